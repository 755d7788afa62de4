"""Writes a run's EMA parameters alone, with its config, for inference.

  python -m dimsum_jax.export --workdir=runs/digits --out=exports/digits [--step=N]

OUT/config.json is the training config; OUT/ema_params/ an Orbax checkpoint of the EMA tree.
Read it back with `config, params = dimsum_jax.export.load_exported(OUT)` (params: a nested dict
of float32 NumPy arrays), then `models.create_model(config.model).apply({'params': params}, x, t,
y)`. An existing export is never overwritten.
"""
from absl import app
from absl import flags
from absl import logging
import jax

from dimsum_jax import checkpoint
from dimsum_jax import metrics
from dimsum_jax import sharding
from dimsum_jax import train

load_exported = checkpoint.load_exported

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir (holds config.json and checkpoints/).')
flags.DEFINE_string('out', None, 'Directory to write config.json and ema_params/ to.')
flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the newest good one).')
flags.mark_flags_as_required(['workdir', 'out'])


def export(workdir, out, step=None):
  """Exports WORKDIR's EMA parameters to OUT; returns the step exported."""
  try:
    config = checkpoint.load_config(workdir)
  except FileNotFoundError as e:
    raise checkpoint.CheckpointError(f'{workdir} has no config.json: pass the --workdir of a '
                                     'training run.') from e
  # The state's shapes on one local device: only `step` and `ema_params` are read.
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1}, devices=jax.local_devices()[:1])
  abstract_state = train.build(config, mesh).abstract_state
  step = checkpoint.export_ema(workdir, out, abstract_state=abstract_state, step=step)
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


if __name__ == '__main__':
  app.run(main)
