"""The generic checks every distillation method must pass, for built-in and plug-in methods alike.

A method gets them without writing test code, from the shell:

  python -m mmkd_jax.testing --plugins=my_losses.py --methods=my_loss

or from Python / a pytest file (a failing check raises an AssertionError naming it):

  from mmkd_jax import testing
  testing.check_method('my_loss')                       # a registered method, default hyperparameters
  testing.check_method('my_loss', {'scale': 2.0})       # other hyperparameters
  testing.check_method(my_function, levels=('hidden',))  # an unregistered function, with its registration

`CHECKS` maps each check's name to `check(method, hparams)`; tests/test_methods.py runs every
one of them on every registered method. The inputs are small random float32 arrays with
padding (padded tokens, a fully padded example): (B, L, F) rows, or (B, C) logits with labels
for a method that takes labels or fits none of the token levels (hidden, attention).
"""
import dataclasses
import functools
from typing import Any, Callable, Mapping

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from mmkd_jax import plugins
from mmkd_jax.distill import METHODS, LevelContext, MethodInfo, Term, collect_pairs, pair_loss
from mmkd_jax.distill.methods import describe_method
from mmkd_jax.errors import ConfigError

Array = Any
B, L, F, C = 5, 3, 4, 6
# Tiny inputs: XLA's backend optimisations cost more compile time than they save.
FAST = {'xla_backend_optimization_level': 0}
TOKEN_LEVELS = ('hidden', 'attention')


@dataclasses.dataclass(frozen=True)
class Subject:
  """A method under test: its name, function, registration info and hyperparameters (hashable: jit caches)."""
  name: str
  function: Callable[..., Array]
  info: MethodInfo
  hparams: tuple[tuple[str, Any], ...]  # every hyperparameter, (name, value) sorted

  def __call__(self, student: Array, teacher: Array, mask: Array | None, labels: Array | None) -> Array:
    extra = {'labels': labels} if self.info.takes_labels else {}
    return self.function(student, teacher, mask, **extra, **dict(self.hparams))

  def fits(self, level: str) -> bool:
    return self.info.levels is None or level in self.info.levels

  @property
  def on_logits(self) -> bool:
    """Whether the inputs are (B, C) logits with an example mask rather than (B, L, F) tokens."""
    return self.info.takes_labels or not any(self.fits(level) for level in TOKEN_LEVELS)


def _subject(method: str | Callable[..., Array], hparams: Mapping[str, Any] | None,
             registration: Mapping[str, Any]) -> Subject:
  if isinstance(method, str):
    if registration:
      raise TypeError('registration keywords are for an unregistered function; a registered method has its own')
    name, function, info = method, METHODS.get(method), METHODS.info(method)
  else:
    name, function = getattr(method, '__name__', 'method'), method
    info = describe_method(name, function, **registration)
  unknown = sorted(set(hparams or {}) - set(info.defaults))
  if unknown:
    raise ConfigError(f'method {name!r}: unknown hyperparameters {", ".join(unknown)}; valid choices: '
                      f'{", ".join(info.defaults) or "none"}')
  return Subject(name, function, info, tuple(sorted({**info.defaults, **(hparams or {})}.items())))


def inputs(subject: Subject, seed: int = 0) -> tuple[Array, Array, Array, Array]:
  """(student, teacher, mask, labels): float32 with padding; (B + 1, C) logits for label methods."""
  rng = np.random.default_rng(seed)
  if subject.on_logits:
    mask = np.ones(B + 1)
    mask[[1, 4]] = 0
    shape = (B + 1, C)
  else:  # padded tokens, one fully padded example (3) and full examples
    mask = np.ones((B, L))
    mask[0, 2] = 0
    mask[2, 1:] = 0
    mask[3] = 0
    shape = (B, L, F)
  labels = jnp.asarray(rng.integers(0, C if subject.on_logits else F, shape[0]))
  s = jnp.asarray(rng.normal(size=shape), jnp.float32)
  t = jnp.asarray(rng.normal(size=shape), jnp.float32)
  return s, t, jnp.asarray(mask, jnp.float32), labels


