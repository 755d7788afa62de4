"""Checkpoints: resume targets, damaged and foreign checkpoints, NaN stops, full disks, export.

One real (tiny) training run in this process saves at steps 2, 4 and 6 and keeps the last two;
each test works on a copy of its workdir.
"""

import inspect
import logging
import os
import shutil
import textwrap

import jax
import orbax.checkpoint as ocp
import pytest

from dimsum_jax import checkpoint
from dimsum_jax import export
from dimsum_jax import train
from dimsum_jax import weights
from tests import train_util

STEPS, EVERY, KEEP = 6, 2, 2


def config(**overrides):
  base = dict(
    num_train_steps=STEPS,
    checkpoint_every_steps=EVERY,
    log_every_steps=EVERY,
    keep_checkpoints=KEEP,
    sample__every_steps=-1,
  )
  base.update(overrides)
  return train_util.digits_config('smoke_dit', **base)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, final state as numpy) of a 6-step run of a tiny DiT on 8x8 digits."""
  workdir = str(tmp_path_factory.mktemp('run') / 'workdir')
  state = train.train_and_evaluate(config(), workdir)
  return workdir, jax.device_get(state)


def copy(run, tmp_path):
  target = str(tmp_path / 'workdir')
  shutil.copytree(run[0], target)
  return target


def test_run_saved_state_and_data_position(run):
  workdir, final = run
  # Three saves, keep_checkpoints=2: step 2 is gone, exactly the newest two remain.
  assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ['4', '6']
  state, data_state = train_util.restore(workdir, config())
  assert int(state.step) == STEPS
  train_util.assert_trees_close(state, final, rtol=0, atol=0, what='restored state')
  # 6 batches of 16 of the 1 797 digits consumed: epoch 0, position 96.
  assert data_state == {'epoch': 0, 'index': STEPS * 16}


# Orbax's failed read of the truncated file can leave a callback for its closed event loop.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_truncated_newest_checkpoint_falls_back_with_a_warning(run, tmp_path, caplog):
  workdir = copy(run, tmp_path)
  newest = os.path.join(checkpoint.checkpoint_dir(workdir), '6')
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(newest, 'state')) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 3)
  expected, expected_data = train_util.restore(run[0], config(), step=4)

  with caplog.at_level(logging.WARNING):
    state, data_state = train_util.restore(workdir, config())
  assert int(state.step) == 4 and data_state == expected_data == {'epoch': 0, 'index': 64}
  train_util.assert_trees_close(state, expected, rtol=0, atol=0, what='fallback state')
  assert any(
    newest in r.getMessage() and 'could not be restored' in r.getMessage() for r in caplog.records
  ), [r.getMessage() for r in caplog.records]
  # The damaged one is kept aside, not deleted, so a new save of step 4 cannot collide with it.
  aside = os.path.join(workdir, 'checkpoints_unreadable', '6')
  assert os.path.isdir(aside) and not os.path.exists(newest)
  assert os.path.getsize(os.path.join(aside, os.path.relpath(biggest, newest))) == (
    os.path.getsize(os.path.join(run[0], 'checkpoints', '6', os.path.relpath(biggest, newest))) // 3
  )


def test_all_checkpoints_damaged_is_an_error_and_nothing_moves(run, tmp_path):
  workdir = copy(run, tmp_path)
  for step in ('4', '6'):
    state_dir = os.path.join(checkpoint.checkpoint_dir(workdir), step, 'state')
    for root, _, files in os.walk(state_dir):
      for name in files:
        if os.path.getsize(os.path.join(root, name)) > 1000:
          with open(os.path.join(root, name), 'r+b') as f:
            f.truncate(10)
  before = train_util.fingerprint(workdir)
  with pytest.raises(checkpoint.CheckpointError, match='None of the 2 checkpoint'):
    train_util.restore(workdir, config())
  assert train_util.fingerprint(workdir) == before


def test_other_models_checkpoints_are_refused_and_kept(run, tmp_path):
  workdir = copy(run, tmp_path)
  before = train_util.fingerprint(workdir)
  with pytest.raises(SystemExit) as e:
    train.train_and_evaluate(config(model__hidden_size=96), workdir)
  message = str(e.value)
  assert checkpoint.checkpoint_dir(workdir) in message
  assert 'another model' in message and 'has shape' in message and 'new --workdir' in message
  assert '\n' not in message
  assert train_util.fingerprint(workdir) == before  # config.json and both checkpoints untouched


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(run, tmp_path):
  workdir = copy(run, tmp_path)
  # A learning rate of 1e30 sends the parameters to ~1e30: their norm overflows at step 7.
  with pytest.raises(SystemExit) as e:
    train.train_and_evaluate(config(num_train_steps=10, optim__learning_rate=1e30), workdir)
  message = str(e.value)
  assert 'at step 7' in message
  assert f'{checkpoint.checkpoint_dir(workdir)}/6, is intact' in message
  assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ['4', '6']
  state, data_state = train_util.restore(workdir, config())
  assert int(state.step) == 6 and data_state == {'epoch': 0, 'index': 96}
  train_util.assert_trees_close(state, run[1], rtol=0, atol=0, what='state after the NaN stop')


# --- a checkpoint that cannot be written ------------------------------------------------------


def fail_the_save_of(step, when):
  """Orbax's writer fails on the checkpoint of `step`: 'start', at once, as a directory without
  write permission does; 'commit', in the background after the arrays were written, as a full
  disk does (a commit future of each item fails with ENOSPC). Returns the real writer. Self-
  contained: a subprocess runs its source."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import errno  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import os  # pylint: disable=g-import-not-at-top,redefined-outer-name,reimported
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top,redefined-outer-name

  real = ocp.PyTreeCheckpointHandler.async_save
  target = f'{os.sep}checkpoints{os.sep}{step}.orbax-checkpoint-tmp'

  async def async_save(self, directory, *args, **kwargs):
    if target not in str(directory):
      return await real(self, directory, *args, **kwargs)
    if when == 'start':
      raise PermissionError(errno.EACCES, 'Permission denied', str(directory))
    failed = concurrent.futures.Future()
    failed.set_exception(OSError(errno.ENOSPC, 'No space left on device'))
    return list(await real(self, directory, *args, **kwargs) or []) + [failed]

  ocp.PyTreeCheckpointHandler.async_save = async_save
  return real


