"""Entry point: python -m dimsum_jax.main --config=configs/imagenet256.py --workdir=DIR."""
from absl import app
from absl import flags
from ml_collections import config_flags

from dimsum_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, samples and metrics go; resumed from.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
