"""Entry point: python -m dimsum_jax.main --config=configs/imagenet256.py --workdir=DIR.

Any config field can be overridden with --config.section.key=value; an unknown key or a value of
the wrong type stops the run with one sentence naming it, before anything is written. So does a
config file that does not exist or does not run (a syntax error, a get_config that fails).
"""
import os
import re
import sys

# The training process owns its accelerator: let JAX's allocator take 90% of the GPU's memory
# rather than its default 75%, so that larger micro-batches fit (set the variable to override).
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.90')

from absl import app
from absl import flags
from ml_collections import config_flags

from dimsum_jax import convert
from dimsum_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, samples and metrics go; resumed from.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl's parsing; a config file that is missing or does not run, or an override of a key the
  config lacks, is one sentence, not a traceback."""
  convert.check_config_flag(argv)
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # ml_collections refuses the unknown key
    text = str(e)
    guess = re.search(r'Did you mean \\?"([\w.]+)\\?" instead of \\?"([\w.]+)', text)
    key = guess.group(2) if guess else (re.findall(r'[A-Za-z_]\w*', text) or ['?'])[0]
    flag = next((a for a in argv[1:] if a.startswith('--config.') and
                 re.search(rf'\.{re.escape(key)}(\.|=|$)', a)), '--config...')
    hint = f': did you mean "{guess.group(1)}"?' if guess else '.'
    print(f'FATAL Flags parsing error: {flag}: config key "{key}" does not exist{hint}',
          file=sys.stderr)
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def cli():
  """The `dimsum-train` console script."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  cli()
