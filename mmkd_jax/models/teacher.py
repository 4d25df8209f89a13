"""The multimodal teacher: every modality's stream cross-attends to all the others."""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mmkd_jax.models.layers import Block, Head, layer_norm, masked_mean
from mmkd_jax.models.tokens import EMBEDDINGS

Array = Any


class Teacher(nn.Module):
  """Cross-attention fusion transformer over N modalities (MulT-style).

  Each modality m's feature chunks become `width`-wide tokens (`embedding`). Its stream
  then passes `num_cross_layers` blocks whose queries are m's tokens and whose
  keys/values are the projected tokens of every other modality (concatenated), then
  `num_self_layers` self-attention blocks. Streams are mean-pooled over real tokens,
  concatenated, and fed to an MLP head.

  Returns (logits, taps) where taps = {'logits', 'pooled', 'hidden': {m: (B, L_m, W) per
  layer}, 'attn': {m: (B, H, L_m, L_keys) per layer}}: stream m's states sit on m's
  token positions, so a student of modality m can be matched to them position by position.
  An optional batch['example_index'] (B,) keys each example's dropout masks (layers.Dropout).
  """
  modalities: Sequence[str]
  num_outputs: int
  width: int = 64
  num_heads: int = 4
  num_cross_layers: int = 2
  num_self_layers: int = 0
  mlp_ratio: int = 4
  dropout_rate: float = 0.1
  # How feature chunks become tokens: a name in models/tokens.py's EMBEDDINGS.
  embedding: str = 'shared'
  dtype: Any = jnp.float32
  kernels: str = 'auto'  # layers.use_cpu_kernels: 'auto', 'cpu' or 'flax'; the same parameters either way

  @nn.compact
  def __call__(self, batch: dict[str, Array], *, train: bool = False) -> tuple[Array, dict]:
    if len(self.modalities) < 2:
      raise ValueError(f'the teacher needs at least two modalities, got {list(self.modalities)}')
    embed = EMBEDDINGS.get(self.embedding)
    embedded = {m: embed(self.width, self.dtype, self.kernels, name=f'embed_{m}')(batch[m]) for m in self.modalities}
    masks = {m: batch[f'{m}_mask'] for m in self.modalities}
    index = batch.get('example_index')
    block = lambda name: Block(self.num_heads, self.mlp_ratio, self.dropout_rate, self.dtype, self.kernels,
                                 name=name)
    hidden, attn, pooled = {}, {}, []
    for m in self.modalities:
      others = [o for o in self.modalities if o != m]
      context = jnp.concatenate([embedded[o] for o in others], axis=1)
      context_mask = jnp.concatenate([masks[o] for o in others], axis=1)
      x, states, maps = embedded[m], [], []
      for layer in range(self.num_cross_layers):
        x, probs = block(f'{m}_cross_{layer}')(x, context_mask, context, train=train, example_index=index)
        states.append(x)
        maps.append(probs)
      for layer in range(self.num_self_layers):
        x, probs = block(f'{m}_self_{layer}')(x, masks[m], train=train, example_index=index)
        states.append(x)
        maps.append(probs)
      hidden[m], attn[m] = tuple(states), tuple(maps)
      pooled.append(masked_mean(layer_norm(kernels=self.kernels, dtype=self.dtype, name=f'{m}_norm')(x),
                                masks[m]))
    pooled = jnp.concatenate(pooled, axis=-1)
    logits = Head(pooled.shape[-1], self.num_outputs, self.dtype, self.kernels, name='head')(pooled)
    return logits, {'logits': logits, 'pooled': pooled, 'hidden': hidden, 'attn': attn}
