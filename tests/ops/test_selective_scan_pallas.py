"""Tests of the Pallas selective-scan kernel against `selective_scan_reference`.

On the CPU the kernel body runs in Pallas' generic interpreter (interpret=True): values, the last
state and the gradients for all nine inputs, with odd lengths (the padded, masked tail), channel
counts that are not a multiple of 128, each optional input on and off, float32 and bfloat16.
Shapes are small and the backward sub-chunk short, so the interpreted programs compile quickly.
Tests marked `gpu` run the compiled Mosaic GPU kernel (pytest -m gpu -n 0 on a Hopper GPU); the
`slow` one runs the Mosaic GPU program itself in JAX's GPU interpreter on the CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax.ops import selective_scan_pallas as ssp
from dimsum_jax.ops.selective_scan import selective_scan, selective_scan_reference

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _inputs(seed, b, length, d, n, dtype, *, z=True, d_skip=True, bias=True, h0=True):
  ks = jax.random.split(jax.random.key(seed), 9)
  return dict(
    u=jax.random.normal(ks[0], (b, length, d), dtype),
    delta=(0.5 * jax.random.normal(ks[1], (b, length, d))).astype(dtype),
    A=-jnp.exp(0.5 * jax.random.normal(ks[2], (d, n))),
    B=jax.random.normal(ks[3], (b, length, n), dtype),
    C=jax.random.normal(ks[4], (b, length, n), dtype),
    D=jax.random.normal(ks[5], (d,)) if d_skip else None,
    z=jax.random.normal(ks[6], (b, length, d), dtype) if z else None,
    delta_bias=0.3 * jax.random.normal(ks[7], (d,)) if bias else None,
    initial_state=jax.random.normal(ks[8], (b, d, n)) if h0 else None,
  )


def _value_and_grads(fn, inputs, softplus):
  """y, last state and the gradients of a fixed random projection of both, for every input."""
  names = [k for k in NAMES if inputs[k] is not None]

  def loss(diff):
    kw = dict(inputs, **diff)
    y, last = fn(
      kw["u"],
      kw["delta"],
      kw["A"],
      kw["B"],
      kw["C"],
      kw["D"],
      kw["z"],
      kw["delta_bias"],
      softplus,
      kw["initial_state"],
      True,
    )
    wy = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
    wl = jnp.sin(jnp.arange(last.size, dtype=jnp.float32).reshape(last.shape))
    return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(last * wl), (y, last)

  (_, (y, last)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
    {k: inputs[k] for k in names}
  )
  return y, last, grads


def _rel(actual, expected):
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  assert np.all(np.isfinite(actual))
  return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


def _compare(inputs, softplus, tol, **kernel_kw):
  kernel = functools.partial(ssp.selective_scan_pallas, **kernel_kw)
  y, last, grads = _value_and_grads(kernel, inputs, softplus)
  y_ref, last_ref, grads_ref = _value_and_grads(selective_scan_reference, inputs, softplus)
  assert y.dtype == inputs["u"].dtype
  errors = {"y": _rel(y, y_ref), "last_state": _rel(last, last_ref)}
  for name in grads_ref:
    assert grads[name].dtype == grads_ref[name].dtype, name
    errors["d" + name] = _rel(grads[name], grads_ref[name])
  bad = {k: v for k, v in errors.items() if not v <= tol}
  assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


CPU = dict(interpret=True, chunk=8, sub_chunk=2)


@pytest.mark.parametrize(
  "keep_decays,reduce_buffers,sub_chunk_states", [(True, 2, True), (False, 1, False)]
)
def test_all_inputs_odd_length_float32(keep_decays, reduce_buffers, sub_chunk_states):
  # 37 = 4 chunks of 8 + 5: the masked tail must not move the last state or the gradients; two
  # register blocks of 4 steps per chunk, their start states saved by the forward or re-run by the
  # backward; two dB/dC reduction groups per block, in one buffer or two.
  options = ssp.KernelOptions(
    keep_decays=keep_decays, reduce_buffers=reduce_buffers, save_sub_chunk_states=sub_chunk_states
  )
  inputs = _inputs(0, b=2, length=37, d=128, n=4, dtype=jnp.float32)
  _compare(inputs, softplus=True, tol=1e-5, options=options, interpret=True, chunk=8, sub_chunk=4)


def test_low_memory_preset():
  """The memory-saving preset (a state saved every 16 steps) computes the same scan."""
  inputs = _inputs(9, b=2, length=40, d=128, n=4, dtype=jnp.float32)
  _compare(inputs, softplus=True, tol=1e-5, options=ssp.PRESETS["low_memory"], interpret=True)
  assert ssp.PRESETS["low_memory"].chunk == 16 and not ssp.PRESETS["low_memory"].keep_decays


def test_options_are_a_hashable_value():
  """Frozen: equal options hash alike (one jit cache entry), others differ (their own entry)."""
  a, b = ssp.KernelOptions(), ssp.KernelOptions()
  assert a == b and hash(a) == hash(b) and a is not ssp.PRESETS["low_memory"]
  assert ssp.PRESETS["low_memory"] != ssp.DEFAULT
  with pytest.raises(Exception):
    a.chunk = 8  # noqa - frozen dataclass


def test_no_optional_inputs_no_softplus_float32():
  # d = 96 pads to one block of 128 channels; no z, D, bias or initial state.
  inputs = _inputs(
    1, b=1, length=16, d=96, n=4, dtype=jnp.float32, z=False, d_skip=False, bias=False, h0=False
  )
  _compare(inputs, softplus=False, tol=1e-5, **CPU)


def test_bfloat16_with_z_and_bias():
  # bf16 inputs and outputs; the state and all arithmetic stay in float32 (the saved chunk-start
  # states are bf16), so the error is the bf16 rounding of outputs and gradients (~4e-3 relative).
  inputs = _inputs(2, b=2, length=21, d=128, n=4, dtype=jnp.bfloat16, d_skip=False, h0=False)
  _compare(inputs, softplus=True, tol=2e-2, **CPU)


def test_dispatch_and_interpret_option():
  inputs = _inputs(4, b=1, length=9, d=64, n=2, dtype=jnp.float32)
  args = [inputs[k] for k in NAMES[:8]]
  ref = selective_scan_reference(*args, True, inputs["initial_state"])
  # On the CPU, impl="pallas" interprets the kernel without being told.
  out = jax.jit(functools.partial(selective_scan, delta_softplus=True, impl="pallas"))(
    *args, initial_state=inputs["initial_state"]
  )
  assert _rel(out, ref) < 1e-5
  low = jax.jit(functools.partial(selective_scan, delta_softplus=True, impl="pallas_low_memory"))(
    *args, initial_state=inputs["initial_state"]
  )
  assert _rel(low, ref) < 1e-5
  options = ssp.KernelOptions(chunk=4, sub_chunk=2, interpret=True)
  out = jax.jit(functools.partial(ssp.selective_scan_pallas, delta_softplus=True, options=options))(
    *args, initial_state=inputs["initial_state"]
  )
  assert _rel(out, ref) < 1e-5


def _per_group_reference(groups):
  """selective_scan_reference run on each of `groups` blocks of the batch with that block's
  parameters (A [g, d, n], D and delta_bias [g, d]): what one grouped kernel call computes."""

  def fn(u, delta, A, B, C, D, z, delta_bias, softplus, h0, last_state):
    rows = u.shape[0] // groups
    outs = []
    for g in range(groups):
      sl = lambda v: None if v is None else v[g * rows : (g + 1) * rows]
      at = lambda v: v[g] if A.ndim == 3 and v is not None else v  # A [d, n]: one group
      outs.append(
        selective_scan_reference(
          sl(u),
          sl(delta),
          at(A),
          sl(B),
          sl(C),
          at(D),
          sl(z),
          at(delta_bias),
          softplus,
          sl(h0),
          last_state,
        )
      )
    return tuple(jnp.concatenate(parts) for parts in zip(*outs))

  return fn


@pytest.mark.parametrize("groups,optional", [(2, True), (3, False)])
def test_parameter_groups_match_one_scan_per_group(groups, optional):
  # A [g, d, n], D and delta_bias [g, d]: batch block i (2 rows) is scanned with group i's
  # parameters. Values, last state and every gradient (the parameters' summed per group only).
  seed = 10 + groups
  inputs = _inputs(
    seed, b=2 * groups, length=13, d=96, n=4, dtype=jnp.float32, z=optional, h0=optional
  )
  ks = jax.random.split(jax.random.key(seed + 100), 3)
  inputs["A"] = -jnp.exp(0.5 * jax.random.normal(ks[0], (groups, 96, 4)))
  inputs["D"] = jax.random.normal(ks[1], (groups, 96))
  inputs["delta_bias"] = 0.3 * jax.random.normal(ks[2], (groups, 96))
  kernel = functools.partial(ssp.selective_scan_pallas, **CPU)
  y, last, grads = _value_and_grads(kernel, inputs, True)
  y_ref, last_ref, grads_ref = _value_and_grads(_per_group_reference(groups), inputs, True)
  errors = {"y": _rel(y, y_ref), "last": _rel(last, last_ref)}
  errors.update({"d" + k: _rel(grads[k], grads_ref[k]) for k in grads_ref})
  assert all(v <= 1e-5 for v in errors.values()), f"seed {seed}: {errors}"


def test_parameter_groups_must_divide_the_batch():
  inputs = _inputs(5, b=3, length=8, d=8, n=2, dtype=jnp.float32)
  args = [inputs[k] for k in NAMES[:5]]
  args[2] = jnp.stack([args[2]] * 2)
  with pytest.raises(ValueError, match="whole number of the 2 parameter groups"):
    ssp.selective_scan_pallas(*args, interpret=True)


def test_call_sites_of_one_shape_share_one_lowered_kernel():
  """Two scans of one shape lower to one Mosaic GPU kernel called twice (the launches are jitted
  per static configuration), not two copies: the compile of a 24-block model lowers and hands to
  XLA each kernel once. Lowered for CUDA on the CPU: the compiled kernel, not the interpreter."""
  options = ssp.KernelOptions(interpret=False)
  scan = lambda u, delta, a, b, c: ssp.selective_scan_pallas(u, delta, a, b, c, options=options)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  args = (f32(1, 16, 128), f32(1, 16, 128), f32(128, 16), f32(1, 16, 16), f32(1, 16, 16))
  two = lambda u, delta, a, b, c: scan(u, delta, a, b, c) + scan(2 * u, delta, a, b, c)
  text = jax.jit(two).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @mosaic_gpu") == 1
  assert text.count("call @_forward(") == 2


def test_rejects_bad_chunking():
  inputs = _inputs(5, b=1, length=8, d=8, n=2, dtype=jnp.float32)
  args = [inputs[k] for k in NAMES[:5]]
  with pytest.raises(ValueError, match="multiple of sub_chunk"):
    ssp.selective_scan_pallas(*args, interpret=True, chunk=6, sub_chunk=4)
  with pytest.raises(ValueError, match="even"):
    ssp.selective_scan_pallas(*args, interpret=True, chunk=6, sub_chunk=3)


@pytest.mark.slow
@pytest.mark.parametrize("groups", [1, 2])
def test_mosaic_program_forward_in_gpu_interpreter(groups):
  """The Mosaic GPU program itself (TMA copies, barriers, layouts) run by JAX's GPU interpreter;
  with two parameter groups, each program reads its group's parameters."""
  inputs = _inputs(6, b=groups, length=20, d=128, n=16, dtype=jnp.float32)
  if groups > 1:
    ks = jax.random.split(jax.random.key(60), 3)
    inputs["A"] = -jnp.exp(0.5 * jax.random.normal(ks[0], (groups, 128, 16)))
    inputs["D"] = jax.random.normal(ks[1], (groups, 128))
    inputs["delta_bias"] = 0.3 * jax.random.normal(ks[2], (groups, 128))
  args = [inputs[k] for k in NAMES[:8]]
  y, last = ssp.selective_scan_pallas(
    *args, True, inputs["initial_state"], True, interpret="mosaic", chunk=8, sub_chunk=2
  )
  y_ref, last_ref = _per_group_reference(groups)(*args, True, inputs["initial_state"], True)
  assert _rel(y, y_ref) < 1e-5
  assert _rel(last, last_ref) < 1e-5


