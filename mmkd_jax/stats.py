"""Paired statistics of a gain over seeds.

Each seed gives one paired difference: the treated arm (e.g. the distilled student) minus the
control arm (the baseline student) trained with the same seed. `paired_difference` reports
their mean and a 95% Student-t confidence interval on them,

  mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n),   sd with n - 1 in the denominator,

and whether that interval excludes 0. With fewer than `MIN_SEEDS` seeds the interval is
undefined (two differences give a t-quantile of 12.7 and an interval too wide to mean anything),
and no number is given for it.
"""
import math
from typing import Sequence

import numpy as np
from scipy import special

# config.report.interval: 'auto' (the t-interval from MIN_SEEDS seeds on, undefined below),
# 'student_t' (asked for explicitly: fewer seeds are a config error), 'none' (no interval).
INTERVALS = ('auto', 'student_t', 'none')
CONFIDENCE = 0.95
MIN_SEEDS = 3
METHOD = 'student_t'


def t_quantile(probability: float, degrees_of_freedom: int) -> float:
  """The `probability` quantile of Student's t distribution with `degrees_of_freedom`."""
  return float(special.stdtrit(degrees_of_freedom, probability))


def describe(interval: str) -> str:
  """One sentence saying how the interval of `paired_difference` is computed under `interval`."""
  if interval == 'none':
    return 'No confidence interval (config.report.interval=none).'
  return (f'{CONFIDENCE:.0%} confidence interval: Student-t on the per-seed paired differences (mean +- '
          f't(0.975, n-1) x sd / sqrt(n)); undefined with fewer than {MIN_SEEDS} seeds.')


def paired_difference(treated: Sequence[float], control: Sequence[float], interval: str = 'auto') -> dict:
  """Mean and 95% Student-t interval of the per-seed differences `treated[i] - control[i]`.

  Args:
    treated: one value per seed of the treated arm (e.g. the distilled students' test accuracy).
    control: the control arm's values at the same seeds, in the same order.
    interval: one of `INTERVALS`.

  Returns:
    A JSON-ready dict: `differences` (per seed), `mean`, `interval` ('student_t' when computed,
    'undefined' below `MIN_SEEDS` seeds or with non-finite values, 'none' when not asked for),
    `confidence`, `low` / `high` (None unless computed) and `excludes_zero` (None unless computed).
  """
  if interval not in INTERVALS:
    raise ValueError(f'interval={interval!r} is unknown; valid choices: {", ".join(INTERVALS)}')
  if len(treated) != len(control) or not treated:
    raise ValueError(f'paired values need the same positive number of seeds, got {len(treated)} and {len(control)}')
  differences = np.asarray(treated, np.float64) - np.asarray(control, np.float64)
  n = len(differences)
  mean = float(np.mean(differences))
  result = {'differences': [float(d) for d in differences], 'mean': mean, 'interval': interval,
            'confidence': CONFIDENCE, 'low': None, 'high': None, 'excludes_zero': None}
  if interval == 'none':
    return result
  if n < MIN_SEEDS or not np.all(np.isfinite(differences)):
    if interval == 'student_t' and n < MIN_SEEDS:
      raise ValueError(f'a Student-t interval needs at least {MIN_SEEDS} paired seeds, got {n}')
    return {**result, 'interval': 'undefined'}
  half_width = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * float(np.std(differences, ddof=1)) / math.sqrt(n)
  low, high = mean - half_width, mean + half_width
  return {**result, 'interval': METHOD, 'low': low, 'high': high, 'excludes_zero': bool(low > 0 or high < 0)}


def format_difference(stat: dict, digits: int = 4) -> str:
  """'+0.0120 [+0.0031, +0.0209] *' (the * when the interval excludes 0), or the mean and why there
  is no interval: 'undefined: 2 seeds' / 'no interval'."""
  mean = f'{stat["mean"]:+.{digits}f}'
  if stat['interval'] == METHOD:
    return f'{mean} [{stat["low"]:+.{digits}f}, {stat["high"]:+.{digits}f}]' + (' *' if stat['excludes_zero'] else '')
  if stat['interval'] == 'undefined':
    n = len(stat['differences'])
    return f'{mean} (interval undefined: ' + (f'{n} seed{"s" * (n > 1)})' if n < MIN_SEEDS else 'non-finite values)')
  return f'{mean} (no interval)'


def summarize(per_seed: Sequence[dict[str, float]]) -> dict:
  """Per-metric mean, std (population, over seeds) and the per-seed values of `per_seed` metric dicts."""
  values = {k: [float(r[k]) for r in per_seed] for k in per_seed[0]}
  return {'mean': {k: float(np.mean(v)) for k, v in values.items()},
          'std': {k: float(np.std(v)) for k, v in values.items()},
          'per_seed': values}
