"""Transformer building blocks shared by the teacher and the student.

Pre-LayerNorm blocks whose attention also returns its probabilities, so that the
attention maps can be distilled. Padding masks apply to keys in attention and to
tokens in pooling; softmax and LayerNorm statistics run in float32 whatever the
compute dtype.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Array = Any
Dtype = Any


class MultiHeadAttention(nn.Module):
  """Multi-head attention of `queries` over `keys_values` that also returns the probabilities.

  Self-attention (keys_values is None) uses one fused QKV projection; cross-attention
  fuses the K and V projections of the other sequence.
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries: Array, keys_values: Array | None, key_mask: Array) -> tuple[Array, Array]:
    batch, q_len, width = queries.shape
    if width % self.num_heads:
      raise ValueError(f'model width {width} is not divisible by num_heads={self.num_heads}')
    head_dim = width // self.num_heads
    dense = lambda features, name: nn.DenseGeneral(features, dtype=self.dtype, name=name)
    if keys_values is None:
      q, k, v = jnp.split(dense((3, self.num_heads, head_dim), 'qkv')(queries), 3, axis=2)
      q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    else:
      q = dense((self.num_heads, head_dim), 'q')(queries)
      k, v = jnp.split(dense((2, self.num_heads, head_dim), 'kv')(keys_values), 2, axis=2)
      k, v = k[:, :, 0], v[:, :, 0]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / jnp.sqrt(head_dim).astype(jnp.float32)
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = nn.softmax(logits, axis=-1)
    context = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), v)
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name='out')(context)
    return out, probs


class Block(nn.Module):
  """Pre-LayerNorm transformer block: (cross- or self-) attention then a ReLU MLP."""
  num_heads: int
  mlp_ratio: int = 4
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, key_mask: Array, context: Array | None = None, *,
               train: bool = False) -> tuple[Array, Array]:
    width = x.shape[-1]
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, name=name)
    queries = norm('norm_q')(x)
    keys_values = None if context is None else norm('norm_kv')(context)
    attended, probs = MultiHeadAttention(self.num_heads, self.dtype, name='attention')(
        queries, keys_values, key_mask)
    x = x + nn.Dropout(self.dropout_rate)(attended, deterministic=not train)
    y = nn.Dense(self.mlp_ratio * width, dtype=self.dtype, name='mlp_in')(norm('norm_mlp')(x))
    y = nn.Dense(width, dtype=self.dtype, name='mlp_out')(nn.relu(y))
    return x + nn.Dropout(self.dropout_rate)(y, deterministic=not train), probs


class Embed(nn.Module):
  """Projects (B, L, F) features to the model width and adds a learned position embedding."""
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    position = self.param('position', nn.initializers.normal(0.02), (x.shape[1], self.width))
    return nn.Dense(self.width, dtype=self.dtype, name='project')(x) + position.astype(self.dtype)


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

  @nn.compact
  def __call__(self, pooled: Array) -> Array:
    y = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name='hidden')(pooled))
    return nn.Dense(self.num_outputs, dtype=jnp.float32, name='out')(y)
