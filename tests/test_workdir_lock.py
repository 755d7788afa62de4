"""One training run per workdir: a second run on a live one stops in one sentence naming it
(pid and host) before it writes anything, and a run killed with SIGKILL does not block a restart.

The lock is an flock on WORKDIR/lock held by process 0 of the run (checkpoint.WorkdirLock); the
kernel drops it with the process. Here the lock itself, against a process holding it and then
killed; with `python -m dimsum_jax.main` (a second run refused while the first lives, restarts
after SIGKILLs) in tests/test_kills.py; two processes of one job sharing a workdir in
tests/test_multiprocess.py.
"""

import os
import signal
import socket
import subprocess
import sys

import pytest

from dimsum_jax import checkpoint
from tests import train_util

HOLD = r'''
import sys, time
from dimsum_jax import checkpoint
lock = checkpoint.WorkdirLock(sys.argv[1]).acquire()
print('locked', flush=True)
time.sleep(600)
'''


def refusal(workdir, pid):
  return (
    f'Another training run, process {pid} on host {socket.gethostname()}, is training in '
    f'{os.path.abspath(workdir)}: wait for it to end or stop it, or pass another --workdir.'
  )


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
  workdir = str(tmp_path / 'workdir')
  os.makedirs(workdir)
  holder = subprocess.Popen(
    [sys.executable, '-c', HOLD, workdir],
    cwd=train_util.ROOT,
    env=train_util.env(1),
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == 'locked'
    for attempt in (
      lambda: checkpoint.WorkdirLock(workdir).acquire(),
      lambda: checkpoint.check_workdir_free(workdir),
    ):
      with pytest.raises(checkpoint.CheckpointError) as e:
        attempt()
      assert str(e.value) == refusal(workdir, holder.pid)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  finally:
    if holder.poll() is None:
      holder.kill()
  # The killed holder's description is still in the file; its lock is gone with it.
  assert str(holder.pid) in open(os.path.join(workdir, 'lock')).read()
  checkpoint.check_workdir_free(workdir)
  with checkpoint.WorkdirLock(workdir) as lock:
    lock.acquire()
    # One lock per run, even within one process.
    with pytest.raises(checkpoint.CheckpointError) as e:
      checkpoint.WorkdirLock(workdir).acquire()
    assert str(e.value) == refusal(workdir, os.getpid())
  assert open(os.path.join(workdir, 'lock')).read() == ''  # a clean release empties it
  checkpoint.WorkdirLock(workdir).acquire().release()
