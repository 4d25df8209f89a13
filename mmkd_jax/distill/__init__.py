"""Distillation terms: (level, method, weight) triples parsed from the config.

`config.distill.terms` is a string such as 'logits:kl:1.0,hidden:mse:0.5'. Levels pick
the tensors (levels.py), methods compare them (methods.py); both are registries, so a
new loss is one registered function plus one entry in that string. A term may carry its
own hyperparameters after the weight ('attention:kl:0.1:temperature=1.0'): they override
the method's `config.distill.hparams.<method>`, which override the signature's defaults.
"""
import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmkd_jax.distill.levels import LEVELS, LevelContext, LevelInfo, Pair, resolve_layer_map
from mmkd_jax.distill.methods import METHODS, MethodInfo
from mmkd_jax.errors import ConfigError
from mmkd_jax.models.layers import Dense

Array = Any

__all__ = ['LEVELS', 'METHODS', 'LevelContext', 'LevelInfo', 'MethodInfo', 'Pair', 'Projector', 'Term',
           'cacheable', 'collect_pairs', 'default_hparams', 'distillation_losses', 'level_problem',
           'method_problem', 'pair_loss', 'parse_terms', 'projection_widths', 'resolve_layer_map', 'term_hparams',
           'validate_hparams']


def level_problem(level: str, method: str) -> str | None:
  """Why `method` makes no sense at `level` (per its registration), or None if it does."""
  levels = METHODS.info(method).levels
  if levels is None or level in levels:
    return None
  return f'{method} is registered for the levels {", ".join(levels)} only'


def method_problem(levels: tuple[str, ...], method: str, task: str) -> str | None:
  """Why `method` makes no sense at one of `levels` on a `task` dataset, or None if it fits them all."""
  if METHODS.info(method).task == 'classification' and task != 'classification':
    return f'{method} needs class probabilities and the task is {task}'
  return next(filter(None, (level_problem(level, method) for level in levels)), None)


@dataclasses.dataclass(frozen=True)
class Term:
  level: str
  method: str
  weight: float
  # The term's own hyperparameters, (name, value) pairs over the method-level ones.
  hparams: tuple[tuple[str, Any], ...] = ()

  @property
  def name(self) -> str:
    return f'{self.level}/{self.method}'


def _check_positive(path: str, method: str, key: str, value: Any) -> None:
  if key in METHODS.info(method).positive and not value > 0:
    raise ConfigError(f'{path}={value!r} must be > 0')


def _hparam_value(item: str, method: str, assignment: str) -> tuple[str, Any]:
  """'name=value' of a term -> (name, value of the default's type)."""
  defaults = METHODS.info(method).defaults
  key, sep, text = (s.strip() for s in assignment.partition('='))
  if not sep or key not in defaults:
    raise ConfigError(f'config.distill.terms: {item!r}: bad hyperparameter {assignment!r}; expected name=value '
                      f'with a name of {method}: {", ".join(defaults) or "none"}')
  kind = type(defaults[key])
  try:
    if kind is bool:
      value = {'true': True, 'false': False}[text.lower()]
    else:
      value = kind(text)
  except (KeyError, ValueError):
    raise ConfigError(f'config.distill.terms: {item!r}: {key}={text!r} is not a {kind.__name__}') from None
  _check_positive(f'config.distill.terms: {item!r}: {key}', method, key, value)
  return key, value


