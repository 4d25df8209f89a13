"""The command lines' bad-input handling: one line on stderr, exit status 2, nothing run."""
import os
import subprocess
import sys

import pytest

from mmkd_jax import cli
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
], ids=['missing-file', 'unknown-key', 'bad-value', 'config-check', 'study-unknown-key'])
def test_bad_command_line_is_one_line_on_stderr(args, message, tmp_path):
  result = _run(*args, f'--workdir={tmp_path / "work"}')
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(f'mmkd_jax: error: {message}')
  assert not (tmp_path / 'work').exists()


def test_only_the_projects_own_value_errors_are_shortened():
  with pytest.raises(SystemExit) as ended:
    with cli.one_line_errors():
      Registry('dataset').get('nope')  # a ValueError raised by the project's code
  assert ended.value.code == 2
  with pytest.raises(ValueError, match='invalid literal'):
    with cli.one_line_errors():
      int('x')  # raised outside the package: keeps its traceback
