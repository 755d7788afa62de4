"""Orbax checkpoints of a training run: async saves, resume, preemption, one run per workdir.

Layout of a workdir:
  WORKDIR/lock                 flock'ed by the run training there (its process 0): one run per
                               workdir; it names that process (pid, host) while held
  WORKDIR/config.json          the config of the run (written by process 0 at start)
  WORKDIR/checkpoints/<step>/  one Orbax checkpoint: item `state` (step, params, EMA, optimiser
                               state, rng), item `data` (each process's data-iterator state) and,
                               at a step evaluated during training, `metrics` ({name: value})
  WORKDIR/checkpoints_unreadable/<step>/  checkpoints that failed to restore, moved aside (kept)
The last `keep` checkpoints are kept and, when the manager tracks a metric (config.eval's
best_metric), also the one whose `metrics` hold its best value (Orbax's BestN preservation
policy): the values live in the checkpoints, so a resumed run keeps honouring them.
A save that fails (disk full, no permission) stops the run with CheckpointError: Orbax writes
each step into a temporary directory renamed into place only when complete, so the previous
checkpoints stay as they were and the half-written one is never restored (Orbax removes it when
the next run opens the directory).
The training state (step, params, EMA, optimiser state, rng) is saved and restored whole, each
array placed as the abstract state's sharding says; each process's data-iterator state travels as
one global uint8 array [devices, DATA_STATE_BYTES] (`encode_data_state`). Reading weights back
outside a run (export, sampling, init_from) and the exports are `weights`, which shares
`checkpoint_dir`, `first_mismatch`, `load_config` and CheckpointError with this module.
"""

import errno
import fcntl
import functools
import json
import math
import os
import shutil
import signal
import socket
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dimsum_jax import io_utils
from dimsum_jax import sharding

DATA_STATE_BYTES = 8192  # Room for one process's data-iterator state as JSON.


class CheckpointError(RuntimeError):
  """A workdir's checkpoints cannot be used; the message says what to do."""


def checkpoint_dir(workdir):
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Manager(ocp.CheckpointManager):
  """Orbax's CheckpointManager whose failed saves raise CheckpointError in one sentence.

  An async save fails in the background (no space left, no permission); Orbax raises its error at
  the next save or wait. Here that error names the step that was not written and the newest
  checkpoint that was, and the next save first waits for the previous one, so that its error is
  not reported as the new step's."""

  _pending = None  # the step of the async save in flight, if any

  def save(self, step, *args, **kwargs):  # pylint: disable=arguments-differ
    self.wait_until_finished()
    try:
      saved = super().save(step, *args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(step, e) from e
    self._pending = step
    return saved

  def wait_until_finished(self):
    try:
      super().wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      step, self._pending = self._pending, None
      raise self._failed(step, e) from e
    self._pending = None

  def best(self):
    """(step, metrics) of the checkpoint with the best tracked metric, or None (no metric is
    tracked, or no checkpoint holds one). Waits for a save in flight: its metrics are read back
    from disk, where they exist only once it is committed."""
    if self._options.best_fn is None:
      return None
    self.wait_until_finished()
    step = self.best_step()
    metrics = None if step is None else self.metrics(step)
    return None if metrics is None else (step, dict(metrics))

  def _failed(self, step, error):
    _NoOrbaxTracebacks.reported = True
    self.reload()
    steps = [s for s in self.all_steps() if s != step]
    kept = (
      f'the newest complete one, step {max(steps)}, is intact'
      if steps
      else 'no complete checkpoint was written yet'
    )
    reason = str(error).split('\n')[0][:300] or type(error).__name__
    return CheckpointError(
      f'The checkpoint of step {step} could not be written to {self.directory} ({reason}) and '
      f'{kept}: free some space or fix the permissions there, then run the same command to '
      'resume.'
    )


class _NoOrbaxTracebacks:
  """Drops the tracebacks that Orbax logs with a failed save, and its lines after the failure
  was reported (its writer threads fail again at exit): the run stops with one sentence
  (Manager._failed), which says what they would."""

  reported = False  # set by Manager._failed

  def filter(self, record):
    if f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    if _NoOrbaxTracebacks.reported:
      return False
    record.exc_info, record.exc_text = None, None
    return True


class _NoUntrackedSaveWarnings:
  """Drops Orbax's warning that a save carries no metrics while a best metric is tracked: only
  the evaluated steps carry them, by design."""

  def filter(self, record):
    return not str(record.msg).startswith('Requested `tracked_metric`')


def _quiet_orbax_tracebacks():
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _NoOrbaxTracebacks) for f in handler.filters):
    handler.addFilter(_NoOrbaxTracebacks())
  _NoOrbaxTracebacks.reported = False
  logger = logging.get_absl_logger()  # every handler: the log file, pytest's capture
  if not any(isinstance(f, _NoUntrackedSaveWarnings) for f in logger.filters):
    logger.addFilter(_NoUntrackedSaveWarnings())