def parse_terms(spec: str) -> tuple[Term, ...]:
  """Parses 'level:method:weight[:name=value...],...' and checks every name and value before training."""
  terms = []
  for item in (s.strip() for s in spec.split(',') if s.strip()):
    parts = item.split(':')
    if len(parts) < 3:
      raise ConfigError(f"config.distill.terms: bad entry {item!r}; expected 'level:method:weight' (then "
                        f"optional ':name=value' hyperparameters), levels: {', '.join(LEVELS.names())}; "
                        f"methods: {', '.join(METHODS.names())}")
    level, method, weight = (p.strip() for p in parts[:3])
    for registry, name in ((LEVELS, level), (METHODS, method)):
      if name not in registry:
        raise ConfigError(f'config.distill.terms: unknown {registry.kind} {name!r} in {item!r}; '
                          f'valid choices: {", ".join(registry.names())}')
    try:
      value = float(weight)
    except ValueError:
      raise ConfigError(f'config.distill.terms: weight {weight!r} of {item!r} is not a number') from None
    if not (value > 0 and math.isfinite(value)):
      raise ConfigError(f'config.distill.terms: weight {weight!r} of {item!r} must be a finite number > 0')
    problem = level_problem(level, method)
    if problem:
      raise ConfigError(f'config.distill.terms: {item!r}: {problem}; levels for {method}: '
                        f'{", ".join(METHODS.info(method).levels)}')
    hparams = dict(_hparam_value(item, method, a) for a in parts[3:])
    if len(hparams) != len(parts) - 3:
      raise ConfigError(f'config.distill.terms: {item!r} sets a hyperparameter twice')
    term = Term(level, method, value, tuple(hparams.items()))
    if term.name in {t.name for t in terms}:
      raise ConfigError(f'config.distill.terms: {term.name!r} is listed twice')
    terms.append(term)
  return tuple(terms)


def default_hparams() -> dict[str, dict[str, Any]]:
  """Method -> its hyperparameters' defaults (from the signature), for every registered method that
  has any: `config.distill.hparams` starts from this, so each is settable on the command line."""
  return {name: METHODS.info(name).defaults for name in METHODS.names() if METHODS.info(name).hparams}


def validate_hparams(hparams: Mapping[str, Mapping[str, Any]]) -> None:
  """Every `config.distill.hparams.<method>.<name>` must be a hyperparameter of that method, of its
  registered sign."""
  for method, values in hparams.items():
    if method not in METHODS:
      raise ConfigError(f'config.distill.hparams.{method}: unknown distillation method; '
                        f'valid choices: {", ".join(METHODS.names())}')
    accepted = METHODS.info(method).defaults
    for key, value in values.items():
      if key not in accepted:
        raise ConfigError(f'config.distill.hparams.{method}.{key}: unknown hyperparameter; '
                          f'valid choices: {", ".join(accepted) or "none"}')
      _check_positive(f'config.distill.hparams.{method}.{key}', method, key, value)


def term_hparams(term: Term, hparams: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """The keyword arguments `term`'s method gets: the signature's defaults, overridden by the
  method's `hparams` (config.distill.hparams), overridden by the term's own."""
  return {**METHODS.info(term.method).defaults, **hparams.get(term.method, {}), **dict(term.hparams)}


def cacheable(terms: tuple[Term, ...]) -> bool:
  """Whether every level of `terms` declares its teacher side cacheable (see levels.py)."""
  return all(LEVELS.info(level).cacheable for level in {t.level for t in terms})


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


def pair_loss(method: Callable[..., Array], info: MethodInfo, pair: Pair, kwargs: Mapping[str, Any]) -> Array:
  """`method`'s loss on one pair, with keyword arguments `kwargs` (its hyperparameters, and labels).

  Where the pair's feature axis has padding (`Pair.feature_mask`), those features are zeroed on
  both sides, which makes sums over features exact (cosine, energy maps, batch distances); a
  method that declares a `feature_mask` argument also receives it (means over features, kl).
  """
  student, teacher, extra = pair.student, pair.teacher, {}
  if pair.feature_mask is not None:
    real = jnp.broadcast_to(pair.feature_mask, student.shape)
    student, teacher = jnp.where(real, student, 0.0), jnp.where(real, teacher, 0.0)
    extra = {'feature_mask': real} if info.takes_feature_mask else {}
  return method(student, teacher, pair.mask, **kwargs, **extra)


def distillation_losses(terms: tuple[Term, ...], pairs: dict[str, dict[str, Pair]],
                        hparams: Mapping[str, Mapping[str, Any]], labels: Array) -> dict[str, Array]:
  """Term name -> unweighted loss (`pair_loss`), averaged over the term's pairs (e.g. over mapped
  layers); each term's method gets `term_hparams(term, hparams)`, and the labels if it takes them."""
  losses = {}
  for term in terms:
    info = METHODS.info(term.method)
    kwargs = term_hparams(term, hparams)
    if info.takes_labels:
      kwargs['labels'] = labels
    values = [pair_loss(METHODS.get(term.method), info, p, kwargs) for p in pairs[term.level].values()]
    losses[term.name] = sum(values) / len(values)
  return losses
