"""Shared fixtures: the real default config shrunk to a tiny synthetic problem."""
import atexit
import os
import shutil
import tempfile

# Tiny test models: XLA's backend optimisations cost more compile time than they save (about -35%
# wall time measured on the end-to-end tests). Set before JAX starts; subprocesses inherit it.
# On GPUs, deterministic reductions so that resumed runs are bitwise equal (ignored on CPU).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
                           ' --xla_gpu_deterministic_ops=true').strip()
# Numerics are checked against float64 references: full float32 matmuls also on GPUs, whose default is
# TF32 (a no-op on CPU). Read by JAX at import; subprocesses inherit it.
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
# Compiled programs are cached for the test session only (config.host.compilation_cache_dir): tests
# reuse each other's programs but never read or fill the user's cache. Subprocesses that import this
# module (training scripts of the multi-process tests) inherit the session's directory.
if '_MMKD_JAX_TEST_CACHE' not in os.environ:
  os.environ['_MMKD_JAX_TEST_CACHE'] = tempfile.mkdtemp(prefix='mmkd_jax_test_xla_')
  atexit.register(shutil.rmtree, os.environ['_MMKD_JAX_TEST_CACHE'], ignore_errors=True)
os.environ['MMKD_JAX_COMPILATION_CACHE'] = os.environ['_MMKD_JAX_TEST_CACHE']

import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position


def shrink(config: ml_collections.ConfigDict, data_dir: str) -> ml_collections.ConfigDict:
  """Tiny models and budget on the synthetic dataset, on the production code path."""
  config.data.name = 'synthetic'
  config.data.data_dir = data_dir
  config.data.synthetic.num_train = 64
  config.data.synthetic.num_validation = 32
  config.data.synthetic.num_test = 32
  config.teacher.modalities = 'm0,m1'
  config.student.modality = 'm0'
  for role in ('teacher', 'student'):
    config[role].width = 16
    config[role].num_heads = 2
  config.student.width = 8
  config.teacher.num_cross_layers = 1
  config.student.num_layers = 1
  config.train.batch_size = 16
  config.train.eval_batch_size = 16
  config.train.num_steps = 6
  config.train.warmup_steps = 2
  config.train.log_every = 3
  config.train.eval_every = 3
  config.report.seeds = '0'
  config.report.latency_batch_size = 4
  config.report.latency_repeats = 2
  return config


@pytest.fixture
def tiny_config(tmp_path) -> ml_collections.ConfigDict:
  return shrink(default.get_config(), str(tmp_path / 'data'))


@pytest.fixture
def private_tempdir(monkeypatch, tmp_path) -> pathlib.Path:
  """An empty directory that Python's `tempfile` uses for the test, to see what is left in it."""
  scratch = tmp_path / 'tmp'
  scratch.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
  return scratch


TINY_CONFIG_FILE = """
from configs import default
from tests.conftest import shrink


def get_config():
  config = shrink(default.get_config(), {data_dir!r})
  config.job = {job!r}
  config.train.num_steps = {num_steps}
  config.train.eval_every = {eval_every}
  config.train.log_every = {log_every}
  return config
"""


def write_tiny_config(directory, job: str = 'student', num_steps: int = 6, eval_every: int = 3,
                      log_every: int = 3) -> str:
  """A config file of `shrink`'s problem for jobs run as `python -m mmkd_jax.main` subprocesses."""
  path = directory / f'tiny_{job}.py'
  path.write_text(TINY_CONFIG_FILE.format(data_dir=str(directory / 'data'), job=job, num_steps=num_steps,
                                          eval_every=eval_every, log_every=log_every))
  return str(path)


def poison_batches(step: int, member: int = 0) -> None:
  """Makes `loop.TrainBatches` put a NaN into the features of modality m0 of `member`'s batch of `step`."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmkd_jax import loop  # pylint: disable=g-import-not-at-top
  fetch = loop.TrainBatches.fetch

  def poisoned(self, first_step, count):
    batches = fetch(self, first_step, count)
    if first_step <= step < first_step + count:
      batches['m0'] = batches['m0'].at[step - first_step, member, 0, 0, 0].set(jnp.nan)
    return batches

  loop.TrainBatches.fetch = poisoned

