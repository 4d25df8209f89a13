"""A tiny name -> object registry, filled by a decorator next to each entry.

Distillation methods, levels, datasets and models are looked up by name; an unknown
name raises a one-line `ConfigError` that lists the known ones, so a bad config fails
at parse time, before anything compiles.
"""
from typing import Callable, Generic, Iterator, TypeVar

from mmkd_jax.errors import ConfigError

T = TypeVar('T')


class Registry(Generic[T]):
  """Maps names to objects of one kind (e.g. 'method' -> loss functions)."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator that registers its argument under `name`; duplicates are an error."""
    def decorator(obj: T) -> T:
      if name in self._entries:
        raise ValueError(f'{self.kind} {name!r} is registered twice')
      self._entries[name] = obj
      return obj
    return decorator

  def get(self, name: str) -> T:
    """Returns the entry called `name` or fails naming the valid choices."""
    if name not in self._entries:
      raise ConfigError(f'unknown {self.kind} {name!r}; valid choices: {", ".join(sorted(self._entries))}')
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())
