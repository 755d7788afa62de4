"""Model weights outside a training run: read back from a workdir or a saved tree, and exports.

Parameters are read back by two functions only, each checking the saved shapes against the
model's (`checkpoint.first_mismatch`, from the Orbax metadata: `saved_tree`) before anything is
restored:
  restore_newest(WORKDIR, target)  the `state` items of `target` (a subset of the TrainState's
                                   fields as ShapeDtypeStructs with shardings, e.g. {'step': [],
                                   'ema_params': tree}) from WORKDIR/checkpoints/<step>/, the newest
                                   one that restores or a given step: export, sampling, init_from
  restore_params(PATH, abstract)   a parameter tree saved whole by Orbax (an export's ema_params/ or
                                   a conversion's params/), placed as `abstract` says, or a nested
                                   dict of NumPy arrays without it
Exported inference weights (python -m dimsum_jax.export, `export_ema`):
  OUT/config.json + OUT/ema_params/ + OUT/step.txt   the EMA parameters alone, read back with
                                                     load_exported(OUT).
Every failure is a checkpoint.CheckpointError in one sentence. Writing and resuming the training
state is `checkpoint`.
"""

import os
import shutil

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from dimsum_jax import checkpoint


def saved_tree(path):
  """The tree that the Orbax checkpoint at `path` holds, from its metadata alone (leaves with
  .shape): what checkpoint.first_mismatch compares before anything is restored."""
  meta = ocp.StandardCheckpointer().metadata(path)
  meta = getattr(meta, 'item_metadata', meta)  # StepMetadata -> TreeMetadata -> the tree
  return getattr(meta, 'tree', meta)


def _first_line(error):
  return (str(error).splitlines() or [type(error).__name__])[0][:200]


def restore_newest(workdir, target, *, step=None):
  """(the `state` items of `target`, their step) from WORKDIR's newest checkpoint that restores
  them (or from `step`), read only: the one reader of a workdir's parameters, for export, sampling
  and init_from.

  `target`: a subset of the TrainState's fields, e.g. {'step': ..., 'ema_params': ...}, as
  ShapeDtypeStructs whose shardings say where the arrays go. A checkpoint whose saved shapes differ
  from `target`'s holds another model: CheckpointError at once, naming the first difference. One
  that cannot be read is logged and the next older one tried. CheckpointError when none restores,
  when there is none, or when `step` is not there."""
  ckdir = checkpoint.checkpoint_dir(workdir)
  manager = ocp.CheckpointManager(
    ckdir,
    options=ocp.CheckpointManagerOptions(read_only=True),
    item_handlers={'state': ocp.PyTreeCheckpointHandler()},
  )
  try:
    saved_steps = sorted(manager.all_steps(), reverse=True)
    if step is not None and step not in saved_steps:
      raise checkpoint.CheckpointError(
        f'{ckdir} has no checkpoint of step {step}; it has {sorted(saved_steps) or "none"}.'
      )
    if not saved_steps:
      raise checkpoint.CheckpointError(
        f'{ckdir} holds no checkpoint yet: train longer, or pass the --workdir '
        'of a run that saved one.'
      )
    failures = []
    for s in [step] if step is not None else saved_steps:
      try:
        saved = saved_tree(os.path.join(ckdir, str(s), 'state'))
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f'step {s}: {_first_line(e)}')
        logging.error('Checkpoint %s/%d could not be read: %s', ckdir, s, failures[-1])
        continue
      for name, tree in target.items():
        mismatch = checkpoint.first_mismatch(saved.get(name, {}), tree, needed_by='the config')
        if mismatch:
          raise checkpoint.CheckpointError(
            f'The checkpoint of step {s} in {ckdir} does not fit config.json '
            f'({mismatch}): the checkpoint and the config come from different '
            'models.'
          )
      try:
        restored = manager.restore(
          s,
          args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
              item=target,
              restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True,
            )
          ),
        )
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f'step {s}: {_first_line(e)}')
        logging.error('Checkpoint %s/%d could not be restored: %s', ckdir, s, failures[-1])
        continue
      return restored['state'], s
    raise checkpoint.CheckpointError(
      f'No checkpoint in {ckdir} could be restored ({"; ".join(failures)}).'
    )
  finally:
    manager.close()


def restore_params(path, abstract=None):
  """A parameter tree saved whole by Orbax, an export's OUT/ema_params/ or a conversion's
  params/: the one reader of both. With `abstract` (ShapeDtypeStructs with shardings) the saved
  shapes are checked first (CheckpointError naming the first difference) and the arrays placed as
  `abstract` says; without, a nested dict of NumPy arrays (Orbax's own error when unreadable)."""
  if abstract is None:
    return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path))
  try:
    saved = saved_tree(path)
  except Exception as e:  # pylint: disable=broad-except
    raise checkpoint.CheckpointError(
      f'{path} is not a readable parameter checkpoint ({_first_line(e)}).'
    ) from e
  mismatch = checkpoint.first_mismatch(saved, abstract, needed_by='the config')
  if mismatch:
    raise checkpoint.CheckpointError(
      f'The weights in {os.path.dirname(os.path.abspath(path))} do not fit its '
      f'config ({mismatch}): the checkpoint and the config come from different '
      'models.'
    )
  return ocp.StandardCheckpointer().restore(path, abstract)


def export_ema(workdir, out, *, abstract_state, step=None):
  """Writes the EMA parameters of WORKDIR's newest good checkpoint (or `step`) to OUT.

  Only `step` and `ema_params` are read (`abstract_state` gives their shapes and placement).
  Returns the step exported."""
  out = os.path.abspath(out)
  if os.path.exists(os.path.join(out, 'ema_params')):
    raise checkpoint.CheckpointError(
      f'{out} already holds an export: choose another --out or remove it.'
    )
  target = {'step': abstract_state.step, 'ema_params': abstract_state.ema_params}
  restored, _ = restore_newest(workdir, target, step=step)
  os.makedirs(out, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out, 'ema_params'), restored['ema_params'])
  checkpointer.wait_until_finished()
  exported_step = int(np.asarray(restored['step']))
  if jax.process_index() == 0:
    shutil.copy(os.path.join(workdir, 'config.json'), os.path.join(out, 'config.json'))
    with open(os.path.join(out, 'step.txt'), 'w', encoding='utf-8') as f:
      f.write(f'{exported_step}\n')
  return exported_step


def load_exported(directory):
  """(config, params) written by export: the run's ConfigDict and its EMA parameters (a nested
  dict of float32 numpy arrays, ready for model.apply({'params': params}, ...)). The training
  step they come from is in OUT/step.txt."""
  directory = os.path.abspath(directory)
  path = os.path.join(directory, 'ema_params')
  if not os.path.isdir(path):
    raise checkpoint.CheckpointError(
      f'{directory} holds no export (no ema_params/): write one with '
      'python -m dimsum_jax.export --workdir=WORKDIR --out=' + directory + '.'
    )
  return checkpoint.load_config(directory), restore_params(path)
