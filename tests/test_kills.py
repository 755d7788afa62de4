"""SIGKILL at random moments: training and sampling resume to what an uninterrupted run gives.

Training: `python -m dimsum_jax.main` on the tiny digits DiT, saving asynchronously every 2
steps, is killed with SIGKILL at random (seeded) moments of its training loop, async saves
included, and the same command is run again each time; once, the newest checkpoint is damaged
before the restart, which must move it to checkpoints_unreadable/ and use the one before. The
final parameters, EMA, optimiser state, rng and data position are bit-identical to those of an
uninterrupted run. While the first run is stopped at its moment, the same command on its
workdir must stop in one sentence naming it and write nothing (one run per workdir); each restart
shows that the lock of a SIGKILL'ed run does not block it. Sampling: `python -m dimsum_jax.sample`
killed likewise while it writes batches resumes to the same samples.npz bytes (and PNGs) as an
uninterrupted run.

The default suite kills each command twice; `pytest -m slow` ten times. A failure names the seed
of the kill moments; the moments themselves depend on the machine's speed (they are drawn as
fractions of the uninterrupted run's duration).
"""

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import train_util

# (seed of the kill moments, kills): the default suite's short variant and the slow one.
SHORT, LONG = (0, 2), (1, 10)

# The runs grow with the number of kills, so that each kill's window (0.6 / kills of the
# uninterrupted run's busy time) holds a few saves or batches: 20 steps (10 saves) per kill, 7
# batches of 4 samples per kill.
TRAIN_STEPS_PER_KILL, TRAIN_EVERY = 20, 2
SAMPLES_PER_KILL = 28
SAMPLE_SETTINGS = dict(batch_size=4, solver='euler', num_steps=24, cfg_scale=2.0, seed=3)


def read(path):
  with open(path) as f:
    return f.read()


def log_time(text, marker):
  """The absl timestamp (seconds in the day) of the first log line containing `marker`."""
  for line in text.splitlines():
    if marker in line:
      stamp = re.match(r'[IWEF]\d{4} (\d\d):(\d\d):(\d\d\.\d+)', line)
      if stamp:
        h, m, s = stamp.groups()
        return 3600 * int(h) + 60 * int(m) + float(s)
  raise AssertionError(f'no log line with {marker!r} in\n{text[-3000:]}')


def loop_seconds(text, start, end):
  """Seconds between two log lines (the run's busy phase, at most a few minutes long)."""
  return (log_time(text, end) - log_time(text, start)) % 86400


def launch(args, log, env=None):
  with open(log, 'w') as f:
    return subprocess.Popen(
      [sys.executable, *args],
      cwd=train_util.ROOT,
      stdout=f,
      stderr=subprocess.STDOUT,
      env=train_util.env(1, **(env or {})),
    )


def wait_stopped(pid, timeout=30.0):
  """Waits until every thread of `pid` is stopped: SIGSTOP reaches the threads asynchronously,
  and a thread stops only when its system call returns, so a write the run had begun (an async
  checkpoint's) can still land after kill() returns."""
  deadline = time.monotonic() + timeout
  while True:
    states = []
    for task in os.listdir(f'/proc/{pid}/task'):
      try:
        with open(f'/proc/{pid}/task/{task}/stat') as f:
          states.append(f.read().rsplit(')', 1)[1].split()[0])
      except FileNotFoundError:  # the thread ended
        pass
    if all(state in 'tT' for state in states):
      return
    assert time.monotonic() < deadline, f'process {pid} not stopped in {timeout} s: {states}'
    time.sleep(0.002)


def kill_at(proc, log, marker, delay, before_kill=None):
  """SIGKILL `delay` seconds after `marker` appears in the log; False when the process ended
  first (nothing was killed). `before_kill` runs between a SIGSTOP and the SIGKILL."""
  deadline = time.monotonic() + 300
  while marker not in read(log):
    if proc.poll() is not None:
      return False
    assert time.monotonic() < deadline, read(log)[-4000:]
    time.sleep(0.005)
  end = time.monotonic() + delay
  while time.monotonic() < end:
    if proc.poll() is not None:
      return False
    time.sleep(min(0.002, max(end - time.monotonic(), 0)))
  if proc.poll() is not None:
    return False
  if before_kill is not None:
    proc.send_signal(signal.SIGSTOP)
    wait_stopped(proc.pid)
    before_kill()
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  return True


def run_to_the_end(args, log, seed, env=None):
  proc = launch(args, log, env)
  try:
    assert proc.wait(timeout=300) == 0, f'seed {seed}: ' + read(log)[-4000:]
  finally:
    if proc.poll() is None:
      proc.kill()
  return read(log)


