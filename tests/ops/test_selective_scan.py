"""Tests of dimsum_jax.ops.selective_scan (the associative-scan reference and the sequential scan).

Three oracles:
  * scan.npz from upstream's `selective_scan_ref` (forward, last state, all input gradients),
    in float64 and float32;
  * an independent float64 NumPy sequential loop written here, with its adjoint loop written by
    hand (itself checked against central finite differences), on fresh random inputs with every
    optional input switched on and off, odd lengths and an initial state;
  * the float32 result, for bfloat16 inputs.
Golden arrays use upstream's layout (u [b, d, l], B/C [b, n, l]); ours is channels-last.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax.ops.selective_scan import (
  resolve_impl,
  selective_scan,
  selective_scan_reference,
  selective_scan_sequential,
)

# The two jnp implementations; every oracle test runs on both.
SCANS = {"reference": selective_scan_reference, "sequential": selective_scan_sequential}
each_scan = pytest.mark.parametrize("impl", sorted(SCANS))
from tests import seeds

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"
ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")  # positional order of the scan
SEQ = ("u", "delta", "z", "B", "C")  # [b, l, .] in our layout


def _close(actual, expected, rel, what=""):
  """Max abs error within rel * max |expected| (the golden README's convention)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = max(float(np.abs(expected).max()), 1e-30)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * scale, err_msg=what)


# ---------------------------------------------------------------- upstream golden data


def _to_ours(name, value):
  """Upstream [b, d|n, l] -> ours [b, l, d|n]; A, D, delta_bias unchanged."""
  return np.swapaxes(value, 1, 2) if value.ndim == 3 and name != "last_state" else value


@pytest.fixture(scope="module")
def golden():
  """scan.npz in our layout; a missing file is a failure, not a skip."""
  path = GOLDEN_DIR / "scan.npz"
  if not path.is_file():
    pytest.fail(f"Golden file {path} is missing: it must sit at <repo root>/../shared/golden/.")
  with np.load(path) as data:
    out = {}
    for key in data.files:
      name = key
      for prefix in ("in_", "grad_"):
        if key.startswith(prefix):
          name = key[len(prefix) :]
      for suffix in ("_f64", "_f32"):
        if name.endswith(suffix):
          name = name[: -len(suffix)]
      out[key] = _to_ours(name, data[key])
    return out


def _golden_run(golden, dtype, scan_fn):
  """(out, last_state, grads by name) of scan_fn on the golden inputs, vjp of out with dout."""
  inputs = [jnp.asarray(golden[f"in_{n}"], dtype) for n in ARGS]

  @jax.jit
  def run(args, dout):
    fn = lambda *values: scan_fn(*values, delta_softplus=True, return_last_state=True)
    (out, last), pullback = jax.vjp(fn, *args)
    return out, last, pullback((dout, jnp.zeros_like(last)))

  out, last, grads = run(inputs, jnp.asarray(golden["dout"], dtype))
  return out, last, dict(zip(ARGS, grads))


@each_scan
def test_golden_float64(golden, impl):
  with jax.enable_x64(True):
    out, last, grads = _golden_run(golden, jnp.float64, SCANS[impl])
    assert out.dtype == last.dtype == jnp.float64
    _close(out, golden["out_f64"], 1e-10)
    _close(last, golden["last_state_f64"], 1e-10)
    for name in ARGS:
      assert grads[name].dtype == jnp.float64, name
      _close(grads[name], golden[f"grad_{name}_f64"], 1e-10)


@each_scan
def test_golden_float32(golden, impl):
  """Through the dispatcher, as the model calls it (the float64 test calls the functions)."""
  scan = lambda *args, **kwargs: selective_scan(*args, impl=impl, **kwargs)
  out, last, grads = _golden_run(golden, jnp.float32, scan)
  assert out.dtype == last.dtype == jnp.float32
  _close(out, golden["out_f64"], 5e-6)
  _close(last, golden["last_state_f64"], 5e-6)
  for name in ARGS:
    assert grads[name].dtype == jnp.float32, name
    _close(grads[name], golden[f"grad_{name}_f64"], 5e-6)


# ---------------------------------------------------------------- NumPy loop oracle


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
  return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def np_scan(
  u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None
):
  """Float64 sequential scan, channels-last; returns (out, last_state, saved for the adjoint)."""
  b, length, d = u.shape
  x = delta + (0.0 if delta_bias is None else delta_bias)
  dt = _softplus(x) if delta_softplus else x
  s = np.zeros((b, d, A.shape[1])) if initial_state is None else initial_state.copy()
  states, ys = [s], []
  for l in range(length):
    decay = np.exp(dt[:, l, :, None] * A)  # [b, d, n]
    s = decay * s + (dt[:, l] * u[:, l])[:, :, None] * B[:, l, None, :]
    states.append(s)
    ys.append(np.einsum("bdn,bn->bd", s, C[:, l]))
  y = np.stack(ys, axis=1)
  if D is not None:
    y = y + u * D
  out = y if z is None else y * z * _sigmoid(z)
  return out, s, dict(x=x, dt=dt, states=states, y=y)


def np_scan_vjp(
  cot_out,
  cot_last,
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
):
  """Hand-written adjoint of np_scan: gradients of <cot_out, out> + <cot_last, last_state>."""
  _, _, saved = np_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
  x, dt, states, y = saved["x"], saved["dt"], saved["states"], saved["y"]
  length = u.shape[1]
  grads = {}
  if z is None:
    gy = cot_out
  else:
    sig = _sigmoid(z)
    gy = cot_out * z * sig
    grads["z"] = cot_out * y * sig * (1.0 + z * (1.0 - sig))
  gu = np.zeros_like(u)
  if D is not None:
    grads["D"] = np.sum(gy * u, axis=(0, 1))
    gu += gy * D
  gdt, gA = np.zeros_like(dt), np.zeros_like(A)
  gB, gC = np.zeros_like(B), np.zeros_like(C)
  gs = np.zeros_like(states[0]) if cot_last is None else cot_last.copy()  # d loss / d s_l
  for l in reversed(range(length)):
    s, s_prev = states[l + 1], states[l]
    gC[:, l] = np.einsum("bd,bdn->bn", gy[:, l], s)
    gs = gs + gy[:, l, :, None] * C[:, l, None, :]
    decay = np.exp(dt[:, l, :, None] * A)
    g_decay = gs * s_prev * decay  # d loss / d (dt A), elementwise
    gA += np.einsum("bdn,bd->dn", g_decay, dt[:, l])
    g_drive = np.einsum("bdn,bn->bd", gs, B[:, l])  # d loss / d (dt u)
    gdt[:, l] = np.einsum("bdn,dn->bd", g_decay, A) + g_drive * u[:, l]
    gu[:, l] += g_drive * dt[:, l]
    gB[:, l] = np.einsum("bdn,bd->bn", gs, dt[:, l] * u[:, l])
    gs = gs * decay
  gx = gdt * _sigmoid(x) if delta_softplus else gdt
  grads.update(u=gu, delta=gx, A=gA, B=gB, C=gC)
  if delta_bias is not None:
    grads["delta_bias"] = np.sum(gx, axis=(0, 1))
  if initial_state is not None:
    grads["initial_state"] = gs
  return grads


def _inputs(seed, batch, length, d, n, D=True, z=True, delta_bias=True, initial_state=True):
  """Random float64 inputs in our layout; None for switched-off optional inputs."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape)
  return dict(
    u=normal(batch, length, d),
    delta=0.5 * normal(batch, length, d),
    A=-np.exp(0.5 * normal(d, n)),
    B=normal(batch, length, n),
    C=normal(batch, length, n),
    D=normal(d) if D else None,
    z=normal(batch, length, d) if z else None,
    delta_bias=0.3 * normal(d) if delta_bias else None,
    initial_state=normal(batch, d, n) if initial_state else None,
  )


def test_numpy_adjoint_matches_finite_differences():
  """The hand adjoint (the oracle for all gradient tests below) against central differences."""
  inputs = _inputs(0, batch=2, length=5, d=3, n=2)
  rng = np.random.default_rng(1)
  out, last, _ = np_scan(**inputs, delta_softplus=True)
  cot_out, cot_last = rng.standard_normal(out.shape), rng.standard_normal(last.shape)

  def loss(values):
    o, s, _ = np_scan(**values, delta_softplus=True)
    return np.sum(o * cot_out) + np.sum(s * cot_last)

  grads = np_scan_vjp(cot_out, cot_last, **inputs, delta_softplus=True)
  assert set(grads) == set(inputs)
  eps = 1e-6
  for name, value in inputs.items():
    direction = rng.standard_normal(value.shape)
    plus = dict(inputs, **{name: value + eps * direction})
    minus = dict(inputs, **{name: value - eps * direction})
    numeric = (loss(plus) - loss(minus)) / (2 * eps)
    np.testing.assert_allclose(np.sum(grads[name] * direction), numeric, rtol=1e-7, err_msg=name)


def test_numpy_loop_matches_golden(golden):
  """The NumPy loop also reproduces upstream, so the two oracles agree."""
  inputs = {n: golden[f"in_{n}"] for n in ARGS}
  out, last, _ = np_scan(**inputs, delta_softplus=True)
  _close(out, golden["out_f64"], 1e-12)
  _close(last, golden["last_state_f64"], 1e-12)
  grads = np_scan_vjp(golden["dout"], None, **inputs, delta_softplus=True)
  for name in ARGS:
    _close(grads[name], golden[f"grad_{name}_f64"], 1e-12)


OPTIONAL = ("D", "z", "delta_bias", "initial_state", "delta_softplus")
# Each option is its own line of code, so instead of all 32 on/off combinations: all on, all off,
# each one alone off and each one alone on (length 7), plus all on / all off at lengths 1 and 37.
# (About 1 s of XLA compile per case on CPU, hence not the full product.)
_ALL, _NONE = (True,) * len(OPTIONAL), (False,) * len(OPTIONAL)
_ONE_OFF = [tuple(j != i for j in range(len(OPTIONAL))) for i in range(len(OPTIONAL))]
_ONE_ON = [tuple(j == i for j in range(len(OPTIONAL))) for i in range(len(OPTIONAL))]
CASES = [(7, flags) for flags in [_ALL, _NONE] + _ONE_OFF + _ONE_ON]
CASES += [(1, _ALL), (1, _NONE), (37, _ALL)]
# Oracle cases only check numerics, so they compile without LLVM optimisation (2x faster).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _case_id(case):
  length, flags = case
  on = [name for name, flag in zip(OPTIONAL, flags) if flag]
  return f"L{length}-" + ("+".join(on) or "plain")


@each_scan
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_numpy_loop_float64(case, impl):
  length, flags = case
  options = dict(zip(OPTIONAL, flags))
  softplus = options.pop("delta_softplus")
  inputs = _inputs(length * 97 + sum(flags), batch=2, length=length, d=5, n=3, **options)
  present = [
    name
    for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    if inputs[name] is not None
  ]
  rng = np.random.default_rng(length)
  out_ref, last_ref, _ = np_scan(**inputs, delta_softplus=softplus)
  cot_out = rng.standard_normal(out_ref.shape)
  cot_last = rng.standard_normal(last_ref.shape)
  grads_ref = np_scan_vjp(cot_out, cot_last, **inputs, delta_softplus=softplus)
  grads_ref_out_only = np_scan_vjp(cot_out, None, **inputs, delta_softplus=softplus)

  scan = SCANS[impl]

  def run(args, cot_out, cot_last):
    def fn(*values):
      return scan(**dict(zip(present, values)), delta_softplus=softplus, return_last_state=True)

    (out, last), pullback = jax.vjp(fn, *args)
    plain = scan(**dict(zip(present, args)), delta_softplus=softplus)
    return (
      out,
      last,
      plain,
      pullback((cot_out, cot_last)),
      pullback((cot_out, jnp.zeros_like(cot_last))),
    )

  with jax.enable_x64(True):
    args = [jnp.asarray(inputs[name]) for name in present]
    out, last, plain, grads, grads_out_only = jax.jit(run, compiler_options=FAST_COMPILE)(
      args, jnp.asarray(cot_out), jnp.asarray(cot_last)
    )
    assert out.dtype == last.dtype == jnp.float64
    _close(out, out_ref, 1e-10)
    _close(last, last_ref, 1e-10)
    _close(plain, out_ref, 1e-10)  # without return_last_state
    for got, expected in ((grads, grads_ref), (grads_out_only, grads_ref_out_only)):
      assert len(got) == len(present)
      for name, grad in zip(present, got):
        _close(grad, expected[name], 1e-10)


@each_scan
def test_initial_state_carries_over_a_split_sequence(impl):
  """Scanning [0, k) then [k, L) from the first half's last state equals one scan of [0, L)."""
  inputs = _inputs(5, batch=2, length=23, d=4, n=3, initial_state=False)
  inputs.pop("initial_state")
  k = 9
  part = lambda v, sl: v[:, sl] if v.ndim == 3 else v
  scan = lambda kw, **extra: SCANS[impl](**kw, delta_softplus=True, return_last_state=True, **extra)

  def run(args):
    full = scan(args)
    first, state = scan({n: part(v, slice(0, k)) for n, v in args.items()})
    second, last = scan({n: part(v, slice(k, None)) for n, v in args.items()}, initial_state=state)
    return full, (jnp.concatenate([first, second], axis=1), last)

  with jax.enable_x64(True):
    (full, full_last), (joined, last) = jax.jit(run, compiler_options=FAST_COMPILE)(
      {n: jnp.asarray(v) for n, v in inputs.items()}
    )
    _close(joined, full, 1e-13)
    _close(last, full_last, 1e-13)


@seeds.each()
@each_scan
@pytest.mark.parametrize("length", [1, 7, 37])
def test_matches_numpy_loop_float32(length, impl, seed):
  """Inputs of seed `length` (seed 0, the default run) or length + 1000 seed."""
  inputs = _inputs(length + 1000 * seed, batch=2, length=length, d=6, n=4)
  out_ref, last_ref, _ = np_scan(**inputs, delta_softplus=True)
  out, last = jax.jit(lambda kw: SCANS[impl](**kw, delta_softplus=True, return_last_state=True))(
    {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
  )
  assert out.dtype == last.dtype == jnp.float32
  _close(out, out_ref, 5e-6, f"seed {seed}")
  _close(last, last_ref, 5e-6, f"seed {seed}")


# ---------------------------------------------------------------- bfloat16, dispatch


@seeds.each()
def test_bfloat16_inputs_close_to_float32(seed):
  """Inputs of seed 11 (seed 0, the default run) or 11 + 1000 seed."""
  inputs = _inputs(11 + 1000 * seed, batch=2, length=19, d=8, n=4)
  bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in inputs.items()}
  f32_of_bf16 = {k: v.astype(jnp.float32) for k, v in bf16.items()}
  f32 = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
  run = jax.jit(
    lambda kw: selective_scan_reference(**kw, delta_softplus=True, return_last_state=True),
    compiler_options=FAST_COMPILE,
  )
  out, last = run(bf16)
  assert out.dtype == jnp.bfloat16
  assert last.dtype == jnp.float32  # the state is carried in float32
  out_same, last_same = run(f32_of_bf16)
  # Same (bf16-representable) inputs: the only bf16 step is the final rounding of the output.
  np.testing.assert_allclose(
    np.asarray(out, np.float32),
    np.asarray(out_same),
    rtol=2.0**-8,
    atol=1e-6 * float(jnp.abs(out_same).max()),
    err_msg=f"seed {seed}",
  )
  _close(last, last_same, 1e-6, f"seed {seed}")
  # Against float32 on the unrounded inputs: within bfloat16 input + output rounding.
  out_f32, _ = run(f32)
  _close(out, out_f32, 3e-2, f"seed {seed}")

  loss = lambda kw: jnp.sum(
    selective_scan_reference(**kw, delta_softplus=True).astype(jnp.float32) ** 2
  )
  grad = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)
  g_bf16, g_f32 = grad(bf16), grad(f32)
  for name in inputs:
    assert g_bf16[name].dtype == jnp.bfloat16, name
    _close(g_bf16[name], g_f32[name], 6e-2, f"{name} (seed {seed})")


def test_dispatch():
  assert resolve_impl("reference") == "reference"
  assert resolve_impl("sequential") == "sequential"
  if jax.default_backend() == "cpu":
    assert resolve_impl("auto") == "sequential"
  with pytest.raises(ValueError, match="Unknown selective-scan implementation"):
    resolve_impl("cuda")
  inputs = {k: jnp.asarray(v, jnp.float32) for k, v in _inputs(3, 1, 7, 4, 2).items()}
  impls = (
    ("reference", "sequential", "auto")
    if jax.default_backend() != "gpu"
    else ("reference", "sequential")
  )

  def run(kw):
    return [
      (
        SCANS.get(impl, SCANS[resolve_impl(impl)])(**kw, delta_softplus=True),
        selective_scan(**kw, delta_softplus=True, impl=impl),
      )
      for impl in impls
    ]

  for direct, dispatched in jax.jit(run, compiler_options=FAST_COMPILE)(inputs):
    np.testing.assert_array_equal(np.asarray(dispatched), np.asarray(direct))
