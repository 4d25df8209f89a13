"""End-to-end: the real jobs on a tiny synthetic problem, checkpoints, resume, bad input."""
import json
import logging
import os
import struct

import jax
import numpy as np
import pytest

from mmkd_jax import checkpoint, data, distill, evaluate, loop, step, train, writer
from mmkd_jax.data import pipeline
from mmkd_jax.errors import ConfigError
from tests import conftest


def _saved_state(run_dir: str, step: int | None = None) -> dict:
  """The raw saved train state (a tree of arrays) of a run directory, latest step by default."""
  manager = checkpoint.create_manager(os.path.join(run_dir, 'checkpoints'))
  step = manager.latest_step() if step is None else step
  return checkpoint.read_state(manager, step)


def _saved_data(run_dir: str) -> dict:
  """The JSON item of a run directory's (latest) checkpoint: each member's best step and metrics."""
  manager = checkpoint.create_manager(os.path.join(run_dir, 'checkpoints'))
  return manager.restore(manager.latest_step(), args=checkpoint.ocp.args.Composite(
      data=checkpoint.ocp.args.JsonRestore()))['data']


def _outputs_of_checkpoint(config, run_dir: str, role: str, split: str, which: str = 'best', member: int = 0):
  """(outputs, labels) on `split` of population member `member`'s `role` model saved in `run_dir`:
  its best parameters, or with which='train' those of the latest step; computed here apart from
  the training code's evaluation."""
  builder = data.load_builder(config.data)
  model = step.create_model(config, data.task_info(builder), role)
  saved = _saved_state(run_dir)
  params = jax.tree.map(lambda x: x[member], saved['best'] if which == 'best' else saved['train']['params'])['model']
  apply = jax.jit(lambda p, b: model.apply({'params': p}, b)[0])
  outputs, labels = [], []
  for batch in pipeline.eval_batches(builder, split, step.batch_modalities(model), config.train.eval_batch_size):
    real = batch['weight'] > 0
    outputs.append(np.asarray(apply(params, batch))[real])
    labels.append(batch['label'][real])
  return np.concatenate(outputs), np.concatenate(labels)


def _accuracy_of_checkpoint(config, run_dir: str, role: str, split: str = 'test', member: int = 0) -> float:
  outputs, labels = _outputs_of_checkpoint(config, run_dir, role, split, member=member)
  return float(np.mean(outputs.argmax(-1) == labels))


