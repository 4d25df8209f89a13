"""The unimodal student: a self-attention encoder over one modality."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmkd_jax.models.layers import Block, Head, layer_norm, masked_mean
from mmkd_jax.models.tokens import EMBEDDINGS

Array = Any


class Student(nn.Module):
  """Self-attention transformer over `modality` only, with the teacher's tap structure.

  Returns (logits, taps) with taps = {'logits', 'pooled', 'hidden': {modality: per-layer
  (B, L, W)}, 'attn': {modality: per-layer (B, H, L, L)}}; other modalities in the batch
  are ignored, so at inference only this one is needed. An optional batch['example_index'] (B,)
  keys each example's dropout masks (layers.Dropout).
  """
  modality: str
  num_outputs: int
  width: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_ratio: int = 4
  dropout_rate: float = 0.1
  # How feature chunks become tokens: a name in models/tokens.py's EMBEDDINGS.
  embedding: str = 'shared'
  dtype: Any = jnp.float32
  kernels: str = 'auto'  # layers.use_cpu_kernels: 'auto', 'cpu' or 'flax'; the same parameters either way

  @nn.compact
  def __call__(self, batch: dict[str, Array], *, train: bool = False) -> tuple[Array, dict]:
    mask = batch[f'{self.modality}_mask']
    x = EMBEDDINGS.get(self.embedding)(self.width, self.dtype, self.kernels, name='embed')(batch[self.modality])
    states, maps = [], []
    for layer in range(self.num_layers):
      x, probs = Block(self.num_heads, self.mlp_ratio, self.dropout_rate, self.dtype, self.kernels,
                       name=f'self_{layer}')(x, mask, train=train, example_index=batch.get('example_index'))
      states.append(x)
      maps.append(probs)
    pooled = masked_mean(layer_norm(kernels=self.kernels, dtype=self.dtype, name='norm')(x), mask)
    logits = Head(self.width, self.num_outputs, self.dtype, self.kernels, name='head')(pooled)
    taps = {'logits': logits, 'pooled': pooled,
            'hidden': {self.modality: tuple(states)}, 'attn': {self.modality: tuple(maps)}}
    return logits, taps