@functools.lru_cache(maxsize=None)
def _jitted(subject: Subject) -> Callable:
  return jax.jit(subject.__call__, compiler_options=FAST)


@functools.lru_cache(maxsize=None)
def _student_grad(subject: Subject) -> Callable:
  return jax.jit(jax.grad(subject.__call__), compiler_options=FAST)


def _padding(mask: Array) -> np.ndarray:
  return np.asarray(mask) == 0


CHECKS: dict[str, Callable[[Subject], None]] = {}


def _check(function: Callable[[Subject], None]) -> Callable[[Subject], None]:
  CHECKS[function.__name__] = function
  return function


@_check
def jit_float32_scalar(subject: Subject) -> None:
  """Under jit, the loss is a finite float32 scalar for float32 and bfloat16 inputs."""
  s, t, mask, labels = inputs(subject)
  for dtype in (jnp.float32, jnp.bfloat16):
    loss = _jitted(subject)(s.astype(dtype), t.astype(dtype), mask, labels)
    assert loss.shape == () and loss.dtype == jnp.float32, f'{dtype.__name__} inputs: got {loss.dtype}{loss.shape}'
    assert np.isfinite(float(loss)), f'{dtype.__name__} inputs: loss {float(loss)}'


@_check
def mask_none_is_all_ones(subject: Subject) -> None:
  """mask=None weighs every row, as an all-ones mask does."""
  s, t, mask, labels = inputs(subject)
  none, ones = float(_jitted(subject)(s, t, None, labels)), float(_jitted(subject)(s, t, jnp.ones_like(mask), labels))
  np.testing.assert_allclose(none, ones, rtol=1e-6)


@_check
def student_equals_teacher(subject: Subject) -> None:
  """The loss at student == teacher is finite and no larger than against other teachers."""
  s, t, mask, labels = inputs(subject)
  method = _jitted(subject)
  at_match = float(method(s, s, mask, labels))
  assert np.isfinite(at_match), f'loss {at_match} at student == teacher'
  for what, other in (('a random teacher', t), ('the teacher rows shuffled', jnp.roll(s, 1, axis=0))):
    loss = float(method(s, other, mask, labels))
    assert at_match <= loss + 1e-6 * max(1.0, abs(loss)), f'{at_match} at student == teacher > {loss} with {what}'


@_check
def gradient_finite_and_nonzero(subject: Subject) -> None:
  """Without padding, d loss / d student is finite and non-zero when student != teacher."""
  s, t, mask, labels = inputs(subject)
  grad = np.asarray(_student_grad(subject)(s, t, jnp.ones_like(mask), labels))
  assert np.all(np.isfinite(grad)), 'non-finite gradient'
  assert np.any(np.abs(grad) > 1e-6), 'zero gradient'


@_check
def gradient_zero_on_padding(subject: Subject) -> None:
  """With padding (a fully padded example included), the gradient is finite, exactly zero on padded rows."""
  s, t, mask, labels = inputs(subject)
  grad = np.asarray(_student_grad(subject)(s, t, mask, labels))
  padding = _padding(mask)
  assert np.all(np.isfinite(grad[~padding])), 'non-finite gradient on real rows'
  assert np.any(np.abs(grad[~padding]) > 1e-6), 'zero gradient on real rows'
  assert np.all(grad[padding] == 0), f'gradient on padded rows, up to {np.abs(grad[padding]).max()}'


@_check
def padded_rows_ignored(subject: Subject) -> None:
  """Rewriting student and teacher values on padded rows leaves the loss unchanged."""
  s, t, mask, labels = inputs(subject)
  rng = np.random.default_rng(7)
  padding = _padding(mask)[..., None]
  noisy_s = jnp.where(padding, 50 * rng.normal(size=s.shape), s).astype(jnp.float32)
  noisy_t = jnp.where(padding, 50 * rng.normal(size=t.shape), t).astype(jnp.float32)
  method = _jitted(subject)
  np.testing.assert_allclose(float(method(noisy_s, noisy_t, mask, labels)), float(method(s, t, mask, labels)),
                             rtol=1e-6, err_msg='the values of padded rows change the loss')