def _logged_scalars(path: str) -> list[tuple[str, int]]:
  """(tag, step) of every scalar in a TensorBoard event file (TFRecord framing: length, its CRC,
  the Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    content = f.read()
  logged, position = [], 0
  while position < len(content):
    (length,) = struct.unpack('<Q', content[position:position + 8])
    event = event_pb2.Event.FromString(content[position + 12:position + 12 + length])
    logged += [(value.tag, event.step) for value in event.summary.value]
    position += 12 + length + 4
  return logged


@pytest.mark.slow
def test_distill_job_trains_checkpoints_and_reports(tiny_config, tmp_path):
  tiny_config.distill.terms = 'logits:kl:1.0,hidden:mse:0.5,attention:kl:0.5,pooled:contrastive:0.1'
  workdir = str(tmp_path / 'work')
  results = train.train_and_evaluate(tiny_config, workdir)
  for arm in ('student', 'distilled'):  # one seed: the mean is that run's best checkpoint's test accuracy
    assert results[arm]['mean']['accuracy'] == _accuracy_of_checkpoint(
        tiny_config, os.path.join(workdir, arm), 'student')
  assert results['teacher']['params'] > results['student']['params']
  with open(os.path.join(workdir, 'report.json')) as f:
    stored = json.load(f)
  assert stored['terms'] == tiny_config.distill.terms
  assert [(r['of'], r['inputs'], r['seeds']) for r in stored['references']] == [('teacher', 'm0+m1', [0]),
                                                                                ('student', 'm0', [0])]
  assert stored['gain_paired']['accuracy']['interval'] == 'undefined'  # one seed
  assert set(stored['versus_reference']) == {'student', 'distilled'}
  report = open(os.path.join(workdir, 'report.md')).read()
  assert '| distilled student (m0) |' in report and '| teacher (m0 + m1) |' in report
  assert '| multinomial logistic regression (m0 + m1) |' in report
  # Each run directory keeps its checkpoints (latest + best) and TensorBoard events.
  run_dir = os.path.join(workdir, 'distilled')
  assert os.listdir(os.path.join(run_dir, 'checkpoints'))
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(os.path.join(run_dir, 'seed_0')))
  # The distilled student's checkpoint holds the student and its projector, never the teacher.
  saved = _saved_state(run_dir)['train']
  assert set(saved['params']) == {'model', 'projector'}
  assert not any('cross' in k for k in saved['params']['model'])


def test_teacher_keeps_the_best_checkpoint_and_a_finished_run_is_not_retrained(tiny_config, tmp_path, monkeypatch):
  """Validation scores scripted so that the best step (3) is not the latest (6): the checkpoint of
  step 6 holds step 3's parameters as the best, the results are theirs, and a second call restores
  them without training."""
  validated = {}  # step -> the validation metrics written at it
  write_validation = writer.MetricWriter.write_validation
  def recording(self, step_now, values):
    validated[step_now] = values
    write_validation(self, step_now, values)
  monkeypatch.setattr(writer.MetricWriter, 'write_validation', recording)
  monkeypatch.setattr(evaluate, 'score', lambda task, values: 0.9 if values is validated.get(3) else 0.1)
  tiny_config.job = 'teacher'
  workdir = str(tmp_path / 'teacher')
  first = train.train_and_evaluate(tiny_config, workdir)
  manager = checkpoint.create_manager(os.path.join(workdir, 'checkpoints'))
  assert manager.all_steps() == [6]  # the latest only: the best parameters are inside it
  saved = _saved_data(workdir)
  assert saved['best_step'] == [3] and saved['best_validation'] == [validated[3]]
  assert first['validation'] == validated[3]
  outputs, labels = _outputs_of_checkpoint(tiny_config, workdir, 'teacher', 'test')
  assert first['test'] == evaluate.compute_metrics('classification', outputs, labels)
  later, _ = _outputs_of_checkpoint(tiny_config, workdir, 'teacher', 'test', which='train')
  assert not np.allclose(later, outputs)  # step 6's parameters are another model
  events = [n for n in os.listdir(workdir) if n.startswith('events')]
  assert len(events) == 1
  logged = _logged_scalars(os.path.join(workdir, events[0]))
  assert sorted({step for tag, step in logged if tag.startswith('train/')}) == [3, 6]
  assert sorted(step for tag, step in logged if tag == 'validation/accuracy') == [3, 6]
  before = {name: open(os.path.join(workdir, name), 'rb').read() for name in (events[0], 'metrics.jsonl')}

  second = train.train_and_evaluate(tiny_config, workdir)  # restores the best parameters, trains nothing
  assert second['test'] == first['test'] and second['validation'] == first['validation']
  assert manager.all_steps() == [6]
  assert {name: open(os.path.join(workdir, name), 'rb').read() for name in before} == before
  for name in os.listdir(workdir):
    if name.startswith('events'):
      assert name == events[0] or _logged_scalars(os.path.join(workdir, name)) == []


def test_single_run_job_claims_its_workdir_before_writing_config_json(tiny_config, tmp_path):
  """A teacher or student job's workdir is its run directory. Holding a run of another config, it is
  refused untouched; with config.overwrite that run is replaced and the new config.json stays."""
  workdir = tmp_path / 'work'
  checkpoint.claim_run_dir(str(workdir), {'role': 'student', 'seeds': [7], 'layout': train.LAYOUT}, overwrite=False)
  (workdir / 'config.json').write_text('{"old": true}')
  tiny_config.job = 'student'
  tiny_config.train.num_steps, tiny_config.train.warmup_steps = 2, 1
  with pytest.raises(ConfigError, match='holds a run of another config .* set --config.overwrite=True'):
    train.train_and_evaluate(tiny_config, str(workdir))
  assert (workdir / 'config.json').read_text() == '{"old": true}'
  tiny_config.overwrite = True
  train.train_and_evaluate(tiny_config, str(workdir))
  assert json.loads((workdir / 'config.json').read_text()) == json.loads(tiny_config.to_json_best_effort())
  assert checkpoint.read_fingerprint(str(workdir))['seeds'] == [tiny_config.seed]
  assert _saved_state(str(workdir))['train']['step'].tolist() == [2]


def test_the_layer_kernels_reach_the_models_and_stay_out_of_the_run_fingerprint(tiny_config):
  """config.train.kernels picks the models' layers; both choices share one parameter tree, so a run
  trained with one resumes or is evaluated with the other."""
  info = data.TaskInfo({'m0': (8, 6), 'm1': (8, 6)}, 'classification', 4)
  fingerprints = []
  for kernels in ('cpu', 'flax'):
    tiny_config.train.kernels = kernels
    assert {step.create_model(tiny_config, info, role).kernels for role in ('teacher', 'student')} == {kernels}
    fingerprints.append(train.run_fingerprint(tiny_config, 'student', 0, distilled=False))
  assert fingerprints[0] == fingerprints[1]


def test_background_checkpoint_holds_the_state_of_its_step_while_training_donates_on(tmp_path):
  """checkpoint.save returns before the write ends; the steps that follow ask to donate the
  state's buffers, and the checkpoint must still hold the state of the step it was saved at."""
  update = jax.jit(lambda tree: jax.tree.map(lambda x: x * 1.5 + 1.0, tree), donate_argnums=0)
  state = {'w': jax.numpy.arange(4096.0).reshape(64, 64), 'b': jax.numpy.ones(64)}
  manager = checkpoint.create_manager(str(tmp_path / 'checkpoints'))
  expected = {}
  for at in (1, 2):
    state = update(state)
    expected[at] = jax.tree.map(np.array, state)
    checkpoint.save(manager, at, state, {'next_step': at})
    for _ in range(5):
      state = update(state)
    manager.wait_until_finished()
    restored, data_state = checkpoint.restore(manager, at, jax.tree.map(np.zeros_like, expected[at]))
    assert data_state == {'next_step': at}
    for key in ('w', 'b'):
      np.testing.assert_array_equal(np.asarray(restored[key]), expected[at][key])
  manager.close()