def checkpoint_steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def damage_newest(workdir):
  """Truncates the biggest file of the newest checkpoint's state; returns that step."""
  step = checkpoint_steps(workdir)[-1]
  state = os.path.join(workdir, 'checkpoints', str(step), 'state')
  files = [os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 3)
  return step


# --- training -----------------------------------------------------------------------------------


def train_args(workdir, cache, steps):
  return [
    '-m',
    'dimsum_jax.main',
    f'--workdir={workdir}',
    *train_util.flags(
      'smoke_dit',
      num_train_steps=steps,
      checkpoint_every_steps=TRAIN_EVERY,
      log_every_steps=TRAIN_EVERY,
      keep_checkpoints=3,
      sample__every_steps=-1,
      compilation_cache_dir=cache,
    ),
  ]


def second_run_is_refused(live, workdir, cache, steps, seed):
  """The same command on the workdir of a live run (stopped, so that it writes nothing now)
  stops in one sentence naming that run, and writes nothing."""
  before = train_util.fingerprint(workdir)
  r = train_util.run_python(train_args(workdir, cache, steps))
  assert r.returncode == 1, f'seed {seed}: {r.stderr[-4000:]}'
  assert r.stderr.strip().splitlines()[-1] == (
    f'error: Another training run, process {live.pid} on host {socket.gethostname()}, is '
    f'training in {workdir}: wait for it to end or stop it, or pass another --workdir.'
  ), f'seed {seed}: {r.stderr[-4000:]}'
  assert 'Traceback' not in r.stderr
  assert train_util.fingerprint(workdir) == before, f'seed {seed}'


def check_training_killed_at_random_moments(tmp_path, cache, seed, kills):
  """(kills survived, kills tried); asserts the final state equals the straight run's."""
  rng = np.random.default_rng(seed)
  steps = TRAIN_STEPS_PER_KILL * kills
  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  text = run_to_the_end(train_args(straight, cache, steps), str(tmp_path / 'straight.log'), seed)
  seconds = loop_seconds(text, 'Training from step', 'Finished at step')

  logs, killed_at, damaged = [], [], None  # damaged: (step, index of the next run's log)
  while len(killed_at) < kills:
    logs.append(str(tmp_path / f'run_{len(logs)}.log'))
    proc = launch(train_args(interrupted, cache, steps), logs[-1])
    try:
      # A uniform moment of 0.6 / kills of the loop's duration after the run starts training:
      # together the kills cover much of the run, which cannot end before the last one.
      delay = rng.uniform(0, 0.6 * seconds / kills)
      second = functools.partial(second_run_is_refused, proc, interrupted, cache, steps, seed)
      if not kill_at(
        proc, logs[-1], 'Training from step', delay, before_kill=None if killed_at else second
      ):
        break  # the run finished before this moment: nothing killed
    finally:
      if proc.poll() is None:
        proc.kill()
    killed_at.append(f'{delay:.2f} s (saved {checkpoint_steps(interrupted)[-1:]})')
    if damaged is None and len(checkpoint_steps(interrupted)) >= 2:
      damaged = (damage_newest(interrupted), len(logs))
  if damaged is None:  # every kill came before two saves: run to a second save, then damage it
    logs.append(str(tmp_path / f'run_{len(logs)}.log'))
    proc = launch(train_args(interrupted, cache, steps), logs[-1])
    try:
      deadline = time.monotonic() + 600
      while len(checkpoint_steps(interrupted)) < 2 and proc.poll() is None:
        assert time.monotonic() < deadline, f'seed {seed}: no second checkpoint in 600 s'
        time.sleep(0.02)
    finally:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
    assert len(checkpoint_steps(interrupted)) >= 2, f'seed {seed}: kills at {killed_at}'
    damaged = (damage_newest(interrupted), len(logs))
  logs.append(str(tmp_path / 'last.log'))
  run_to_the_end(train_args(interrupted, cache, steps), logs[-1], seed)

  # The run after the damage moved the damaged checkpoint aside and used the one before.
  step, first = damaged
  after = ''.join(read(log) for log in logs[first:])
  assert f'Moved unreadable checkpoint of step {step} to ' in after, f'seed {seed}: {after[-4000:]}'
  assert os.path.isdir(os.path.join(interrupted, 'checkpoints_unreadable', str(step)))
  config = train_util.digits_config('smoke_dit')
  resumed, resumed_data = train_util.restore(interrupted, config)
  expected, expected_data = train_util.restore(straight, config)
  assert int(resumed.step) == steps, f'seed {seed}'
  assert resumed_data == expected_data, f'seed {seed}'
  train_util.assert_trees_equal(
    resumed, expected, what=f'seed {seed}: resumed after kills at {killed_at} vs straight'
  )
  print(
    f'training, seed {seed}: {len(killed_at)} kills survived, at {killed_at}; '
    f'{len(logs) - 1} runs killed or tried, checkpoint {step} damaged'
  )
  return len(killed_at), len(logs) - 1


