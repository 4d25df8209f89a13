"""Preemption and bad numbers, in subprocesses as a real job meets them.

SIGKILL or SIGTERM mid-run, then the same command: the final state of a population must be
bitwise that of an uninterrupted one, also when the job spans two processes that are sent
SIGTERM at different moments. A NaN injected into a batch must stop the run with the step and
the bad term, a non-zero exit, and the last good checkpoint intact.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmkd_jax import checkpoint, loop
from tests.conftest import write_tiny_config
from tests.test_sharding import _env, _free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 300

def _config_file(tmp_path, num_steps: int = NUM_STEPS) -> str:
  return write_tiny_config(tmp_path, 'student', num_steps=num_steps, eval_every=20, log_every=20)


# Trains the student arm of seeds 0 and 1 as one population: python -c ARM_SCRIPT <config file> <workdir> [flags]
ARM_SCRIPT = '''
import importlib.util, sys
from absl import flags
from mmkd_jax import checkpoint, data, runtime, train
spec = importlib.util.spec_from_file_location('tiny', sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
for flag in sys.argv[3:]:  # --config.a.b=v
  key, value = flag[len('--config.'):].split('=')
  section, field = key.rsplit('.', 1)
  config[section][field] = type(config[section][field])(value)
flags.FLAGS.mark_as_parsed()
runtime.initialize_distributed(config)
builder = train.load_data(config)
train.train_arm(config, sys.argv[2], (0, 1), builder, data.task_info(builder))
'''


def _command(config_file: str, workdir: str, *flags: str) -> list[str]:
  return [sys.executable, '-c', ARM_SCRIPT, config_file, workdir, *flags]


def _steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _final_state(workdir: str) -> list[np.ndarray]:
  """Every array of the population's last checkpoint: train state, guard and best parameters."""
  manager = checkpoint.create_manager(os.path.join(workdir, 'checkpoints'))
  assert manager.latest_step() == NUM_STEPS
  return [np.asarray(x) for x in jax.tree.leaves(checkpoint.read_state(manager, NUM_STEPS))]


def _start(command: list[str], **kwargs) -> subprocess.Popen:
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _wait_for_checkpoint(processes: list[subprocess.Popen], workdir: str) -> None:
  """Returns once a checkpoint past the first exists."""
  deadline = time.time() + 240
  while not any(step >= 40 for step in _steps(workdir)):
    for process in processes:
      assert process.poll() is None, process.communicate()[0][-3000:]
    assert time.time() < deadline
    time.sleep(0.01)


def _check_resumed(workdir: str, uninterrupted: list[np.ndarray]) -> None:
  for seed in (0, 1):
    with open(os.path.join(workdir, f'seed_{seed}', 'metrics.jsonl')) as f:  # each logged step once, in order
      assert [json.loads(line)['step'] for line in f] == list(range(20, NUM_STEPS + 1, 20))
  resumed = _final_state(workdir)
  assert len(resumed) == len(uninterrupted)
  for a, b in zip(resumed, uninterrupted):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('uninterrupted')
  workdir = str(tmp_path / 'work')
  subprocess.run(_command(_config_file(tmp_path), workdir), cwd=REPO, check=True, capture_output=True)
  return _final_state(workdir)


def _saved_at(output: str) -> int:
  assert 'SIGTERM: checkpoint saved at step' in output, output[-3000:]
  return int(output.split('SIGTERM: checkpoint saved at step ')[1].split(';')[0])


@pytest.mark.slow
def test_killed_population_resumes_bitwise(tmp_path, uninterrupted):
  """SIGKILL mid-run, then the same command. (SIGTERM: the two-process test below, which also checks
  that the final checkpoint is written at the call boundary after the signal.)"""
  workdir = str(tmp_path / 'work')
  command = _command(_config_file(tmp_path), workdir)
  process = _start(command)
  _wait_for_checkpoint([process], workdir)
  process.send_signal(signal.SIGKILL)
  output = process.communicate(timeout=240)[0]
  assert process.returncode == -signal.SIGKILL, output[-3000:]
  saved = _steps(workdir)
  assert saved and max(saved) < NUM_STEPS, 'the run finished before the signal: nothing was tested'
  subprocess.run(command, cwd=REPO, check=True, capture_output=True)
  _check_resumed(workdir, uninterrupted)


def test_sigterm_in_one_process_is_agreed_at_the_next_boundary_and_the_handler_restored():
  previous = signal.getsignal(signal.SIGTERM)
  with loop.Preemption() as preemption:
    assert not preemption.agreed()
    os.kill(os.getpid(), signal.SIGTERM)  # handled: sets the flag, the process goes on
    assert preemption.agreed()
  assert signal.getsignal(signal.SIGTERM) is previous


def _two_processes(config_file: str, workdir: str, port: int) -> list[subprocess.Popen]:
  return [_start(_command(config_file, workdir, f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                          '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}'),
                 env=_env(1)) for i in range(2)]


@pytest.mark.slow
def test_two_processes_sent_sigterm_at_different_moments_save_one_step_and_resume_bitwise(tmp_path):
  """Each process is sent SIGTERM at another moment; they agree on one step, both save it and exit,
  and the two-process job run again ends bitwise where the uninterrupted two-process job does."""
  config_file = _config_file(tmp_path)
  finals = {}
  for name in ('uninterrupted', 'interrupted'):
    workdir = str(tmp_path / name)
    with contextlib.ExitStack() as stack:
      processes = _two_processes(config_file, workdir, _free_port())
      for p in processes:
        stack.callback(p.kill)  # a no-op after wait(); else the cleanup of a hung job
      if name == 'interrupted':
        _wait_for_checkpoint(processes, workdir)
        processes[1].send_signal(signal.SIGTERM)
        time.sleep(0.5)
        processes[0].send_signal(signal.SIGTERM)
      outputs = [p.communicate(timeout=300)[0] for p in processes]
    if name == 'interrupted':
      assert [p.returncode for p in processes] == [-signal.SIGTERM] * 2, [o[-3000:] for o in outputs]
      saved = _steps(workdir)
      assert saved == [_saved_at(outputs[0])] == [_saved_at(outputs[1])] and saved[0] < NUM_STEPS
      processes = _two_processes(config_file, workdir, _free_port())
      outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [o[-3000:] for o in outputs]
    finals[name] = _final_state(workdir)
  _check_resumed(str(tmp_path / 'interrupted'), finals['uninterrupted'])


NAN_SCRIPT = '''
import sys
from absl import app
from mmkd_jax import main
from tests.conftest import poison_batches

poison_batches({bad_step})
sys.argv = ['main', '--config={config}', '--workdir={workdir}']
app.run(main.main)
'''


@pytest.mark.slow
def test_nan_in_a_batch_stops_with_step_and_term_and_keeps_the_checkpoint(tmp_path):
  workdir = str(tmp_path / 'work')
  script = NAN_SCRIPT.format(bad_step=50, config=write_tiny_config(tmp_path, 'student', num_steps=NUM_STEPS,
                                                                  eval_every=20, log_every=20), workdir=workdir)
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True)
  assert result.returncode != 0
  assert '[student] non-finite loss, task_loss, grad_norm at step 50;' in result.stderr
  assert 'last good checkpoint: step 40' in result.stderr
  manager = checkpoint.create_manager(os.path.join(workdir, 'checkpoints'))
  assert manager.latest_step() == 40
  state = checkpoint.read_state(manager, 40)['train']
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))
