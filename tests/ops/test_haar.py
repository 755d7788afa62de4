"""Tests of dimsum_jax.ops.haar: upstream golden data, PyWavelets oracle, inverse, jit, grad.

Both implementations (jaxwt convolutions and the direct butterflies) go through every check; the
direct one is also compared with jaxwt on random inputs of stated seeds (tests/seeds.py; values
and gradients), shown to lower without any convolution, and run inside the tiny golden model
against the default.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt

from dimsum_jax.ops.haar import IMPLS, inverse_wavelet_tokens, wavelet_tokens
from tests import seeds
from tests.golden import golden_file

GRIDS = (8, 16)

# Jitted once per (shape, grid, levels, impl): much faster on CPU than op-by-op dispatch.
fwd = jax.jit(wavelet_tokens, static_argnums=(1, 2, 3))
inv = jax.jit(inverse_wavelet_tokens, static_argnums=(1, 2, 3))


@pytest.fixture(scope="module")
def golden():
  """wavelet.npz from upstream DiMSUM; a missing file is a failure, not a skip."""
  with np.load(golden_file("wavelet.npz")) as data:
    return {key: data[key] for key in data.files}


def _close(actual, expected, rel, what=""):
  """Max abs error within rel * max |expected| (the README's tolerance convention)."""
  actual = np.asarray(actual, np.float64)
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * scale, err_msg=what)


