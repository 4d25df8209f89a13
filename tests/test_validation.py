"""Every config error is one line naming the key, the bad value and what is allowed, before training."""
import json

import ml_collections
import pytest

from configs import study as study_config
from mmkd_jax import checkpoint, data, train, validation
from mmkd_jax.errors import ConfigError


def _set(config, key: str, value) -> None:
  *path, last = key.split('.')
  node = config
  for part in path:
    node = node[part]
  node[last] = value


INFO = data.TaskInfo({'m0': (8, 6), 'm1': (8, 6)}, 'classification', 4)

CASES = [
    ('job', 'evaluate', "config.job='evaluate' is unknown; valid choices: teacher, student, distill"),
    ('data.name', 'mnist', "config.data.name='mnist' is unknown; valid choices: arrays, iemocap, mfeat, mosei_senti"),
    ('train.optimizer', 'lamb', "config.train.optimizer='lamb' is unknown; valid choices: adam, adamw, sgd"),
    ('train.schedule', 'step', "config.train.schedule='step' is unknown; valid choices: constant, cosine, linear"),
    ('student.embedding', 'rows', "config.student.embedding='rows' is unknown; valid choices: per_position, shared"),
    ('train.compute_dtype', 'float16', "config.train.compute_dtype='float16' is unknown"),
    ('train.kernels', 'gpu', "config.train.kernels='gpu' is unknown; valid choices: auto, cpu, flax"),
    ('distill.terms', 'logitz:kl:1', "config.distill.terms: unknown distillation level 'logitz' in 'logitz:kl:1'; "
     'valid choices: attention, hidden, logits, pooled'),
    ('distill.terms', 'logits:kld:1', "config.distill.terms: unknown distillation method 'kld' in 'logits:kld:1'; "
     'valid choices: attention_transfer, contrastive'),
    ('distill.terms', 'logits:kl:0', "config.distill.terms: weight '0' of 'logits:kl:0' must be a finite number > 0"),
    ('distill.terms', 'logits:kl:-1', "weight '-1' of 'logits:kl:-1' must be a finite number > 0"),
    ('distill.terms', 'logits:kl', "config.distill.terms: bad entry 'logits:kl'; expected 'level:method:weight'"),
    ('distill.terms', '', 'config.distill.terms is empty'),
    ('distill.hparams.kl.temperature', 0.0, 'config.distill.hparams.kl.temperature=0.0 must be > 0'),
    ('distill.hparams.kl.temperature', -2.0, 'config.distill.hparams.kl.temperature=-2.0 must be > 0'),
    ('distill.layer_map', '0:5', "config.distill.layer_map: entry '0:5' is out of range; student layers are 0..0, "
     'teacher layers 0..0'),
    ('distill.layer_map', '3:0', "config.distill.layer_map: entry '3:0' is out of range"),
    ('distill.layer_map', 'a-b', "config.distill.layer_map: bad entry 'a-b'"),
    ('student.width', 0, 'config.student.width=0 must be > 0'),
    ('teacher.num_heads', -1, 'config.teacher.num_heads=-1 must be > 0'),
    ('train.batch_size', 0, 'config.train.batch_size=0 must be > 0'),
    ('train.learning_rate', -0.1, 'config.train.learning_rate=-0.1 must be > 0'),
    ('train.num_steps', 0, 'config.train.num_steps=0 must be > 0'),
    ('teacher.dropout_rate', -0.5, 'config.teacher.dropout_rate=-0.5 must be >= 0'),
    ('student.num_heads', 3, 'config.student.width=8 is not divisible by config.student.num_heads=3'),
    ('teacher.modalities', 'm0', "config.teacher.modalities='m0': the teacher needs at least two"),
    ('report.seeds', '0,x', "config.report.seeds='0,x': expected distinct comma-separated integers"),
    ('report.seeds', '', "config.report.seeds='': expected distinct comma-separated integers"),
    ('report.seeds', '0,1,0', "config.report.seeds='0,1,0': expected distinct comma-separated integers such as "
     "'0,1,2,3,4' (each seed is one baseline and one distilled run); seed 0 is given twice"),
    ('report.seeds', '3,1,3,1,2', 'seeds 1, 3 are given twice'),
    ('report.interval', 'bootstrap', "config.report.interval='bootstrap' is unknown; valid choices: auto, student_t, "
     'none'),
    ('student.dropout_rate', 1.5, 'config.student.dropout_rate=1.5 must be < 1'),
    ('teacher.dropout_rate', 1.0, 'config.teacher.dropout_rate=1.0 must be < 1'),
    ('train.warmup_steps', 7, 'config.train.warmup_steps=7 is more than config.train.num_steps=6'),
    ('host.cpu_dispatch', 'threads', "config.host.cpu_dispatch='threads' is unknown; valid choices: auto, sync, async"),
    ('distributed.initialize', 'yes',
     "config.distributed.initialize='yes' is unknown; valid choices: auto, always, never"),
    ('host.cpu_devices', -2, 'config.host.cpu_devices=-2 must be >= 0'),
]