def _metric_value(metrics, *, key, mode):
  """metrics[key] for Orbax's ranking; a missing or non-finite value ranks worst."""
  try:
    value = float(metrics[key])
  except (KeyError, TypeError, ValueError):
    value = math.nan
  if math.isfinite(value):
    return value
  return math.inf if mode == 'min' else -math.inf


def create_manager(workdir, *, keep, best=None):
  """An async CheckpointManager keeping the last `keep` checkpoints (see Manager).

  best: (metric, 'min' | 'max') also keeps the checkpoint whose saved metrics (save(...,
  metrics={metric: value, ...})) hold the lowest / highest value of `metric`; Manager.best()
  names it. Checkpoints saved without metrics are kept by recency alone."""
  _quiet_orbax_tracebacks()
  best_options = {}
  try:  # orbax >= 0.11.x: preservation policies; max_to_keep is deprecated.
    from orbax.checkpoint import checkpoint_managers  # pylint: disable=g-import-not-at-top

    policy = checkpoint_managers.LatestN(n=keep)
    if best is not None:
      key, mode = best
      rank = functools.partial(_metric_value, key=key, mode=mode)
      policy = checkpoint_managers.AnyPreservationPolicy(
        [
          policy,
          checkpoint_managers.BestN(
            get_metric_fn=rank, reverse=mode == 'min', n=1, keep_checkpoints_without_metrics=False
          ),
        ]
      )
      best_options = dict(best_fn=rank, best_mode=mode)  # writes the metrics, ranks best_step()
    keep_policy = dict(preservation_policy=policy)
    ocp.CheckpointManagerOptions(**keep_policy)
  except (ImportError, AttributeError, TypeError):
    keep_policy, best_options = dict(max_to_keep=keep), {}
    if best is not None:
      logging.warning(
        'This Orbax has no preservation policies: the checkpoint of the best %s '
        'is kept only while it is among the last %d.',
        best[0],
        keep,
      )
  options = ocp.CheckpointManagerOptions(
    enable_async_checkpointing=True,
    create=True,
    cleanup_tmp_directories=True,
    **keep_policy,
    **best_options,
  )
  return Manager(checkpoint_dir(workdir), options=options, item_handlers=_item_handlers())


def _item_handlers():
  """PyTree handlers for both items; replica-parallel writes only on TPU (on CPU and GPU each
  first save would compile one slicing program per array shard, for no gain)."""
  array_handler = ocp.type_handlers.ArrayHandler(
    use_replica_parallel=jax.default_backend() == 'tpu'
  )
  registry = ocp.type_handlers.create_type_handler_registry(
    (jax.Array, array_handler), (np.ndarray, ocp.type_handlers.NumpyHandler())
  )
  return {
    name: ocp.PyTreeCheckpointHandler(type_handler_registry=registry) for name in ('state', 'data')
  }


def _save_args(tree):
  return ocp.args.PyTreeSave(tree)


def _restore_args(abstract_tree):
  return ocp.args.PyTreeRestore(
    item=abstract_tree, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_tree)
  )


def encode_data_state(data_state, mesh):
  """This process's data-iterator state -> a global uint8 array [devices, DATA_STATE_BYTES]
  (each device holds its process's state as JSON)."""
  raw = json.dumps(data_state).encode()
  if len(raw) > DATA_STATE_BYTES:
    raise ValueError(f'Data-iterator state is {len(raw)} bytes; raise DATA_STATE_BYTES.')
  row = np.zeros([DATA_STATE_BYTES], np.uint8)
  row[: len(raw)] = np.frombuffer(raw, np.uint8)
  return sharding.per_process_rows(row, mesh)


def decode_data_state(rows, mesh):
  """Inverse of encode_data_state, from the whole array (numpy) restored on every process.

  Saved with this device layout: this process's own row. Saved with another one (more or fewer
  devices or processes): process 0's row, with a warning, as each process's split of the data
  differs then anyway."""
  rows = np.asarray(rows)
  if rows.shape[0] == mesh.size:
    index = sharding.this_process_rows(rows.shape, mesh)
  else:
    logging.warning(
      'The checkpoint was written by %d devices, this run has %d: every process '
      "continues from process 0's data position.",
      rows.shape[0],
      mesh.size,
    )
    index = 0
  row = rows[index]
  return json.loads(bytes(row[row != 0]).decode())


