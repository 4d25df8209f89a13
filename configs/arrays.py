"""The 'distill' job on your own arrays: one .npz per split in config.data.arrays.path.

See docs/own_data.md for the file layout. Name the modalities (keys) of your files:
  python -m mmkd_jax.main --config=configs/arrays.py --workdir=/tmp/own \
    --config.data.arrays.path=/path/to/dir --config.teacher.modalities=text,audio,video \
    --config.student.modality=audio
`--config=configs/arrays.py:tiny` shrinks models and budget to a smoke run of seconds.
"""
import ml_collections

from configs import default
from mmkd_jax.errors import ConfigError


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.job = 'distill'
  config.data.name = 'arrays'
  # Directory holding train.npz, validation.npz and test.npz.
  config.data.arrays.path = ''
  # 'classification', 'regression', 'multilabel', or 'auto' to read it off the train labels.
  config.data.arrays.task = 'auto'
  # Comma-separated keys of your files the teacher fuses (two or more).
  config.teacher.modalities = ''
  # The one key the student sees; one of the teacher's modalities.
  config.student.modality = ''
  # One projection for every frame plus a position embedding, as for sequences; 'per_position' fits
  # tabular features cut into chunks (configs/default.py).
  config.teacher.embedding = config.student.embedding = 'shared'
  # MSE on hidden states and logits fits every task kind (KL and DKD need classes).
  config.distill.terms = 'hidden:mse:1.0,logits:mse:1.0'
  if arg == 'tiny':
    # One-layer models of width 16 and 30 steps: checks that the files and the config fit together.
    for role in ('teacher', 'student'):
      config[role].width = 16
      config[role].num_heads = 2
    config.teacher.num_cross_layers = 1
    config.student.num_layers = 1
    config.train.batch_size = 32
    config.train.num_steps = 30
    config.train.warmup_steps = 5
    config.train.log_every = 15
    config.train.eval_every = 15
    config.report.seeds = '0'
    config.report.latency_repeats = 5
  elif arg:
    raise ConfigError(f"configs/arrays.py:{arg} is unknown; valid choices: 'tiny' or nothing")
  return config
