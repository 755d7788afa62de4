"""The selective scan of Mamba (S6), as a pure function.

Layout is channels-last, the natural one for JAX:
  u, delta, z: [batch, length, dim]     A: [dim, state]
  B, C:        [batch, length, state]   D, delta_bias: [dim]
  initial_state: [batch, dim, state]

  Δ = softplus(delta + delta_bias)      (when delta_softplus)
  s_l = exp(Δ_l A) ⊙ s_{l-1} + Δ_l B_l u_l,   s_0 = initial_state (zeros by default)
  y_l = C_l · s_l + D u_l;  out = y ⊙ SiLU(z)

The state is always carried in float32; inputs may be bfloat16. `selective_scan` picks the
implementation: the associative-scan reference here (TPU), the same recurrence step by step
(`sequential`, CPU), or the Pallas GPU kernel. `selective_scan_many` takes several independent scans
(`ScanInputs`) and, with the kernel, runs those of one shape as one call with parameter groups
when a call each would leave the GPU idle (`fuse_pays`); its results are those of a call each.
Such a call can also run each row's sequence as time segments in two calls (`MAX_TIME_SEGMENTS`,
`time_segments`), with the results of whole rows up to float rounding.

Sharding: XLA's SPMD partitioner cannot split the Pallas kernel (a custom call), so under a
batch-sharded jit it would gather the whole batch onto every device. When the Pallas path is traced
with a mesh in context (`jax.set_mesh(mesh)` around the jit's tracing, i.e. its first call or
`.lower`), the kernel instead runs once per batch shard through `jax.shard_map` over the mesh axes
of `sharding.BATCH_AXES` that the mesh has; A, D and delta_bias are replicated into it, and their
gradients are summed over the shards by shard_map's transpose. Without a mesh in context (or on
one device) the kernel is called directly.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dimsum_jax.sharding import BATCH_AXES

# "pallas" runs the kernel with its "fast" preset, "pallas_low_memory" with "low_memory"
# (selective_scan_pallas.PRESETS).
IMPLS = ("auto", "reference", "sequential", "pallas", "pallas_low_memory")
# selective_scan_many fuses its scans into one kernel call when that call has at most this many
# programs: one wave on an H100 or H200 (132 streaming multiprocessors).
FUSE_MAX_PROGRAMS = 132
# A kernel call with few programs (batch 1 in sampling) may instead run each row's sequence as up to
# this many segments, each a row of its own: a first call finds every segment's end state from
# zero, the segments' start states follow from those in a short loop, and a second call runs the
# segments from them (`time_segments`). 1 keeps whole rows (the default until timed on a GPU).
MAX_TIME_SEGMENTS = 1
MIN_SEGMENT = 16  # time steps per segment, at least


class ScanInputs(NamedTuple):
  """One scan's arguments to `selective_scan_many` (shapes as in the module docstring)."""

  u: jax.Array
  delta: jax.Array
  A: jax.Array
  B: jax.Array
  C: jax.Array
  D: jax.Array | None = None
  z: jax.Array | None = None
  delta_bias: jax.Array | None = None
  initial_state: jax.Array | None = None


def _combine(left, right):
  a_l, b_l = left
  a_r, b_r = right
  return a_r * a_l, a_r * b_l + b_r


def _step_sizes(delta, delta_bias, delta_softplus, dtype):
  """Δ in `dtype`: delta plus its bias (broadcast against it), through softplus if asked."""
  delta = delta.astype(dtype)
  if delta_bias is not None:
    delta = delta + delta_bias.astype(dtype)
  return jax.nn.softplus(delta) if delta_softplus else delta


def _inputs(u, delta, A, B, C, delta_bias, delta_softplus):
  """u, Δ, A, B, C in the state's precision (float32; float64 stays float64)."""
  f32 = jnp.promote_types(u.dtype, jnp.float32)
  u, A, B, C = (v.astype(f32) for v in (u, A, B, C))
  return u, _step_sizes(delta, delta_bias, delta_softplus, f32), A, B, C


