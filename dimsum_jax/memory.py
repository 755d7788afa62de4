"""How many images one device takes per pass: the micro-batch behind `optim.grad_accum_steps`.

A training step on a per-device batch of b images runs as k passes of b / k images
(`train.train_step`). `config.optim.grad_accum_steps` = k, or 0 (the default) for the fewest passes
whose step fits the device, chosen before anything is compiled from an estimate of the step's peak
memory on one device for a micro-batch of m images:

  estimate(m) = state + gradients + SLACK * residuals(m)

  state       bytes of the train state on this device (parameters, EMA, optimiser state, as sharded)
  gradients   float32 gradients of every parameter, twice when accumulating (the running sum)
  residuals   what the backward keeps of the forward over m images: the leaves of `jax.vjp`'s
              pullback, sized by `jax.eval_shape` (a trace, no compile, no FLOP), linear in m
  SLACK       XLA's working set beyond the residuals (the backward's temporaries), the ratio of
              XLA's compiled memory plan to the estimate's residual term measured on H100 / H200
              for DiMSUM-L/2 and DiT-L/2 (BENCHMARKS.md)

and the budget is HEADROOM x the allocator's limit (`device.memory_stats()['bytes_limit']`, which
XLA_PYTHON_CLIENT_MEM_FRACTION sets). Devices that report no limit (CPU) take the whole batch in one
pass. After compiling, `plan_bytes` reads XLA's own plan of the program, which the training loop
checks against the limit before the first step (`train.compile_update`).
"""

from __future__ import annotations

import math
from typing import Callable

import jax

SLACK = 1.4
HEADROOM = 0.92  # share of the limit the estimate may fill
PLAN_HEADROOM = 0.95  # share of the limit XLA's compiled plan may fill
GIB = 2.0**30


def device_limit_bytes(device=None) -> int | None:
  """The allocator's limit on `device` (default: the first local one); None where unknown."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory stats
    return None
  limit = (stats or {}).get('bytes_limit')
  return int(limit) if limit and math.isfinite(limit) else None


def bytes_on_one_device(abstract_tree) -> int:
  """Bytes of one device's shards of a tree of ShapeDtypeStructs (whole leaves if unsharded)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.shape
    sharding = getattr(leaf, 'sharding', None)
    if sharding is not None:
      shape = sharding.shard_shape(shape)
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def residual_bytes(loss_of_batch: Callable[[int], tuple[Callable, tuple]], images: int) -> int:
  """Bytes the backward keeps of `loss` over `images` images: loss_of_batch(images) gives
  (loss(params, *rest), (params, *rest)) as abstract values; nothing is computed."""
  loss, args = loss_of_batch(images)
  pullback = jax.eval_shape(lambda p, *rest: jax.vjp(lambda q: loss(q, *rest), p)[1], *args)
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(pullback))


class Plan:
  """The estimate for one model and state on one device: `bytes(m, k)` for k passes of m images.

  The residuals are `fixed + per_image * m` (fixed: what does not grow with the batch, such as the
  compute-dtype copies of the parameters)."""

  def __init__(self, state_bytes: int, param_bytes: int, fixed: float, per_image: float):
    self.state_bytes = state_bytes
    self.param_bytes = param_bytes
    self.fixed = fixed
    self.per_image = per_image

  def residuals(self, m: int) -> float:
    return self.fixed + self.per_image * m

  def bytes(self, m: int, k: int) -> float:
    gradients = self.param_bytes * (2 if k > 1 else 1)
    return self.state_bytes + gradients + SLACK * self.residuals(m)


def divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def fewest_passes(per_device_batch: int, plan: Plan, limit: int) -> int:
  """The smallest k dividing the per-device batch whose estimate fits HEADROOM x limit (the
  largest k, one image per pass, when none does)."""
  ks = divisors(per_device_batch)
  for k in ks:
    if plan.bytes(per_device_batch // k, k) <= HEADROOM * limit:
      return k
  return ks[-1]


def plan_bytes(compiled) -> int | None:
  """XLA's memory plan of a compiled program on one device (arguments + outputs - aliased +
  temporaries), or None where the backend does not report it."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None
  if ma is None:
    return None
  return int(
    ma.argument_size_in_bytes
    + ma.output_size_in_bytes
    - ma.alias_size_in_bytes
    + ma.temp_size_in_bytes
  )
