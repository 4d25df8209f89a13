"""A tiny name -> object registry, filled by a decorator next to each entry.

Distillation methods, levels, datasets and models are looked up by name; an unknown
name raises a one-line `ConfigError` that lists the known ones, so a bad config fails
at parse time, before anything compiles. A registry may take keyword arguments at
registration (`@METHODS.register('kl', levels=(...))`): its `describe` function checks
them against the entry and turns them into the entry's `info`, so everything about an
entry is said once, next to it, also in a user's own module (mmkd_jax/plugins.py).
"""
from typing import Any, Callable, Generic, Iterator, TypeVar

from mmkd_jax.errors import ConfigError

T = TypeVar('T')


def _origin(obj: Any) -> str:
  return getattr(obj, '__module__', None) or type(obj).__module__


class Registry(Generic[T]):
  """Maps names to objects of one kind (e.g. 'method' -> loss functions), each with its `info`."""

  def __init__(self, kind: str, describe: Callable[..., Any] | None = None):
    """`describe(name, obj, **keywords)` returns the info of an entry registered with `keywords`
    (raising `ConfigError` on a bad one); without it, registration takes no keywords."""
    self.kind = kind
    self._describe = describe
    self._entries: dict[str, T] = {}
    self._info: dict[str, Any] = {}

  def register(self, name: str, **keywords: Any) -> Callable[[T], T]:
    """Decorator that registers its argument under `name`; duplicates are an error."""
    if keywords and self._describe is None:
      raise TypeError(f'{self.kind} registration takes no keywords; got {", ".join(keywords)}')

    def decorator(obj: T) -> T:
      if name in self._entries:
        raise ConfigError(f'{self.kind} {name!r} is registered twice: by {_origin(self._entries[name])} and by '
                          f'{_origin(obj)}; rename one of them')
      info = self._describe(name, obj, **keywords) if self._describe else None
      self._entries[name] = obj
      self._info[name] = info
      return obj
    return decorator

  def get(self, name: str) -> T:
    """Returns the entry called `name` or fails naming the valid choices."""
    if name not in self._entries:
      raise ConfigError(f'unknown {self.kind} {name!r}; valid choices: {", ".join(sorted(self._entries))}')
    return self._entries[name]

  def info(self, name: str) -> Any:
    """What the entry called `name` was registered with (see `describe`)."""
    self.get(name)
    return self._info[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())
