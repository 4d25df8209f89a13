"""Transformer building blocks shared by the teacher and the student.

Pre-LayerNorm blocks whose attention also returns its probabilities, so that the
attention maps can be distilled. Padding masks apply to keys in attention and to
tokens in pooling; softmax and LayerNorm statistics run in float32 whatever the
compute dtype.

`Dense`, `softmax` and `LayerNorm` are drop-in replacements for Flax's that XLA's CPU
backend runs faster: a Dense on (B, L, F) tokens is one (B*L, F) matmul, so its weight
gradient is a plain 2-D matmul too, and the softmax and LayerNorm derivatives are closed
forms (custom JVPs, so forward and reverse mode both work) instead of the derivatives of
their forward ops (benchmarks/README.md has the measurements). The modules' `kernels`
field ('auto', 'cpu' or 'flax'; config.train.kernels) picks them or Flax's `DenseGeneral`,
`LayerNorm` and `jax.nn.softmax`; 'auto' takes the CPU kernels on the CPU backend only.
Both choices have the same parameter tree, so a checkpoint of one loads into the other.
"""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = Any
Dtype = Any

KERNELS = ('auto', 'cpu', 'flax')


def use_cpu_kernels(kernels: str) -> bool:
  """Whether `kernels` ('auto', 'cpu' or 'flax') selects this module's CPU kernels: 'auto' does
  on the CPU backend, where they were measured faster; GPUs and TPUs get Flax's layers."""
  if kernels not in KERNELS:
    raise ValueError(f'kernels={kernels!r} is unknown; valid choices: {", ".join(KERNELS)}')
  return kernels == 'cpu' or (kernels == 'auto' and jax.default_backend() == 'cpu')


@jax.custom_jvp
def softmax(x: Array) -> Array:
  """Softmax over the last axis whose derivative is y * (dx - sum(y * dx)), not that of exp / sum."""
  return jax.nn.softmax(x, axis=-1)


@softmax.defjvp
def _softmax_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
  (x,), (dx,) = primals, tangents
  y = softmax(x)
  return y, y * (dx - jnp.sum(y * dx, axis=-1, keepdims=True))


LAYER_NORM_EPSILON = 1e-6  # flax.linen.LayerNorm's default


@jax.custom_jvp
def _layer_norm(x: Array, scale: Array, bias: Array) -> Array:
  """float32 LayerNorm over the last axis, computed as flax.linen.LayerNorm computes it."""
  mean, inv_std = _layer_norm_statistics(x)
  return (x - mean) * (inv_std * scale) + bias


def _layer_norm_statistics(x: Array) -> tuple[Array, Array]:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean)
  return mean, jax.lax.rsqrt(var + LAYER_NORM_EPSILON)


@_layer_norm.defjvp
def _layer_norm_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
  # d x_hat = inv_std * (dx - mean(dx) - x_hat * mean(dx * x_hat)): a symmetric map, so its
  # transpose (reverse mode) is the same closed form applied to the cotangent g * scale.
  (x, scale, bias), (dx, dscale, dbias) = primals, tangents
  mean, inv_std = _layer_norm_statistics(x)
  x_hat = (x - mean) * inv_std
  dx_hat = inv_std * (dx - jnp.mean(dx, axis=-1, keepdims=True)
                      - x_hat * jnp.mean(dx * x_hat, axis=-1, keepdims=True))
  return (x - mean) * (inv_std * scale) + bias, dx_hat * scale + x_hat * dscale + dbias


# Reverse mode would otherwise store x_hat for the backward pass; recomputing it from x, as a
# hand-written VJP does, keeps the train step's FLOPs and memory traffic at the custom_vjp's
# (storing it measured 4-7% slower on CPU, benchmarks/README.md). No effect on forward mode.
_rematerialized_layer_norm = jax.checkpoint(_layer_norm)


