"""Every device mesh and sharding decision of training, in one place.

The mesh has two axes: `data` (pure data parallelism: parameters replicated) and `fsdp` (data
parallelism with parameters, EMA and optimiser state split across the axis). The batch is split
over both. Parameters are placed by `config.sharding_rules`: (regex on the leaf path, strategy)
pairs, first match wins, with strategies

  'replicate'  the leaf lives whole on every device;
  'fsdp'       the largest dimension that the fsdp axis size divides is split over `fsdp`
               (replicated when none does).

The same code runs on one CPU, 8 fake CPU devices, N GPUs of a host, or a multi-host pod.
"""

import os
import re

from absl import logging
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # The batch dimension is split over every device.


def initialize_distributed():
  """Starts JAX's multi-process runtime when this process is one of several.

  Launchers say so with JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (any
  cluster), or by running under a cluster that JAX detects by itself (multi-host Cloud TPU,
  SLURM or Open MPI with more than one task, or DIMSUM_DISTRIBUTED=1 to force detection).
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if 'JAX_NUM_PROCESSES' in env:
    jax.distributed.initialize(
      coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
      num_processes=int(env['JAX_NUM_PROCESSES']),
      process_id=int(env['JAX_PROCESS_ID']),
    )
  elif (
    env.get('DIMSUM_DISTRIBUTED') == '1'
    or ',' in env.get('TPU_WORKER_HOSTNAMES', '')
    or int(env.get('SLURM_NTASKS', '1')) > 1
    or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
  ):
    jax.distributed.initialize()
  else:
    return
  logging.info(
    'Distributed runtime up: process %d of %d, %d local of %d devices.',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def make_mesh(mesh_config, devices=None):
  """A mesh with axes ('data', 'fsdp') over all devices (or `devices`); -1 takes what is left."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  n = jax.device_count() if devices is None else len(devices)
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.')
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if known <= 0 or n % known:
      raise ValueError(
        f'config.mesh {dict(zip(MESH_AXES, sizes))} does not fit {n} devices: '
        f'set the fixed axis sizes to divide {n}.'
      )
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(
      f'config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} '
      f'devices but there are {n}: make the product of the axis sizes {n}, or '
      'set one axis to -1.'
    )
  axis_types = (jax.sharding.AxisType.Auto,) * len(sizes)
  return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  """Leading (batch) dimension split over every device, the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(global_batch_size, mesh):
  """Refuses a global batch that the devices (or processes) cannot split evenly."""
  n = mesh.devices.size
  if global_batch_size % n:
    raise ValueError(
      f'The global batch size {global_batch_size} does not divide over {n} devices: set '
      f'--config.data.global_batch_size to a multiple of {n} '
      f'(e.g. {max(n, global_batch_size // n * n)}).'
    )


def leaf_path(path):
  return jax.tree_util.keystr(path, simple=True, separator='/')


def _spec_for(strategy, shape, mesh, path):
  if strategy == 'replicate':
    return P()
  if strategy == 'fsdp':
    size = mesh.shape['fsdp']
    if size == 1 or not shape:
      return P()
    # The largest dimension that the fsdp axis divides (ties: the last one).
    order = np.argsort(shape, kind='stable')[::-1]
    for d in order:
      if shape[d] % size == 0 and shape[d] >= size:
        spec = [None] * len(shape)
        spec[d] = 'fsdp'
        return P(*spec)
    return P()
  raise ValueError(f'Unknown sharding strategy {strategy!r} for {path}: use replicate or fsdp.')


def tree_shardings(abstract_tree, mesh, rules):
  """NamedShardings for every leaf of `abstract_tree` from (regex, strategy) rules."""
  compiled = [(re.compile(pattern), strategy) for pattern, strategy in rules]

  def one(path, leaf):
    name = leaf_path(path)
    for pattern, strategy in compiled:
      if pattern.fullmatch(name):
        return NamedSharding(mesh, _spec_for(strategy, tuple(leaf.shape), mesh, name))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def global_batch(local_batch, mesh):
  """This process's slice of the batch (numpy) -> global jax arrays split over all devices."""
  sharding = batch_sharding(mesh)
  # An intended copy: allowed even where the training loop disallows implicit ones (with several
  # processes JAX builds the array through a callback that the transfer guard would refuse).
  with jax.transfer_guard_host_to_device('allow'):
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def per_process_rows(rows, mesh):
  """Stacks one numpy row per process into a global array [devices, ...] (each device holds its
  process's row), so per-process host state can travel in a multi-process checkpoint. Read it
  back with this_process_rows."""
  sharding = NamedSharding(mesh, P(BATCH_AXES))
  local = np.stack([rows] * len(mesh.local_devices))
  with jax.transfer_guard_host_to_device('allow'):  # intended, as in global_batch
    return jax.make_array_from_process_local_data(sharding, local)


def this_process_rows(shape, mesh):
  """Index of the first row that this process stored in a per_process_rows array of `shape`."""
  indices = batch_sharding(mesh).addressable_devices_indices_map(tuple(shape))
  return min(index[0].start or 0 for index in indices.values())
