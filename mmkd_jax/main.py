"""Entry point: `python -m mmkd_jax.main --config=configs/distill.py --workdir=...`."""
import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

from mmkd_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file; fields overridable as --config.a.b=v.',
                                lock_config=True)
flags.DEFINE_string('workdir', '/tmp/mmkd_jax', 'Where checkpoints, TensorBoard logs and the report go.')
flags.mark_flags_as_required(['config'])


def _quiet_checkpointing(record: py_logging.LogRecord) -> bool:
  """Drops Orbax's per-save INFO chatter so that the progress lines stay readable."""
  return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_checkpointing)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
