"""Data parallelism: the same seeds give the same loss curves on 1, 2 and 8 (forced host) devices,
the batch really is sharded, and a two-process run on localhost agrees with one process. The
student arms are populations of two seeds: on 8 devices (and over two processes) their members
spread over the mesh's 'member' axis.

Each device count needs a fresh process (XLA_FLAGS is read once), so the jobs run as subprocesses.
"""
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from tests.conftest import write_tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK_SHARDING = '''
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from configs import default
from mmkd_jax import step
mesh = step.create_mesh(default.get_config())
batch = {'m0': np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
x = step.shard_local_batch(batch, NamedSharding(mesh, PartitionSpec('data')))['m0']
print(jax.device_count(), x.sharding.spec, sorted({s.data.shape for s in x.addressable_shards}),
      bool(np.array_equal(np.asarray(x), batch['m0'])))
'''


CHECK_ONE_ALLREDUCE = '''
import jax, jax.numpy as jnp, ml_collections, numpy as np
from jax.sharding import Mesh
from mmkd_jax import step
from mmkd_jax.models import Student
model = Student(modality='a', num_outputs=3, width=8, num_heads=2, num_layers=2, mlp_ratio=2, dropout_rate=0.5)
rng = np.random.default_rng(0)
batch = {'a': rng.normal(size=(8, 5, 3)).astype(np.float32), 'a_mask': np.arange(5) < rng.integers(1, 6, (8, 1))}
params = model.init(jax.random.key(0), batch)['params']
loss = lambda apply: lambda p: jnp.sum(apply(p, batch, train=True, rngs={'dropout': jax.random.key(1)})[0] ** 2)
plain = jax.grad(loss(lambda p, b, **kw: model.apply({'params': p}, b, **kw)))
parallel = jax.jit(jax.grad(loss(step.data_parallel_apply(model, Mesh(np.array(jax.devices()), ('data',))))))
hlo = parallel.lower(params).compile().as_text()
reduces = [line.split('=')[1].split('all-reduce(')[0].strip() for line in hlo.splitlines() if ' all-reduce(' in line]
size = sum(x.size for x in jax.tree.leaves(params))
expected = jax.tree.leaves(plain(params))
error = lambda g: max(float(np.max(np.abs(a - b))) for a, b in zip(expected, jax.tree.leaves(g)))
# a ('data', 'model') mesh with 2 devices on the reserved model axis: the same gradient, not twice it
mesh_2x2 = step.create_mesh(ml_collections.ConfigDict({'mesh': {'model': 2}}))
errors = (error(parallel(params)), error(jax.jit(jax.grad(loss(step.data_parallel_apply(model, mesh_2x2))))(params)))
print(jax.device_count(), reduces == [f'f32[{size}]{{0}}'], errors[0] < 1e-4, errors[1] < 1e-4, reduces, errors)
'''


CHECK_CHECKPOINT_WRITES = '''
import sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from mmkd_jax import checkpoint
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, **kw: compiles.append(event) if event == '/jax/core/compile/backend_compile_duration' else None)
replicated = NamedSharding(Mesh(np.array(jax.devices()), ('data',)), PartitionSpec())
state = {f'w{i}': jax.device_put(np.arange(8 * (i + 1), dtype=np.float32).reshape(8, i + 1), replicated)
         for i in range(6)}
manager = checkpoint.create_manager(sys.argv[1])
checkpoint.save(manager, 1, state, {'epoch': 0})
manager.wait_until_finished()
restored, data_state = checkpoint.restore(manager, 1, state)
equal = all(np.array_equal(np.asarray(restored[k]), np.asarray(v)) for k, v in state.items())
print(jax.device_count(), len(compiles), equal, data_state == {'epoch': 0})
'''


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _losses(run_dir: str) -> np.ndarray:
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    return np.array([json.loads(line)['loss'] for line in f])