@pytest.mark.parametrize(
  'when, reason',
  [('commit', '[Errno 28] No space left on device'), ('start', '[Errno 13] Permission denied')],
)
def test_failed_save_stops_in_one_sentence_and_keeps_the_good_checkpoints(
  run, tmp_path, when, reason
):
  workdir = copy(run, tmp_path)
  ckdir = checkpoint.checkpoint_dir(workdir)
  real = fail_the_save_of(8, when)
  try:
    with pytest.raises(SystemExit) as e:
      train.train_and_evaluate(config(num_train_steps=12), workdir)
  finally:
    ocp.PyTreeCheckpointHandler.async_save = real
  message = str(e.value)
  assert (
    message.startswith(f'error: The checkpoint of step 8 could not be written to {ckdir} ({reason}')
    and '\n' not in message
  ), message
  assert 'the newest complete one, step 6, is intact' in message, message
  # The run stopped at the failure (at the next save, step 10, at the latest): steps 4 and 6
  # are as they were and restore, and the half-written step 8 is no checkpoint.
  assert sorted(n for n in os.listdir(ckdir) if n.isdigit()) == ['4', '6'], os.listdir(ckdir)
  state, data_state = train_util.restore(workdir, config())
  assert int(state.step) == 6 and data_state == {'epoch': 0, 'index': 96}
  train_util.assert_trees_equal(state, run[1], what='step 6 after the failed save')
  # The same command, with room again, resumes from step 6 past the half-written step 8.
  final = train.train_and_evaluate(config(num_train_steps=8), workdir)
  assert int(final.step) == 8 and sorted(os.listdir(ckdir)) == ['6', '8']
  state, _ = train_util.restore(workdir, config())
  train_util.assert_trees_equal(state, final, what='step 8 after the resume')


