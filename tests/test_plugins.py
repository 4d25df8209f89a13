"""Plug-ins: a method (and level) from a module outside the package, everywhere a built-in one works."""
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest

from mmkd_jax import data, plugins, step, train
from mmkd_jax.distill import LEVELS, Pair, parse_terms
from mmkd_jax.distill.methods import describe_method
from mmkd_jax.errors import ConfigError
from mmkd_jax.registry import Registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLUGIN = '''
"""A user's loss, outside the package."""
from mmkd_jax.distill import METHODS
from mmkd_jax.distill.methods import mse


@METHODS.register('scaled_mse', positive=('scale',))
def scaled_mse(student, teacher, mask=None, feature_mask=None, scale: float = 1.0):
  """scale * mse."""
  return scale * mse(student, teacher, mask, feature_mask)
'''

CONFIG_NAMING_THE_PLUGIN = '''
from configs import default


def get_config():
  config = default.get_config()
  config.plugins = {plugins!r}  # set in the file: the command line still overrides its methods' hparams
  return config
'''

# main.py's flags, parsed as `mmkd_jax.main` parses them; prints the parsed hparams of the plug-in's method.
PARSE = '''
import sys
from absl import flags
from ml_collections import config_flags
from mmkd_jax import cli
config_flags.DEFINE_config_file('config', None, '')
cli.parse_flags(sys.argv)
print(dict(flags.FLAGS.config.distill.hparams.scaled_mse))
'''


def _run(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT})


def _write(path, text: str) -> str:
  path.write_text(textwrap.dedent(text))
  return str(path)


def test_a_plugin_named_in_the_config_file_is_imported_before_overrides_are_parsed(tmp_path):
  """The plug-in's hyperparameters exist in the config the file builds, so a flag overrides them.
  (Training with a plug-in in the main job and the study: tests/test_docs.py runs docs/new_method.md.)"""
  outside = tmp_path / 'elsewhere'
  outside.mkdir()
  plugin = _write(outside / 'kd_plugin_test.py', PLUGIN)
  config = _write(tmp_path / 'names_plugin.py', CONFIG_NAMING_THE_PLUGIN.format(plugins=plugin))
  result = subprocess.run([sys.executable, '-c', PARSE, f'--config={config}',
                           '--config.distill.hparams.scaled_mse.scale=2.5'], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "{'scale': 2.5}"


def test_study_methods_all_includes_plugin_methods(tmp_path):
  plugin = _write(tmp_path / 'kd_plugin_all.py', PLUGIN)
  code = textwrap.dedent(f'''
      from mmkd_jax import data, plugins, study
      from tests.conftest import shrink
      from configs import default, study as study_config
      plugins.load({plugin!r})
      config = shrink(default.get_config(), {str(tmp_path / 'data')!r})
      config.study = study_config.get_config().study
      config.study.update(modalities='m0', widths='8', levels='hidden', methods='all', seeds='0', max_runs=100,
                          max_minutes=1000.0)
      info = data.TaskInfo({{'m0': (8, 6), 'm1': (8, 6)}}, 'classification', 4)
      print(sorted(cell.method for cell in study.plan(config, info).cells))
  ''')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "'scaled_mse'" in result.stdout and "'mse'" in result.stdout and "'dkd'" not in result.stdout


@pytest.mark.parametrize('make, message', [
    (lambda d: str(d / 'missing.py'), "config.plugins: '{d}/missing.py' is not a .py file"),
    (lambda d: 'no_such_kd_plugin_module', "config.plugins: no module named 'no_such_kd_plugin_module'"),
    (lambda d: _write(d / 'kd_plugin_broken.py', 'raise RuntimeError("no GPU here")\n'),
     "config.plugins: '{d}/kd_plugin_broken.py' failed to import: RuntimeError: no GPU here"),
    (lambda d: _write(d / 'kd_plugin_needs.py', 'import torch_that_is_not_installed\n'),
     "failed to import: ModuleNotFoundError: No module named 'torch_that_is_not_installed'"),
    (lambda d: _write(d / 'kd_plugin_dup.py', PLUGIN.replace("'scaled_mse'", "'kl'")),
     "config.plugins: '{d}/kd_plugin_dup.py': distillation method 'kl' is registered twice: by "
     'mmkd_jax.distill.methods and by kd_plugin_dup; rename one of them'),
    (lambda d: _write(d / 'kd_plugin_nodefault.py', PLUGIN.replace('mask=None, feature_mask=None, scale: float = 1.0', 'mask, feature_mask, scale')),
     "distillation method 'scaled_mse' (kd_plugin_nodefault.scaled_mse): hyperparameter 'scale' needs a default"),
], ids=['missing-file', 'missing-module', 'raises', 'missing-dependency', 'registers-twice', 'no-default'])
def test_a_bad_plugin_is_one_line(tmp_path, make, message):
  spec = make(tmp_path)
  with pytest.raises(ConfigError) as error:
    plugins.load(spec)
  assert message.format(d=tmp_path) in str(error.value)
  assert '\n' not in str(error.value)
  assert not any(name.startswith('kd_plugin_') for name in sys.modules)


def test_a_bad_plugin_on_the_command_line_is_one_line_and_runs_nothing(tmp_path):
  plugin = _write(tmp_path / 'kd_plugin_broken.py', 'raise RuntimeError("no GPU here")\n')
  result = _run('mmkd_jax.main', '--config=configs/distill.py', f'--config.plugins={plugin}',
                f'--workdir={tmp_path / "work"}')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"mmkd_jax: error: config.plugins: '{plugin}' failed to import: RuntimeError: no GPU here")
  assert not (tmp_path / 'work').exists()


