"""Distillation terms: (level, method, weight) triples parsed from the config.

`config.distill.terms` is a string such as 'logits:kl:1.0,hidden:mse:0.5'. Levels pick
the tensors (levels.py), methods compare them (methods.py); both are registries, so a
new loss is one registered function plus one entry in that string.
"""
import dataclasses
import inspect
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmkd_jax.distill import methods
from mmkd_jax.distill.levels import LEVELS, LevelContext, Pair, resolve_layer_map
from mmkd_jax.distill.methods import METHODS
from mmkd_jax.models.layers import Dense

Array = Any

__all__ = ['CLASSIFICATION_METHODS', 'LEVELS', 'METHODS', 'METHOD_LEVELS', 'LevelContext', 'Pair', 'Projector',
           'Term', 'collect_pairs', 'distillation_losses', 'level_problem', 'parse_terms', 'projection_widths',
           'resolve_layer_map', 'validate_hparams']

# Levels a method is meaningful on, where that is not every level, and why. Unlisted methods
# (a newly added one included) fit every level.
METHOD_LEVELS: dict[str, tuple[tuple[str, ...], str]] = {
    'kl': (('logits', 'attention'), 'kl compares distributions (class logits, attention rows)'),
    'dkd': (('logits',), 'dkd splits target and non-target class probabilities'),
    'attention_transfer': (('hidden', 'attention'), 'attention_transfer needs a token axis'),
}
# Methods that need class probabilities: classification tasks only.
CLASSIFICATION_METHODS = ('kl', 'dkd')


def level_problem(level: str, method: str) -> str | None:
  """Why `method` makes no sense at `level`, or None if it does."""
  allowed, reason = METHOD_LEVELS.get(method, (LEVELS.names(), ''))
  return None if level in allowed else reason


@dataclasses.dataclass(frozen=True)
class Term:
  level: str
  method: str
  weight: float

  @property
  def name(self) -> str:
    return f'{self.level}/{self.method}'


def parse_terms(spec: str) -> tuple[Term, ...]:
  """Parses 'level:method:weight,...' and checks every name and weight before training."""
  terms = []
  for item in (s.strip() for s in spec.split(',') if s.strip()):
    parts = item.split(':')
    if len(parts) != 3:
      raise ValueError(f"config.distill.terms: bad entry {item!r}; expected 'level:method:weight', "
                       f"levels: {', '.join(LEVELS.names())}; methods: {', '.join(METHODS.names())}")
    level, method, weight = parts
    for registry, name in ((LEVELS, level), (METHODS, method)):
      if name not in registry:
        raise ValueError(f'config.distill.terms: unknown {registry.kind} {name!r} in {item!r}; '
                         f'valid choices: {", ".join(registry.names())}')
    try:
      value = float(weight)
    except ValueError:
      raise ValueError(f'config.distill.terms: weight {weight!r} of {item!r} is not a number') from None
    if not (value > 0 and math.isfinite(value)):
      raise ValueError(f'config.distill.terms: weight {weight!r} of {item!r} must be a finite number > 0')
    problem = level_problem(level, method)
    if problem:
      raise ValueError(f'config.distill.terms: {item!r}: {problem}; levels for {method}: '
                       f'{", ".join(METHOD_LEVELS[method][0])}')
    term = Term(level, method, value)
    if term.name in {t.name for t in terms}:
      raise ValueError(f'config.distill.terms: {term.name!r} is listed twice')
    terms.append(term)
  return tuple(terms)


def validate_hparams(hparams: Mapping[str, Mapping[str, Any]]) -> None:
  """Every `config.distill.hparams.<method>.<name>` must be a keyword of that method."""
  for method, values in hparams.items():
    if method not in METHODS:
      raise ValueError(f'config.distill.hparams.{method}: unknown distillation method; '
                       f'valid choices: {", ".join(METHODS.names())}')
    accepted = set(inspect.signature(METHODS.get(method)).parameters) - set(methods.INPUTS)
    for key, value in values.items():
      if key not in accepted:
        raise ValueError(f'config.distill.hparams.{method}.{key}: unknown hyperparameter; '
                         f'valid choices: {", ".join(sorted(accepted)) or "none"}')
      if key in ('temperature', 'alpha', 'beta', 'distance_weight', 'angle_weight') and not value > 0:
        raise ValueError(f'config.distill.hparams.{method}.{key}={value!r} must be > 0')


def collect_pairs(terms: tuple[Term, ...], student_taps: dict, teacher_taps: dict,
                  context: LevelContext) -> dict[str, dict[str, Pair]]:
  """Level name -> its named (student, teacher, mask) pairs, for the levels the terms use."""
  teacher_taps = jax.lax.stop_gradient(teacher_taps)
  return {level: LEVELS.get(level)(student_taps, teacher_taps, context)
          for level in dict.fromkeys(t.level for t in terms)}


def projection_widths(pairs: dict[str, dict[str, Pair]]) -> dict[str, int]:
  """Pair name -> teacher width, for projectable pairs whose widths differ."""
  return {name: p.teacher.shape[-1] for level in pairs.values() for name, p in level.items()
          if p.projectable and p.student.shape[-1] != p.teacher.shape[-1]}


class Projector(nn.Module):
  """Learned linear maps from the student's width to the teacher's, one per pair that needs one
  (layers.Dense: one 2-D matmul over all tokens, like the models' own projections)."""
  widths: Mapping[str, int]

  @nn.compact
  def __call__(self, pairs: dict[str, dict[str, Pair]]) -> dict[str, dict[str, Pair]]:
    return {level: {name: p.replace(student=Dense(self.widths[name], name=name)(p.student))
                    if name in self.widths else p for name, p in named.items()}
            for level, named in pairs.items()}


def distillation_losses(terms: tuple[Term, ...], pairs: dict[str, dict[str, Pair]],
                        hparams: Mapping[str, Mapping[str, Any]], labels: Array) -> dict[str, Array]:
  """Term name -> unweighted loss, averaged over the term's pairs (e.g. over mapped layers).

  Where a pair's feature axis has padding (`Pair.feature_mask`), those features are zeroed on
  both sides, which makes sums over features exact (cosine, energy maps, batch distances); a
  method that declares a `feature_mask` argument also receives it (means over features, kl).
  """
  losses = {}
  for term in terms:
    method = METHODS.get(term.method)
    accepted = inspect.signature(method).parameters
    kwargs = dict(hparams.get(term.method, {}))
    if 'labels' in accepted:
      kwargs['labels'] = labels
    values = []
    for p in pairs[term.level].values():
      student, teacher, extra = p.student, p.teacher, {}
      if p.feature_mask is not None:
        real = jnp.broadcast_to(p.feature_mask, student.shape)
        student, teacher = jnp.where(real, student, 0.0), jnp.where(real, teacher, 0.0)
        extra = {'feature_mask': real} if 'feature_mask' in accepted else {}
      values.append(method(student, teacher, p.mask, **kwargs, **extra))
    losses[term.name] = sum(values) / len(values)
  return losses