@pytest.mark.parametrize('seed, kills', [SHORT, pytest.param(*LONG, marks=pytest.mark.slow)])
def test_training_killed_at_random_moments_ends_bit_identical(
  tmp_path, tmp_path_factory, seed, kills
):
  killed, _ = check_training_killed_at_random_moments(
    tmp_path, train_util.xla_cache(tmp_path_factory), seed, kills
  )
  assert killed == kills, f'seed {seed}: the run ended after {killed} of {kills} kills'


# --- sampling -----------------------------------------------------------------------------------


def sample_args(checkpoint_dir, out, kills):
  settings = dict(SAMPLE_SETTINGS, num_samples=SAMPLES_PER_KILL * kills)
  return [
    '-m',
    'dimsum_jax.sample',
    f'--checkpoint={checkpoint_dir}',
    f'--out={out}',
    *(f'--{k}={v}' for k, v in settings.items()),
  ]


def converted_model(root):
  """A tiny DiMSUM with every weight non-zero, in the layout of dimsum_jax.convert."""
  from dimsum_jax import convert  # pylint: disable=g-import-not-at-top
  from dimsum_jax import models  # pylint: disable=g-import-not-at-top
  from tests.models import common  # pylint: disable=g-import-not-at-top

  mc = common.tiny_config(in_channels=3)
  convert.save_params(str(root), common.filled_params(models.create_model(mc), mc), mc)
  return str(root)


def outputs(out):
  """samples.npz and every PNG, as bytes."""
  files = {'samples.npz': read_bytes(os.path.join(out, 'samples.npz'))}
  for name in sorted(os.listdir(os.path.join(out, 'images'))):
    files[name] = read_bytes(os.path.join(out, 'images', name))
  return files


def read_bytes(path):
  with open(path, 'rb') as f:
    return f.read()


def check_sampling_killed_at_random_moments(tmp_path, model, cache, seed, kills):
  """(kills survived, kills tried); asserts the outputs equal the straight run's, byte by byte."""
  rng = np.random.default_rng(seed)
  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  env = dict(JAX_COMPILATION_CACHE_DIR=cache)
  text = run_to_the_end(
    sample_args(model, straight, kills), str(tmp_path / 'straight.log'), seed, env
  )
  seconds = loop_seconds(text, 'Compiled the sampler', 'Wrote ')
  killed_at, tried = [], 0
  while len(killed_at) < kills:
    log = str(tmp_path / f'run_{tried}.log')
    proc = launch(sample_args(model, interrupted, kills), log, env)
    tried += 1
    try:
      delay = rng.uniform(0, 0.6 * seconds / kills)
      if not kill_at(proc, log, 'Compiled the sampler', delay):
        break
    finally:
      if proc.poll() is None:
        proc.kill()
    chunks = os.listdir(os.path.join(interrupted, 'chunks'))
    killed_at.append(f'{delay:.2f} s ({sum(c.endswith(".npz") for c in chunks)} batches)')
  run_to_the_end(sample_args(model, interrupted, kills), str(tmp_path / 'last.log'), seed, env)
  expected, got = outputs(straight), outputs(interrupted)
  assert sorted(got) == sorted(expected), f'seed {seed}'
  for name, data in expected.items():
    assert got[name] == data, f'seed {seed}: {name} differs after kills at {killed_at}'
  print(f'sampling, seed {seed}: {len(killed_at)} kills survived, at {killed_at}')
  return len(killed_at), tried


# Sampling's resume is in the default suite through test_sample_cli; its kills under -m slow.
@pytest.mark.parametrize(
  'seed, kills',
  [pytest.param(*SHORT, marks=pytest.mark.slow), pytest.param(*LONG, marks=pytest.mark.slow)],
)
def test_sampling_killed_at_random_moments_gives_the_same_bytes(
  tmp_path, tmp_path_factory, seed, kills
):
  model = converted_model(tmp_path / 'model')
  killed, _ = check_sampling_killed_at_random_moments(
    tmp_path, model, train_util.xla_cache(tmp_path_factory), seed, kills
  )
  assert killed == kills, f'seed {seed}: sampling ended after {killed} of {kills} kills'
