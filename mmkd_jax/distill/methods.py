"""Distillation methods: pure losses between a student tensor and a teacher tensor.

Every method has the signature `method(student, teacher, mask, **hyperparameters)`:
`student` and `teacher` are float arrays of one shape (..., F) (last axis = features),
`mask` broadcasts to their leading dims and weights each row (1 = real, 0 = padding),
and the result is a float32 scalar. A method that needs the task labels declares a
`labels` argument and receives them. Where the feature axis itself is padded (the attention
level's affinities run over token positions), padded features arrive as zeros on both sides,
and a method that declares a `feature_mask` argument (bool, the inputs' shape) also gets the
mask. Hyperparameters are the other keyword arguments; their defaults are the signature's and
`config.distill.hparams.<method>.<name>` (or a term's own `name=value`) overrides them.

To add a method, decorate one function, here or in your own module (config.plugins):

  @METHODS.register('name', levels=('hidden', 'attention'), task='any', width_agnostic=False,
                    positive=('temperature',))

`levels`: the levels it fits (None: every level); `task`: 'classification' where it needs class
probabilities, else 'any'; `width_agnostic`: student and teacher widths may differ;
`positive`: the hyperparameters that must be > 0. docs/new_method.md walks through it.
"""
import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mmkd_jax.errors import ConfigError
from mmkd_jax.registry import Registry

Array = Any
# A method's arguments that are inputs, not hyperparameters.
INPUTS = ('student', 'teacher', 'mask', 'labels', 'feature_mask')
TASKS = ('any', 'classification')
# Types a hyperparameter's default may have: what a config field and a command-line flag hold.
HPARAM_TYPES = (bool, int, float, str)


@dataclasses.dataclass(frozen=True)
class MethodInfo:
  """What a method's registration says about it."""
  levels: tuple[str, ...] | None  # the levels it fits; None: every level
  task: str  # one of TASKS
  width_agnostic: bool  # student and teacher widths may differ
  positive: tuple[str, ...]  # hyperparameters that must be > 0
  hparams: tuple[tuple[str, Any], ...]  # (name, default) in signature order
  takes_labels: bool
  takes_feature_mask: bool

  @property
  def defaults(self) -> dict[str, Any]:
    return dict(self.hparams)


def describe_method(name: str, function: Callable[..., Array], *, levels: tuple[str, ...] | None = None,
                    task: str = 'any', width_agnostic: bool = False, positive: tuple[str, ...] = ()) -> MethodInfo:
  """Checks a method's signature and registration keywords (see the module docstring)."""
  where = (f'distillation method {name!r} ({getattr(function, "__module__", "?")}.'
           f'{getattr(function, "__qualname__", function)})')
  parameters = inspect.signature(function).parameters
  if list(parameters)[:3] != ['student', 'teacher', 'mask']:
    raise ConfigError(f'{where}: its first arguments must be (student, teacher, mask); got ({", ".join(parameters)})')
  hparams = []
  for p in list(parameters.values())[3:]:
    if p.name in INPUTS:
      continue
    if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or not isinstance(p.default, HPARAM_TYPES):
      raise ConfigError(f'{where}: hyperparameter {p.name!r} needs a default value of type bool, int, float or str '
                        '(the config holds it)')
    hparams.append((p.name, p.default))
  if task not in TASKS:
    raise ConfigError(f'{where}: task={task!r} is unknown; valid choices: {", ".join(TASKS)}')
  if isinstance(levels, str) or not (levels is None or all(isinstance(level, str) for level in levels)):
    raise ConfigError(f'{where}: levels={levels!r} must be a tuple of level names or None (every level)')
  numeric = [n for n, v in hparams if isinstance(v, (int, float)) and not isinstance(v, bool)]
  for key in positive:
    if key not in numeric:
      raise ConfigError(f'{where}: positive={tuple(positive)!r} names {key!r}, which is not one of its numeric '
                        f'hyperparameters; valid choices: {", ".join(numeric) or "none"}')
  return MethodInfo(None if levels is None else tuple(levels), task, bool(width_agnostic), tuple(positive),
                    tuple(hparams), 'labels' in parameters, 'feature_mask' in parameters)


METHODS: Registry[Callable[..., Array]] = Registry('distillation method', describe_method)


def _row_weights(x: Array, mask: Array | None) -> Array:
  """Float32 weights of shape x.shape[:-1] from a broadcastable mask (all ones if None)."""
  if mask is None:
    return jnp.ones(x.shape[:-1], jnp.float32)
  return jnp.broadcast_to(mask, x.shape[:-1]).astype(jnp.float32)


def _norm(x: Array, keepdims: bool = False) -> Array:
  """L2 norm over the last axis with a finite gradient at zero (jnp.linalg.norm's is NaN)."""
  return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=keepdims), 1e-16))


