"""Preemption and bad numbers, in subprocesses as a real job meets them.

SIGKILL or SIGTERM mid-run, then the same command: the final parameters must be bitwise
those of an uninterrupted run. A NaN injected into a batch must stop the run with the step
and the bad term, a non-zero exit, and the last good checkpoint intact.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmkd_jax import checkpoint
from tests.conftest import write_tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 300

def _config_file(tmp_path, num_steps: int = NUM_STEPS) -> str:
  return write_tiny_config(tmp_path, 'student', num_steps=num_steps, eval_every=20, log_every=20)


def _command(config_file: str, workdir: str) -> list[str]:
  return [sys.executable, '-m', 'mmkd_jax.main', f'--config={config_file}', f'--workdir={workdir}']


def _steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _final_params(workdir: str) -> list[np.ndarray]:
  manager = checkpoint.create_manager(os.path.join(workdir, 'checkpoints'))
  assert manager.latest_step() == NUM_STEPS
  state = checkpoint.read_state(manager, NUM_STEPS)
  return [np.asarray(x) for x in jax.tree.leaves((state['params'], state['opt_state']))]


def _interrupt(command: list[str], workdir: str, sig: int) -> subprocess.CompletedProcess:
  """Starts the job, sends `sig` once a checkpoint past the first exists, waits for the end."""
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while not any(step >= 40 for step in _steps(workdir)):
    assert process.poll() is None, process.communicate()[0][-3000:]
    assert time.time() < deadline
    time.sleep(0.01)
  process.send_signal(sig)
  output = process.communicate(timeout=240)[0]
  return subprocess.CompletedProcess(command, process.returncode, output)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('uninterrupted')
  workdir = str(tmp_path / 'work')
  subprocess.run(_command(_config_file(tmp_path), workdir), cwd=REPO, check=True, capture_output=True)
  return _final_params(workdir)


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_bitwise(tmp_path, uninterrupted, sig):
  workdir = str(tmp_path / 'work')
  command = _command(_config_file(tmp_path), workdir)
  killed = _interrupt(command, workdir, sig)
  assert killed.returncode == -sig, killed.stdout[-3000:]
  saved = _steps(workdir)
  assert saved and max(saved) < NUM_STEPS, 'the run finished before the signal: nothing was tested'
  if sig == signal.SIGTERM:
    # The final checkpoint is written at the step where the signal was seen, not only at eval steps.
    assert 'SIGTERM: checkpoint saved at step' in killed.stdout
    stopped_at = int(killed.stdout.split('SIGTERM: checkpoint saved at step ')[1].split(';')[0])
    assert max(saved) == stopped_at
  subprocess.run(command, cwd=REPO, check=True, capture_output=True)
  resumed = _final_params(workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:  # each logged step once, in order
    assert [json.loads(line)['step'] for line in f] == list(range(20, NUM_STEPS + 1, 20))
  assert len(resumed) == len(uninterrupted)
  for a, b in zip(resumed, uninterrupted):
    np.testing.assert_array_equal(a, b)


NAN_SCRIPT = '''
import sys
from absl import app
from mmkd_jax import main
from mmkd_jax.data import pipeline
from tests.conftest import PoisonedIterator

original = pipeline.train_iterator
pipeline.train_iterator = lambda *args, **kwargs: PoisonedIterator(original(*args, **kwargs), {bad_step})
sys.argv = ['main', '--config={config}', '--workdir={workdir}']
app.run(main.main)
'''


@pytest.mark.slow
def test_nan_in_a_batch_stops_with_step_and_term_and_keeps_the_checkpoint(tmp_path):
  workdir = str(tmp_path / 'work')
  script = NAN_SCRIPT.format(bad_step=50, config=_config_file(tmp_path), workdir=workdir)
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True)
  assert result.returncode != 0
  assert 'non-finite loss, task_loss' in result.stderr and 'at step 50;' in result.stderr
  assert 'last good checkpoint: step 40' in result.stderr
  manager = checkpoint.create_manager(os.path.join(workdir, 'checkpoints'))
  assert manager.latest_step() == 40
  state = checkpoint.read_state(manager, 40)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))