def _random(shape, seed, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------- golden parity


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("g", GRIDS)
def test_forward_matches_upstream_float32(golden, g, impl):
  out = fwd(jnp.asarray(golden[f"g{g}_x"]), (g, g), 2, impl)
  assert out.dtype == jnp.float32
  _close(out, golden[f"g{g}_dwt_tokens_f64"], 5e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("g", GRIDS)
def test_inverse_matches_upstream_float32(golden, g, impl):
  out = inv(jnp.asarray(golden[f"g{g}_z"]), (g, g), 2, impl)
  _close(out, golden[f"g{g}_idwt_of_z_f64"], 5e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("g", GRIDS)
def test_matches_upstream_float64(golden, g, impl):
  with jax.enable_x64(True):
    x = jnp.asarray(golden[f"g{g}_x"], jnp.float64)
    z = jnp.asarray(golden[f"g{g}_z"], jnp.float64)
    forward = fwd(x, (g, g), 2, impl)
    inverse = inv(z, (g, g), 2, impl)
    assert forward.dtype == inverse.dtype == jnp.float64
    _close(forward, golden[f"g{g}_dwt_tokens_f64"], 1e-12)
    _close(inverse, golden[f"g{g}_idwt_of_z_f64"], 1e-12)


# ---------------------------------------------------------------- PyWavelets oracle


def _oracle_tokens(x, grid, levels):
  """Float64 NumPy: pywt.dwt2 per level, then the token layout written out from its description.

  Token (row P*Y + p1, column P*X + p2), channel c holds band j = c // m (j = 4 s1 + s2, each in
  the order LL, LH, HL, HH) of original channel P*P*(c % m) + P*p1 + p2 at (Y, X), m = d / P**2.
  """
  b, _, d = x.shape
  h, w = grid
  patch = 2**levels
  images = np.asarray(x, np.float64).transpose(0, 2, 1).reshape(b, d, h, w)
  bands = [images]
  for _ in range(levels):
    split = []
    for band in bands:
      ll, (lh, hl, hh) = pywt.dwt2(band, "haar")
      split += [ll, lh, hl, hh]
    bands = split
  bands = [band / patch for band in bands]  # band j: [b, d, h/P, w/P]
  m = d // patch**2
  out = np.zeros((b, h, w, d))
  for c in range(d):
    for p1 in range(patch):
      for p2 in range(patch):
        source = bands[c // m][:, patch * patch * (c % m) + patch * p1 + p2]  # [b, h/P, w/P]
        out[:, p1::patch, p2::patch, c] = source
  return out.reshape(b, h * w, d)


ORACLE_CASES = [  # (batch, grid, d, levels)
  (2, (8, 12), 16, 2),
  (1, (12, 4), 48, 2),
  (3, (6, 10), 4, 1),
  (2, (4, 2), 12, 1),
]


@seeds.each()
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,grid,d,levels", ORACLE_CASES)
def test_matches_pywavelets_oracle(batch, grid, d, levels, impl, seed):
  x = _random((batch, grid[0] * grid[1], d), seed=seed)
  expected = _oracle_tokens(x, grid, levels)
  _close(fwd(jnp.asarray(x), grid, levels, impl), expected, 5e-6, f"seed {seed}")
  with jax.enable_x64(True):
    _close(fwd(jnp.asarray(x, jnp.float64), grid, levels, impl), expected, 1e-12, f"seed {seed}")


@pytest.mark.parametrize("impl", IMPLS)
def test_two_level_ll_band_is_block_mean(impl):
  x = _random((1, 64, 16), seed=3)
  tokens = np.asarray(fwd(jnp.asarray(x), (8, 8), 2, impl))
  blocks = x.reshape(1, 2, 4, 2, 4, 16).mean(axis=(2, 4))  # [1, Y, X, channel]
  # Band 0 sits in channels c < m = 1, original channel 16 * 0 + 4 p1 + p2.
  for p1 in range(4):
    for p2 in range(4):
      grid_tokens = tokens.reshape(1, 2, 4, 2, 4, 16)[:, :, p1, :, p2, 0]
      np.testing.assert_allclose(grid_tokens, blocks[..., 4 * p1 + p2], atol=1e-6)


# ---------------------------------------------------------------- inverse, dtypes


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,grid,d,levels", ORACLE_CASES + [(1, (16, 16), 32, 2)])
def test_round_trip_float32(batch, grid, d, levels, impl):
  x = jnp.asarray(_random((batch, grid[0] * grid[1], d), seed=7))
  back = inv(fwd(x, grid, levels, impl), grid, levels, impl)
  _close(back, np.asarray(x), 2e-6)
  again = fwd(inv(x, grid, levels, impl), grid, levels, impl)
  _close(again, np.asarray(x), 2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_round_trip_float64(impl):
  with jax.enable_x64(True):
    x = jnp.asarray(_random((2, 96, 16), seed=8, dtype=np.float64))
    back = inv(fwd(x, (8, 12), 2, impl), (8, 12), 2, impl)
    assert back.dtype == jnp.float64
    _close(back, np.asarray(x), 1e-14)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_keeps_dtype_and_is_accurate(impl):
  x32 = _random((2, 64, 16), seed=9)
  x = jnp.asarray(x32, jnp.bfloat16)
  out = fwd(x, (8, 8), 2, impl)
  assert out.dtype == jnp.bfloat16
  reference = _oracle_tokens(np.asarray(x, np.float32), (8, 8), 2)
  _close(out, reference, 1e-2)  # one bfloat16 rounding of the output
  back = inv(out, (8, 8), 2, impl)
  assert back.dtype == jnp.bfloat16
  _close(back, np.asarray(x, np.float32), 3e-2)


# ---------------------------------------------------------------- jit and grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("levels,grid,d", [(2, (8, 12), 16), (1, (6, 4), 8)])
def test_grad_is_scaled_inverse(levels, grid, d, impl):
  """The transform is (1/P) * orthogonal, so its adjoint is inverse / P**2."""
  x = jnp.asarray(_random((2, grid[0] * grid[1], d), seed=10))
  r = jnp.asarray(_random(x.shape, seed=11))
  scale = 4.0**levels

  loss = lambda v: jnp.sum(wavelet_tokens(v, grid, levels, impl) * r)
  grad = jax.jit(jax.grad(loss))(x)
  _close(grad, np.asarray(inv(r, grid, levels, impl)) / scale, 2e-6)

  inv_loss = lambda v: jnp.sum(inverse_wavelet_tokens(v, grid, levels, impl) * r)
  inv_grad = jax.jit(jax.grad(inv_loss))(x)
  _close(inv_grad, np.asarray(fwd(r, grid, levels, impl)) * scale, 2e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("transform", [wavelet_tokens, inverse_wavelet_tokens])
def test_grad_matches_finite_differences_float64(transform, impl):
  """Directional derivative of a nonlinear loss: reverse mode vs central differences."""
  with jax.enable_x64(True):
    x, u = (jnp.asarray(_random((2, 32, 16), seed=s, dtype=np.float64)) for s in (12, 13))
    loss = jax.jit(lambda v: jnp.sum(jnp.sin(transform(v, (4, 8), 2, impl))))
    eps = 1e-6
    numeric = (loss(x + eps * u) - loss(x - eps * u)) / (2 * eps)
    analytic = jnp.vdot(jax.jit(jax.grad(loss))(x), u)
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_over_extra_axis(impl):
  x = jnp.asarray(_random((3, 2, 64, 16), seed=13))
  out = jax.jit(jax.vmap(lambda v: wavelet_tokens(v, (8, 8), 2, impl)))(x)
  _close(out, np.asarray(fwd(x.reshape(6, 64, 16), (8, 8), 2, impl)).reshape(x.shape), 1e-7)


# ---------------------------------------------------------------- direct vs jaxwt

DIRECT_CASES = [  # (batch, grid, d, levels): square and oblong grids, both level counts
  (2, (8, 8), 32, 2),
  (1, (4, 12), 16, 2),
  (3, (6, 2), 8, 1),
]


@seeds.each()
@pytest.mark.parametrize("batch,grid,d,levels", DIRECT_CASES)
def test_direct_equals_jaxwt(batch, grid, d, levels, seed):
  """Random inputs: forward and inverse agree to float32 / float64 round-off."""
  x = _random((batch, grid[0] * grid[1], d), seed=seed, dtype=np.float64)
  for dtype, rel in ((jnp.float32, 1e-6), (jnp.float64, 1e-13)):
    with jax.enable_x64(dtype == jnp.float64):
      v = jnp.asarray(x, dtype)
      for f in (fwd, inv):
        direct, conv = f(v, grid, levels, "direct"), f(v, grid, levels, "jaxwt")
        assert direct.dtype == conv.dtype == dtype
        _close(direct, np.asarray(conv, np.float64), rel, f"seed {seed}")


def _loss(v, w, grid, levels, impl):
  t = wavelet_tokens(v, grid, levels, impl)
  return jnp.sum(jnp.tanh(inverse_wavelet_tokens(jnp.sin(t) * w, grid, levels, impl)) * w)


_grad = jax.jit(jax.grad(_loss), static_argnums=(2, 3, 4))  # compiled once for all seeds


@seeds.each()
@pytest.mark.parametrize("batch,grid,d,levels", DIRECT_CASES)
def test_direct_gradients_equal_jaxwt(batch, grid, d, levels, seed):
  """Reverse-mode gradients of a nonlinear loss through forward then inverse, both paths."""
  shape = (batch, grid[0] * grid[1], d)
  x, w = (
    _random(shape, seed=seed, dtype=np.float64),
    _random(shape, seed=[seed, 1], dtype=np.float64),
  )
  for dtype, rel in ((jnp.float32, 2e-6), (jnp.float64, 1e-13)):
    with jax.enable_x64(dtype == jnp.float64):
      v, wd = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
      direct, conv = (_grad(v, wd, grid, levels, impl) for impl in ("direct", "jaxwt"))
      assert direct.dtype == dtype
      _close(direct, np.asarray(conv, np.float64), rel, f"seed {seed}")


def test_direct_has_no_convolution():
  """The direct path lowers to adds, subtracts and layout ops; jaxwt's to convolutions."""
  x = jnp.zeros((2, 64, 32), jnp.float32)

  def hlo(impl):
    f = lambda v: inverse_wavelet_tokens(wavelet_tokens(v, (8, 8), 2, impl), (8, 8), 2, impl)
    return jax.jit(jax.grad(lambda v: jnp.sum(f(v) ** 2))).lower(x).compile().as_text()

  assert "convolution(" in hlo("jaxwt")
  assert "convolution(" not in hlo("direct")


@pytest.fixture(scope="module")
def tiny_golden_models():
  """The tiny golden DiMSUM (upstream weights): its golden inputs and output, its parameters, and
  one jitted function applying it with wavelet_impl 'jaxwt' and 'direct' (compiled once)."""
  from dimsum_jax.models.dimsum_convert import from_upstream, model_config_from_upstream
  from dimsum_jax.models import abstract_params
  from dimsum_jax.models import create_model
  from dimsum_jax.tools.parity import split_golden

  with np.load(golden_file("tiny.npz")) as data:
    state, inputs, refs = split_golden(data)
  mc = model_config_from_upstream(json.loads(str(inputs["config_json"])), state)
  mc.scan_impl = "reference"
  mc.wavelet_impl = "jaxwt"
  jaxwt_model = create_model(mc)
  mc.wavelet_impl = "direct"
  direct = create_model(mc)
  assert (jaxwt_model.wavelet_impl, direct.wavelet_impl) == ("jaxwt", "direct")
  params = from_upstream(state, jaxwt_model, abstract_params(jaxwt_model, mc))

  @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
  def both(params, x, t, y):
    return tuple(m.apply({"params": params}, x, t, y) for m in (jaxwt_model, direct))

  return mc, inputs, refs, params, both


@seeds.each()
def test_model_direct_equals_default_on_tiny_golden(tiny_golden_models, seed):
  """The tiny golden DiMSUM (upstream weights) with wavelet_impl='direct' (the jaxwt_model) against
  'jaxwt': on the golden inputs (also against upstream's float64 output) and on random inputs of
  that size."""
  mc, inputs, refs, params, both = tiny_golden_models
  rng = np.random.default_rng(seed)
  b = inputs["x"].shape[0]
  x = np.concatenate(
    [
      np.transpose(inputs["x"], (0, 2, 3, 1)),
      rng.standard_normal((b, mc.input_size, mc.input_size, mc.in_channels)),
    ]
  )
  t = np.concatenate([inputs["t"], rng.uniform(size=b)])
  y = np.concatenate([inputs["y"], rng.integers(0, mc.num_classes, size=b)]).astype(np.int32)

  with jax.default_matmul_precision("highest"):
    out_jaxwt, out_direct = both(
      params, jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y)
    )
  out_jaxwt, out_direct = np.asarray(out_jaxwt), np.asarray(out_direct)
  scale = np.abs(out_jaxwt).max()
  np.testing.assert_allclose(
    out_direct, out_jaxwt, rtol=0, atol=1e-5 * scale, err_msg=f"seed {seed}"
  )
  golden_out = np.transpose(refs["out"], (0, 2, 3, 1))
  np.testing.assert_allclose(
    out_direct[:b], golden_out, rtol=0, atol=1e-4 * np.abs(golden_out).max()
  )


def test_unknown_impl_raises():
  x = jnp.zeros((1, 64, 16))
  for f in (wavelet_tokens, inverse_wavelet_tokens):
    with pytest.raises(ValueError, match="choose one of"):
      f(x, (8, 8), 2, "conv")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
  "shape,grid,levels,message",
  [
    ((1, 64, 8), (8, 8), 2, "divisible by 16"),
    ((1, 64, 6), (8, 8), 1, "divisible by 4"),
    ((1, 48, 16), (6, 8), 2, "divisible by 4"),
    ((1, 30, 16), (5, 6), 1, "divisible by 2"),
    ((1, 64, 16), (8, 4), 2, "h \\* w = N"),
    ((1, 64, 64), (8, 8), 3, "levels must be one of"),
    ((64, 16), (8, 8), 2, "batch, N, d"),
  ],
)
def test_bad_layout_raises(shape, grid, levels, message):
  x = jnp.zeros(shape)
  with pytest.raises(ValueError, match=message):
    wavelet_tokens(x, grid, levels)
  with pytest.raises(ValueError, match=message):
    inverse_wavelet_tokens(x, grid, levels)


def test_benchmark_script_reports_both_paths(capsys):
  """benchmarks/haar.py at a small shape: one JSON line per (direction, impl), with op counts."""
  from benchmarks import haar as bench

  assert bench.main(["--batch", "1", "--grid", "8", "--channels", "16", "--warmup", "0"]) == 0
  records = [
    json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
  ]
  got = {(r["transform"], r["impl"]): r for r in records}
  assert set(got) == {(t, i) for t in ("forward", "inverse") for i in IMPLS}
  for transform in ("forward", "inverse"):
    conv, direct = got[(transform, "jaxwt")], got[(transform, "direct")]
    assert conv["ops"]["convolutions"] > 0 and direct["ops"]["convolutions"] == 0
    assert 0 < direct["ops"]["entry_ops"] < conv["ops"]["entry_ops"]
    assert max(direct["max_abs_diff"]["vs_jaxwt"]) < 1e-5
    assert direct["fwd_bwd_timing"]["repeats"] == 5 and direct["fwd_bwd_ms"] > 0
