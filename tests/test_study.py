"""The study: a 2x2 grid end to end with an interruption and resume, tables, export, bad input."""
import csv
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import distill as distill_config
from configs import study as study_config
from configs import study_full
from mmkd_jax import data, export, stats, study, train
from mmkd_jax.errors import ConfigError
from mmkd_jax.models import Student

METRICS = ('accuracy', 'macro_f1')
TRAINERS = {'train_run': train.train_run, 'train_arm': train.train_arm}


class Interrupted(Exception):
  """Stands for a study killed between two cells."""


@pytest.fixture
def config(tiny_config):
  """A 2x2 grid (levels x methods) on the tiny synthetic problem; hidden x kl is skipped."""
  tiny_config.study = study_config.get_config().study
  tiny_config.study.modalities = 'm0'
  tiny_config.study.widths = '8'
  tiny_config.study.levels = 'logits,hidden'
  tiny_config.study.methods = 'kl,mse'
  tiny_config.study.seeds = '0'
  tiny_config.train.eval_every = tiny_config.train.num_steps  # one checkpoint per run: faster
  return tiny_config


def _record(monkeypatch, calls: list, workdir: str, interrupt_at: str | None = None) -> None:
  """Makes train.train_run and train.train_arm record the run directories they are asked for (and
  fail at one)."""
  for name, trainer in TRAINERS.items():

    def recording(config, *args, trainer=trainer, **kwargs):
      run_dir = args[1] if trainer is TRAINERS['train_run'] else args[0]
      if os.path.relpath(run_dir, workdir) == interrupt_at:
        raise Interrupted(interrupt_at)
      calls.append(os.path.relpath(run_dir, workdir))
      return trainer(config, *args, **kwargs)
    monkeypatch.setattr(train, name, recording)