def _probabilities(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  e = np.exp(rng.normal(size=shape))
  return e / e.sum(-1, keepdims=True)


@functools.lru_cache(maxsize=None)
def _attention_loss(subject: Subject) -> Callable:
  """jit: the method's loss at the attention level between attention maps (student, teacher) of one layer."""
  def loss(student: Array, teacher: Array, token_mask: Array, labels: Array) -> Array:
    context = LevelContext('a', token_mask, jnp.ones(student.shape[0]), ((0, 0),))
    pairs = collect_pairs((Term('attention', subject.name, 1.0),), {'attn': {'a': (student,)}},
                          {'attn': {'a': (teacher,)}}, context)
    kwargs = {**dict(subject.hparams), **({'labels': labels} if subject.info.takes_labels else {})}
    return pair_loss(subject.function, subject.info, pairs['attention']['attention_0_0'], kwargs)
  return jax.jit(loss, compiler_options=FAST)


@_check
def attention_padding_independent(subject: Subject) -> None:
  """At the attention level (where it fits), the same real tokens followed by 0 or 5 padded tokens
  (keys of probability 0, arbitrary query rows) give the same loss."""
  if not subject.fits('attention'):
    return
  rng = np.random.default_rng(0)
  h, real, keys = 2, 4, 3
  student, teacher = _probabilities(rng, (B, h, real, real)), _probabilities(rng, (B, h, real, keys))
  losses = []
  for pad in (0, 5):
    s = np.zeros((B, h, real + pad, real + pad))
    s[:, :, :real, :real] = student
    s[:, :, real:] = _probabilities(rng, (B, h, pad, real + pad))
    t = np.concatenate([teacher, _probabilities(rng, (B, h, pad, keys))], axis=2)
    token_mask = jnp.asarray(np.arange(real + pad) < real, jnp.float32)[None].repeat(B, 0)
    losses.append(float(_attention_loss(subject)(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                                 token_mask, jnp.zeros(B, jnp.int32))))
  assert losses[0] > 1e-4, f'loss {losses[0]} on different attention maps'
  np.testing.assert_allclose(losses[1], losses[0], rtol=2e-5,
                             err_msg='the loss depends on how much padding follows the real tokens')


def check_method(method: str | Callable[..., Array], hparams: Mapping[str, Any] | None = None,
                 checks: tuple[str, ...] | None = None, **registration: Any) -> tuple[str, ...]:
  """Runs `checks` (default: all of `CHECKS`) on `method` and returns their names.

  Args:
    method: a registered method's name, or a function with the method signature.
    hparams: hyperparameters over the method's defaults.
    checks: names of `CHECKS` to run.
    **registration: for a function, what its `METHODS.register` would say (levels, task, ...).

  Raises:
    AssertionError: naming the method and the first check it fails.
  """
  subject = _subject(method, hparams, registration)
  names = tuple(CHECKS) if checks is None else tuple(checks)
  for name in names:
    try:
      CHECKS[name](subject)
    except AssertionError as error:
      raise AssertionError(f'method {subject.name!r} fails check {name!r} ({CHECKS[name].__doc__.split(chr(10))[0]}):'
                           f' {" ".join(str(error).split())}') from None
  return names


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  before = set(METHODS.names())
  plugins.load(flags.FLAGS.plugins)
  names = [m.strip() for m in flags.FLAGS.methods.split(',') if m.strip()] or sorted(set(METHODS.names()) - before)
  if not names:
    raise app.UsageError('no method to check: give --methods, or --plugins that register some')
  for name in names:
    METHODS.get(name)  # an unknown name: one line naming the valid ones
    try:
      passed = check_method(name)
    except AssertionError as error:
      print(error)
      raise SystemExit(1) from None
    print(f'{name}: {len(passed)} checks passed ({", ".join(passed)})')


if __name__ == '__main__':
  from mmkd_jax import cli  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('plugins', '', 'Modules or .py files that register methods (as config.plugins).')
  flags.DEFINE_string('methods', '', "Methods to check (comma-separated); '' = those the plugins register.")
  cli.run(main)
