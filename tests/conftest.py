"""Shared fixtures: the real default config shrunk to a tiny synthetic problem."""
import ml_collections
import pytest

from configs import default


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
  config.teacher.num_cross_layers = 2
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