def _run_all(runs: list[tuple[list[str], int]], timeout: int) -> None:
  """Runs every (command, device count) at once and checks that each succeeded: independent jobs
  (compiling, most of their time, is single-threaded) or the processes of one multi-process job.

  Their logs go to files, not pipes: a process blocked on a full pipe that is not being read would
  stall the others (the processes of one job wait for each other). Processes still running when
  the timeout ends or a check fails are killed.
  """
  with contextlib.ExitStack() as stack:
    logs = [stack.enter_context(tempfile.TemporaryFile('w+')) for _ in runs]
    processes = [subprocess.Popen(command, cwd=REPO, env=_env(devices), stdout=subprocess.DEVNULL, stderr=log,
                                  text=True) for (command, devices), log in zip(runs, logs)]
    for p in processes:
      stack.callback(p.kill)  # after wait() a no-op; before it, the cleanup of a timed-out run
    for p in processes:
      p.wait(timeout=timeout)
    for (command, devices), p, log in zip(runs, processes, logs):
      log.seek(0)
      assert p.returncode == 0, f'{command} on {devices} devices: {log.read()[-3000:]}'


def test_batch_is_sharded_over_eight_devices():
  result = subprocess.run([sys.executable, '-c', CHECK_SHARDING], cwd=REPO, env=_env(8), capture_output=True,
                          text=True, check=True)
  assert result.stdout.split('\n')[0] == "8 P('data',) [(2, 3)] True"


def test_gradient_is_summed_by_one_all_reduce():
  """data_parallel_apply on 4 devices (dropout on): the gradient equals one device's, also with devices on
  the model axis, and the compiled backward pass sums it with a single all-reduce of the flat vector."""
  result = subprocess.run([sys.executable, '-c', CHECK_ONE_ALLREDUCE], cwd=REPO, env=_env(4), capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split()[:4] == ['4', 'True', 'True', 'True'], result.stdout


def test_one_process_writes_replicated_arrays_without_slicing_them(tmp_path):
  """On 8 devices a checkpoint of replicated arrays is written whole from one replica (Orbax's
  default slices each array once per device, an eagerly compiled op each) and restores exactly."""
  result = subprocess.run([sys.executable, '-c', CHECK_CHECKPOINT_WRITES, str(tmp_path / 'checkpoints')], cwd=REPO,
                          env=_env(8), capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ['8', '0', 'True', 'True'], result.stdout


@pytest.fixture(scope='module')
def distill_runs(tmp_path_factory):
  """The tiny distill job (teacher, baseline, distilled student) on 1, 2 and 8 devices."""
  tmp_path = tmp_path_factory.mktemp('devices')
  runs = []
  for devices in (1, 2, 8):  # each job prepares the (same, seeded) data in its own dir: they run at once
    (tmp_path / f'config_{devices}').mkdir()
    config = write_tiny_config(tmp_path / f'config_{devices}', 'distill', num_steps=8, eval_every=4, log_every=1)
    runs.append(([sys.executable, '-m', 'mmkd_jax.main', f'--config={config}', '--config.report.seeds=0,1',
                  f'--workdir={tmp_path / str(devices)}'], devices))
  _run_all(runs, timeout=600)
  return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize('run', ['teacher', 'student/seed_1', 'distilled/seed_0', 'distilled/seed_1'])
@pytest.mark.parametrize('devices', [2, 8])
def test_same_loss_curve_on_any_device_count(distill_runs, run, devices):
  reference = _losses(str(distill_runs / '1' / run))
  assert len(reference) == 8
  np.testing.assert_allclose(_losses(str(distill_runs / str(devices) / run)), reference, rtol=2e-4, atol=1e-5)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_agrees_with_one_process(tmp_path, distill_runs):
  """The distill job over two processes, from the one-process job's teacher (`teacher_dir`; the
  train path is the teacher's too): each process computes the teacher's targets and reads its own
  rows of every batch; baseline and distilled curves match the one-process job's."""
  config = write_tiny_config(tmp_path, 'distill', num_steps=8, eval_every=4, log_every=1)
  workdir = tmp_path / 'multihost'
  port = _free_port()
  _run_all([([sys.executable, '-m', 'mmkd_jax.main', f'--config={config}', f'--workdir={workdir}',
              '--config.report.seeds=0,1',
              f"--config.distill.teacher_dir={distill_runs / '1' / 'teacher'}",
              f'--config.distributed.coordinator_address=127.0.0.1:{port}',
              '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}'], 1)
            for i in range(2)], timeout=300)
  for run in ('student/seed_0', 'distilled/seed_0', 'distilled/seed_1'):
    np.testing.assert_allclose(_losses(str(workdir / run)), _losses(str(distill_runs / '1' / run)),
                               rtol=2e-4, atol=1e-5, err_msg=run)
