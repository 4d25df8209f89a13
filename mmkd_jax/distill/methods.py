"""Distillation methods: pure losses between a student tensor and a teacher tensor.

Every method has the signature `method(student, teacher, mask, **hyperparameters)`:
`student` and `teacher` are float arrays of one shape (..., F) (last axis = features),
`mask` broadcasts to their leading dims and weights each row (1 = real, 0 = padding),
and the result is a float32 scalar. A method that needs the task labels declares a
`labels` argument and receives them. Where the feature axis itself is padded (the attention
level's affinities run over token positions), padded features arrive as zeros on both sides,
and a method that declares a `feature_mask` argument (bool, the inputs' shape) also gets the
mask. Hyperparameters come from `config.distill.hparams.<method name>`.

To add a method, write one function here with `@METHODS.register('name')` and name it in
`config.distill.terms`.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mmkd_jax.registry import Registry

Array = Any
METHODS: Registry[Callable[..., Array]] = Registry('distillation method')
# A method's arguments that are inputs, not hyperparameters.
INPUTS = ('student', 'teacher', 'mask', 'labels', 'feature_mask')


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


@METHODS.register('kl')
def kl(student: Array, teacher: Array, mask: Array | None = None, feature_mask: Array | None = None,
       temperature: float = 4.0) -> Array:
  """Hinton et al. 2015: T^2 * KL(softmax(t/T) || softmax(s/T)) over the last axis (its real
  entries), row mean."""
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


@METHODS.register('attention_transfer')
def attention_transfer(student: Array, teacher: Array, mask: Array | None = None) -> Array:
  """Zagoruyko & Komodakis 2017: match L2-normalised spatial energy maps.

  Each example's map is the squared activation summed over features, one value per
  row (token); the loss is the squared L2 distance of the normalised maps, averaged
  over examples. Feature widths of student and teacher may differ.
  """
  def energy(x: Array) -> tuple[Array, Array]:
    weights = _row_weights(x, mask)
    e = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1) * weights
    e = e.reshape(x.shape[0], -1)
    return e / _norm(e, keepdims=True), weights
  q_s, weights = energy(student)
  q_t, _ = energy(teacher)
  example_weights = jnp.max(weights.reshape(student.shape[0], -1), axis=1)
  return _weighted_mean(jnp.sum(jnp.square(q_s - q_t), axis=-1), example_weights)


def _pairwise_weights(w: Array) -> Array:
  return w[:, None] * w[None, :]


@METHODS.register('relational')
def relational(student: Array, teacher: Array, mask: Array | None = None,
               distance_weight: float = 1.0, angle_weight: float = 2.0) -> Array:
  """Park et al. 2019 (RKD): match distance and angle structure within the batch.

  Distances are normalised by their mean over real pairs; both terms use the Huber loss
  (delta 1). Examples are flattened to vectors; widths may differ.
  """
  s, w = _flatten_examples(student, mask)
  t, _ = _flatten_examples(teacher, mask)
  pair_w = _pairwise_weights(w) * (1.0 - jnp.eye(w.shape[0]))

  def distances(x: Array) -> Array:
    sq = jnp.sum(jnp.square(x[:, None] - x[None, :]), axis=-1)
    d = jnp.sqrt(jnp.maximum(sq, 1e-12)) * (1.0 - jnp.eye(x.shape[0]))
    return d / jnp.maximum(_weighted_mean(d, pair_w), 1e-8)

  distance_loss = _weighted_mean(optax.huber_loss(distances(s), distances(t)), pair_w)

  def angles(x: Array) -> Array:
    diff = x[:, None] - x[None, :]  # diff[i, j] = x_i - x_j
    unit = diff / _norm(diff, keepdims=True)
    return jnp.einsum('ijd,kjd->ijk', unit, unit)  # cosine of the angle at j between i and k

  triple_w = w[:, None, None] * w[None, :, None] * w[None, None, :]
  angle_loss = _weighted_mean(optax.huber_loss(angles(s), angles(t)), triple_w)
  return distance_weight * distance_loss + angle_weight * angle_loss


@METHODS.register('contrastive')
def contrastive(student: Array, teacher: Array, mask: Array | None = None,
                temperature: float = 0.1) -> Array:
  """InfoNCE (van den Oord et al. 2018; as in CRD, Tian et al. 2020) within the batch.

  Each L2-normalised student vector must pick its own teacher vector among the batch's
  teacher vectors; padding examples are neither queries nor candidates. Widths must match
  (the hidden/pooled levels add a learned projection when they do not).
  """
  s, w = _flatten_examples(student, mask)
  t, _ = _flatten_examples(teacher, mask)
  s = s / _norm(s, keepdims=True)
  t = t / _norm(t, keepdims=True)
  logits = s @ t.T / temperature
  logits = jnp.where(w[None, :] > 0, logits, -1e9)
  rows = -jnp.diagonal(jax.nn.log_softmax(logits, axis=-1))
  return _weighted_mean(rows, w)


@METHODS.register('dkd')
def dkd(student: Array, teacher: Array, mask: Array | None = None, labels: Array | None = None,
        temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0) -> Array:
  """Zhao et al. 2022, Decoupled KD: alpha * TCKD + beta * NCKD, each scaled by T^2.

  TCKD is the KL of the binary (target, non-target) probabilities; NCKD the KL of the
  distributions over the non-target classes only. Needs integer class labels (B,).
  """
  if labels is None:
    raise ValueError('dkd needs integer class labels')
  s = student.astype(jnp.float32) / temperature
  t = teacher.astype(jnp.float32) / temperature
  target = jax.nn.one_hot(labels, s.shape[-1], dtype=jnp.bool_)
  p_s, p_t = jax.nn.softmax(s, axis=-1), jax.nn.softmax(t, axis=-1)
  b_s = jnp.stack([jnp.sum(jnp.where(target, p_s, 0.0), -1), jnp.sum(jnp.where(target, 0.0, p_s), -1)], -1)
  b_t = jnp.stack([jnp.sum(jnp.where(target, p_t, 0.0), -1), jnp.sum(jnp.where(target, 0.0, p_t), -1)], -1)
  b_s, b_t = jnp.clip(b_s, 1e-12, 1.0), jnp.clip(b_t, 1e-12, 1.0)
  tckd = jnp.sum(b_t * (jnp.log(b_t) - jnp.log(b_s)), axis=-1)
  masked = lambda x: jnp.where(target, -1e9, x)
  log_q_s = jax.nn.log_softmax(masked(s), axis=-1)
  log_q_t = jax.nn.log_softmax(masked(t), axis=-1)
  nckd = jnp.sum(jnp.where(target, 0.0, jnp.exp(log_q_t) * (log_q_t - log_q_s)), axis=-1)
  rows = alpha * tckd + beta * nckd
  return temperature**2 * _weighted_mean(rows, _row_weights(student, mask))