def _require_gpu():
  assert jax.default_backend() == "gpu", (
    "Tests marked gpu compile the Mosaic GPU kernel: run them with `pytest -m gpu -n 0` on a host "
    "with a Hopper GPU."
  )


@pytest.mark.gpu
@pytest.mark.parametrize(
  "dtype,length,z,tol",
  [
    (jnp.float32, 37, True, 1e-4),
    (jnp.bfloat16, 256, True, 2e-2),
    (jnp.bfloat16, 100, False, 2e-2),
  ],
)
def test_compiled_kernel_on_gpu(dtype, length, z, tol):
  _require_gpu()
  inputs = _inputs(7, b=3, length=length, d=384, n=16, dtype=dtype, z=z)
  # ex2.approx and the transposed dB/dC sums: float32 agrees to ~1e-6 relative.
  _compare(inputs, softplus=True, tol=tol, interpret=False)


@pytest.mark.gpu
def test_compiled_kernel_parameter_groups_on_gpu():
  _require_gpu()
  groups = 2
  inputs = _inputs(11, b=2 * groups, length=64, d=256, n=16, dtype=jnp.bfloat16)
  ks = jax.random.split(jax.random.key(111), 3)
  inputs["A"] = -jnp.exp(0.5 * jax.random.normal(ks[0], (groups, 256, 16)))
  inputs["D"] = jax.random.normal(ks[1], (groups, 256))
  inputs["delta_bias"] = 0.3 * jax.random.normal(ks[2], (groups, 256))
  y, last, grads = _value_and_grads(
    functools.partial(ssp.selective_scan_pallas, interpret=False), inputs, True
  )
  y_ref, last_ref, grads_ref = _value_and_grads(_per_group_reference(groups), inputs, True)
  errors = {"y": _rel(y, y_ref), "last": _rel(last, last_ref)}
  errors.update({"d" + k: _rel(grads[k], grads_ref[k]) for k in grads_ref})
  assert all(v <= 2e-2 for v in errors.values()), errors


@pytest.mark.gpu
@pytest.mark.parametrize(
  "chunk,sub_chunk,reduce_steps,keep_decays,buffers,bf16_states,sub_chunk_states",
  [
    (8, 8, 4, True, 2, True, True),
    (16, 4, 2, True, 2, True, False),
    (32, 8, 1, False, 2, True, False),
    (16, 8, 1, False, 1, False, False),
    (16, 4, 1, True, 1, True, True),
  ],
)
def test_compiled_kernel_other_chunkings_on_gpu(
  chunk, sub_chunk, reduce_steps, keep_decays, buffers, bf16_states, sub_chunk_states
):
  _require_gpu()
  options = ssp.KernelOptions(
    chunk=chunk,
    sub_chunk=sub_chunk,
    reduce_steps=reduce_steps,
    keep_decays=keep_decays,
    reduce_buffers=buffers,
    bf16_saved_states=bf16_states,
    save_sub_chunk_states=sub_chunk_states,
    interpret=False,
  )
  inputs = _inputs(8, b=2, length=70, d=256, n=16, dtype=jnp.bfloat16, z=False)
  _compare(inputs, softplus=True, tol=2e-2, options=options, chunk=chunk)