@pytest.mark.parametrize('key, value, message', [
    ('distill.terms', 'logitz:kl:1', "unknown distillation level 'logitz'"),
    ('distill.terms', 'logits:kld:1', "unknown distillation method 'kld'"),
    ('student.modality', 'm7', "config.student.modality='m7' is unknown; valid choices: m0, m1"),
    ('teacher.modalities', 'm0,audio', "config.teacher.modalities='audio' is unknown"),
    ('data.name', 'mnist', "config.data.name='mnist' is unknown; valid choices: arrays, iemocap, mfeat"),
])
def test_bad_names_fail_before_training(tiny_config, tmp_path, key, value, message):
  section, field = key.split('.')
  tiny_config[section][field] = value
  workdir = tmp_path / 'work'
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(tiny_config, str(workdir))
  assert message in str(error.value)
  assert '\n' not in str(error.value)
  assert not (workdir / 'teacher').exists()


def test_bfloat16_compute_trains_with_finite_float32_losses(tiny_config, tmp_path):
  tiny_config.job = 'student'
  tiny_config.train.compute_dtype = 'bfloat16'
  results = train.train_and_evaluate(tiny_config, str(tmp_path / 'work'))
  assert results['test']['accuracy'] == _accuracy_of_checkpoint(tiny_config, str(tmp_path / 'work'), 'student')
  with open(tmp_path / 'work' / 'metrics.jsonl') as f:
    losses = [json.loads(line)['loss'] for line in f]
  assert len(losses) == 2 and all(np.isfinite(losses))
  # Parameters stay float32 whatever the compute dtype.
  saved = _saved_state(str(tmp_path / 'work'))['train']
  assert {x.dtype for x in jax.tree.leaves(saved['params'])} == {np.dtype('float32')}