@pytest.mark.parametrize('key, value, message', CASES, ids=[f'{k}={v!r}' for k, v, _ in CASES])
def test_config_errors_name_key_and_value(tiny_config, key, value, message):
  _set(tiny_config, key, value)
  with pytest.raises(ConfigError) as error:
    validation.check_config(tiny_config)
    validation.check_against_data(tiny_config, INFO)
  assert message in str(error.value)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('seeds, interval', [('0', 'auto'), ('0,1', 'auto'), ('0,1', 'none'), ('0,1,2', 'student_t')])
def test_intervals_accept_these_seeds(tiny_config, seeds, interval):
  tiny_config.report.seeds, tiny_config.report.interval = seeds, interval
  validation.check_config(tiny_config)


@pytest.mark.parametrize('seeds, count', [('0', '1 seed'), ('4,7', '2 seeds')])
def test_too_few_seeds_for_an_asked_interval_is_one_line(tiny_config, seeds, count):
  tiny_config.report.seeds, tiny_config.report.interval = seeds, 'student_t'
  with pytest.raises(ConfigError) as error:
    validation.check_config(tiny_config)
  assert str(error.value) == (f"config.report.seeds={seeds!r} gives {count}; config.report.interval='student_t' "
                              "needs at least 3 (or set it to 'auto', which reports the interval as undefined below "
                              "that, or to 'none')")


def test_seeds_of_another_key_name_that_key(tiny_config):
  tiny_config.report.seeds = '0'
  tiny_config.study = ml_collections.ConfigDict({'seeds': '2,2'})
  with pytest.raises(ConfigError, match=r"^config.study.seeds='2,2': .*; seed 2 is given twice$"):
    validation.seeds(tiny_config, 'study.seeds')


DATA_CASES = [
    ('student.modality', 'm7', "config.student.modality='m7' is unknown; valid choices: m0, m1"),
    ('teacher.modalities', 'm0,audio', "config.teacher.modalities='audio' is unknown; valid choices: m0, m1"),
]


@pytest.mark.parametrize('key, value, message', DATA_CASES)
def test_modality_errors_name_key_and_value(tiny_config, key, value, message):
  _set(tiny_config, key, value)
  validation.check_config(tiny_config)
  with pytest.raises(ConfigError, match=message.replace('(', r'\(')):
    validation.check_against_data(tiny_config, INFO)


def test_student_modality_must_be_a_teacher_stream(tiny_config):
  tiny_config.teacher.modalities = 'm1,m2'
  info = data.TaskInfo({'m0': (8, 6), 'm1': (8, 6), 'm2': (8, 6)}, 'classification', 4)
  with pytest.raises(ConfigError, match="config.student.modality='m0' is not one of the teacher's modalities"):
    validation.check_against_data(tiny_config, info)


def test_hidden_level_between_widths_needs_the_projection(tiny_config):
  tiny_config.distill.terms = 'hidden:mse:1.0'
  tiny_config.distill.projection = False
  with pytest.raises(ConfigError, match="config.distill.projection=False but 'hidden/mse' compares student width 8 "
                                       'with teacher width 16'):
    validation.check_config(tiny_config)
  tiny_config.distill.terms = 'hidden:attention_transfer:1.0'  # width-agnostic: allowed
  validation.check_config(tiny_config)


def test_unknown_method_hyperparameter(tiny_config):
  tiny_config.distill.hparams.kl.tau = 2.0
  with pytest.raises(ConfigError, match='config.distill.hparams.kl.tau: unknown hyperparameter; valid choices: '
                                       'temperature'):
    validation.check_config(tiny_config)


def test_main_refuses_a_study_config(tmp_path):
  # A study config passed to mmkd_jax.main would otherwise run one distillation job with its settings.
  with pytest.raises(ConfigError, match=r'python -m mmkd_jax.study .*one of teacher, student, distill'):
    train.train_and_evaluate(study_config.get_config(), str(tmp_path / 'work'))
  assert not (tmp_path / 'work').exists()


