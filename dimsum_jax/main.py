"""Entry point: python -m dimsum_jax.main --config=configs/imagenet256.py --workdir=DIR.

Any config field can be overridden with --config.section.key=value; an unknown key or a value of
the wrong type stops the run with one sentence naming it, before anything is written. So does a
config file that does not exist or does not run (a syntax error, a get_config that fails).
"""

import os

# The training process owns its accelerator: let JAX's allocator take 90% of the GPU's memory
# rather than its default 75%, so that larger micro-batches fit (set the variable to override).
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.90')

from absl import app
from absl import flags
from ml_collections import config_flags

from dimsum_jax import command_line
from dimsum_jax import train

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file(
  'config', None, 'Training config file (configs/*.py).', flag_values=FLAGS, lock_config=True
)
flags.DEFINE_string(
  'workdir', None, 'Where checkpoints, samples and metrics go; resumed from.', flag_values=FLAGS
)
flags.mark_flags_as_required(['config', 'workdir'], flag_values=FLAGS)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def cli():
  """The `dimsum-train` console script."""
  command_line.run(main, FLAGS, config_flag='config')


if __name__ == '__main__':
  cli()
