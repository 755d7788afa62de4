"""Real training processes: two JAX processes training and resuming together, and SIGTERM.

Each test launches `python -m dimsum_jax.main` on CPU with a tiny DiT and compares what the
processes saved with a run that was not split or not interrupted.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from dimsum_jax import sharding
from dimsum_jax import train
from tests import train_util


def read(path):
  with open(path) as f:
    return f.read()


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def main_args(workdir, **overrides):
  return [
    '-m',
    'dimsum_jax.main',
    f'--workdir={workdir}',
    *train_util.flags('smoke_dit', **overrides),
  ]


def launch_two_processes(workdir, logdir, **overrides):
  """Runs main as processes 0 and 1 of one job (4 CPU devices each); returns their logs."""
  port = free_port()
  procs, logs = [], []
  for i in range(2):
    log = os.path.join(logdir, f'process_{i}_{time.monotonic_ns()}.log')
    with open(log, 'w') as f:
      procs.append(
        subprocess.Popen(
          [sys.executable, *main_args(workdir, **overrides)],
          cwd=train_util.ROOT,
          stdout=f,
          stderr=subprocess.STDOUT,
          env=train_util.env(
            4, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i
          ),
        )
      )
    logs.append(log)
  try:
    codes = [p.wait(timeout=400) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  texts = [read(log) for log in logs]
  for code, text in zip(codes, texts):
    assert code == 0, text[-4000:]
  return texts


def test_two_processes_train_save_and_resume_together(tmp_path):
  workdir, cache = str(tmp_path / 'workdir'), str(tmp_path / 'xla_cache')
  common = dict(
    checkpoint_every_steps=2, log_every_steps=2, sample__every_steps=-1, compilation_cache_dir=cache
  )
  first = launch_two_processes(workdir, str(tmp_path), num_train_steps=2, **common)
  assert 'process 0 of 2, 4 local of 8 devices' in first[0]
  assert 'process 1 of 2, 4 local of 8 devices' in first[1]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']
  # A new pair of processes resumes from step 2 (state, rng and both data positions) to 4.
  second = launch_two_processes(workdir, str(tmp_path), num_train_steps=4, **common)
  for text in second:
    assert 'Resumed from checkpoint' in text and 'Training from step 2 to 4' in text
  # Process 0 held the workdir's lock for both processes of each job and released it.
  assert read(os.path.join(workdir, 'lock')) == ''

  # The same four global batches on one device, one process: process 0's rows, then process 1's.
  config = train_util.digits_config('smoke_dit', num_train_steps=4)
  mesh = train_util.one_device_mesh()
  training = train.build(config, mesh)
  state = training.init(jax.random.PRNGKey(config.seed))
  for batch in train_util.global_batches(config, 4, process_count=2):
    state, _ = training.update(state, sharding.global_batch(batch, mesh))
  saved, data_state = train_util.restore(workdir, config)
  assert int(saved.step) == 4
  assert data_state == {'epoch': 0, 'index': 4 * 8}  # 8 of each process's 898 digits per step
  train_util.assert_trees_close(saved, state, rtol=1e-5, atol=1e-6, what='two processes vs one')


def test_sigterm_saves_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
  steps, batch = 60, 64  # 3 840 digits: the run crosses two epoch boundaries of the 1 797
  overrides = dict(
    num_train_steps=steps,
    checkpoint_every_steps=5,
    log_every_steps=5,
    sample__every_steps=-1,
    data__global_batch_size=batch,
    compilation_cache_dir=str(tmp_path / 'xla_cache'),
  )
  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  r = train_util.run_python(main_args(straight, **overrides))
  assert r.returncode == 0, r.stderr[-4000:]

  log = str(tmp_path / 'interrupted.log')
  with open(log, 'w') as f:
    proc = subprocess.Popen(
      [sys.executable, *main_args(interrupted, **overrides)],
      cwd=train_util.ROOT,
      stdout=f,
      stderr=subprocess.STDOUT,
      env=train_util.env(1),
    )
  try:
    deadline = time.monotonic() + 300
    while not os.path.isdir(os.path.join(interrupted, 'checkpoints', '5')):
      assert proc.poll() is None and time.monotonic() < deadline, read(log)[-4000:]
      time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, read(log)[-4000:]
  finally:
    if proc.poll() is None:
      proc.kill()
  text = read(log)
  saved_at = int(re.search(r'Preempted: saved step (\d+)', text).group(1))
  assert 5 <= saved_at < steps
  config = train_util.digits_config('smoke_dit', data__global_batch_size=batch)
  state, data_state = train_util.restore(interrupted, config)
  assert int(state.step) == saved_at
  assert data_state == {'epoch': saved_at * batch // 1797, 'index': saved_at * batch % 1797}

  r = train_util.run_python(main_args(interrupted, **overrides))
  assert r.returncode == 0, r.stderr[-4000:]
  assert f'Training from step {saved_at} to {steps}' in r.stderr
  resumed, resumed_data = train_util.restore(interrupted, config)
  expected, expected_data = train_util.restore(straight, config)
  assert int(resumed.step) == steps and resumed_data == expected_data == {
    'epoch': steps * batch // 1797,
    'index': steps * batch % 1797,
  }
  # Same program, same data, same keys: the interruption leaves no trace in the numbers.
  train_util.assert_trees_close(resumed, expected, rtol=0, atol=0, what='resumed vs straight')
  np.testing.assert_array_equal(np.asarray(resumed.rng), np.asarray(expected.rng))