def test_skip_nonfinite_skips_the_bad_step_counts_it_and_finishes(tiny_config, tmp_path, monkeypatch):
  monkeypatch.setattr(loop.TrainBatches, 'fetch', loop.TrainBatches.fetch)  # undone after the test
  conftest.poison_batches(step=2)
  tiny_config.job = 'teacher'
  tiny_config.train.skip_nonfinite = True
  train.train_and_evaluate(tiny_config, str(tmp_path / 'work'))
  with open(tmp_path / 'work' / 'metrics.jsonl') as f:
    logged = [json.loads(line) for line in f]
  assert [r['skipped_steps'] for r in logged] == [1, 1]
  assert all(np.isfinite(r['loss']) for r in logged)
  saved = _saved_state(str(tmp_path / 'work'))['train']
  assert int(saved['step'][0]) == tiny_config.train.num_steps
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(saved['params']))


@pytest.mark.slow
def test_distill_from_an_explicit_teacher_dir_restores_it_untouched(tiny_config, tmp_path):
  """A teacher trained elsewhere (other budget) is restored, never trained or written to."""
  teacher_config = tiny_config.copy_and_resolve_references()
  teacher_config.job = 'teacher'
  teacher_config.train.num_steps = 3
  teacher_dir = tmp_path / 'teacher'
  teacher = train.train_and_evaluate(teacher_config, str(teacher_dir))
  before = sorted(os.listdir(teacher_dir)), sorted(os.listdir(teacher_dir / 'checkpoints'))
  tiny_config.distill.teacher_dir = str(teacher_dir)
  results = train.train_and_evaluate(tiny_config, str(tmp_path / 'work'))
  assert results['teacher']['test'] == teacher['test']
  assert (sorted(os.listdir(teacher_dir)), sorted(os.listdir(teacher_dir / 'checkpoints'))) == before
  assert not (tmp_path / 'work' / 'teacher').exists()


ALL_LEVELS = 'logits:kl:1.0,hidden:mse:0.5,attention:kl:0.5,pooled:cosine:0.1'


def _distillation_setup(config):
  """A tiny student, a (randomly initialised) teacher and their Distillation on the synthetic data."""
  config.distill.terms = ALL_LEVELS
  builder = data.load_builder(config.data)
  info = data.task_info(builder)
  teacher, student = step.create_model(config, info, 'teacher'), step.create_model(config, info, 'student')
  modalities = list(teacher.modalities)
  teacher_params = teacher.init(jax.random.key(5), step.dummy_batch(info, modalities))['params']
  state, dist = step.create_train_state(config, student, info, modalities, tuple(jax.random.split(jax.random.key(1))),
                                         (teacher, teacher_params), distill.parse_terms(config.distill.terms))
  return builder, info, student, teacher, teacher_params, state, dist


def test_cached_teacher_targets_are_the_teacher_sides_of_each_drawn_example(tiny_config):
  """Read back by row from the cache, every pair of a shuffled batch is the pair the teacher gives online."""
  builder, info, student, teacher, teacher_params, state, dist = _distillation_setup(tiny_config)
  n = pipeline.num_examples(builder, 'train')
  cached_dist, fields = step.teacher_targets(student, dist, state.params['model'], teacher_params, builder, info, 24,
                                              step.create_mesh(tiny_config), 1.0)
  assert set(fields) == {'teacher/logits/logits', 'teacher/pooled/pooled', 'teacher/hidden/hidden_0_0',
                         'teacher/attention/attention_0_0'}
  assert all(len(v) == n for v in fields.values())
  batch = next(pipeline.train_iterator(builder, ['m0', 'm1'], 16, seed=4, row_fields={'row': np.arange(n)}))
  rows = batch.pop('row')
  taps_of_student = student.apply({'params': state.params['model']}, batch)[1]
  online = step.distillation_pairs(student, dist, taps_of_student, teacher_params, batch)
  student_only = {k: v for k, v in batch.items() if not k.startswith('m1')}
  cached = step.distillation_pairs(student, cached_dist, taps_of_student, None,
                                    {**student_only, **{k: v[rows] for k, v in fields.items()}})
  for level, named in online.items():
    for name, pair in named.items():
      np.testing.assert_allclose(cached[level][name].teacher, pair.teacher, rtol=1e-5, atol=1e-6, err_msg=name)
      np.testing.assert_array_equal(cached[level][name].student, pair.student)
      np.testing.assert_array_equal(cached[level][name].mask, pair.mask)