class LayerNorm(nn.Module):
  """flax.linen.LayerNorm (last axis, float32 statistics, same parameters and forward values)
  whose derivative is the closed form inv_std * (dx - mean(dx) - x_hat * mean(dx * x_hat)),
  rather than the derivative of its mean / variance / rsqrt ops; forward and reverse mode."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, features)
    bias = self.param('bias', nn.initializers.zeros, features)
    return _rematerialized_layer_norm(x.astype(jnp.float32), scale, bias).astype(self.dtype)


class Dense(nn.Module):
  """Affine map of the trailing `axis` dims of x to `features`, computed as one 2-D matmul.

  Parameters ('kernel' of shape in_dims + features, 'bias' of shape features) and their
  initialisation match flax.linen.DenseGeneral, so checkpoints and seeds carry over.
  """
  features: int | tuple[int, ...]
  axis: int | tuple[int, ...] = -1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    num_in = len(axes)
    if sorted(a % x.ndim for a in axes) != list(range(x.ndim - num_in, x.ndim)):
      raise ValueError(f'Dense maps trailing dims only; got axis={self.axis} for an input of rank {x.ndim}')
    in_dims, lead = x.shape[x.ndim - num_in:], x.shape[:x.ndim - num_in]
    fan_in, fan_out = math.prod(in_dims), math.prod(features)
    kernel = self.param('kernel', lambda key, shape: nn.initializers.lecun_normal()(
        key, (fan_in, fan_out)).reshape(shape), in_dims + features)
    bias = self.param('bias', nn.initializers.zeros, features)
    y = x.reshape(-1, fan_in).astype(self.dtype) @ kernel.reshape(fan_in, fan_out).astype(self.dtype)
    return (y + bias.reshape(fan_out).astype(self.dtype)).reshape(lead + features)


def dense(features: int | tuple[int, ...], *, kernels: str, dtype: Dtype, name: str,
          axis: int | tuple[int, ...] = -1) -> nn.Module:
  """`Dense` with the CPU kernels, else flax.linen.DenseGeneral (same parameters)."""
  if use_cpu_kernels(kernels):
    return Dense(features, axis=axis, dtype=dtype, name=name)
  return nn.DenseGeneral(features, axis=axis, dtype=dtype, name=name)


def layer_norm(*, kernels: str, dtype: Dtype, name: str) -> nn.Module:
  """`LayerNorm` with the CPU kernels, else flax.linen.LayerNorm (same parameters)."""
  if use_cpu_kernels(kernels):
    return LayerNorm(dtype, name=name)
  return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


class MultiHeadAttention(nn.Module):
  """Multi-head attention of `queries` over `keys_values` that also returns the probabilities.

  Self-attention (keys_values is None) uses one fused QKV projection; cross-attention
  fuses the K and V projections of the other sequence.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, queries: Array, keys_values: Array | None, key_mask: Array) -> tuple[Array, Array]:
    batch, q_len, width = queries.shape
    if width % self.num_heads:
      raise ValueError(f'model width {width} is not divisible by num_heads={self.num_heads}')
    head_dim = width // self.num_heads
    project = lambda features, name, axis=-1: dense(features, kernels=self.kernels, dtype=self.dtype, name=name,
                                                    axis=axis)
    if keys_values is None:
      q, k, v = jnp.split(project((3, self.num_heads, head_dim), 'qkv')(queries), 3, axis=2)
      q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    else:
      q = project((self.num_heads, head_dim), 'q')(queries)
      k, v = jnp.split(project((2, self.num_heads, head_dim), 'kv')(keys_values), 2, axis=2)
      k, v = k[:, :, 0], v[:, :, 0]
    # float32 logits whatever the compute dtype (bfloat16 q . k would round them before the softmax).
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(head_dim).astype(jnp.float32)
    keys = key_mask[:, None, None, :]
    normalize = softmax if use_cpu_kernels(self.kernels) else functools.partial(jax.nn.softmax, axis=-1)
    probs = normalize(jnp.where(keys, logits, jnp.finfo(jnp.float32).min))
    # A query with no real key at all (a missing modality) would spread its softmax evenly over the
    # padding: zero values make its context zero, and the returned probabilities are 0 on masked
    # keys. (Masking v, not probs, costs less in the train step, where the probabilities are unused.)
    v = jnp.where(key_mask[:, :, None, None], v, 0.0)
    context = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), v)
    out = project(width, 'out', axis=(-2, -1))(context)
    return out, jnp.where(keys, probs, 0.0)


class Dropout(nn.Module):
  """Inverted dropout whose mask for an example depends only on the 'dropout' rng and that
  example's index in the global batch, so data-parallel shards draw exactly the masks one
  device would draw for the whole batch, whatever the device count. This holds for JAX's
  default threefry keys; 'rbg' keys draw other bits under vmap for other batch sizes."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, example_index: Array | None, *, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    key = self.make_rng('dropout')
    index = jnp.arange(x.shape[0]) if example_index is None else example_index
    keep = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - self.rate, x.shape[1:]))(index)
    return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


class Block(nn.Module):
  """Pre-LayerNorm transformer block: (cross- or self-) attention then a ReLU MLP."""
  num_heads: int
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x: Array, key_mask: Array, context: Array | None = None, *,
               train: bool = False, example_index: Array | None = None) -> tuple[Array, Array]:
    width = x.shape[-1]
    norm = lambda name: layer_norm(kernels=self.kernels, dtype=self.dtype, name=name)
    queries = norm('norm_q')(x)
    keys_values = None if context is None else norm('norm_kv')(context)
    attended, probs = MultiHeadAttention(self.num_heads, self.dtype, self.kernels, name='attention')(
        queries, keys_values, key_mask)
    dropout = lambda y: Dropout(self.dropout_rate)(y, example_index, deterministic=not train)
    x = x + dropout(attended)
    y = dense(self.mlp_ratio * width, kernels=self.kernels, dtype=self.dtype, name='mlp_in')(norm('norm_mlp')(x))
    y = dense(width, kernels=self.kernels, dtype=self.dtype, name='mlp_out')(nn.relu(y))
    return x + dropout(y), probs


def position_init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
  """normal(0.02) that draws the same bits under jit as eagerly.

  Under jit XLA would fold the 0.02 into the draw's own sqrt(2) and round differently; the
  barrier keeps the two multiplications apart, so jitted initialisation (which compiles one
  program instead of one per op and shape) reproduces eager `nn.initializers.normal(0.02)`.
  """
  return jax.lax.optimization_barrier(jax.random.normal(key, shape, dtype)) * jnp.asarray(0.02, dtype)


class Embed(nn.Module):
  """Projects (B, L, F) features to the model width and adds a learned position embedding."""
  width: int
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    position = self.param('position', position_init, (x.shape[1], self.width))
    projected = dense(self.width, kernels=self.kernels, dtype=self.dtype, name='project')(x)
    return projected + position.astype(self.dtype)


def masked_mean(x: Array, mask: Array) -> Array:
  """Mean over the token axis of (B, L, D) `x`, counting only tokens where `mask` (B, L) is True."""
  weights = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(x.astype(jnp.float32) * weights, axis=1)
  return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class Head(nn.Module):
  """Two-layer ReLU MLP from the pooled representation to the task outputs."""
  hidden: int
  num_outputs: int
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, pooled: Array) -> Array:
    y = nn.relu(dense(self.hidden, kernels=self.kernels, dtype=self.dtype, name='hidden')(pooled))
    return dense(self.num_outputs, kernels=self.kernels, dtype=jnp.float32, name='out')(y)