def save(manager, step, state, data_array, *, force=False, metrics=None):
  """Starts an async save of (state, data); returns at once. Only finite states may come here.
  metrics: {name: float} of an evaluation at this step (kept with it when the manager tracks a
  best metric)."""
  return manager.save(
    step,
    force=force,
    metrics=metrics,
    args=ocp.args.Composite(state=_save_args(state), data=_save_args({'data': data_array})),
  )


def first_mismatch(saved, wanted, *, needed_by='this model'):
  """Where a saved tree (Orbax metadata) differs from `wanted`'s shapes ('' when it fits)."""

  def shapes(tree):
    return {
      sharding.leaf_path(p): tuple(getattr(x, 'shape', ()) or ())
      for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }

  have, need = shapes(saved), shapes(wanted)
  for name, shape in need.items():
    if name not in have:
      return f'it has no {name}'
    if have[name] != shape:
      return f'{name} has shape {have[name]} there, {needed_by} needs {shape}'
  extra = sorted(set(have) - set(need))
  return f'it has {extra[0]}, which {needed_by} lacks' if extra else ''


def _restore_one(manager, step, abstract_state, mesh):
  """(state, data state of this process) of one step; raises with the reason when it cannot."""
  metadata = manager.item_metadata(step)
  saved, saved_data = metadata['state'], metadata['data']
  if saved is None or saved_data is None:
    raise CheckpointError('its metadata is missing or unreadable')
  mismatch = first_mismatch(saved, abstract_state)
  if mismatch:
    raise CheckpointError(f'it holds a different model ({mismatch})')
  data_shape = tuple(saved_data['data'].shape)
  abstract_data = {
    'data': jax.ShapeDtypeStruct(data_shape, np.uint8, sharding=sharding.replicated(mesh))
  }
  restored = manager.restore(
    step,
    args=ocp.args.Composite(state=_restore_args(abstract_state), data=_restore_args(abstract_data)),
  )
  rows = jax.device_get(restored['data']['data'])
  return restored['state'], decode_data_state(rows, mesh)


def restore_latest(manager, abstract_state, mesh):
  """(state, data_state) from the newest checkpoint that restores, or None when there is none.

  A checkpoint that fails (truncated, or another model's) is named in an error log and the next
  older one is tried; failed ones newer than the one used are moved to checkpoints_unreadable/
  (not deleted) so that new saves cannot collide with them. When none restores, CheckpointError
  says what to do and nothing is touched.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  failures = []
  for step in steps:
    path = os.path.join(str(manager.directory), str(step))
    try:
      state, data = _restore_one(manager, step, abstract_state, mesh)
    except Exception as e:  # pylint: disable=broad-except
      reason = str(e).split('\n')[0][:500]
      logging.error(
        'Checkpoint %s could not be restored: %s. Trying the next older one.', path, reason
      )
      failures.append((step, path, reason))
      continue
    if failures:
      _move_aside(manager, [s for s, _, _ in failures])
    logging.info('Resumed from checkpoint %s.', path)
    return state, data
  if failures:
    _, path, reason = failures[0]
    different = 'different model' in reason
    advice = (
      'this config is for another model than the one saved there'
      if different
      else 'they look damaged'
    )
    raise CheckpointError(
      f'None of the {len(failures)} checkpoint(s) in {manager.directory} can be restored '
      f'({advice}; newest: {path}: {reason}). They were left untouched: pass a new --workdir '
      'to start afresh, or use the config that wrote them.'
    )
  return None


def _move_aside(manager, steps):
  manager.wait_until_finished()
  if jax.process_index() == 0:
    target = os.path.join(os.path.dirname(str(manager.directory)), 'checkpoints_unreadable')
    os.makedirs(target, exist_ok=True)
    for step in steps:
      dst = os.path.join(target, str(step))
      while os.path.exists(dst):
        dst += '_'
      shutil.move(os.path.join(str(manager.directory), str(step)), dst)
      logging.warning('Moved unreadable checkpoint of step %d to %s.', step, dst)
  multihost_utils.sync_global_devices('dimsum_jax.checkpoint.move_aside')
  manager.reload()


class PreemptionWatch:
  """Notices SIGTERM (preemption). Single process: a signal handler sets a flag. Several
  processes: JAX's preemption sync service (started by jax.distributed.initialize) makes all
  processes agree on the step at which they stop."""

  def __init__(self):
    self._signalled = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning('SIGTERM: will save a checkpoint and stop after this step.')
    self._signalled = True

  def reached(self, step, manager):
    if jax.process_count() == 1:
      return self._signalled
    return manager.reached_preemption(step)

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


# --- one run per workdir --------------------------------------------------------------------

LOCK_FILE = 'lock'
_HOLDER_BYTES = 512  # room for the holder's description, broadcast to the other processes
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _holder(fd):
  """The description the lock's holder wrote into the file ('' while it is still writing)."""
  try:
    raw = os.pread(fd, _HOLDER_BYTES, 0).decode(errors='replace').strip()
    info = json.loads(raw)
    return f"process {info['pid']} on host {info['host']}"
  except (OSError, ValueError, KeyError, TypeError):
    return ''


