"""Tests of dimsum_jax.ops.haar: upstream golden data, PyWavelets oracle, inverse, jit, grad."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt

from dimsum_jax.ops.haar import inverse_wavelet_tokens, wavelet_tokens

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"
GRIDS = (8, 16)

# Jitted once per (shape, grid, levels): much faster on CPU than op-by-op dispatch of the convs.
fwd = jax.jit(wavelet_tokens, static_argnums=(1, 2))
inv = jax.jit(inverse_wavelet_tokens, static_argnums=(1, 2))


@pytest.fixture(scope="module")
def golden():
  """wavelet.npz from upstream DiMSUM; a missing file is a failure, not a skip."""
  path = GOLDEN_DIR / "wavelet.npz"
  if not path.is_file():
    pytest.fail(f"Golden file {path} is missing: it must sit at <repo root>/../shared/golden/.")
  with np.load(path) as data:
    return {key: data[key] for key in data.files}


def _close(actual, expected, rel):
  """Max abs error within rel * max |expected| (the README's tolerance convention)."""
  actual = np.asarray(actual, np.float64)
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * scale)


def _random(shape, seed, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------- golden parity

@pytest.mark.parametrize("g", GRIDS)
def test_forward_matches_upstream_float32(golden, g):
  out = fwd(jnp.asarray(golden[f"g{g}_x"]), (g, g), 2)
  assert out.dtype == jnp.float32
  _close(out, golden[f"g{g}_dwt_tokens_f64"], 5e-6)


@pytest.mark.parametrize("g", GRIDS)
def test_inverse_matches_upstream_float32(golden, g):
  out = inv(jnp.asarray(golden[f"g{g}_z"]), (g, g), 2)
  _close(out, golden[f"g{g}_idwt_of_z_f64"], 5e-6)


@pytest.mark.parametrize("g", GRIDS)
def test_matches_upstream_float64(golden, g):
  with jax.enable_x64(True):
    x = jnp.asarray(golden[f"g{g}_x"], jnp.float64)
    z = jnp.asarray(golden[f"g{g}_z"], jnp.float64)
    forward = fwd(x, (g, g), 2)
    inverse = inv(z, (g, g), 2)
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


@pytest.mark.parametrize("batch,grid,d,levels", ORACLE_CASES)
def test_matches_pywavelets_oracle(batch, grid, d, levels):
  x = _random((batch, grid[0] * grid[1], d), seed=d + levels)
  expected = _oracle_tokens(x, grid, levels)
  _close(fwd(jnp.asarray(x), grid, levels), expected, 5e-6)
  with jax.enable_x64(True):
    _close(fwd(jnp.asarray(x, jnp.float64), grid, levels), expected, 1e-12)


def test_two_level_ll_band_is_block_mean():
  x = _random((1, 64, 16), seed=3)
  tokens = np.asarray(fwd(jnp.asarray(x), (8, 8), 2))
  blocks = x.reshape(1, 2, 4, 2, 4, 16).mean(axis=(2, 4))  # [1, Y, X, channel]
  # Band 0 sits in channels c < m = 1, original channel 16 * 0 + 4 p1 + p2.
  for p1 in range(4):
    for p2 in range(4):
      grid_tokens = tokens.reshape(1, 2, 4, 2, 4, 16)[:, :, p1, :, p2, 0]
      np.testing.assert_allclose(grid_tokens, blocks[..., 4 * p1 + p2], atol=1e-6)


# ---------------------------------------------------------------- inverse, dtypes

@pytest.mark.parametrize("batch,grid,d,levels", ORACLE_CASES + [(1, (16, 16), 32, 2)])
def test_round_trip_float32(batch, grid, d, levels):
  x = jnp.asarray(_random((batch, grid[0] * grid[1], d), seed=7))
  back = inv(fwd(x, grid, levels), grid, levels)
  _close(back, np.asarray(x), 2e-6)
  again = fwd(inv(x, grid, levels), grid, levels)
  _close(again, np.asarray(x), 2e-6)


def test_round_trip_float64():
  with jax.enable_x64(True):
    x = jnp.asarray(_random((2, 96, 16), seed=8, dtype=np.float64))
    back = inv(fwd(x, (8, 12), 2), (8, 12), 2)
    assert back.dtype == jnp.float64
    _close(back, np.asarray(x), 1e-14)


def test_bfloat16_keeps_dtype_and_is_accurate():
  x32 = _random((2, 64, 16), seed=9)
  x = jnp.asarray(x32, jnp.bfloat16)
  out = fwd(x, (8, 8), 2)
  assert out.dtype == jnp.bfloat16
  reference = _oracle_tokens(np.asarray(x, np.float32), (8, 8), 2)
  _close(out, reference, 1e-2)  # one bfloat16 rounding of the output
  back = inv(out, (8, 8), 2)
  assert back.dtype == jnp.bfloat16
  _close(back, np.asarray(x, np.float32), 3e-2)


# ---------------------------------------------------------------- jit and grad

@pytest.mark.parametrize("levels,grid,d", [(2, (8, 12), 16), (1, (6, 4), 8)])
def test_grad_is_scaled_inverse(levels, grid, d):
  """The transform is (1/P) * orthogonal, so its adjoint is inverse / P**2."""
  x = jnp.asarray(_random((2, grid[0] * grid[1], d), seed=10))
  r = jnp.asarray(_random(x.shape, seed=11))
  scale = 4.0**levels

  loss = lambda v: jnp.sum(wavelet_tokens(v, grid, levels) * r)
  grad = jax.jit(jax.grad(loss))(x)
  _close(grad, np.asarray(inv(r, grid, levels)) / scale, 2e-6)

  inv_loss = lambda v: jnp.sum(inverse_wavelet_tokens(v, grid, levels) * r)
  inv_grad = jax.jit(jax.grad(inv_loss))(x)
  _close(inv_grad, np.asarray(fwd(r, grid, levels)) * scale, 2e-6)


@pytest.mark.parametrize("transform", [wavelet_tokens, inverse_wavelet_tokens])
def test_grad_matches_finite_differences_float64(transform):
  """Directional derivative of a nonlinear loss: reverse mode vs central differences."""
  with jax.enable_x64(True):
    x, u = (jnp.asarray(_random((2, 32, 16), seed=s, dtype=np.float64)) for s in (12, 13))
    loss = jax.jit(lambda v: jnp.sum(jnp.sin(transform(v, (4, 8), 2))))
    eps = 1e-6
    numeric = (loss(x + eps * u) - loss(x - eps * u)) / (2 * eps)
    analytic = jnp.vdot(jax.jit(jax.grad(loss))(x), u)
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-7)


def test_vmap_over_extra_axis():
  x = jnp.asarray(_random((3, 2, 64, 16), seed=13))
  out = jax.jit(jax.vmap(lambda v: wavelet_tokens(v, (8, 8))))(x)
  _close(out, np.asarray(fwd(x.reshape(6, 64, 16), (8, 8), 2)).reshape(x.shape), 1e-7)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("shape,grid,levels,message", [
    ((1, 64, 8), (8, 8), 2, "divisible by 16"),
    ((1, 64, 6), (8, 8), 1, "divisible by 4"),
    ((1, 48, 16), (6, 8), 2, "divisible by 4"),
    ((1, 30, 16), (5, 6), 1, "divisible by 2"),
    ((1, 64, 16), (8, 4), 2, "h \\* w = N"),
    ((1, 64, 64), (8, 8), 3, "levels must be one of"),
    ((64, 16), (8, 8), 2, "batch, N, d"),
])
def test_bad_layout_raises(shape, grid, levels, message):
  x = jnp.zeros(shape)
  with pytest.raises(ValueError, match=message):
    wavelet_tokens(x, grid, levels)
  with pytest.raises(ValueError, match=message):
    inverse_wavelet_tokens(x, grid, levels)
