"""Writes a run's EMA parameters alone, with its config, for inference.

  python -m dimsum_jax.export --workdir=runs/digits --out=exports/digits [--step=N]

OUT/config.json is the training config; OUT/ema_params/ an Orbax checkpoint of the EMA tree.
Read it back with `config, params = dimsum_jax.export.load_exported(OUT)` (params: a nested dict
of float32 NumPy arrays), then `models.create_model(config.model).apply({'params': params}, x, t,
y)`. An existing export is never overwritten.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections

from dimsum_jax import checkpoint
from dimsum_jax import command_line
from dimsum_jax import config_utils
from dimsum_jax import metrics
from dimsum_jax import sharding
from dimsum_jax import train
from dimsum_jax import weights

load_exported = weights.load_exported

FLAGS = flags.FlagValues()
flags.DEFINE_string(
  'workdir', None, 'Training workdir (holds config.json and checkpoints/).', flag_values=FLAGS
)
flags.DEFINE_string(
  'out', None, 'Directory to write config.json and ema_params/ to.', flag_values=FLAGS
)
flags.DEFINE_integer(
  'step', None, 'Checkpoint step to export (default: the newest good one).', flag_values=FLAGS
)
flags.mark_flags_as_required(['workdir', 'out'], flag_values=FLAGS)


def read_run_config(workdir):
  """WORKDIR/config.json as a ConfigDict, or CheckpointError in one sentence when it is missing,
  not JSON or not the config of a training run."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    absent = '' if os.path.isdir(workdir) else ' (the directory does not exist)'
    raise checkpoint.CheckpointError(
      f'{workdir} has no config.json{absent}: pass the --workdir of a training run.'
    )
  try:
    config = checkpoint.load_config(workdir)
  except (ValueError, TypeError, AttributeError) as e:  # not JSON, or JSON but not an object
    raise checkpoint.CheckpointError(
      f'{path} is not a readable config ({type(e).__name__}: {str(e)[:200]}): restore the '
      'config.json that python -m dimsum_jax.main wrote there.'
    ) from e
  sections = [
    k for k, v in config_utils.base_config().items() if isinstance(v, ml_collections.ConfigDict)
  ]
  missing = [k for k in sections if k not in config]
  if missing:
    raise checkpoint.CheckpointError(
      f'{path} is not the config of a training run (no {", ".join(missing)} section): restore '
      'the config.json that python -m dimsum_jax.main wrote there.'
    )
  return config


def export(workdir, out, step=None):
  """Exports WORKDIR's EMA parameters to OUT; returns the step exported."""
  config = read_run_config(workdir)
  # The state's shapes on one local device: only `step` and `ema_params` are read.
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1}, devices=jax.local_devices()[:1])
  abstract_state = train.build(config, mesh).abstract_state
  step = weights.export_ema(workdir, out, abstract_state=abstract_state, step=step)
  logging.info('Exported the EMA parameters of step %d from %s to %s.', step, workdir, out)
  return step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  metrics.quiet_library_logs()
  try:
    export(FLAGS.workdir, FLAGS.out, FLAGS.step)
  except (checkpoint.CheckpointError, train.SetupError) as e:
    raise SystemExit(f'error: {e}') from e


def cli():
  """The `dimsum-export` console script."""
  command_line.run(main, FLAGS)


if __name__ == '__main__':
  cli()