def _check_tables(workdir: str) -> None:
  with open(os.path.join(workdir, 'study.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['kind'] for r in rows] == ['teacher', 'teacher_missing', 'teacher_missing', 'reference', 'reference',
                                       'baseline', 'distilled', 'distilled', 'distilled']
  assert [r['model'] for r in rows[-3:]] == ['m0-w8-logits-kl', 'm0-w8-logits-mse', 'm0-w8-hidden-mse']
  assert [(r['model'], r['inputs']) for r in rows[3:5]] == [('multinomial logistic regression', 'm0+m1'),
                                                             ('multinomial logistic regression', 'm0')]
  for row in rows:
    assert None not in row and None not in row.values()  # every row has exactly the header's fields
    for metric in METRICS:
      assert 0.0 <= float(row[f'{metric}_mean']) <= 1.0
    assert (row['gain_accuracy'] != '') == (row['kind'] == 'distilled')
    # One seed: the interval is undefined, and no number is given for it.
    assert row['gain_accuracy_interval'] == ('undefined' if row['kind'] == 'distilled' else '')
    assert row['gain_accuracy_low'] == row['gain_accuracy_high'] == row['gain_accuracy_excludes_zero'] == ''
    assert (row['accuracy_std'] != '') == (row['kind'] in ('baseline', 'distilled', 'reference'))
    assert int(row['params']) > 0 and (row['latency_ms'] == '') == (row['kind'] == 'reference')
  assert rows[1]['inputs'] == 'm1' and rows[2]['inputs'] == 'm0'  # teacher with m0, then m1, removed
  gain = float(rows[6]['accuracy_mean']) - float(rows[5]['accuracy_mean'])
  assert float(rows[6]['gain_accuracy']) == pytest.approx(gain, abs=1e-5)
  lines = open(os.path.join(workdir, 'study.md')).read().splitlines()
  table = [line for line in lines if line.startswith('|')]
  assert len(table) == 2 + len(rows)
  assert len({line.count('|') for line in table}) == 1
  assert '| teacher, m1 removed | m0 |' in '\n'.join(table)
  assert '| multinomial logistic regression | m0+m1 | - | - | - |' in '\n'.join(table)
  assert f'| {gain:+.4f} (interval undefined: 1 seed) |' in table[8]
  assert any('hidden x kl' in line for line in lines)


def test_table_cells_carry_the_paired_gain_and_its_interval(tmp_path):
  """Five seeds: each gain cell has the mean of the paired differences, its Student-t interval and whether
  that excludes 0 (marked * in study.md); the values are those of stats.paired_difference."""
  baseline = [{'accuracy': a, 'macro_f1': a} for a in (0.80, 0.75, 0.78, 0.81, 0.76)]
  better = [{'accuracy': a, 'macro_f1': a} for a in (0.83, 0.78, 0.80, 0.84, 0.785)]
  noisy = [{'accuracy': a, 'macro_f1': a} for a in (0.82, 0.74, 0.81, 0.81, 0.775)]
  rows = [study._row('baseline', 'fou-w32', 'fou', 32, baseline, METRICS, 100, 1.0)]
  rows += [study._row('distilled', name, 'fou', 32, runs, METRICS, 100, 1.0, 'hidden', 'mse', baseline=baseline)
           for name, runs in (('better', better), ('noisy', noisy))]
  for name, runs in (('better', better), ('noisy', noisy)):
    row = next(r for r in rows if r['model'] == name)
    expected = stats.paired_difference([r['accuracy'] for r in runs], [r['accuracy'] for r in baseline])
    assert (row['gain_accuracy'], row['gain_accuracy_low'], row['gain_accuracy_high'],
            row['gain_accuracy_excludes_zero'], row['gain_accuracy_interval']) == (
                expected['mean'], expected['low'], expected['high'], expected['excludes_zero'], 'student_t')
  assert [r['gain_accuracy_excludes_zero'] for r in rows] == [None, True, False]
  results = {'dataset': 'mfeat', 'teacher_modalities': 'fou,pix', 'seeds': [0, 1, 2, 3, 4], 'num_steps': 10,
             'metrics': list(METRICS), 'latency_batch_size': 8, 'rows': rows, 'skipped': [], 'best': 'better',
             'interval': {'description': stats.describe('auto')}, 'seconds': 60.0,
             'export': {'seed': 0, 'path': 'export/better.npz', 'bytes': 1024, 'latency_ms': 1.0,
                        'in_memory_latency_ms': 1.0}}
  study.write_tables(results, str(tmp_path))
  with open(tmp_path / 'study.csv', newline='') as f:
    stored = list(csv.DictReader(f))
  assert [r['gain_accuracy_excludes_zero'] for r in stored] == ['', 'True', 'False']
  assert float(stored[1]['gain_accuracy_low']) == pytest.approx(rows[1]['gain_accuracy_low'], rel=1e-5)
  table = [line for line in (tmp_path / 'study.md').read_text().splitlines() if line.startswith('| ')]
  better_row, noisy_row = rows[1], rows[2]
  assert (f"| {better_row['gain_accuracy']:+.4f} [{better_row['gain_accuracy_low']:+.4f}, "
          f"{better_row['gain_accuracy_high']:+.4f}] * |") in table[2]
  assert f"[{noisy_row['gain_accuracy_low']:+.4f}, {noisy_row['gain_accuracy_high']:+.4f}] |" in table[3]


def test_grid_resumes_after_interruption_and_writes_tables(config, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'study')
  calls = []
  _record(monkeypatch, calls, workdir, interrupt_at='runs/m0-w8-logits-mse')
  with pytest.raises(Interrupted):
    study.run_study(config, workdir)
  assert calls == ['teacher', 'baselines/m0-w8', 'runs/m0-w8-logits-kl']
  assert os.listdir(os.path.join(workdir, 'cells')) == ['m0-w8-logits-kl.json']
  finished = open(os.path.join(workdir, 'cells', 'm0-w8-logits-kl.json')).read()

  calls.clear()
  _record(monkeypatch, calls, workdir)
  results = study.run_study(config, workdir)
  # The teacher is restored (not retrained) for the two remaining cells; nothing finished runs again.
  assert calls == ['teacher', 'runs/m0-w8-logits-mse', 'runs/m0-w8-hidden-mse']
  assert open(os.path.join(workdir, 'cells', 'm0-w8-logits-kl.json')).read() == finished
  assert results['best'] in {'m0-w8-logits-kl', 'm0-w8-logits-mse', 'm0-w8-hidden-mse'}
  assert results['export']['latency_ms'] > 0
  _check_tables(workdir)
  if _has_matplotlib():
    for name in ('heatmap', 'latency'):
      with open(os.path.join(workdir, f'study_{name}.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  # A finished study trains nothing; without matplotlib it still writes the tables.
  calls.clear()
  for name in os.listdir(workdir):
    if name.startswith('study'):
      os.remove(os.path.join(workdir, name))
  monkeypatch.setitem(sys.modules, 'matplotlib', None)
  study.run_study(config, workdir)
  assert calls == []
  _check_tables(workdir)
  assert not [n for n in os.listdir(workdir) if n.endswith('.png')]

  # Stored results of another config are refused, not reported as this one's.
  config.train.learning_rate = 0.5
  with pytest.raises(ConfigError, match=r'holds results of another config \(0\.train\.learning_rate was'):
    study.run_study(config, workdir)


def _has_matplotlib() -> bool:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def test_exported_student_matches_the_in_memory_student(tmp_path):
  model = Student('m0', num_outputs=3, width=8, num_heads=2, num_layers=1)
  rng = np.random.default_rng(0)
  batch = {'m0': rng.normal(size=(5, 6, 4)).astype(np.float32),
           'm0_mask': np.arange(6) < np.array([[6], [3], [1], [6], [4]])}  # with padding
  params = model.init(jax.random.key(0), batch)['params']
  path = str(tmp_path / 'student.npz')
  export.export_student(model, params, (6, 4), path, metadata={'cell': 'test'})
  loaded = export.load_exported(path)
  assert loaded.metadata['cell'] == 'test' and loaded.modality == 'm0'
  expected = model.apply({'params': params}, batch)[0]
  np.testing.assert_allclose(loaded(batch), expected, rtol=1e-5, atol=1e-5)
  # The batch size is symbolic: any batch runs.
  small = {k: v[:2] for k, v in batch.items()}
  np.testing.assert_allclose(loaded(small), expected[:2], rtol=1e-5, atol=1e-5)
  # The loader needs neither the models nor the training code (nor Flax).
  code = (f'import sys; from mmkd_jax import export; s = export.load_exported({path!r}); '
          "import numpy as np; s({'m0': np.zeros((1, 6, 4)), 'm0_mask': np.ones((1, 6), bool)}); "
          "bad = [m for m in sys.modules if m.startswith(('flax', 'mmkd_jax.models', 'mmkd_jax.train'))]; "
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_exported_student_runs_on_a_platform_it_was_exported_for(tmp_path):
  """A student exported for several platforms runs on the first present here (the CPU on a GPU host
  too); one exported only for absent platforms fails on load with a one-line error."""
  model = Student('m0', num_outputs=3, width=8, num_heads=2, num_layers=1)
  batch = {'m0': np.ones((2, 6, 4), np.float32), 'm0_mask': np.ones((2, 6), bool)}
  params = model.init(jax.random.key(0), batch)['params']
  present = {d.platform for d in jax.devices()} | {'cpu'}
  path = str(tmp_path / 'multi.npz')
  export.export_student(model, params, (6, 4), path, platforms=('tpu', 'cpu'))
  loaded = export.load_exported(path)
  assert loaded.device.platform == ('tpu' if 'tpu' in present else 'cpu')
  np.testing.assert_allclose(loaded(batch), model.apply({'params': params}, batch)[0], rtol=1e-5, atol=1e-5)
  if 'tpu' not in present:
    export.export_student(model, params, (6, 4), str(tmp_path / 'tpu.npz'), platforms=('tpu',))
    with pytest.raises(ConfigError, match=r"exported for platforms \['tpu'\], none of which is available here"):
      export.load_exported(str(tmp_path / 'tpu.npz'))


@pytest.mark.parametrize('overrides, message', [
    ({'study.levels': ''}, 'config.study.levels is empty'),
    ({'study.methods': 'mse,kld'}, "config.study.methods: unknown distillation method 'kld'; valid choices: all,"),
    ({'study.levels': 'logits,hidden+logitz'}, "unknown distillation level 'logitz' in 'hidden+logitz'"),
    ({'study.modalities': 'm7'}, "config.study.modalities: 'm7' is unknown; valid choices: m0, m1"),
    ({'data.synthetic.num_modalities': 3, 'study.modalities': 'm2'}, "'m2' is not one of the teacher's"),
    ({'study.widths': '8,x'}, "config.study.widths: 'x' is not an integer >= 1"),
    ({'study.widths': '7'}, 'config.study cell m0-w7-logits-kl: config.student.width=7 is not divisible'),
    ({'study.methods': 'dkd', 'study.levels': 'hidden'}, 'every cell of the grid is skipped'),
    ({'study.plots': 'pie'}, "config.study.plots: unknown plot 'pie'; valid choices: heatmap, latency"),
    ({'study.max_runs': 4}, 'config.study.max_runs=4: the grid needs 5 training runs (3 cells x 1 seeds + 1 '
                            'baselines x 1 seeds + 1 teacher)'),
    ({'study.minutes_per_run': 0.6, 'study.max_minutes': 1.0},
     'config.study.max_minutes=1.0: the grid needs about 3 minutes (5 runs'),
])
def test_bad_grids_fail_before_training(config, tmp_path, overrides, message):
  for key, value in overrides.items():
    *path, field = key.split('.')
    section = config
    for name in path:
      section = section[name]
    section[field] = value
  workdir = tmp_path / 'study'
  with pytest.raises(ConfigError) as error:
    study.run_study(config, str(workdir))
  assert message in str(error.value)
  assert '\n' not in str(error.value)
  assert not workdir.exists()


def test_a_config_without_a_grid_is_refused(tmp_path):
  with pytest.raises(ConfigError, match=r'no config.study grid .*python -m mmkd_jax.main'):
    study.run_study(distill_config.get_config(), str(tmp_path / 'study'))
  assert not (tmp_path / 'study').exists()


def test_shipped_configs_fit_their_budget(tmp_path):
  for module, runs in ((study_config, 61), (study_full, 741)):
    config = module.get_config()
    config.data.data_dir = str(tmp_path)
    grid = study.plan(config, data.task_info(data.load_builder(config.data)))
    assert grid.num_runs == runs
