"""Paired statistics: the Student-t interval against a float64 hand computation, and where it is undefined."""
import math

import pytest

from mmkd_jax import stats

# Two-sided 95% quantiles t(0.975, df): closed forms for 1 and 2 degrees of freedom (Cauchy: tan(pi (p - 1/2));
# df 2: (2p - 1) / sqrt(2 p (1 - p))), printed tables for 4 and 9.
T_TABLE = {1: math.tan(math.pi * 0.475), 2: 0.95 / math.sqrt(2 * 0.975 * 0.025), 4: 2.776445105197793,
           9: 2.262157162798205}


@pytest.mark.parametrize('df', sorted(T_TABLE))
def test_t_quantile_matches_the_table(df):
  assert stats.t_quantile(0.975, df) == pytest.approx(T_TABLE[df], rel=1e-12 if df <= 2 else 1e-9)


def _hand_interval(differences: list[float], t: float) -> tuple[float, float, float]:
  n = len(differences)
  mean = math.fsum(differences) / n
  sd = math.sqrt(math.fsum((d - mean) ** 2 for d in differences) / (n - 1))
  return mean, mean - t * sd / math.sqrt(n), mean + t * sd / math.sqrt(n)


def test_interval_matches_a_float64_hand_computation():
  control = [0.80, 0.75, 0.78, 0.81, 0.76]
  treated = [0.82, 0.74, 0.81, 0.81, 0.775]
  got = stats.paired_difference(treated, control)
  differences = [t - c for t, c in zip(treated, control)]
  mean, low, high = _hand_interval(differences, T_TABLE[4])
  assert got['interval'] == 'student_t' and got['confidence'] == 0.95
  assert got['differences'] == pytest.approx(differences, abs=1e-15)
  assert got['mean'] == pytest.approx(mean, abs=1e-15)
  assert got['low'] == pytest.approx(low, abs=1e-12) and got['high'] == pytest.approx(high, abs=1e-12)
  assert low < 0 < high and got['excludes_zero'] is False
  text = stats.format_difference(got)
  assert text == f'{mean:+.4f} [{low:+.4f}, {high:+.4f}]'


def test_interval_pairs_by_seed_not_by_means():
  # Large seed-to-seed spread shared by both arms, constant paired gain: the interval is tight and excludes 0.
  control = [0.60, 0.90, 0.70]
  treated = [0.62, 0.921, 0.719]
  got = stats.paired_difference(treated, control)
  mean, low, high = _hand_interval([t - c for t, c in zip(treated, control)], T_TABLE[2])
  assert got['mean'] == pytest.approx(mean, abs=1e-15)
  assert got['low'] == pytest.approx(low, abs=1e-12) and got['high'] == pytest.approx(high, abs=1e-12)
  assert 0 < got['low'] and got['excludes_zero'] is True
  assert stats.format_difference(got).endswith(' *')
  # A loss of the same size excludes 0 from below.
  assert stats.paired_difference(control, treated)['excludes_zero'] is True


@pytest.mark.parametrize('treated, control', [([0.9], [0.8]), ([0.9, 0.7], [0.8, 0.75])])
def test_one_or_two_seeds_give_no_interval(treated, control):
  got = stats.paired_difference(treated, control)
  assert got['interval'] == 'undefined'
  assert got['low'] is None and got['high'] is None and got['excludes_zero'] is None
  assert got['mean'] == pytest.approx(sum(treated) / len(treated) - sum(control) / len(control), abs=1e-15)
  text = stats.format_difference(got)
  assert text == f'{got["mean"]:+.4f} (interval undefined: {len(treated)} seed{"s" * (len(treated) > 1)})'
  with pytest.raises(ValueError, match='needs at least 3 paired seeds'):
    stats.paired_difference(treated, control, interval='student_t')


def test_no_interval_when_none_is_asked_for_and_undefined_for_non_finite_values():
  got = stats.paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], interval='none')
  assert (got['interval'], got['low'], got['excludes_zero'], got['mean']) == ('none', None, None, 2.0)
  assert stats.format_difference(got) == '+2.0000 (no interval)'
  nan = stats.paired_difference([1.0, float('nan'), 3.0], [0.0, 0.0, 0.0])
  assert nan['interval'] == 'undefined' and nan['low'] is None
  assert stats.format_difference(nan).endswith('(interval undefined: non-finite values)')


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="interval='bootstrap' is unknown; valid choices: auto, student_t, none"):
    stats.paired_difference([1.0], [1.0], interval='bootstrap')
  with pytest.raises(ValueError, match='same positive number of seeds, got 2 and 3'):
    stats.paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])
