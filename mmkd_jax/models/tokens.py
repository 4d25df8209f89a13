"""How a modality's (B, L, F) feature chunks become (B, L, W) tokens, looked up by name.

'shared' (layers.Embed) projects every chunk with one matrix and adds a learned position
embedding: right when a position means the same kind of feature everywhere (a frame, a word).
'per_position' gives each token position its own projection, the feature tokenizer of
FT-Transformer (Gorishniy et al. 2021) over chunks of features: in a tabular view, feature 3
of chunk 0 and feature 3 of chunk 5 are unrelated quantities, which a shared matrix would
have to treat alike (on mfeat it is worth 3.6 points of baseline student accuracy and 5.7 of
teacher accuracy: docs/mfeat_defaults.md).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmkd_jax.models.layers import Embed, position_init
from mmkd_jax.registry import Registry

Array = Any
Dtype = Any

EMBEDDINGS: Registry[type] = Registry('token embedding')
EMBEDDINGS.register('shared')(Embed)


@EMBEDDINGS.register('per_position')
class PerPositionEmbed(nn.Module):
  """Token l = x_l @ kernel_l + bias_l with a (F, W) kernel and a W bias per position l.

  The bias is also the position embedding (normal(0.02), as layers.Embed's); the kernels are
  LeCun-normal over each position's F inputs, so a token starts at the scale a shared Dense
  gives it.
  """
  width: int
  dtype: Dtype = jnp.float32
  kernels: str = 'auto'  # as layers.Embed's, for one signature; an einsum is the same on both paths

  @nn.compact
  def __call__(self, x: Array) -> Array:
    _, length, features = x.shape
    kernel = self.param('kernel', nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,)),
                        (length, features, self.width))
    bias = self.param('bias', position_init, (length, self.width))
    y = jnp.einsum('blf,lfw->blw', x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)