def test_failed_save_on_the_command_line_is_one_line_without_traceback(run, tmp_path):
  workdir = copy(run, tmp_path)
  script = inspect.getsource(fail_the_save_of) + textwrap.dedent('''
      import sys
      from dimsum_jax import main
      fail_the_save_of(8, 'commit')
      sys.argv = ['main', *sys.argv[1:]]
      main.cli()
      ''')
  r = train_util.run_python(
    [
      '-c',
      script,
      f'--workdir={workdir}',
      *train_util.flags(
        'smoke_dit',
        num_train_steps=12,
        checkpoint_every_steps=EVERY,
        log_every_steps=EVERY,
        keep_checkpoints=KEEP,
        sample__every_steps=-1,
      ),
    ]
  )
  assert r.returncode == 1, r.stderr[-4000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: The checkpoint of step 8 could not be written to '), last
  assert 'No space left on device' in last and 'step 6, is intact' in last, last
  assert 'Traceback' not in r.stderr, r.stderr[-4000:]
  assert sorted(n for n in os.listdir(checkpoint.checkpoint_dir(workdir)) if n.isdigit()) == [
    '4',
    '6',
  ]


def test_export_writes_the_ema_alone_with_its_config(run, tmp_path):
  workdir, final = run
  out = str(tmp_path / 'export')
  assert export.export(workdir, out) == STEPS
  exported_config, params = weights.load_exported(out)
  assert exported_config.model.to_dict() == config().model.to_dict()
  assert exported_config.num_train_steps == STEPS
  train_util.assert_trees_close(params, final.ema_params, rtol=0, atol=0, what='exported EMA')
  assert not os.path.exists(os.path.join(out, 'opt_state'))
  assert sorted(os.listdir(out)) == ['config.json', 'ema_params', 'step.txt']
  # An existing export is never overwritten; a workdir without checkpoints says so.
  with pytest.raises(checkpoint.CheckpointError, match='already holds an export'):
    export.export(workdir, out)
  with pytest.raises(checkpoint.CheckpointError, match='has no config.json'):
    export.export(str(tmp_path / 'empty'), str(tmp_path / 'export2'))
  with pytest.raises(checkpoint.CheckpointError, match='holds no export'):
    weights.load_exported(str(tmp_path / 'empty'))


# --- the best checkpoint (config.eval.best_metric) ----------------------------------------------


def _save_state(manager, step, **metrics):
  """A small checkpoint of `step` with `metrics` (none when empty); the steps kept after it."""
  data = checkpoint.encode_data_state({'index': step}, train_util.one_device_mesh())
  state = {'x': jax.numpy.full([2], float(step))}
  checkpoint.save(manager, step, state, data, force=True, metrics=metrics or None)
  manager.wait_until_finished()
  return sorted(manager.all_steps())


def test_best_checkpoint_is_kept_besides_the_last_and_survives_reopening(tmp_path):
  """Orbax's preservation with keep=1: the lowest FID stays, saves without metrics rotate, a
  NaN score never counts as best; a reopened manager (a resumed run) ranks against it."""
  workdir = str(tmp_path / 'w')
  manager = checkpoint.create_manager(workdir, keep=1, best=('fid', 'min'))
  assert manager.best() is None
  assert _save_state(manager, 1, fid=5.0, accuracy=0.1) == [1]
  assert _save_state(manager, 2, fid=2.0, accuracy=0.5) == [2]
  assert _save_state(manager, 3) == [2, 3]
  assert _save_state(manager, 4, fid=3.0, accuracy=0.9) == [2, 4]
  assert _save_state(manager, 5, fid=float('nan')) == [2, 5]
  manager.close()
  manager = checkpoint.create_manager(workdir, keep=1, best=('fid', 'min'))  # a resumed run
  assert manager.best() == (2, {'fid': 2.0, 'accuracy': 0.5})
  assert _save_state(manager, 6) == [2, 6] and _save_state(manager, 7) == [2, 7]
  assert _save_state(manager, 8, fid=1.0) == [8]
  # A save still in flight counts: best() waits for it (its metrics are read back from disk).
  data = checkpoint.encode_data_state({'index': 9}, train_util.one_device_mesh())
  checkpoint.save(manager, 9, {'x': jax.numpy.zeros([2])}, data, force=True, metrics={'fid': 9.0})
  assert manager.best() == (8, {'fid': 1.0})
  checkpoint.save(manager, 10, {'x': jax.numpy.zeros([2])}, data, force=True, metrics={'fid': 0.5})
  assert manager.best() == (10, {'fid': 0.5})
  manager.close()
  # Highest is best for the other metrics.
  manager = checkpoint.create_manager(str(tmp_path / 'm'), keep=1, best=('accuracy', 'max'))
  for step, accuracy in ((1, 0.3), (2, 0.9), (3, 0.4)):
    _save_state(manager, step, accuracy=accuracy)
  assert sorted(manager.all_steps()) == [2, 3] and manager.best() == (2, {'accuracy': 0.9})
  manager.close()
  # Without a tracked metric: the last k only, and no best.
  manager = checkpoint.create_manager(str(tmp_path / 'm'), keep=1)
  assert manager.best() is None and _save_state(manager, 4, accuracy=1.0) == [4]
  manager.close()


@pytest.mark.filterwarnings('ignore:Sharding info not provided:UserWarning')
def test_best_checkpoint_survives_a_failed_save_of_a_better_one(tmp_path):
  """The save of a new best fails at its commit (as a full disk, or a kill before the rename,
  leaves it): the old best and the last checkpoint stay, whole and restorable, and the
  half-written step neither counts as best nor survives the next start."""
  workdir = str(tmp_path / 'w')
  manager = checkpoint.create_manager(workdir, keep=1, best=('fid', 'min'))
  _save_state(manager, 2, fid=2.0)
  _save_state(manager, 3)
  real = fail_the_save_of(4, 'commit')
  try:
    with pytest.raises(checkpoint.CheckpointError, match='step 4 could not be written'):
      _save_state(manager, 4, fid=1.0)
  finally:
    ocp.PyTreeCheckpointHandler.async_save = real
  manager.close()
  manager = checkpoint.create_manager(workdir, keep=1, best=('fid', 'min'))  # the next start
  try:
    assert sorted(manager.all_steps()) == [2, 3] and manager.best() == (2, {'fid': 2.0})
    for step in (2, 3):
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
      assert float(restored.state['x'][0]) == step
    assert _save_state(manager, 5) == [2, 5]
    assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ['2', '5']
  finally:
    manager.close()


def test_a_kill_between_a_new_best_and_the_old_ones_removal_keeps_the_new(tmp_path, monkeypatch):
  """Orbax removes old steps only after the new one is committed; a run killed in between
  leaves both, and the next start ranks them and removes the old one at its next save."""
  workdir = str(tmp_path / 'w')
  manager = checkpoint.create_manager(workdir, keep=1, best=('fid', 'min'))
  _save_state(manager, 2, fid=2.0)
  deleter = manager._checkpoint_deleter  # pylint: disable=protected-access
  monkeypatch.setattr(deleter, 'delete_steps', lambda steps: None)
  _save_state(manager, 4, fid=1.0)  # "killed" before its finalize deleted step 2
  manager.close()
  assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ['2', '4']
  manager = checkpoint.create_manager(workdir, keep=1, best=('fid', 'min'))
  try:
    assert manager.best() == (4, {'fid': 1.0})
    assert _save_state(manager, 5) == [4, 5]
  finally:
    manager.close()
