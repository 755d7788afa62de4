"""Tiny training configs and helpers shared by the training, checkpoint and multi-process tests."""

import hashlib
import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np

from dimsum_jax import checkpoint
from dimsum_jax import data as data_lib
from dimsum_jax import sharding
from dimsum_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, 'configs', 'digits.py')


def digits_config(variant='smoke_dit', **overrides):
  """configs/digits.py:<variant> with `section__key=value` overrides (e.g. optim__learning_rate)."""
  spec = importlib.util.spec_from_file_location('digits_config', DIGITS)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  for key, value in overrides.items():
    *sections, leaf = key.split('__')
    node = config
    for s in sections:
      node = node[s]
    node[leaf] = value
  return config


def flags(variant='smoke_dit', **overrides):
  """The same config as command-line flags for python -m dimsum_jax.main."""
  out = [f'--config={DIGITS}:{variant}']
  for key, value in overrides.items():
    out.append(f'--config.{key.replace("__", ".")}={value}')
  return out


def env(devices=1, **extra):
  """Environment of a CPU subprocess with `devices` fake devices (fast, unoptimised compiles)."""
  e = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    PYTHONUNBUFFERED='1',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
    '--xla_backend_optimization_level=0',
  )
  e.pop('JAX_NUM_PROCESSES', None)
  e.update({k: str(v) for k, v in extra.items()})
  return e


def run_python(args, *, devices=1, timeout=300, **extra_env):
  return subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    env=env(devices, **extra_env),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def xla_cache(tmp_path_factory):
  """A persistent compilation cache shared by the subprocesses of one test session."""
  return str(tmp_path_factory.getbasetemp() / 'xla_cache')


def one_device_mesh():
  return sharding.make_mesh({'data': 1, 'fsdp': 1}, devices=jax.devices()[:1])


def restore(workdir, config, step=None):
  """(state, data_state) of WORKDIR's newest good checkpoint (or `step`), on one device."""
  mesh = one_device_mesh()
  abstract_state = train.build(config, mesh).abstract_state
  manager = checkpoint.create_manager(workdir, keep=100)
  try:
    if step is None:
      return checkpoint.restore_latest(manager, abstract_state, mesh)
    return checkpoint._restore_one(manager, step, abstract_state, mesh)  # pylint: disable=protected-access
  finally:
    manager.close()


def global_batches(config, num_steps, process_count=1):
  """The global batches a run with `process_count` processes trains on: each process's share,
  in process order (the order of the batch rows over the devices)."""
  sources = [
    data_lib.create_dataset(
      config.data, process_index=p, process_count=process_count, seed=config.seed
    )
    for p in range(process_count)
  ]
  for _ in range(num_steps):
    parts = [next(s) for s in sources]
    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def assert_trees_close(actual, expected, *, rtol, atol, what):
  actual, expected = jax.device_get(actual), jax.device_get(expected)
  assert jax.tree.structure(actual) == jax.tree.structure(expected), what
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(
      np.asarray(a),
      np.asarray(b),
      rtol=rtol,
      atol=atol,
      err_msg=f'{what}: {jax.tree_util.keystr(path)}',
    )


def assert_trees_equal(actual, expected, *, what):
  """Bit for bit: same structure, dtypes, shapes and bytes in every leaf (NaNs included)."""
  actual, expected = jax.device_get(actual), jax.device_get(expected)
  assert jax.tree.structure(actual) == jax.tree.structure(expected), what
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    a, b = np.asarray(a), np.asarray(b)
    where = f'{what}: {jax.tree_util.keystr(path)}'
    assert (a.dtype, a.shape) == (b.dtype, b.shape), (where, a.dtype, a.shape, b.dtype, b.shape)
    if a.tobytes() != b.tobytes():
      np.testing.assert_array_equal(a, b, err_msg=where)  # names the elements that differ
      raise AssertionError(f'{where}: equal values with different bits (signed zeros or NaNs)')


def fingerprint(directory):
  """Hashes of every file under `directory` (to show that nothing was touched or added)."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), directory) + '/'] = 'dir'
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out