def test_workdir_that_is_a_file_is_refused_before_anything_runs(tiny_config, tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('keep me')
  with pytest.raises(ConfigError, match=rf"^--workdir='{path}' is a file; give a directory"):
    train.train_and_evaluate(tiny_config, str(path))
  assert path.read_text() == 'keep me'


def test_missing_teacher_checkpoint(tiny_config, tmp_path):
  tiny_config.distill.teacher_dir = str(tmp_path / 'nowhere')
  with pytest.raises(ConfigError, match=r"config.distill.teacher_dir='.*nowhere' holds no trained teacher"):
    train.train_and_evaluate(tiny_config, str(tmp_path / 'work'))


def test_teacher_trained_on_other_modalities_or_shapes(tiny_config, tmp_path):
  teacher_dir = tmp_path / 'teacher'
  (teacher_dir / 'checkpoints' / '6').mkdir(parents=True)
  fingerprint = train.arm_fingerprint(tiny_config, 'teacher', (0,), distilled=False)
  checkpoint.claim_run_dir(str(teacher_dir), fingerprint, overwrite=False)
  tiny_config.distill.teacher_dir = str(teacher_dir)
  train.check_teacher_dir(tiny_config, str(teacher_dir))  # the same config passes
  other = tiny_config.copy_and_resolve_references()
  other.teacher.modalities = 'm1,m0'
  with pytest.raises(ConfigError, match="teacher was trained with another config \\(teacher.modalities was 'm0,m1', "
                                       "now 'm1,m0'\\)"):
    train.check_teacher_dir(other, str(teacher_dir))
  other = tiny_config.copy_and_resolve_references()
  other.data.synthetic.seq_len = 12
  with pytest.raises(ConfigError, match='data.synthetic.seq_len was 8, now 12'):
    train.check_teacher_dir(other, str(teacher_dir))


def test_workdir_of_another_config_is_refused_unless_overwrite(tiny_config, tmp_path):
  run_dir = str(tmp_path / 'run')
  checkpoint.claim_run_dir(run_dir, train.run_fingerprint(tiny_config, 'student', 0, False), overwrite=False)
  (tmp_path / 'run' / 'checkpoints').mkdir()
  tiny_config.train.learning_rate = 0.5
  changed = train.run_fingerprint(tiny_config, 'student', 0, False)
  with pytest.raises(ConfigError, match=r'holds a run of another config \(train.learning_rate was 0.001, now 0.5\); '
                                       'use another --workdir or set --config.overwrite=True'):
    checkpoint.claim_run_dir(run_dir, changed, overwrite=False)
  assert (tmp_path / 'run' / 'checkpoints').exists()  # nothing lost by the refusal
  checkpoint.claim_run_dir(run_dir, changed, overwrite=True)
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  assert checkpoint.read_fingerprint(run_dir) == changed


def test_distilled_run_fingerprint_holds_only_the_hparams_of_its_methods(tiny_config):
  tiny_config.distill.terms = 'logits:kl:1.0,hidden:mse:1.0'
  before = train.run_fingerprint(tiny_config, 'student', 0, distilled=True)
  tiny_config.distill.hparams.contrastive.temperature = 0.5  # a method this run does not use
  assert train.run_fingerprint(tiny_config, 'student', 0, distilled=True) == before
  tiny_config.distill.hparams.kl.temperature = 2.0
  assert checkpoint.first_difference(before, train.run_fingerprint(tiny_config, 'student', 0, distilled=True)) == (
      'distill.hparams.kl.temperature was 4.0, now 2.0')


def test_run_dir_of_an_earlier_version_with_every_methods_hparams_is_still_claimed(tiny_config, tmp_path):
  """Earlier versions stored the hparams of every method in run.json: such a run dir resumes."""
  tiny_config.distill.terms = 'logits:kl:1.0'
  wanted = train.run_fingerprint(tiny_config, 'student', 0, distilled=True)
  older = json.loads(json.dumps(wanted))
  older['distill']['hparams'] = tiny_config.distill.hparams.to_dict()
  assert set(older['distill']['hparams']) > {'kl'}
  checkpoint.write_json(str(tmp_path / 'run' / 'run.json'), older)
  (tmp_path / 'run' / 'checkpoints').mkdir()
  with pytest.raises(ConfigError, match='holds a run of another config'):  # compared as stored: refused
    checkpoint.claim_run_dir(str(tmp_path / 'run'), wanted, overwrite=False)
  checkpoint.claim_run_dir(str(tmp_path / 'run'), wanted, overwrite=False, upgrade=train.current_fingerprint)
  assert (tmp_path / 'run' / 'checkpoints').exists()
  assert checkpoint.read_fingerprint(str(tmp_path / 'run')) == wanted