def _output(y, u, D, z, dtype):
  """y + D u, gated by SiLU(z), in the input dtype."""
  if D is not None:
    y = y + u * D.astype(y.dtype)
  if z is not None:
    y = y * jax.nn.silu(z.astype(y.dtype))
  return y.astype(dtype)


def selective_scan_reference(
  u,
  delta,
  A,
  B,
  C,
  D=None,
  z=None,
  delta_bias=None,
  delta_softplus=False,
  initial_state=None,
  return_last_state=False,
):
  """Selective scan through `jax.lax.associative_scan`; materialises [b, l, d, n]."""
  dtype = u.dtype
  u, delta, A, B, C = _inputs(u, delta, A, B, C, delta_bias, delta_softplus)
  decay = jnp.exp(delta[..., None] * A)  # [b, l, d, n]
  drive = (delta * u)[..., None] * B[:, :, None, :]  # [b, l, d, n]
  if initial_state is not None:
    # Fold h0 into the first input: s_1 = a_1 h0 + b_1.
    drive = drive.at[:, 0].add(decay[:, 0] * initial_state.astype(decay.dtype))
  _, states = jax.lax.associative_scan(_combine, (decay, drive), axis=1)
  y = _output(jnp.einsum("bldn,bln->bld", states, C), u, D, z, dtype)
  if return_last_state:
    return y, states[:, -1]
  return y


def selective_scan_sequential(
  u,
  delta,
  A,
  B,
  C,
  D=None,
  z=None,
  delta_bias=None,
  delta_softplus=False,
  initial_state=None,
  return_last_state=False,
):
  """The same recurrence one step at a time (`jax.lax.scan` over the length, an [b, d, n] carry):
  O(L) work instead of the associative scan's O(L log L) passes over [b, l, d, n], which is
  3-4x faster forward+backward on a CPU at the sizes the CPU runs (measured: b 64, L 16-64,
  d 64-128). Equal to the reference up to float rounding."""
  dtype = u.dtype
  u, delta, A, B, C = _inputs(u, delta, A, B, C, delta_bias, delta_softplus)
  b, _, d = u.shape
  state = (
    jnp.zeros((b, d, A.shape[-1]), u.dtype)
    if initial_state is None
    else initial_state.astype(u.dtype)
  )

  def step(s, xs):
    delta_l, u_l, b_l, c_l = xs
    s = jnp.exp(delta_l[..., None] * A) * s + (delta_l * u_l)[..., None] * b_l[:, None, :]
    return s, jnp.einsum("bdn,bn->bd", s, c_l)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (delta, u, B, C))
  last, ys = jax.lax.scan(step, state, xs)
  y = _output(jnp.moveaxis(ys, 0, 1), u, D, z, dtype)
  if return_last_state:
    return y, last
  return y


def resolve_impl(impl: str = "auto") -> str:
  """'auto' takes the Pallas kernel on GPU, the sequential scan on CPU and the associative-scan
  reference elsewhere (TPU, where its parallel passes pay)."""
  if impl not in IMPLS:
    raise ValueError(f"Unknown selective-scan implementation {impl!r}; choose one of {IMPLS}.")
  if impl == "auto":
    backend = jax.default_backend()
    if backend == "gpu" and _pallas_available():
      return "pallas"
    return "sequential" if backend == "cpu" else "reference"
  return impl


def _pallas_available() -> bool:
  try:
    from dimsum_jax.ops import selective_scan_pallas  # noqa: F401
  except ImportError:
    return False
  return True


