"""Entry point: `python -m mmkd_jax.main --config=configs/distill.py --workdir=...`."""
from absl import app, flags
from ml_collections import config_flags

from mmkd_jax import checkpoint, cli, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file; fields overridable as --config.a.b=v.',
                                lock_config=True)
flags.DEFINE_string('workdir', '/tmp/mmkd_jax', 'Where checkpoints, TensorBoard logs and the report go.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  checkpoint.quiet_orbax_logs()
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  cli.run(main)
