"""The command lines' error handling: bad input is one line on stderr, exit status 2, nothing run;
any other error keeps its traceback."""
import os
import subprocess
import sys

import numpy as np
import pytest

from mmkd_jax import cli, metrics
from mmkd_jax.registry import Registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


@pytest.mark.parametrize('args, message', [
    (('mmkd_jax.main', '--config=configs/nope.py'),
     "--config='configs/nope.py': no such file; config files there: arrays.py, default.py, distill.py"),
    (('mmkd_jax.main', '--config=configs/distill.py', '--config.train.nope=1'),
     "--config.train.nope: config.train has no key 'nope' in configs/distill.py; its keys: batch_size,"),
    (('mmkd_jax.main', '--config=configs/distill.py', '--config.train.num_steps=abc'),
     'flag --config.train.num_steps=abc: invalid literal'),
    (('mmkd_jax.main', '--config=configs/distill.py', '--config.report.seeds=0,0'),
     "config.report.seeds='0,0': expected distinct comma-separated integers"),
    (('mmkd_jax.study', '--config=configs/study.py', '--config.study.nope=1'),
     "--config.study.nope: config.study has no key 'nope' in configs/study.py"),
    (('mmkd_jax.main', '--config=configs/arrays.py:big'),
     "configs/arrays.py:big is unknown; valid choices: 'tiny' or nothing"),
], ids=['missing-file', 'unknown-key', 'bad-value', 'config-check', 'study-unknown-key', 'config-argument'])
def test_bad_command_line_is_one_line_on_stderr(args, message, tmp_path):
  result = _run(*args, f'--workdir={tmp_path / "work"}')
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(f'mmkd_jax: error: {message}')
  assert not (tmp_path / 'work').exists()


def test_only_config_errors_are_shortened():
  with pytest.raises(SystemExit) as ended:
    with cli.one_line_errors():
      Registry('dataset').get('nope')  # a bad name in a config
  assert ended.value.code == 2
  with pytest.raises(ValueError, match='pred has shape'):
    with cli.one_line_errors():
      metrics.accuracy(np.zeros(2), np.zeros(3))  # an internal check of the project: keeps its traceback
  with pytest.raises(ValueError, match='invalid literal'):
    with cli.one_line_errors():
      int('x')


BROKEN_CONFIG = """
import numpy as np

from configs import default
from mmkd_jax import metrics, validation
from tests.conftest import shrink


def check_config(config):
  metrics.accuracy(np.zeros(2), np.zeros(3))  # an internal check of the project fails: a bug, not bad input


def get_config():
  validation.check_config = check_config
  return shrink(default.get_config(), {data_dir!r})
"""


def test_an_internal_value_error_reaches_the_user_with_its_traceback(tmp_path):
  config = tmp_path / 'broken.py'
  config.write_text(BROKEN_CONFIG.format(data_dir=str(tmp_path / 'data')))
  result = _run('mmkd_jax.main', f'--config={config}', f'--workdir={tmp_path / "work"}')
  assert result.returncode == 1, result.stderr
  assert 'Traceback (most recent call last)' in result.stderr
  assert 'mmkd_jax/metrics.py' in result.stderr
  assert result.stderr.strip().splitlines()[-1] == 'ValueError: pred has shape (2,), label has shape (3,)'
  assert 'mmkd_jax: error:' not in result.stderr