def _weighted_mean(values: Array, weights: Array) -> Array:
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-6)


def _flatten_examples(x: Array, mask: Array | None) -> tuple[Array, Array]:
  """(B, ...) rows with padding zeroed -> (B, D) vectors and (B,) example weights."""
  weights = _row_weights(x, mask)
  x = x.astype(jnp.float32) * weights[..., None]
  example_weights = jnp.max(weights.reshape(x.shape[0], -1), axis=1)
  return x.reshape(x.shape[0], -1), example_weights


def _feature_mean(values: Array, feature_mask: Array | None) -> Array:
  """Mean over the last axis, over its real entries only where `feature_mask` is given."""
  if feature_mask is None:
    return jnp.mean(values, axis=-1)
  real = feature_mask.astype(jnp.float32)
  return jnp.sum(values * real, axis=-1) / jnp.maximum(jnp.sum(real, axis=-1), 1.0)


@METHODS.register('kl', levels=('logits', 'attention'), task='classification', positive=('temperature',))
def kl(student: Array, teacher: Array, mask: Array | None = None, feature_mask: Array | None = None,
       temperature: float = 4.0) -> Array:
  """Hinton et al. 2015: T^2 * KL(softmax(t/T) || softmax(s/T)) over the last axis (its real
  entries), row mean. Compares distributions: class logits and attention rows."""
  def log_probs(x: Array) -> Array:
    x = x.astype(jnp.float32) / temperature
    return jax.nn.log_softmax(x if feature_mask is None else jnp.where(feature_mask, x, -1e9), axis=-1)
  log_p_t, log_p_s = log_probs(teacher), log_probs(student)
  rows = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return temperature**2 * _weighted_mean(rows, _row_weights(student, mask))


@METHODS.register('mse')
def mse(student: Array, teacher: Array, mask: Array | None = None, feature_mask: Array | None = None) -> Array:
  """Mean squared error, averaged over (real) features and real rows (FitNets when applied to hidden states)."""
  rows = _feature_mean(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)), feature_mask)
  return _weighted_mean(rows, _row_weights(student, mask))


@METHODS.register('l1')
def l1(student: Array, teacher: Array, mask: Array | None = None, feature_mask: Array | None = None) -> Array:
  """Mean absolute error, averaged over (real) features and real rows."""
  rows = _feature_mean(jnp.abs(student.astype(jnp.float32) - teacher.astype(jnp.float32)), feature_mask)
  return _weighted_mean(rows, _row_weights(student, mask))


@METHODS.register('cosine')
def cosine(student: Array, teacher: Array, mask: Array | None = None) -> Array:
  """1 - cosine similarity of each row, averaged over real rows."""
  s = student.astype(jnp.float32)
  t = teacher.astype(jnp.float32)
  similarity = jnp.sum(s * t, axis=-1) / (_norm(s) * _norm(t))
  return _weighted_mean(1.0 - similarity, _row_weights(student, mask))


@METHODS.register('attention_transfer', levels=('hidden', 'attention'), width_agnostic=True, positive=('p',))
def attention_transfer(student: Array, teacher: Array, mask: Array | None = None, p: float = 2.0) -> Array:
  """Zagoruyko & Komodakis 2017: match L2-normalised spatial energy maps (needs a token axis).

  Each example's map is F(A) = sum over features of |A|^p, one value per row (token), the
  paper's p (default 2, the paper's choice); the loss is the squared L2 distance of the
  L2-normalised maps, averaged over examples. Feature widths of student and teacher may differ.
  """
  def energy(x: Array) -> tuple[Array, Array]:
    weights = _row_weights(x, mask)
    e = jnp.sum(jnp.abs(x.astype(jnp.float32)) ** p, axis=-1) * weights
    e = e.reshape(x.shape[0], -1)
    return e / _norm(e, keepdims=True), weights
  q_s, weights = energy(student)
  q_t, _ = energy(teacher)
  example_weights = jnp.max(weights.reshape(student.shape[0], -1), axis=1)
  return _weighted_mean(jnp.sum(jnp.square(q_s - q_t), axis=-1), example_weights)


def _pairwise_weights(w: Array) -> Array:
  return w[:, None] * w[None, :]