def batch_shard_axes(batch: int) -> tuple[str, ...]:
  """Axes of the mesh in context that split the batch (those of BATCH_AXES it has, not already
  manual); () without a mesh, on a single device, or when `batch` does not divide over them."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  manual = set(mesh.manual_axes)
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and a not in manual)
  size = math.prod(mesh.shape[a] for a in axes)
  if size <= 1:
    return ()
  if batch % size:
    warnings.warn(
      f"The selective scan's batch {batch} does not divide over the mesh axes {axes} "
      f"({size} devices): the Pallas kernel runs on the whole batch on every device; "
      f"use a batch that is a multiple of {size}.",
      stacklevel=3,
    )
    return ()
  return axes


def _pallas(scans, delta_softplus, return_last_state, preset="fast"):
  """The Pallas kernel over a list of ScanInputs, per batch shard when a mesh in context splits
  the batch; one call for all of them where `fuse_pays`, else one call each."""
  from dimsum_jax.ops import selective_scan_pallas

  options = selective_scan_pallas.PRESETS[preset]

  def call(batched, shared, last_state):
    """One kernel call; batched, shared: dicts of one scan's per-row and per-channel arguments."""
    return selective_scan_pallas.selective_scan_pallas(
      batched["u"],
      batched["delta"],
      shared["A"],
      batched["B"],
      batched["C"],
      shared["D"],
      batched["z"],
      shared["delta_bias"],
      delta_softplus,
      batched["initial_state"],
      last_state,
      options,
    )

  def run(batched, shared):
    b, length, d = batched["u"].shape
    programs = b * -(-d // selective_scan_pallas.BLOCK_D)
    segments = time_segments(programs, length, options.chunk)
    if segments == 1:
      return call(batched, shared, return_last_state)
    y, last = _in_segments(call, batched, shared, segments, delta_softplus)
    return (y, last) if return_last_state else y

  def kernel(batched, shared):
    b, _, d = batched[0]["u"].shape
    signature = lambda *args: jax.tree.map(lambda v: (v.shape, v.dtype), args)
    alike = all(signature(*x) == signature(batched[0], shared[0]) for x in zip(batched, shared))
    if len(batched) == 1 or not alike or not fuse_pays(len(batched), b, d):
      return [run(bt, sh) for bt, sh in zip(batched, shared)]
    # One call: the batches one after another, the parameters stacked into groups.
    outs = run(
      jax.tree.map(lambda *v: jnp.concatenate(v), *batched),
      jax.tree.map(lambda *v: jnp.stack(v), *shared),
    )
    return [jax.tree.map(lambda v: v[i * b : (i + 1) * b], outs) for i in range(len(batched))]

  batched = [
    dict(u=s.u, delta=s.delta, B=s.B, C=s.C, z=s.z, initial_state=s.initial_state) for s in scans
  ]
  shared = [dict(A=s.A, D=s.D, delta_bias=s.delta_bias) for s in scans]
  axes = batch_shard_axes(scans[0].u.shape[0])
  if not axes:
    return kernel(batched, shared)
  spec = P(axes)
  # check_vma=False: the kernel's primitives carry no varying-axis rules. The transpose of the
  # replicated (P()) inputs still sums their per-shard cotangents over `axes`.
  return jax.shard_map(
    kernel,
    in_specs=(spec, P()),
    out_specs=spec,
    axis_names=frozenset(axes),
    check_vma=False,
  )(batched, shared)


def time_segments(programs: int, length: int, chunk: int) -> int:
  """Segments per row for a kernel call of `programs` programs over `length` steps: the largest
  power of two S <= MAX_TIME_SEGMENTS whose programs x S fit one wave (FUSE_MAX_PROGRAMS) and whose
  segments are whole kernel chunks of at least MIN_SEGMENT steps; 1 when none is."""
  segments = 1
  while (
    2 * segments <= MAX_TIME_SEGMENTS
    and programs * 2 * segments <= FUSE_MAX_PROGRAMS
    and length % (2 * segments * chunk) == 0
    and length // (2 * segments) >= MIN_SEGMENT
  ):
    segments *= 2
  return segments


def _in_segments(call, batched, shared, segments, delta_softplus):
  """(y, last state) of one kernel call's scans, each row's sequence run as `segments` rows.

  A segment that starts from state h ends in P ⊙ h + e, where e is its end from zero (the first
  call, without the D skip and the gate, which do not touch the state) and P = exp(A ΣΔ) is its
  decay, Δ summed over its steps. The start states follow one segment after another, and the
  second call runs every segment from its own start."""
  u = batched["u"]
  b, length, d = u.shape
  seg = length // segments
  stacked = shared["A"].ndim == 3  # parameter groups: [g, d, n], [g, d]
  n = shared["A"].shape[-1]

  def rows(x):
    return None if x is None else x.reshape(b * segments, seg, x.shape[-1])

  def per_row(x):  # a parameter for each of the b rows (group i for the i-th block of rows)
    x = x if stacked else x[None]
    return jnp.repeat(x, b // x.shape[0], axis=0)

  steps = dict(u=rows(u), delta=rows(batched["delta"]), B=rows(batched["B"]), C=rows(batched["C"]))
  _, ends = call(dict(steps, z=None, initial_state=None), dict(shared, D=None), True)
  bias = shared["delta_bias"]
  bias = None if bias is None else per_row(bias)[:, None]
  delta = _step_sizes(batched["delta"], bias, delta_softplus, jnp.float32)
  total = delta.reshape(b, segments, seg, d).sum(2)  # [b, S, d]
  decay = jnp.exp(total[..., None] * per_row(shared["A"]).astype(jnp.float32)[:, None])
  ends = ends.reshape(b, segments, d, n)
  state = batched["initial_state"]
  state = jnp.zeros((b, d, n), jnp.float32) if state is None else state.astype(jnp.float32)
  starts = []
  for s in range(segments):
    starts.append(state)
    state = decay[:, s] * state + ends[:, s]
  start = jnp.stack(starts, 1).reshape(b * segments, d, n)
  y, last = call(dict(steps, z=rows(batched["z"]), initial_state=start), shared, True)
  return y.reshape(b, length, d), last.reshape(b, segments, d, n)[:, -1]


def fuse_pays(groups: int, batch: int, dim: int) -> bool:
  """Whether `groups` scans of batch rows x dim channels should be one kernel call: when each
  call alone would leave streaming multiprocessors idle (one program per 128 channels of a row),
  as at batch 1 in sampling. Larger batches keep separate calls, which need no stacked copies."""
  from dimsum_jax.ops import selective_scan_pallas

  programs = groups * batch * -(-dim // selective_scan_pallas.BLOCK_D)
  return programs <= FUSE_MAX_PROGRAMS


def selective_scan(
  u,
  delta,
  A,
  B,
  C,
  D=None,
  z=None,
  delta_bias=None,
  delta_softplus=False,
  initial_state=None,
  return_last_state=False,
  *,
  impl: str = "auto",
):
  """Selective scan; see the module docstring for shapes. `impl`: one of IMPLS."""
  scan = ScanInputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
  return selective_scan_many([scan], delta_softplus, return_last_state, impl=impl)[0]


def selective_scan_many(scans, delta_softplus=False, return_last_state=False, *, impl="auto"):
  """Independent selective scans (a sequence of ScanInputs), one result each, as `selective_scan`
  gives them. With the Pallas kernel, scans of one shape run as one kernel call when a call each
  would leave the GPU idle (`fuse_pays`: DiMSUM's two branches at batch 1 in sampling); the
  results are the same either way."""
  impl = resolve_impl(impl)
  if impl.startswith("pallas"):
    preset = "low_memory" if impl == "pallas_low_memory" else "fast"
    return _pallas(list(scans), delta_softplus, return_last_state, preset)
  one = selective_scan_sequential if impl == "sequential" else selective_scan_reference
  return [
    one(*s[:7], s.delta_bias, delta_softplus, s.initial_state, return_last_state) for s in scans
  ]
