"""Distillation levels: which student and teacher taps are compared.

A level is a function `level(student_taps, teacher_taps, context) -> {name: Pair}` that
reads the named taps both models return ('logits', 'pooled', 'hidden', 'attn') and
pairs student and teacher tensors of matching leading shape, with the mask of their
real rows. The teacher's taps for the student's modality are its stream on that
modality's token positions, so hidden states and attention rows line up by position.

A level registers with `@LEVELS.register('name', cacheable=...)`. `cacheable=True` declares
that each pair's teacher side depends on that example's teacher taps and mask alone (not on
the student, nor on other examples of the batch): distilled runs may then compute it once per
training example (`config.distill.cache_teacher`, `step.teacher_targets`). The default,
False, runs the teacher in every step, so a level that normalises over the batch never
trains on stale targets.
"""
import dataclasses
from typing import Any, Callable

from flax import struct
import jax.numpy as jnp

from mmkd_jax.errors import ConfigError
from mmkd_jax.registry import Registry

Array = Any


@struct.dataclass
class Pair:
  """A student tensor, the teacher tensor it should match, and the mask of real rows."""
  student: Array
  teacher: Array
  mask: Array
  # Whether a learned linear map may bring the student's width to the teacher's (static).
  projectable: bool = struct.field(pytree_node=False)
  # Where the last (feature) axis itself has padding, which of its entries are real; broadcasts
  # to the pair's shape. None: every feature is real.
  feature_mask: Array | None = None


@dataclasses.dataclass(frozen=True)
class LevelContext:
  """What a level needs besides the taps."""
  modality: str
  token_mask: Array  # (B, L) real tokens of the student's modality
  example_weight: Array  # (B,) 1 for real examples, 0 for padding examples
  layer_map: tuple[tuple[int, int], ...]  # (student layer, teacher layer) pairs, 0-based


@dataclasses.dataclass(frozen=True)
class LevelInfo:
  """What a level's registration says about it."""
  cacheable: bool  # each pair's teacher side depends on the example's teacher taps and mask alone


def describe_level(name: str, function: Callable, *, cacheable: bool = False) -> LevelInfo:
  """Checks a level's registration keywords (see the module docstring)."""
  if not isinstance(cacheable, bool):
    raise ConfigError(f'distillation level {name!r} ({getattr(function, "__module__", "?")}): '
                      f'cacheable={cacheable!r} must be True or False')
  return LevelInfo(cacheable)


LEVELS: Registry[Callable[[dict, dict, LevelContext], dict[str, Pair]]] = Registry('distillation level',
                                                                                    describe_level)


def resolve_layer_map(spec: str, student_depth: int, teacher_depth: int) -> tuple[tuple[int, int], ...]:
  """Parses 'student:teacher,...' (0-based layers) or '' for the default.

  The default pairs every student layer i with teacher layer ceil((i + 1) * T / S) - 1,
  so the last layers meet and the rest spread evenly.
  """
  if not spec.strip():
    return tuple((i, -(-(i + 1) * teacher_depth // student_depth) - 1) for i in range(student_depth))
  pairs = []
  for item in spec.split(','):
    try:
      s, t = (int(v) for v in item.split(':'))
    except ValueError:
      raise ConfigError(f"config.distill.layer_map: bad entry {item!r}; expected 'student:teacher' integer pairs "
                       "such as '0:1,1:3'") from None
    if not (0 <= s < student_depth and 0 <= t < teacher_depth):
      raise ConfigError(f'config.distill.layer_map: entry {item!r} is out of range; student layers are '
                       f'0..{student_depth - 1}, teacher layers 0..{teacher_depth - 1}')
    pairs.append((s, t))
  return tuple(pairs)


@LEVELS.register('logits', cacheable=True)
def logits_level(student: dict, teacher: dict, context: LevelContext) -> dict[str, Pair]:
  """Output logits (B, C)."""
  return {'logits': Pair(student['logits'], teacher['logits'], context.example_weight, False)}


@LEVELS.register('pooled', cacheable=True)
def pooled_level(student: dict, teacher: dict, context: LevelContext) -> dict[str, Pair]:
  """The pooled representation the head reads (teacher: all streams concatenated)."""
  return {'pooled': Pair(student['pooled'], teacher['pooled'], context.example_weight, True)}


@LEVELS.register('hidden', cacheable=True)
def hidden_level(student: dict, teacher: dict, context: LevelContext) -> dict[str, Pair]:
  """Per-layer hidden states (B, L, W) on the student's token positions, per the layer map."""
  s_states, t_states = student['hidden'][context.modality], teacher['hidden'][context.modality]
  mask = context.token_mask * context.example_weight[:, None]
  return {f'hidden_{s}_{t}': Pair(s_states[s], t_states[t], mask, True) for s, t in context.layer_map}


def query_affinity(probs: Array, query_mask: Array) -> Array:
  """Log of the row-normalised query-by-query affinity A A^T of attention probabilities.

  probs (B, H, Lq, Lk) -> (B, H, Lq, Lq). Teacher cross-attention and student
  self-attention attend over different keys; A A^T says how alike two query positions
  attend, which both define over the student's query positions.
  """
  a = probs.astype(jnp.float32) * query_mask[:, None, :, None]
  affinity = jnp.einsum('bhqk,bhpk->bhqp', a, a)
  affinity = affinity / jnp.maximum(jnp.sum(affinity, axis=-1, keepdims=True), 1e-12)
  return jnp.log(affinity + 1e-8)


@LEVELS.register('attention', cacheable=True)
def attention_level(student: dict, teacher: dict, context: LevelContext) -> dict[str, Pair]:
  """Attention maps compared as query affinities (see `query_affinity`), per the layer map.

  When student and teacher have different head counts, both are averaged over heads. The
  affinities' last axis runs over the student's token positions, padded ones included: the
  pair's `feature_mask` marks the real ones.
  """
  s_maps, t_maps = student['attn'][context.modality], teacher['attn'][context.modality]
  mask = (context.token_mask * context.example_weight[:, None])[:, None, :]
  pairs = {}
  for s, t in context.layer_map:
    s_aff = query_affinity(s_maps[s], context.token_mask)
    t_aff = query_affinity(t_maps[t], context.token_mask)
    if s_aff.shape[1] != t_aff.shape[1]:
      s_aff, t_aff = (jnp.log(jnp.mean(jnp.exp(x), axis=1, keepdims=True)) for x in (s_aff, t_aff))
    pairs[f'attention_{s}_{t}'] = Pair(s_aff, t_aff, mask, False, context.token_mask[:, None, None, :] > 0)
  return pairs