def _try_flock(path, operation):
  """(fd holding the lock, '') or (None, the holder's description) for a lock held elsewhere;
  (None, '') when there is no lock file (peek) or the file system cannot lock (with a warning)."""
  flags = os.O_CLOEXEC | (os.O_RDWR | os.O_CREAT if operation == fcntl.LOCK_EX else os.O_RDONLY)
  try:
    fd = os.open(path, flags, 0o644)
  except (FileNotFoundError, NotADirectoryError):  # no lock file (yet), or no workdir
    return None, ''
  # Tries for a second: another check_workdir_free holds the lock for microseconds, and a run
  # that has just locked writes its description within milliseconds (until then the file may
  # still describe a run that was killed).
  for attempt in range(50):
    try:
      fcntl.flock(fd, operation | fcntl.LOCK_NB)
      return fd, ''
    except OSError as e:
      if e.errno in _UNSUPPORTED:
        os.close(fd)
        logging.warning(
          '%s cannot be locked (%s): a second run on this workdir would not be refused.', path, e
        )
        return None, ''
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        os.close(fd)
        raise
    holder = _holder(fd) if attempt >= 5 else ''
    if holder:
      os.close(fd)
      return None, holder
    time.sleep(0.02)
  os.close(fd)
  return None, 'a process that did not say which'


def _busy_error(workdir, holder):
  return CheckpointError(
    f'Another training run, {holder}, is training in {os.path.abspath(workdir)}: wait for it '
    'to end or stop it, or pass another --workdir.'
  )


def check_workdir_free(workdir):
  """CheckpointError when a live run holds WORKDIR's lock; touches nothing (a shared lock taken
  and dropped at once, no file created). For a quick refusal before the model is compiled: each
  process of a job can call it before jax.distributed.initialize, as none of them can hold the
  lock before every one has joined."""
  fd, holder = _try_flock(os.path.join(os.path.abspath(workdir), LOCK_FILE), fcntl.LOCK_SH)
  if fd is not None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
  if holder:
    raise _busy_error(workdir, holder)


class WorkdirLock:
  """One training run per workdir: process 0 holds an flock on WORKDIR/lock for the whole run,
  for every process of its job. The kernel drops it when the process ends, however it ends, so
  a run killed with SIGKILL leaves nothing that blocks the restart. While held, the file says
  which process holds it (pid, host), for the error of a second run; a clean release empties it.

    with WorkdirLock(workdir) as lock:
      ...              # nothing written yet
      lock.acquire()   # CheckpointError naming the holder when another run trains there
      ...              # released on leaving the block
  """

  def __init__(self, workdir):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd = None

  def acquire(self):
    holder = ''
    if jax.process_index() == 0:
      self._fd, holder = _try_flock(self.path, fcntl.LOCK_EX)
      if self._fd is not None:
        description = json.dumps(
          {
            'pid': os.getpid(),
            'host': socket.gethostname(),
            'since': time.strftime('%Y-%m-%d %H:%M:%S'),
          }
        )
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, description.encode()[:_HOLDER_BYTES], 0)
    if jax.process_count() > 1:  # every process of this job stops when process 0 could not lock
      row = np.zeros([_HOLDER_BYTES], np.uint8)
      raw = holder.encode()[:_HOLDER_BYTES]
      row[: len(raw)] = np.frombuffer(raw, np.uint8)
      row = np.asarray(multihost_utils.broadcast_one_to_all(row), np.uint8)
      holder = bytes(row[row != 0]).decode(errors='replace')
    if holder:
      raise _busy_error(self.workdir, holder)
    return self

  def release(self):
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


# --- config kept next to the checkpoints ----------------------------------------------------


def save_config(workdir, config):
  """WORKDIR/config.json, replaced whole (a run killed while writing it leaves the old one)."""
  if jax.process_index() == 0:
    io_utils.atomic_write(
      os.path.join(workdir, 'config.json'),
      lambda f: f.write(config.to_json_best_effort(indent=2, sort_keys=True)),
      binary=False,
    )


def load_config(workdir):
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))
