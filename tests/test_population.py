"""Population training and fused dispatch: a population is its seeds' own runs, K steps per call
are K single steps, and a member that goes bad stops alone."""
import json
import logging
import os

import jax
import numpy as np
import pytest

from mmkd_jax import checkpoint, data, loop, step, train
from mmkd_jax.errors import ConfigError
from mmkd_jax.data import pipeline
from tests import conftest


def _final(run_dir: str) -> dict:
  """The saved train state (member axis first) and guard of a run directory's latest checkpoint."""
  manager = checkpoint.create_manager(os.path.join(run_dir, 'checkpoints'))
  return checkpoint.read_state(manager, manager.latest_step())


def _curve(log_dir) -> list[float]:
  with open(os.path.join(log_dir, 'metrics.jsonl')) as f:
    return [json.loads(line)['loss'] for line in f]


@pytest.fixture
def setup(tiny_config):
  builder = data.load_builder(tiny_config.data)
  tiny_config.train.log_every = 1
  return tiny_config, builder, data.task_info(builder)


def test_population_equals_the_sequential_runs(setup, tmp_path):
  config, builder, info = setup
  # SGD: Adam's normalised update turns the rounding noise of a near-zero gradient into steps of the
  # learning rate's size, which an elementwise comparison of parameters would count as a difference.
  config.train.optimizer, config.train.learning_rate = 'sgd', 0.1
  population = train.train_arm(config, str(tmp_path / 'population'), (0, 1), builder, info)
  config.train.population = False
  sequential = train.train_arm(config, str(tmp_path / 'sequential'), (0, 1), builder, info)
  together = _final(str(tmp_path / 'population'))['train']['params']
  for i, seed in enumerate((0, 1)):
    alone = _final(str(tmp_path / 'sequential' / f'seed_{seed}'))['train']['params']
    for a, b in zip(jax.tree.leaves(loop.member(together, i)), jax.tree.leaves(alone)):
      np.testing.assert_allclose(a, b[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_curve(tmp_path / 'population' / f'seed_{seed}'),
                               _curve(tmp_path / 'sequential' / f'seed_{seed}'), rtol=1e-5)
    assert population[i].test == pytest.approx(sequential[i].test)
  # Two real members: other seeds, other parameters.
  assert not np.allclose(jax.tree.leaves(together)[0][0], jax.tree.leaves(together)[0][1])


def test_k_steps_per_call_give_the_parameters_of_single_steps(setup, tmp_path):
  config, builder, info = setup
  config.train.log_every = config.train.eval_every = 6
  finals = {}
  for k in (1, 4):
    config.train.steps_per_call = k  # 4: calls of 4 and 2 steps, the second shortened to end on the boundary
    train.train_run(config, 'student', str(tmp_path / str(k)), 0, builder, info)
    finals[k] = jax.tree.leaves(_final(str(tmp_path / str(k)))['train'])
  for a, b in zip(finals[1], finals[4]):
    np.testing.assert_array_equal(a, b)


def test_host_gathered_batches_equal_device_resident_ones(setup, tmp_path):
  config, builder, info = setup
  finals = {}
  for max_mb in (0, 1024):
    config.train.device_data_max_mb = max_mb
    train.train_run(config, 'student', str(tmp_path / str(max_mb)), 0, builder, info)
    finals[max_mb] = jax.tree.leaves(_final(str(tmp_path / str(max_mb)))['train'])
  for a, b in zip(finals[0], finals[1024]):
    np.testing.assert_array_equal(a, b)


def test_batches_follow_the_host_iterators_order(setup):
  config, builder, info = setup
  mesh = step.create_mesh(config, 2)
  arrays = pipeline.train_arrays(builder, ['m0'], row_fields={'row': np.arange(64)})
  fetched = loop.TrainBatches(arrays, (3, 5), 16, mesh, resident=True).fetch(first_step=4, count=3)
  for i, seed in enumerate((3, 5)):
    iterator = pipeline.train_iterator(builder, ['m0'], 16, seed, row_fields={'row': np.arange(64)})
    expected = [next(iterator)['row'] for _ in range(6)][3:]
    np.testing.assert_array_equal(np.asarray(fetched['row'][:, i]), expected)


def test_a_nan_in_one_member_stops_it_alone(setup, tmp_path, monkeypatch, caplog):
  config, builder, info = setup
  train.train_arm(config, str(tmp_path / 'clean'), (0, 1), builder, info)
  monkeypatch.setattr(loop.TrainBatches, 'fetch', loop.TrainBatches.fetch)  # undone after the test
  conftest.poison_batches(step=2, member=1)
  with caplog.at_level(logging.WARNING):
    results = train.train_arm(config, str(tmp_path / 'poisoned'), (0, 1), builder, info)
  assert ('[poisoned/seed_1] non-finite loss, task_loss, grad_norm at step 2; the update was not applied '
          'and this member stopped; the others go on') in caplog.text
  assert [r.stopped_at for r in results] == [None, 2]
  clean, bad = _final(str(tmp_path / 'clean')), _final(str(tmp_path / 'poisoned'))
  for a, b in zip(jax.tree.leaves(loop.member(clean['train'], 0)), jax.tree.leaves(loop.member(bad['train'], 0))):
    np.testing.assert_array_equal(a, b)
  assert _curve(tmp_path / 'clean' / 'seed_0') == _curve(tmp_path / 'poisoned' / 'seed_0')
  # The stopped member keeps its parameters of step 1 and logs no steps past it.
  assert bad['guard']['stopped'].tolist() == [False, True] and bad['guard']['stopped_at'].tolist() == [0, 2]
  assert len(_curve(tmp_path / 'poisoned' / 'seed_1')) == 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(bad['train']['params']))


def test_a_workdir_of_the_earlier_layout_is_refused(setup, tmp_path):
  config, builder, info = setup
  old = tmp_path / 'student'
  checkpoint.write_json(str(old / 'seed_0' / 'run.json'), train.run_fingerprint(config, 'student', 0, False))
  with pytest.raises(ConfigError, match=r'holds runs of another layout \(an earlier mmkd_jax version'):
    train.train_arm(config, str(old), (0,), builder, info)
  checkpoint.write_json(str(tmp_path / 'one' / 'run.json'), train.run_fingerprint(config, 'student', 0, False))
  with pytest.raises(ConfigError, match='holds a run of another layout'):
    train.train_run(config, 'student', str(tmp_path / 'one'), 0, builder, info)


def test_the_report_names_the_members_a_nan_stopped(tiny_config, tmp_path, monkeypatch):
  monkeypatch.setattr(loop.TrainBatches, 'fetch', loop.TrainBatches.fetch)  # undone after the test
  conftest.poison_batches(step=2, member=1)  # the teacher, a population of one, has no member 1
  tiny_config.report.seeds = '0,1'
  results = train.train_and_evaluate(tiny_config, str(tmp_path / 'work'))
  assert results['stopped_at_step'] == {'student/seed_1': 2, 'distilled/seed_1': 2}
  with open(tmp_path / 'work' / 'report.json') as f:
    assert json.load(f)['stopped_at_step'] == results['stopped_at_step']
  assert ('Stopped by a non-finite step (their results are of the best checkpoint before it): student/seed_1 at '
          'step 2, distilled/seed_1 at step 2.') in (tmp_path / 'work' / 'report.md').read_text()


def test_a_population_has_one_progress_label():
  assert loop.population_label(['student/seed_0', 'student/seed_1', 'student/seed_4']) == 'student/seed_{0,1,4}'
  assert loop.population_label(['teacher']) == 'teacher'
  assert loop.population_label(['a/seed_7']) == 'a/seed_7'