@pytest.mark.slow
def test_cached_teacher_gives_the_online_loss_curve_and_falls_back_above_its_memory_limit(tiny_config, tmp_path,
                                                                                       caplog):
  builder, info, _, teacher, teacher_params, _, _ = _distillation_setup(tiny_config)
  tiny_config.train.log_every = 1
  terms = distill.parse_terms(tiny_config.distill.terms)
  curves, results = {}, {}
  for arm, cache, max_gb in (('cached', True, 2.0), ('online', False, 2.0), ('over_limit', True, 0.0)):
    tiny_config.distill.cache_teacher, tiny_config.distill.cache_teacher_max_gb = cache, max_gb
    with caplog.at_level(logging.WARNING):
      results[arm] = train.train_run(tiny_config, 'student', str(tmp_path / arm), 0, builder, info,
                                     teacher=(teacher, teacher_params), terms=terms)
    with open(tmp_path / arm / 'metrics.jsonl') as f:
      curves[arm] = [[row[k] for k in sorted(row)] for row in map(json.loads, f)]
  assert len(curves['cached']) == tiny_config.train.num_steps
  np.testing.assert_allclose(curves['cached'], curves['online'], rtol=1e-5, atol=1e-6)
  assert curves['over_limit'] == curves['online']
  assert 'more than config.distill.cache_teacher_max_gb=0.0: the teacher runs in every step' in caplog.text
  # A finished run is restored and evaluated without computing the teacher's targets again.
  tiny_config.distill.cache_teacher = True
  caplog.clear()
  with caplog.at_level(logging.INFO):
    again = train.train_run(tiny_config, 'student', str(tmp_path / 'cached'), 0, builder, info,
                            teacher=(teacher, teacher_params), terms=terms)
  assert 'finished run restored at step %d' % tiny_config.train.num_steps in caplog.text
  assert 'teacher targets' not in caplog.text
  assert again.test == results['cached'].test


def test_runs_of_other_seeds_reuse_the_traced_train_step(tiny_config, tmp_path):
  """Equal models, optimizer and state structure: the second seed's run traces nothing new."""
  builder = data.load_builder(tiny_config.data)
  info = data.task_info(builder)
  tiny_config.train.num_steps = 2
  before = loop.train_steps._cache_size()
  first = train.train_run(tiny_config, 'student', str(tmp_path / 'seed_0'), 0, builder, info)
  after_first = loop.train_steps._cache_size()
  second = train.train_run(tiny_config, 'student', str(tmp_path / 'seed_1'), 1, builder, info)
  assert after_first - before <= 1 and loop.train_steps._cache_size() == after_first
  # Two real runs: other seeds, other parameters.
  assert not np.array_equal(jax.tree.leaves(first.params)[0], jax.tree.leaves(second.params)[0])


@pytest.mark.parametrize('run_dir, role, label', [
    ('/w/teacher', 'teacher', 'teacher'), ('/w/student/seed_3', 'student', 'student/seed_3'),
    ('/w/distilled/seed_0/', 'student', 'distilled/seed_0'), ('/tmp/mmkd_jax', 'student', 'student'),
    ('/s/runs/pix64-hidden-mse/seed_1', 'student', 'pix64-hidden-mse/seed_1')])
def test_run_label_names_the_arm_and_seed(run_dir, role, label):
  assert loop.run_label(run_dir, role) == label


def test_resumed_run_drops_the_logged_steps_past_its_checkpoint(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': step, 'loss': 1.0}) + '\n' for step in (10, 20, 30, 40)))
  writer.drop_logged_steps_after(str(path), 20)
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [10, 20]
  writer.drop_logged_steps_after(str(tmp_path / 'absent.jsonl'), 20)  # a run that logged nothing yet
