"""report.json / report.md: reference rows and the paired statistics of every gain."""
import json
import math
from types import SimpleNamespace

import ml_collections
import pytest

from mmkd_jax import report

T4 = 2.776445105197793  # t(0.975, 4)
BASELINE = [0.80, 0.75, 0.78, 0.81, 0.76]
DISTILLED = [0.83, 0.78, 0.80, 0.84, 0.785]
LOGISTIC = [0.817, 0.817, 0.818, 0.817, 0.817]


def _config(seeds: str, interval: str = 'auto') -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      'data': {'name': 'mfeat'}, 'teacher': {'modalities': 'fou,pix'}, 'student': {'modality': 'fou'},
      'distill': {'terms': 'hidden:mse:1.0'},
      'report': {'seeds': seeds, 'interval': interval, 'latency_batch_size': 8}, 'train': {'num_steps': 10}})


def _run(accuracy: float) -> SimpleNamespace:
  return SimpleNamespace(test={'accuracy': accuracy, 'macro_f1': accuracy - 0.01}, num_params=10, stopped_at=None)


def _reference(inputs: str, of: str, accuracies: list[float], seeds: list[int]) -> dict:
  per_seed = {'accuracy': accuracies, 'macro_f1': [a - 0.02 for a in accuracies]}
  mean = {k: sum(v) / len(v) for k, v in per_seed.items()}
  return {'inputs': inputs, 'of': of, 'model': 'multinomial logistic regression', 'seeds': seeds, 'params': 3170,
          'l2': [0.01] * len(seeds), 'l2_grid': [0.01, 0.1],
          'test': {'mean': mean, 'std': {k: 0.0 for k in mean}, 'per_seed': per_seed}}


def _build(seeds: str, baseline: list[float], distilled: list[float], interval: str = 'auto',
           references: bool = True) -> dict:
  seed_list = [int(s) for s in seeds.split(',')]
  rows = [_reference('fou+pix', 'teacher', [0.967] * len(baseline), seed_list),
          _reference('fou', 'student', LOGISTIC[:len(baseline)], seed_list)] if references else []
  return report.build(_config(seeds, interval), SimpleNamespace(task='classification'), teacher=_run(0.95),
                      students=[_run(a) for a in baseline], distilled=[_run(a) for a in distilled],
                      teacher_latency=0.002, student_latency=0.001, references=rows)


def _hand(treated: list[float], control: list[float]) -> tuple[float, float, float]:
  d = [t - c for t, c in zip(treated, control)]
  mean = math.fsum(d) / len(d)
  half = T4 * math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (len(d) - 1)) / math.sqrt(len(d))
  return mean, mean - half, mean + half


def test_report_json_has_references_and_paired_statistics(tmp_path):
  results = _build('0,1,2,3,4', BASELINE, DISTILLED)
  report.write(results, str(tmp_path))
  with open(tmp_path / 'report.json') as f:
    stored = json.load(f)
  assert stored['interval'] == {'setting': 'auto', 'method': 'student_t', 'confidence': 0.95, 'min_seeds': 3,
                                'description': stored['interval']['description']}
  assert 'Student-t on the per-seed paired differences' in stored['interval']['description']
  gain = stored['gain_paired']['accuracy']
  mean, low, high = _hand(DISTILLED, BASELINE)
  assert gain['interval'] == 'student_t'
  assert gain['mean'] == pytest.approx(mean, abs=1e-12) == pytest.approx(stored['gain']['accuracy'], abs=1e-12)
  assert gain['low'] == pytest.approx(low, abs=1e-12) and gain['high'] == pytest.approx(high, abs=1e-12)
  assert gain['excludes_zero'] is (low > 0 or high < 0) is True
  assert set(stored['gain_paired']) == {'accuracy', 'macro_f1'}
  assert [(r['of'], r['inputs']) for r in stored['references']] == [('teacher', 'fou+pix'), ('student', 'fou')]
  versus = stored['versus_reference']['student']['accuracy']
  mean, low, high = _hand(BASELINE, LOGISTIC)
  assert versus['mean'] == pytest.approx(mean, abs=1e-12) and versus['high'] == pytest.approx(high, abs=1e-12)
  assert versus['excludes_zero'] is (high < 0) is True  # the baselines are below the linear model

  text = (tmp_path / 'report.md').read_text()
  assert '| multinomial logistic regression (fou + pix) | 0.9670 +- 0.0000 | 0.9470 +- 0.0000 | 3,170 | - |' in text
  assert '| multinomial logistic regression (fou) |' in text
  accuracy = stored['gain_paired']['accuracy']
  assert f"accuracy {accuracy['mean']:+.4f} [{accuracy['low']:+.4f}, {accuracy['high']:+.4f}] *" in text
  assert 'Intervals that exclude 0 (*): accuracy, macro_f1.' in text
  assert '- Teacher - multinomial logistic regression on fou+pix (one teacher run, the mean over seeds): ' \
         'accuracy -0.0170, macro_f1 -0.0070.' in text
  assert ('- Baseline student - multinomial logistic regression on fou (same seed): '
          f"accuracy {versus['mean']:+.4f} [{versus['low']:+.4f}, {versus['high']:+.4f}] *, macro_f1 ") in text


@pytest.mark.parametrize('seeds', ['0', '0,1'])
def test_fewer_than_three_seeds_print_no_interval(seeds):
  n = len(seeds.split(','))
  results = _build(seeds, BASELINE[:n], DISTILLED[:n])
  gain = results['gain_paired']['accuracy']
  assert gain['interval'] == 'undefined' and gain['low'] is None and gain['excludes_zero'] is None
  text = report.markdown(results)
  assert f"accuracy {gain['mean']:+.4f} (interval undefined: {n} seed{'s' * (n > 1)})" in text
  assert f"The interval is undefined with {n} seed{'s' * (n > 1)}: at least 3 are needed." in text
  assert '[' not in text


def test_no_interval_and_no_references():
  results = _build('0,1,2', BASELINE[:3], DISTILLED[:3], interval='none', references=False)
  assert results['references'] == [] and 'versus_reference' not in results
  assert results['gain_paired']['accuracy']['interval'] == 'none'
  text = report.markdown(results)
  assert 'No interval computed (config.report.interval=none).' in text and 'Reference rows' not in text


def test_references_of_other_seeds_are_refused():
  with pytest.raises(ValueError, match=r'reference on fou\+pix was fitted with seeds \[0, 1, 2\], the report has'):
    report.build(_config('0,1,3'), SimpleNamespace(task='classification'), teacher=_run(0.9),
                 students=[_run(0.8)] * 3, distilled=[_run(0.8)] * 3, teacher_latency=1.0, student_latency=1.0,
                 references=[_reference('fou+pix', 'teacher', [0.9] * 3, [0, 1, 2])])