def test_a_plugin_hyperparameter_without_the_plugin_is_one_line_with_a_hint(tmp_path):
  result = _run('mmkd_jax.main', '--config=configs/distill.py', '--config.distill.hparams.scaled_mse.scale=2',
                f'--workdir={tmp_path / "work"}')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      "mmkd_jax: error: --config.distill.hparams.scaled_mse.scale: config.distill.hparams has no key 'scaled_mse' "
      'in configs/distill.py; its keys: attention_transfer, contrastive, dkd, kl, relational; a plug-in method')


def test_the_check_helper_on_the_command_line(tmp_path):
  """`python -m mmkd_jax.testing` passes a plug-in's good method and names the check a broken one fails."""
  plugin = _write(tmp_path / 'kd_plugin_checks.py', PLUGIN + textwrap.dedent('''
      import jax.numpy as jnp


      @METHODS.register('leaky_mse')
      def leaky_mse(student, teacher, mask=None):
        """Ignores the mask."""
        return jnp.mean(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)))
      '''))
  result = _run('mmkd_jax.testing', f'--plugins={plugin}', '--methods=scaled_mse')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith('scaled_mse: 7 checks passed (jit_float32_scalar, ')
  result = _run('mmkd_jax.testing', f'--plugins={plugin}')  # every method it registers
  assert result.returncode == 1
  assert "method 'leaky_mse' fails check 'gradient_zero_on_padding'" in result.stdout


@pytest.mark.parametrize('keywords, message', [
    ({'task': 'regression'}, "task='regression' is unknown; valid choices: any, classification"),
    ({'levels': 'hidden'}, "levels='hidden' must be a tuple of level names or None"),
    ({'positive': ('delta',)}, "positive=('delta',) names 'delta', which is not one of its numeric hyperparameters; "
                               'valid choices: scale'),
])
def test_bad_registrations_are_one_line(keywords, message):
  registry = Registry('distillation method', describe_method)

  def loss(student, teacher, mask=None, scale: float = 1.0, name: str = 'x'):
    return scale * jnp.mean(student - teacher)

  with pytest.raises(ConfigError, match=r"^distillation method 'loss' \(.*loss\): ") as error:
    registry.register('loss', **keywords)(loss)
  assert message in str(error.value)
  with pytest.raises(ConfigError, match=r'first arguments must be \(student, teacher, mask\); got \(x, y, mask\)'):
    registry.register('other')(lambda x, y, mask: x)
  assert registry.names() == []


def _batch_normalised_pooled(student: dict, teacher: dict, context) -> dict:
  """Pooled representations, the teacher's standardised over the batch: not cacheable."""
  t = teacher['pooled']
  return {'pooled': Pair(student['pooled'], (t - t.mean(0)) / (t.std(0) + 1e-6), context.example_weight, True)}


def test_the_teacher_cache_is_used_only_where_every_level_declares_it(tiny_config, tmp_path, monkeypatch):
  """A level that normalises over the batch (registered without cacheable=True) runs the teacher in every step."""
  if 'zz_batch_pooled' not in LEVELS:
    LEVELS.register('zz_batch_pooled')(_batch_normalised_pooled)
  builder = data.load_builder(tiny_config.data)
  info = data.task_info(builder)
  tiny_config.job = 'teacher'
  teacher = train.train_run(tiny_config, 'teacher', str(tmp_path / 'teacher'), 0, builder, info)
  calls = []
  monkeypatch.setattr(step, 'teacher_targets', lambda *args, **kwargs: calls.append(1))
  tiny_config.job, tiny_config.train.num_steps, tiny_config.train.warmup_steps = 'distill', 2, 1
  for terms, cached in (('hidden:mse:1.0,zz_batch_pooled:mse:1.0', False), ('hidden:mse:1.0', True)):
    calls.clear()
    tiny_config.distill.terms = terms
    run = train.train_run(tiny_config, 'student', str(tmp_path / terms.replace(':', '_')), 0, builder, info,
                          teacher=(teacher.model, teacher.params['model']), terms=parse_terms(terms))
    assert bool(calls) == cached, terms
    assert run.test