@METHODS.register('relational', width_agnostic=True, positive=('distance_weight', 'angle_weight'))
def relational(student: Array, teacher: Array, mask: Array | None = None, distance_weight: float = 1.0,
               angle_weight: float = 2.0, full_matrix: bool = False) -> Array:
  """Park et al. 2019 (RKD): match distance and angle structure within the batch.

  Distances are normalised by their mean over the R(R-1) off-diagonal pairs of the R real
  examples; both terms use the Huber loss (delta 1), the angle term averaged over all R^3
  triples. The distance term is averaged over the off-diagonal pairs (default) or, with
  `full_matrix`, over the full R x R matrix, zero diagonal included, as the authors' code and
  torchdistill do: (R-1)/R times the default. Examples are flattened to vectors; widths may differ.
  """
  s, w = _flatten_examples(student, mask)
  t, _ = _flatten_examples(teacher, mask)
  off_diagonal = _pairwise_weights(w) * (1.0 - jnp.eye(w.shape[0]))

  def distances(x: Array) -> Array:
    sq = jnp.sum(jnp.square(x[:, None] - x[None, :]), axis=-1)
    d = jnp.sqrt(jnp.maximum(sq, 1e-12)) * (1.0 - jnp.eye(x.shape[0]))
    return d / jnp.maximum(_weighted_mean(d, off_diagonal), 1e-8)

  averaged_over = _pairwise_weights(w) if full_matrix else off_diagonal
  distance_loss = _weighted_mean(optax.huber_loss(distances(s), distances(t)), averaged_over)

  def angles(x: Array) -> Array:
    diff = x[:, None] - x[None, :]  # diff[i, j] = x_i - x_j
    unit = diff / _norm(diff, keepdims=True)
    return jnp.einsum('ijd,kjd->ijk', unit, unit)  # cosine of the angle at j between i and k

  triple_w = w[:, None, None] * w[None, :, None] * w[None, None, :]
  angle_loss = _weighted_mean(optax.huber_loss(angles(s), angles(t)), triple_w)
  return distance_weight * distance_loss + angle_weight * angle_loss


@METHODS.register('contrastive', positive=('temperature',))
def contrastive(student: Array, teacher: Array, mask: Array | None = None, temperature: float = 0.1,
                symmetric: bool = False) -> Array:
  """InfoNCE (van den Oord et al. 2018; as in CRD, Tian et al. 2020) within the batch.

  Each L2-normalised student vector must pick its own teacher vector among the batch's
  teacher vectors (student -> teacher); padding examples are neither queries nor candidates.
  With `symmetric`, the mean of that and teacher -> student (each teacher vector picks its own
  student vector), the two-way form of CLIP-style objectives. Widths must match (the
  hidden/pooled levels add a learned projection when they do not).
  """
  s, w = _flatten_examples(student, mask)
  t, _ = _flatten_examples(teacher, mask)
  s = s / _norm(s, keepdims=True)
  t = t / _norm(t, keepdims=True)
  real = (w[None, :] > 0) & (w[:, None] > 0)
  logits = jnp.where(real, s @ t.T / temperature, -1e9)  # [i, j]: student i, teacher j
  rows = -jnp.diagonal(jax.nn.log_softmax(logits, axis=1))
  if symmetric:
    rows = 0.5 * (rows - jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
  return _weighted_mean(rows, w)


@METHODS.register('dkd', levels=('logits',), task='classification', positive=('temperature', 'alpha', 'beta'))
def dkd(student: Array, teacher: Array, mask: Array | None = None, labels: Array | None = None,
        temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0) -> Array:
  """Zhao et al. 2022, Decoupled KD: alpha * TCKD + beta * NCKD, each scaled by T^2.

  TCKD is the KL of the binary (target, non-target) probabilities; NCKD the KL of the
  distributions over the non-target classes only. Both are computed from log-probabilities
  (log p_target = z_y - logsumexp(z), log(1 - p_target) = logsumexp(z over non-targets) -
  logsumexp(z)), so they stay exact where a probability underflows (logit gaps of ~50 at
  T = 1). Needs integer class labels (B,).
  """
  if labels is None:
    raise ValueError('dkd needs integer class labels')
  s = student.astype(jnp.float32) / temperature
  t = teacher.astype(jnp.float32) / temperature
  target = jax.nn.one_hot(labels, s.shape[-1], dtype=jnp.bool_)

  def log_parts(z: Array) -> tuple[Array, Array]:
    """(log of the binary (target, non-target) probabilities, log-softmax over the non-targets)."""
    all_classes = jax.nn.logsumexp(z, axis=-1)
    non_target = jax.nn.logsumexp(jnp.where(target, -jnp.inf, z), axis=-1)
    log_target = jnp.sum(jnp.where(target, z, 0.0), axis=-1) - all_classes
    # 0 at the target entry (unused): z_y - logsumexp(non-targets) there can overflow exp().
    return jnp.stack([log_target, non_target - all_classes], -1), jnp.where(target, 0.0, z - non_target[..., None])

  log_b_s, log_q_s = log_parts(s)
  log_b_t, log_q_t = log_parts(t)
  tckd = jnp.sum(jnp.exp(log_b_t) * (log_b_t - log_b_s), axis=-1)
  nckd = jnp.sum(jnp.exp(log_q_t) * (log_q_t - log_q_s), axis=-1)
  rows = alpha * tckd + beta * nckd
  return temperature**2 * _weighted_mean(rows, _row_weights(student, mask))
