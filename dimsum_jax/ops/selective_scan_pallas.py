"""The selective scan of Mamba (S6) as a Pallas Mosaic GPU kernel, forward and backward.

Same semantics and layout as `selective_scan.selective_scan_reference` (channels-last: u, delta, z
[b, l, d]; B, C [b, l, n]; A [d, n]; D, delta_bias [d]; initial_state [b, d, n]; the state in
float32; the output in u.dtype), with a `jax.custom_vjp` that gives gradients for u, delta, A, B, C,
D, z, delta_bias and initial_state.

Design (Hopper, Mosaic GPU, `plgpu.kernel`, Lane semantics):

* Grid (batch, channel blocks of 128). Each program is one warpgroup; thread i owns channel i of its
  block and keeps all N states of that channel in registers in float32, so the sums over N (y, du,
  d delta) are in-thread. Time is walked sequentially in chunks of `chunk` steps; each chunk's
  inputs come into shared memory by TMA, double buffered (the next chunk is in flight while this one
  is computed), and outputs leave by TMA.
* Forward: y, the last state, and the state at the start of every `sub_chunk` steps
  ([b, L/sub_chunk, n, d], bf16 for bf16 inputs, else f32: with the default sub_chunk of 4 that is
  1/4 of the [b, L, d, n] state tensor in f32, 1/8 in bf16).
* Backward: chunks in reverse; each sub-chunk, last first, is re-run forward from its saved start
  state with its states and decays held in registers (the Python loop is unrolled) and then walked
  backward. No [b, L, d, n] tensor exists anywhere. (With save_sub_chunk_states off, only chunk
  starts are saved and an extra forward pass per chunk finds the sub-chunk starts.) dB and dC need
  a sum over channels: the 2n per-thread partials of a step go to shared memory and are read back
  in a layout where 8 lanes share a row (a warp-level transpose), giving one sum per row after 3
  shuffles; two such buffers are used in turn so that one barrier per group of steps suffices; each
  channel block writes its partial sums and the wrapper adds the (d / 128) blocks.
* exp is `ex2.approx` on A pre-scaled by log2(e) (`approx_math`); softplus, sigmoid and SiLU use
  exp/log only.
* Parameter groups: A [g, d, n] with D and delta_bias [g, d] scan g blocks of the batch, block i
  with group i's parameters, in one call (the program of batch row b reads group b // (batch / g));
  `selective_scan.selective_scan_many` uses this to run DiMSUM's two branches as one kernel call at
  small batch, where a call each leaves most multiprocessors idle.
* The launches (`_forward`, `_backward`) are jitted with the static configuration, so every call
  site of one shape in a model shares one traced and lowered kernel.
* The tuning is a value, `KernelOptions`, with named PRESETS ("fast", the default, chosen by
  measurement on an H200, BENCHMARKS.md "Selective scan"; "low_memory", a quarter of the saved
  states); `model.scan_impl="pallas_low_memory"` selects the second from a config.

Why Mosaic GPU and not the Triton backend: the Triton backend of Pallas is deprecated from JAX 0.11
and warns on every call; Mosaic GPU gives TMA copies, explicit shared-memory buffers and explicit
register layouts, which this kernel needs (the register-resident state and the transposed
reduction). On JAX 0.11.2 and an H200 it compiles, passes the GPU tests and runs faster than
mamba_ssm's CUDA kernel at every shape where that kernel was measured (2.5x at L=4096), so nothing
measured argued for Triton. Numbers are in BENCHMARKS.md ("Selective scan").

Interpret mode (CPU tests): `interpret=True` (a field of KernelOptions) runs the same kernel
body through Pallas' generic interpreter (`pl.pallas_call(..., interpret=True)`), with plain copies
standing in for the TMA copies and barriers; `interpret="mosaic"` runs the Mosaic GPU program itself
in JAX's GPU interpreter (exact, much slower). With `interpret=None` the kernel is interpreted when
the default backend is not a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# Channels per program: one warpgroup, one channel per thread.
BLOCK_D = 128


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """How the kernel is tuned: a frozen value, so it is part of every jit cache key (it reaches
  the custom_vjp as static configuration); pick one of PRESETS or replace fields.

  chunk / sub_chunk: time steps per TMA pipeline stage and per backward register block
  (chunk % sub_chunk == 0, sub_chunk even); with save_sub_chunk_states the forward saves the state
  every sub_chunk steps, else every chunk steps (the backward then re-runs each chunk to find its
  sub-chunk starts). reduce_steps: backward steps whose dB/dC partial sums share one reduction;
  reduce_buffers: 1 or 2 reduction buffers used in turn (one barrier per group instead of two);
  fwd_unroll: forward steps unrolled per loop iteration; keep_decays: the backward keeps each
  step's decays from the register re-run for the reverse walk (one exp2 less per state and step,
  more registers); bf16_saved_states: for bfloat16 inputs the saved states are bfloat16 (half the
  largest residual; relative gradient error ~2e-3 instead of ~1e-4). interpret: None (interpret
  off a GPU), False, True (Pallas' generic interpreter) or "mosaic" (JAX's GPU interpreter).
  The values were chosen by measurement on an H200 (BENCHMARKS.md, "Selective scan").
  """

  chunk: int = 4
  sub_chunk: int = 4
  reduce_steps: int = 2
  fwd_unroll: int = 4
  keep_decays: bool = True
  reduce_buffers: int = 2
  bf16_saved_states: bool = True
  save_sub_chunk_states: bool = True
  interpret: bool | str | None = None


# "fast": the measured defaults. "low_memory": a state saved every 16 steps (a quarter of the
# default's saved states) for about 1.4x the backward time (BENCHMARKS.md: 0.083 / 0.428 ms at
# D=1024, L=256 with z, against 0.090 / 0.31).
PRESETS = {
  "fast": KernelOptions(),
  "low_memory": KernelOptions(
    chunk=16,
    sub_chunk=8,
    reduce_steps=1,
    reduce_buffers=1,
    keep_decays=False,
    save_sub_chunk_states=False,
  ),
}
DEFAULT = PRESETS["fast"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_F32 = jnp.float32
# jax >= 0.11 deprecates passing an index to plgpu.load; 0.10 requires it.
_LOAD_IDX_OPTIONAL = (
  inspect.signature(plgpu.load).parameters["idx"].default is not inspect.Parameter.empty
)


@dataclasses.dataclass(frozen=True)
class _Config:
  length: int  # true sequence length
  padded_length: int  # multiple of chunk
  chunk: int
  sub_chunk: int
  softplus: bool
  has_z: bool
  reduce_steps: int
  fwd_unroll: int
  keep_decays: bool
  reduce_buffers: int  # 1 or 2; 2 only when a sub-chunk has an even number of groups
  save: int  # steps between saved states: chunk or sub_chunk
  interpret: bool | str  # False, True (generic interpreter) or "mosaic" (GPU interpreter)
  bf16_saved_states: bool = True
  group_batch: int = 0  # batch rows per parameter group (the batch for one group)

  def group(self, bi):
    """The parameter group of batch row bi."""
    return lax.div(bi, self.group_batch)

  @property
  def num_chunks(self) -> int:
    return self.padded_length // self.chunk

  @property
  def saves_per_chunk(self) -> int:
    return self.chunk // self.save

  @property
  def masked(self) -> bool:
    return self.padded_length != self.length


# ---------------------------------------------------------------------------------------------
# The two execution modes share the kernel bodies; `_Env` hides how data moves.


class _Env:
  """Program ids, chunked double-buffered pipelines and barriers, per execution mode."""

  def __init__(self, generic: bool):
    self.generic = generic

  def ids(self):
    if self.generic:
      return pl.program_id(0), pl.program_id(1)
    return lax.axis_index("b"), lax.axis_index("d")

  def sync(self):
    """Makes shared-memory writes of every thread visible to all threads (and to TMA)."""
    if not self.generic:
      plgpu.commit_smem()

  def load_now(self, pairs, bar):
    """Copies (gmem view, smem ref) pairs and waits for them."""
    if self.generic:
      for g, s in pairs:
        s[...] = g[...]
      return
    for g, s in pairs:
      plgpu.copy_gmem_to_smem(g, s, bar)
    plgpu.barrier_wait(bar)

  def store_now(self, pairs):
    """Copies (smem ref, gmem view) pairs out and waits for them."""
    if self.generic:
      for s, g in pairs:
        g[...] = s[...]
      return
    plgpu.commit_smem()
    for s, g in pairs:
      plgpu.copy_smem_to_gmem(s, g, commit_group=False)
    plgpu.commit_smem_to_gmem_group()
    plgpu.wait_smem_to_gmem(0)

  def pipeline(self, num_chunks, reverse, ins, outs, bar, body, init):
    """Runs body(chunk, slot, carry) over chunks with inputs/outputs double buffered.

    ins: (gmem_view_fn(chunk), smem [2, ...]) pairs copied in before the body; outs: the same,
    copied out after it. Chunk i+1's inputs are in flight while chunk i is computed.
    """
    order = (lambda i: num_chunks - 1 - i) if reverse else (lambda i: i)
    if self.generic:

      def loop(i, carry):
        c = order(i)
        for g, s in ins:
          s[0] = g(c)[...]
        carry = body(c, 0, carry)
        for g, s in outs:
          g(c)[...] = s[0]
        return carry

      return lax.fori_loop(0, num_chunks, loop, init)

    def fetch(c, slot):
      for g, s in ins:
        plgpu.copy_gmem_to_smem(g(c), s.at[slot], bar.at[slot])

    fetch(order(0), 0)
    if num_chunks > 1:
      fetch(order(1), 1)

    def loop(i, carry):
      slot = lax.rem(i, 2)
      c = order(i)
      plgpu.barrier_wait(bar.at[slot])
      # The output buffers of this slot were last sent two chunks ago; wait until they are read.
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)
      carry = body(c, slot, carry)
      plgpu.commit_smem()
      for g, s in outs:
        plgpu.copy_smem_to_gmem(s.at[slot], g(c), commit_group=False)
      plgpu.commit_smem_to_gmem_group()

      @pl.when(i + 2 < num_chunks)
      def _():
        fetch(order(i + 2), slot)

      return carry

    carry = lax.fori_loop(0, num_chunks, loop, init)
    plgpu.wait_smem_to_gmem(0)
    return carry

  def row_sums(self, ref):
    """Sums a [rows, BLOCK_D] f32 shared-memory ref over its last axis (rows % 32 == 0)."""
    if self.generic:
      return jnp.sum(ref[...], axis=1)
    layout = _row_sum_layout(ref.shape[0])
    x = plgpu.load(ref, layout=layout) if _LOAD_IDX_OPTIONAL else plgpu.load(ref, (), layout=layout)
    return jnp.sum(x, axis=1)


def _row_sum_layout(rows: int):
  """A [rows, 128] f32 register layout with 8 lanes per row, each holding 4 x 4 columns.

  Tiles: (32, 128) -> 4 warps x 8 rows -> 2 row groups x 4 column quarters of (4 rows x 32
  columns) -> 8 lanes x 4-wide vectors along a row. A quarter-warp reads 128 contiguous bytes of one
  row (no bank conflicts) and a row sum is 15 in-thread adds and 3 shuffles.
  """
  assert rows % 32 == 0, rows
  tiling = plgpu.Tiling(((32, BLOCK_D), (8, BLOCK_D), (4, 32), (4,)))
  # Tiled shape (rows/32, 1, 4, 1, 2, 4, 4, 8, 4); from the end: -7 warps (4), -5 row groups (2,
  # registers), -4 column quarters (4, registers), -3 rows of a group (4 lanes), -2 column lanes
  # (8), -1 vector (4). (Written in Mosaic GPU's canonical form.)
  return plgpu.Layout.TILED(tiling, warp_dims=(-7,), lane_dims=(-3, -2), vector_dim=-1)


def _loop(trips: int, body, carry):
  """lax.fori_loop(0, trips, body, carry), or one direct call when trips == 1."""
  if trips == 1:
    return body(0, carry)
  return lax.fori_loop(0, trips, body, carry)


def _softplus(x):
  return jnp.maximum(x, 0.0) + jnp.log(1.0 + jnp.exp(-jnp.abs(x)))


def _sigmoid(x):
  return 1.0 / (1.0 + jnp.exp(-x))


# ---------------------------------------------------------------------------------------------
# Kernels.


def _fwd_kernel(cfg: _Config, n: int, env: _Env, *refs):
  if cfg.has_z:
    (
      u_g,
      dl_g,
      z_g,
      b_g,
      c_g,
      p_g,
      h0_g,
      y_g,
      hs_g,
      last_g,
      u_s,
      dl_s,
      z_s,
      b_s,
      c_s,
      y_s,
      hs_s,
      p_s,
      st_s,
      bar,
      pbar,
    ) = refs
  else:
    (
      u_g,
      dl_g,
      b_g,
      c_g,
      p_g,
      h0_g,
      y_g,
      hs_g,
      last_g,
      u_s,
      dl_s,
      b_s,
      c_s,
      y_s,
      hs_s,
      p_s,
      st_s,
      bar,
      pbar,
    ) = refs
    z_g = z_s = None
  t_c = cfg.chunk
  bi, di = env.ids()
  dsl = pl.ds(di * BLOCK_D, BLOCK_D)
  tsl = lambda c: pl.ds(c * t_c, t_c)

  env.load_now([(h0_g.at[bi, :, dsl], st_s), (p_g.at[cfg.group(bi), :, dsl], p_s)], pbar)
  a2 = [p_s[k] for k in range(n)]
  d_skip = p_s[n]
  bias = p_s[n + 1]
  init = tuple(st_s[k] for k in range(n))

  def chunk_body(c, slot, state):
    u_r, dl_r, b_r, c_r, y_r = u_s.at[slot], dl_s.at[slot], b_s.at[slot], c_s.at[slot], y_s.at[slot]
    z_r = z_s.at[slot] if cfg.has_z else None

    def step(t, s):
      x = dl_r[t].astype(_F32) + bias
      dt = _softplus(x) if cfg.softplus else x
      if cfg.masked:
        dt = dt * (c * t_c + t < cfg.length).astype(_F32)
      uu = u_r[t].astype(_F32)
      du = dt * uu
      acc = d_skip * uu
      new = []
      for k in range(n):
        sk = jnp.exp2(dt * a2[k]) * s[k] + du * b_r[t, k].astype(_F32)
        acc = acc + c_r[t, k].astype(_F32) * sk
        new.append(sk)
      if cfg.has_z:
        zz = z_r[t].astype(_F32)
        acc = acc * (zz * _sigmoid(zz))
      y_r[t] = acc.astype(y_r.dtype)
      return tuple(new)

    unroll = cfg.fwd_unroll

    def block(j, s):
      # Save the state at the start of this block of `cfg.save` steps, then walk the block.
      for k in range(n):
        hs_s[slot, j, k] = s[k].astype(hs_s.dtype)

      def steps(i, s):
        for q in range(unroll):
          s = step(j * cfg.save + i * unroll + q, s)
        return s

      return _loop(cfg.save // unroll, steps, s)

    return _loop(cfg.saves_per_chunk, block, state)

  ins = [(lambda c: u_g.at[bi, tsl(c), dsl], u_s), (lambda c: dl_g.at[bi, tsl(c), dsl], dl_s)]
  if cfg.has_z:
    ins.append((lambda c: z_g.at[bi, tsl(c), dsl], z_s))
  ins += [(lambda c: b_g.at[bi, tsl(c)], b_s), (lambda c: c_g.at[bi, tsl(c)], c_s)]
  nsv = cfg.saves_per_chunk
  outs = [
    (lambda c: y_g.at[bi, tsl(c), dsl], y_s),
    (lambda c: hs_g.at[bi, pl.ds(c * nsv, nsv), :, dsl], hs_s),
  ]
  last = env.pipeline(cfg.num_chunks, False, ins, outs, bar, chunk_body, init)
  for k in range(n):
    st_s[k] = last[k]
  env.store_now([(st_s, last_g.at[bi, :, dsl])])


def _bwd_kernel(cfg: _Config, n: int, env: _Env, *refs):
  if cfg.has_z:
    (
      u_g,
      dl_g,
      z_g,
      dy_g,
      b_g,
      c_g,
      p_g,
      hs_g,
      dlast_g,
      du_g,
      ddl_g,
      dz_g,
      dbc_g,
      dp_g,
      dh0_g,
      u_s,
      dl_s,
      z_s,
      dy_s,
      b_s,
      c_s,
      hs_s,
      du_s,
      ddl_s,
      dz_s,
      dbc_s,
      sb_s,
      red_s,
      bar,
      pbar,
    ) = refs
  else:
    (
      u_g,
      dl_g,
      dy_g,
      b_g,
      c_g,
      p_g,
      hs_g,
      dlast_g,
      du_g,
      ddl_g,
      dbc_g,
      dp_g,
      dh0_g,
      u_s,
      dl_s,
      dy_s,
      b_s,
      c_s,
      hs_s,
      du_s,
      ddl_s,
      dbc_s,
      sb_s,
      red_s,
      bar,
      pbar,
    ) = refs
    z_g = z_s = dz_g = dz_s = None
  t_c, t_s = cfg.chunk, cfg.sub_chunk
  n_sub = t_c // t_s
  bi, di = env.ids()
  dsl = pl.ds(di * BLOCK_D, BLOCK_D)
  tsl = lambda c: pl.ds(c * t_c, t_c)

  # red_s ([2n + 2, 128] f32) is the dB/dC reduction buffer; before and after the chunk loop it
  # stages the parameters, the last-state cotangent and the per-channel results.
  env.load_now(
    [
      (p_g.at[cfg.group(bi), :, dsl], red_s.at[pl.ds(0, n + 2)]),
      (dlast_g.at[bi, :, dsl], red_s.at[pl.ds(n + 2, n)]),
    ],
    pbar,
  )
  a2 = [red_s[k] for k in range(n)]
  d_skip = red_s[n]
  bias = red_s[n + 1]
  ds0 = tuple(red_s[n + 2 + k] for k in range(n))
  zero = d_skip * 0.0
  group = cfg.reduce_steps
  n_groups = -(-t_s // group)
  nbuf = cfg.reduce_buffers

  def delta_at(c, dl_r, t):
    """(dt, dsoftplus/dx or None, mask or None) at chunk-local step t."""
    x = dl_r[t].astype(_F32) + bias
    if cfg.softplus:
      dt = _softplus(x)
      sig = jnp.exp(x - dt)
    else:
      dt, sig = x, None
    mask = None
    if cfg.masked:
      mask = (c * t_c + t < cfg.length).astype(_F32)
      dt = dt * mask
    return dt, sig, mask

  def chunk_body(c, slot, carry):
    u_r, dl_r, dy_r = u_s.at[slot], dl_s.at[slot], dy_s.at[slot]
    b_r, c_r, hs_r = b_s.at[slot], c_s.at[slot], hs_s.at[slot]
    du_r, ddl_r, dbc_r = du_s.at[slot], ddl_s.at[slot], dbc_s.at[slot]
    z_r = z_s.at[slot] if cfg.has_z else None
    dz_r = dz_s.at[slot] if cfg.has_z else None

    # Pass A (states saved per chunk only): the states at the start of sub-chunks 1 .. n_sub - 1,
    # into sb_s.
    if n_sub > 1 and cfg.save == t_c:

      def sub_fwd(j, s):
        def step(i, s):
          t = j * t_s + i
          dt, _, _ = delta_at(c, dl_r, t)
          du = dt * u_r[t].astype(_F32)
          return tuple(jnp.exp2(dt * a2[k]) * s[k] + du * b_r[t, k].astype(_F32) for k in range(n))

        s = lax.fori_loop(0, t_s, step, s)
        for k in range(n):
          sb_s[j * n + k] = s[k]
        return s

      lax.fori_loop(0, n_sub - 1, sub_fwd, tuple(hs_r[0, k].astype(_F32) for k in range(n)))

    # Pass B: each sub-chunk, last first: forward in registers, then backward.
    def sub_bwd(jj, carry):
      ds, da_acc, dd_acc, db_acc = carry
      ds, da_acc = list(ds), list(da_acc)
      j = n_sub - 1 - jj
      t0 = j * t_s
      if n_sub > 1 and cfg.save == t_c:
        first = (j == 0).astype(_F32)
        prev = jnp.maximum(j - 1, 0) * n
        start = [hs_r[0, k].astype(_F32) * first + sb_s[prev + k] * (1.0 - first) for k in range(n)]
      else:  # a state saved at every sub-chunk start
        start = [hs_r[j, k].astype(_F32) for k in range(n)]
      states, decays = [start], []
      for i in range(t_s):
        dt, _, _ = delta_at(c, dl_r, t0 + i)
        du = dt * u_r[t0 + i].astype(_F32)
        decays.append([jnp.exp2(dt * a2[k]) for k in range(n)])
        states.append(
          [decays[-1][k] * states[-1][k] + du * b_r[t0 + i, k].astype(_F32) for k in range(n)]
        )
      for i in reversed(range(t_s)):
        t = t0 + i
        s_now, s_prev = states[i + 1], states[i]
        dt, sig, mask = delta_at(c, dl_r, t)
        uu = u_r[t].astype(_F32)
        dy = dy_r[t].astype(_F32)
        if cfg.has_z:
          zz = z_r[t].astype(_F32)
          sz = _sigmoid(zz)
          g = dy * (zz * sz)
          y_pre = d_skip * uu
          for k in range(n):
            y_pre = y_pre + c_r[t, k].astype(_F32) * s_now[k]
          dz_r[t] = (dy * y_pre * sz * (1.0 + zz * (1.0 - sz))).astype(dz_r.dtype)
        else:
          g = dy
        dd_acc = dd_acc + g * uu
        dtu = dt * uu
        ddt_a = None
        sb = None
        lo = i - i % group  # first (lowest) step of this reduction group
        # Groups are walked from the top; with two buffers, group q uses buffer q % 2.
        base = ((n_groups - 1 - i // group) % nbuf) * group * 2 * n
        red = red_s.at[pl.ds(base + (i - lo) * 2 * n, 2 * n)]
        if nbuf == 1 and (i % group == group - 1 or i == t_s - 1):
          # All threads have read the previous group's partial sums before they are overwritten.
          # (With two buffers, the barrier after the previous group's writes already orders this.)
          env.sync()
        for k in range(n):
          ds[k] = ds[k] + g * c_r[t, k].astype(_F32)
          red[n + k] = g * s_now[k]
          decay = decays[i][k] if cfg.keep_decays else jnp.exp2(dt * a2[k])
          w = ds[k] * s_prev[k] * decay
          ddt_a = w * a2[k] if ddt_a is None else ddt_a + w * a2[k]
          da_acc[k] = da_acc[k] + w * dt
          red[k] = ds[k] * dtu
          bk = ds[k] * b_r[t, k].astype(_F32)
          sb = bk if sb is None else sb + bk
          ds[k] = ds[k] * decay
        ddt = ddt_a * _LN2 + sb * uu
        dx = ddt * sig if cfg.softplus else ddt
        if mask is not None:
          dx = dx * mask
        db_acc = db_acc + dx
        ddl_r[t] = dx.astype(ddl_r.dtype)
        du_r[t] = (g * d_skip + sb * dt).astype(du_r.dtype)
        if i == lo:
          env.sync()
          rows = (min(lo + group, t_s) - lo) * 2 * n
          dbc_r[pl.ds((t0 + lo) * 2 * n, rows)] = env.row_sums(red_s.at[pl.ds(base, rows)])
      return tuple(ds), tuple(da_acc), dd_acc, db_acc

    return lax.fori_loop(0, n_sub, sub_bwd, carry)

  nsv = cfg.saves_per_chunk
  ins = [(lambda c: u_g.at[bi, tsl(c), dsl], u_s), (lambda c: dl_g.at[bi, tsl(c), dsl], dl_s)]
  if cfg.has_z:
    ins.append((lambda c: z_g.at[bi, tsl(c), dsl], z_s))
  ins += [
    (lambda c: dy_g.at[bi, tsl(c), dsl], dy_s),
    (lambda c: b_g.at[bi, tsl(c)], b_s),
    (lambda c: c_g.at[bi, tsl(c)], c_s),
    (lambda c: hs_g.at[bi, pl.ds(c * nsv, nsv), :, dsl], hs_s),
  ]
  outs = [(lambda c: du_g.at[bi, tsl(c), dsl], du_s), (lambda c: ddl_g.at[bi, tsl(c), dsl], ddl_s)]
  if cfg.has_z:
    outs.append((lambda c: dz_g.at[bi, tsl(c), dsl], dz_s))
  outs.append((lambda c: dbc_g.at[bi, di, pl.ds(c * t_c * 2 * n, t_c * 2 * n)], dbc_s))

  init = (ds0, tuple(zero for _ in range(n)), zero, zero)
  ds, da_acc, dd_acc, db_acc = env.pipeline(cfg.num_chunks, True, ins, outs, bar, chunk_body, init)
  env.sync()
  for k in range(n):
    red_s[k] = da_acc[k]
    red_s[n + 2 + k] = ds[k]
  red_s[n] = dd_acc
  red_s[n + 1] = db_acc
  env.store_now(
    [
      (red_s.at[pl.ds(0, n + 2)], dp_g.at[bi, :, dsl]),
      (red_s.at[pl.ds(n + 2, n)], dh0_g.at[bi, :, dsl]),
    ]
  )


# ---------------------------------------------------------------------------------------------
# pallas / plgpu plumbing.


def _scratch(shape, dtype):
  return plgpu.SMEM(shape, dtype)


def _launch(kernel_fn, cfg: _Config, args, out_shapes, scratch, grid, name):
  """Runs kernel_fn(env, *in_refs, *out_refs, *scratch_refs) on grid (batch, channel blocks)."""
  mode = cfg.interpret
  if mode is True:
    env = _Env(generic=True)
    # Barriers are not needed by the generic path; keep the positions with 1-element buffers.
    scratch = [
      s if not isinstance(s, plgpu.Barrier) else _scratch((1,), jnp.int32) for s in scratch
    ]
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
      functools.partial(kernel_fn, env),
      out_shape=out_shapes,
      grid=grid,
      in_specs=[any_spec] * len(args),
      out_specs=[any_spec] * len(out_shapes),
      scratch_shapes=scratch,
      interpret=True,
    )(*args)
  env = _Env(generic=False)
  body = functools.partial(kernel_fn, env)
  body.__name__ = name  # names the kernel in compiler dumps and profiles
  interpret = None
  if mode == "mosaic":
    interpret = _gpu_interpret_params()
  params = plgpu.CompilerParams(
    approx_math=True,
    lowering_semantics=plgpu.LoweringSemantics.Lane,
    unsafe_no_auto_barriers=True,
  )
  return plgpu.kernel(
    body,
    out_type=tuple(out_shapes),
    scratch_types=scratch,
    grid=grid,
    grid_names=("b", "d"),
    compiler_params=params,
    interpret=interpret,
  )(*args)


def _gpu_interpret_params():
  params_cls = getattr(plgpu, "InterpretGPUParams", None)
  if params_cls is None:  # jax < 0.11 keeps it private.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params_cls
  return params_cls()


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg: _Config, u, delta, z, bm, cm, params, h0):
  b, lp, d = u.shape
  n = bm.shape[-1]
  t_c = cfg.chunk
  args = [u, delta] + ([z] if cfg.has_z else []) + [bm, cm, params, h0]
  out_shapes = [
    jax.ShapeDtypeStruct((b, lp, d), u.dtype),
    jax.ShapeDtypeStruct((b, lp // cfg.save, n, d), _saved_state_dtype(cfg, u.dtype)),
    jax.ShapeDtypeStruct((b, n, d), _F32),
  ]
  scratch = [_scratch((2, t_c, BLOCK_D), u.dtype), _scratch((2, t_c, BLOCK_D), delta.dtype)]
  if cfg.has_z:
    scratch.append(_scratch((2, t_c, BLOCK_D), z.dtype))
  scratch += [
    _scratch((2, t_c, n), bm.dtype),
    _scratch((2, t_c, n), cm.dtype),
    _scratch((2, t_c, BLOCK_D), u.dtype),
    _scratch((2, cfg.saves_per_chunk, n, BLOCK_D), _saved_state_dtype(cfg, u.dtype)),
    _scratch((n + 2, BLOCK_D), _F32),
    _scratch((n, BLOCK_D), _F32),
    plgpu.Barrier(num_arrivals=len(args) - 2, num_barriers=2),
    plgpu.Barrier(num_arrivals=2),
  ]
  kernel = lambda env, *refs: _fwd_kernel(cfg, n, env, *refs)
  return _launch(
    kernel,
    cfg,
    args,
    out_shapes,
    scratch,
    (b, d // BLOCK_D),
    f"selective_scan_fwd_c{t_c}_v{cfg.save}",
  )


@functools.partial(jax.jit, static_argnums=0)
def _backward(cfg: _Config, u, delta, z, dy, bm, cm, params, hs, dlast):
  b, lp, d = u.shape
  n = bm.shape[-1]
  t_c = cfg.chunk
  nd = d // BLOCK_D
  args = [u, delta] + ([z] if cfg.has_z else []) + [dy, bm, cm, params, hs, dlast]
  out_shapes = [
    jax.ShapeDtypeStruct((b, lp, d), u.dtype),
    jax.ShapeDtypeStruct((b, lp, d), delta.dtype),
  ]
  if cfg.has_z:
    out_shapes.append(jax.ShapeDtypeStruct((b, lp, d), z.dtype))
  out_shapes += [
    jax.ShapeDtypeStruct((b, nd, lp * 2 * n), _F32),
    jax.ShapeDtypeStruct((b, n + 2, d), _F32),
    jax.ShapeDtypeStruct((b, n, d), _F32),
  ]
  blk = lambda dtype: _scratch((2, t_c, BLOCK_D), dtype)
  scratch = [blk(u.dtype), blk(delta.dtype)]
  if cfg.has_z:
    scratch.append(blk(z.dtype))
  scratch += [
    blk(dy.dtype),
    _scratch((2, t_c, n), bm.dtype),
    _scratch((2, t_c, n), cm.dtype),
    _scratch((2, cfg.saves_per_chunk, n, BLOCK_D), hs.dtype),
    blk(u.dtype),
    blk(delta.dtype),
  ]
  if cfg.has_z:
    scratch.append(blk(z.dtype))
  scratch += [
    _scratch((2, t_c * 2 * n), _F32),
    # Sub-chunk start states (pass A); a one-row stand-in when pass A does not run.
    _scratch((((t_c // cfg.sub_chunk - 1) * n if cfg.save == t_c else 0) or 1, BLOCK_D), _F32),
    _scratch((max(cfg.reduce_buffers * 2 * n * cfg.reduce_steps, 2 * n + 2), BLOCK_D), _F32),
    plgpu.Barrier(num_arrivals=len(args) - 2, num_barriers=2),
    plgpu.Barrier(num_arrivals=2),
  ]
  kernel = lambda env, *refs: _bwd_kernel(cfg, n, env, *refs)
  return _launch(
    kernel,
    cfg,
    args,
    out_shapes,
    scratch,
    (b, nd),
    f"selective_scan_bwd_c{t_c}_s{cfg.sub_chunk}_v{cfg.save}_r{cfg.reduce_steps}",
  )


# ---------------------------------------------------------------------------------------------
# custom_vjp over padded, kernel-layout operands.


def _saved_state_dtype(cfg, dtype):
  return jnp.bfloat16 if cfg.bf16_saved_states and dtype == jnp.bfloat16 else _F32


def _pack_params(a, d_skip, bias):
  """a [g, d, n], d_skip and bias [g, d] -> [g, n + 2, d] f32: a * log2(e) transposed, D, bias."""
  return jnp.concatenate(
    [
      jnp.swapaxes(a.astype(_F32) * _LOG2E, 1, 2),
      d_skip.astype(_F32)[:, None],
      bias.astype(_F32)[:, None],
    ],
    axis=1,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg, u, delta, z, bm, cm, a, d_skip, bias, h0):
  y, _, last = _forward(cfg, u, delta, z, bm, cm, _pack_params(a, d_skip, bias), h0)
  return y, last


def _scan_fwd(cfg, u, delta, z, bm, cm, a, d_skip, bias, h0):
  params = _pack_params(a, d_skip, bias)
  y, hs, last = _forward(cfg, u, delta, z, bm, cm, params, h0)
  return (y, last), (u, delta, z, bm, cm, params, hs, a, d_skip, bias)


def _scan_bwd(cfg, res, cts):
  u, delta, z, bm, cm, params, hs, a, d_skip, bias = res
  dy, dlast = cts
  n = bm.shape[-1]
  dy = dy.astype(u.dtype)
  # A cotangent on the last state is the adjoint the reverse walk starts from.
  outs = _backward(cfg, u, delta, z, dy, bm, cm, params, hs, dlast.astype(_F32))
  if cfg.has_z:
    du, ddelta, dz, dbc, dp, dh0 = outs
  else:
    du, ddelta, dbc, dp, dh0 = outs
    dz = None
  dbc = jnp.sum(dbc, axis=1).reshape(u.shape[0], -1, 2 * n)  # [b, lp, 2n]
  dbm = dbc[..., :n].astype(bm.dtype)
  dcm = dbc[..., n:].astype(cm.dtype)
  groups = a.shape[0]
  dp = jnp.sum(dp.reshape(groups, -1, *dp.shape[1:]), axis=1)  # [g, n + 2, d]
  da = jnp.swapaxes(dp[:, :n], 1, 2).astype(a.dtype)
  dd = dp[:, n].astype(d_skip.dtype)
  dbias = dp[:, n + 1].astype(bias.dtype)
  return du, ddelta, dz, dbm, dcm, da, dd, dbias, dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


# ---------------------------------------------------------------------------------------------
# Public entry point.


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def selective_scan_pallas(
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
  options: KernelOptions = DEFAULT,
  *,
  interpret=None,
  chunk: int | None = None,
  sub_chunk: int | None = None,
):
  """Selective scan through the Pallas kernel; same arguments and results as the reference.

  Parameter groups: A [g, d, n] with D and delta_bias [g, d] (or None) run g independent scans of
  one shape in one kernel call; the batch is then g blocks of b / g rows, block i read with
  group i's parameters (what `selective_scan.selective_scan_many` stacks). A [d, n] is one group.

  options: a KernelOptions (PRESETS["fast"] by default). interpret, chunk, sub_chunk: shortcuts
  that replace those fields of `options`. Sequences of at most half a chunk run in one shorter
  chunk unless `chunk` is given here.
  """
  overrides = {
    k: v
    for k, v in (("interpret", interpret), ("chunk", chunk), ("sub_chunk", sub_chunk))
    if v is not None
  }
  options = dataclasses.replace(options, **overrides)
  interpret = options.interpret
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  b, length, d = u.shape
  n = A.shape[-1]
  groups = A.shape[0] if A.ndim == 3 else 1
  if b % groups:
    raise ValueError(f"The batch ({b}) must be a whole number of the {groups} parameter groups.")
  t_c, t_s = options.chunk, options.sub_chunk
  if t_c % t_s or t_s % 2:
    raise ValueError(f"chunk ({t_c}) must be a multiple of sub_chunk ({t_s}), which must be even.")
  if length <= t_c // 2 and chunk is None:
    t_c = max(t_s, _round_up(length, t_s))
  lp = _round_up(length, t_c)
  dp_ = _round_up(d, BLOCK_D)
  # The dB/dC reduction layout wants 2n % 32 == 0; the generic interpreter has no such limit.
  np_ = n if interpret is True else _round_up(n, 16)
  save = t_s if options.save_sub_chunk_states else t_c
  unroll = options.fwd_unroll if save % options.fwd_unroll == 0 else 2
  group = max(1, min(options.reduce_steps, t_s))
  two_buffers = options.reduce_buffers == 2 and (-(-t_s // group)) % 2 == 0
  cfg = _Config(
    length=length,
    padded_length=lp,
    chunk=t_c,
    sub_chunk=t_s,
    softplus=bool(delta_softplus),
    has_z=z is not None,
    reduce_steps=group,
    fwd_unroll=unroll,
    keep_decays=bool(options.keep_decays),
    reduce_buffers=2 if two_buffers else 1,
    save=save,
    interpret=interpret,
    bf16_saved_states=bool(options.bf16_saved_states),
    group_batch=b // groups,
  )

  def pad_bld(x):
    if x is None:
      return None
    return jnp.pad(x, ((0, 0), (0, lp - length), (0, dp_ - d)))

  def pad_bln(x):
    return jnp.pad(x, ((0, 0), (0, lp - length), (0, np_ - n)))

  if A.ndim == 2:  # one group
    A, D, delta_bias = (None if v is None else v[None] for v in (A, D, delta_bias))
  a = jnp.pad(A, ((0, 0), (0, dp_ - d), (0, np_ - n)), constant_values=-1.0)
  d_skip = jnp.zeros((groups, d), _F32) if D is None else D
  bias = jnp.zeros((groups, d), _F32) if delta_bias is None else delta_bias
  d_skip = jnp.pad(d_skip, ((0, 0), (0, dp_ - d)))
  bias = jnp.pad(bias, ((0, 0), (0, dp_ - d)))
  if initial_state is None:
    h0 = jnp.zeros((b, np_, dp_), _F32)
  else:
    h0 = jnp.pad(
      jnp.swapaxes(initial_state.astype(_F32), 1, 2), ((0, 0), (0, np_ - n), (0, dp_ - d))
    )
  y, last = _scan(
    cfg, pad_bld(u), pad_bld(delta), pad_bld(z), pad_bln(B), pad_bln(C), a, d_skip, bias, h0
  )
  y = y[:, :length, :d]
  if return_last_state:
    last = jnp.swapaxes(last[:, :n, :d], 1, 2)
    return y, last
  return y
