"""DiMSUM's Haar wavelet-packet token layout (upstream `WaveDiMBlock._dwt_fast` / `_idwt_fast`).

The wavelet branch of a DiMSUM block maps its [B, N, d] row-major tokens on an (h, w) grid to
another [B, N, d] token tensor (same grid, same width) that the window scan then reads.
With P = 2**levels:

1. View the tokens as d channels of an h x w image.
2. One orthonormal Haar level splits each 2x2 patch [[a, b], [e, f]] into
     LL = (a+b+e+f)/2, LH = (a+b-e-f)/2 (top - bottom), HL = (a-b+e-f)/2 (left - right),
     HH = (a-b-e+f)/2.
   For levels=2 the second level splits ALL four first-level bands again (a full wavelet packet,
   not only LL). Band j (of P*P) is numbered first-level major: j = 4 s1 + s2, each s in the order
   LL, LH, HL, HH. Upstream computes the second level subband-major and then reorders its 16 chunks;
   the result is this first-level-major order.
3. All bands are divided by P (so for levels=2 the LL-of-LL band is the 4x4 block mean).
4. Stack the bands subband-major into P*P*d channels (flat index k = j*d + channel) and re-read them
   with einops' "b (c p1 p2) H W -> b (H p1 W p2) c": the token at grid row P*Y + p1, column
   P*X + p2 holds, in channel c, the value k = P*P*c + P*p1 + p2 at low-resolution position (Y, X).
   Equivalently, with m = d / P**2: band j = c // m of original channel P*P*(c % m) + P*p1 + p2.
   Every token therefore carries all P*P bands for a 1/P**2 slice of the channels.

Two implementations give the same tokens (`impl`):

* 'jaxwt' (the default, the reference): the Haar levels go through jaxwt (`wavedec2` / `waverec2`,
  level 1, spatial axes last), whose (cA, (cH, cV, cD)) output is exactly upstream's
  (LL, LH, HL, HH) including signs. We use the exact taps 1/sqrt(2); upstream's float32 buffers
  hold 0.49999997 for the 2-D taps, a 6e-8 relative difference.
* 'direct': no convolution. The P x P patch of pixel (P*Y + r, P*X + q) splits the row r and the
  column q into bits, one per level (level 1 takes the lowest bit); each Haar level is an unscaled
  2-point butterfly (x0 + x1, x0 - x1) over its row bit and its column bit, done on the
  channels-last tokens by reshapes, adds and subtracts, then one transpose into the token layout
  (XLA fuses it all into one pass over the tensor). The 1/sqrt(2) of 2 * levels butterflies and
  the 1/P of step 3 make one exact power-of-two factor 4**-levels; the inverse is the same
  butterflies on the wavelet layout with no factor at all (each butterfly is its own inverse up to
  2). Gradients come from a custom VJP (each direction's adjoint is the other direction, scaled),
  so reverse mode is one pass too; forward-mode differentiation (jax.jvp) of 'direct' is not
  supported: use 'jaxwt' for it.

Inputs of a dtype narrower than float32 (bfloat16, float16) are transformed in float32 and cast
back; float32 and float64 are transformed in their own precision. The transform is linear and
orthogonal up to the factor 1/P: inverse_wavelet_tokens(v) = P**2 * (adjoint of wavelet_tokens)(v).
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import jaxwt
import numpy as np
from jax import lax

LEVELS = (1, 2)
IMPLS = ("jaxwt", "direct")
_WAVELET = "haar"


def _check_layout(
  shape: Tuple[int, ...], grid: Tuple[int, int], levels: int, impl: str = "jaxwt"
) -> None:
  """Raises ValueError, saying what to change, when (shape, grid, levels) cannot be transformed."""
  if impl not in IMPLS:
    raise ValueError(
      f"Unknown wavelet implementation {impl!r}; choose one of {IMPLS} "
      "(model config field wavelet_impl)."
    )
  if levels not in LEVELS:
    raise ValueError(f"levels must be one of {LEVELS} (upstream num_wavelet_lv), got {levels}.")
  if len(shape) != 3:
    raise ValueError(f"Expected tokens of shape [batch, N, d], got shape {tuple(shape)}.")
  h, w = grid
  _, n, d = shape
  if h * w != n:
    raise ValueError(
      f"grid {tuple(grid)} has {h * w} cells but the tokens have N = {n}; "
      "pass the token grid (h, w) with h * w = N."
    )
  patch = 2**levels
  if h % patch or w % patch:
    raise ValueError(
      f"A {levels}-level Haar packet needs grid sides divisible by {patch}, got "
      f"grid {tuple(grid)}; change the image or patch size, or use fewer levels."
    )
  if d % (patch * patch):
    raise ValueError(
      f"A {levels}-level Haar packet needs the channel count d divisible by "
      f"{patch * patch} (4**levels), got d = {d}; change the hidden size "
      "(d is half of it) or use fewer levels."
    )


def _compute_dtype(dtype) -> jnp.dtype:
  """float32 for narrow float types, the dtype itself for float32 / float64."""
  return jnp.promote_types(dtype, jnp.float32)


def _haar_split(x: jnp.ndarray) -> jnp.ndarray:
  """One Haar level on the last two axes: [..., h, w] -> [..., 4, h/2, w/2] (LL, LH, HL, HH)."""
  ll, (lh, hl, hh) = jaxwt.wavedec2(x, _WAVELET, level=1)
  return jnp.stack([ll, lh, hl, hh], axis=-3)


def _haar_merge(bands: jnp.ndarray) -> jnp.ndarray:
  """Inverse of `_haar_split`: [..., 4, h/2, w/2] -> [..., h, w]."""
  ll, lh, hl, hh = (bands[..., i, :, :] for i in range(4))
  return jaxwt.waverec2([ll, (lh, hl, hh)], _WAVELET)


def _packet(images: jnp.ndarray, levels: int) -> jnp.ndarray:
  """Full Haar packet: [B, d, h, w] -> [B, d, 4**levels, h/P, w/P], bands first-level major."""
  bands = images
  for _ in range(levels):
    bands = _haar_split(bands)  # each level adds a band axis just before the spatial axes
  b, d = images.shape[:2]
  return bands.reshape(b, d, 4**levels, *bands.shape[-2:])


def _unpacket(bands: jnp.ndarray, levels: int) -> jnp.ndarray:
  """Inverse of `_packet`: [B, d, 4**levels, H, W] -> [B, d, H*P, W*P]."""
  b, d, _, hl, wl = bands.shape
  x = bands.reshape(b, d, *(4,) * levels, hl, wl)
  for _ in range(levels):
    x = _haar_merge(x)  # merges the innermost (last-level) band axis
  return x


def _bands_to_tokens(bands: jnp.ndarray, levels: int) -> jnp.ndarray:
  """[B, d, P*P, H, W] -> [B, (H P) * (W P), d] with upstream's channel re-reading (step 4)."""
  b, d, _, hl, wl = bands.shape
  patch = 2**levels
  flat = jnp.swapaxes(bands, 1, 2)  # [B, P*P, d, H, W]: flat channel k = j * d + channel
  flat = flat.reshape(b, d, patch, patch, hl, wl)  # k = (c, p1, p2), c slowest
  tokens = flat.transpose(0, 4, 2, 5, 3, 1)  # [B, H, p1, W, p2, c]
  return tokens.reshape(b, hl * patch * wl * patch, d)


def _tokens_to_bands(tokens: jnp.ndarray, grid: Tuple[int, int], levels: int) -> jnp.ndarray:
  """Inverse of `_bands_to_tokens`: [B, N, d] -> [B, d, P*P, H, W]."""
  b, _, d = tokens.shape
  patch = 2**levels
  hl, wl = grid[0] // patch, grid[1] // patch
  x = tokens.reshape(b, hl, patch, wl, patch, d)  # [B, H, p1, W, p2, c]
  x = x.transpose(0, 5, 2, 4, 1, 3).reshape(b, patch * patch, d, hl, wl)  # [B, P*P, d, H, W]
  return jnp.swapaxes(x, 1, 2)


# ---------------------------------------------------------------- direct (butterfly) path
#
# With L = levels, P = 2**L and m = d / P**2, the tokens read as
#   pixels [B, Y, r_L .. r_1, X, q_L .. q_1, c', p1, p2]  (row P*Y + sum r_k 2**(k-1), channel
#                                                          P*P*c' + P*p1 + p2)
#   bands  [B, Y, p1, X, p2, q_1, r_1, .., q_L, r_L, c']   (the wavelet layout: channel j*m + c')
# r_k / q_k is the row / column bit of level k (level 1 takes the lowest bit). A level-k butterfly
# turns r_k into its row type (0 = sum, 1 = difference) and q_k into its column type, so the level's
# band is s_k = row type + 2 * column type (LL, LH, HL, HH) and j = sum_k s_k 4**(L - k) has the
# bits (q_1, r_1, .., q_L, r_L). Each direction is the butterflies on the input's bit axes followed
# by one transpose, which XLA fuses into one pass; the butterflies are symmetric, so each direction
# is the other's adjoint (up to the factor), which gives the VJPs without transposing the
# butterflies (whose autodiff transpose is a chain of reductions).


def _butterfly(x: jnp.ndarray, axis: int) -> jnp.ndarray:
  """(x0 + x1, x0 - x1) along a size-2 axis, as x0 + (1, -1) * x1 (one elementwise expression)."""
  x0 = lax.index_in_dim(x, 0, axis, keepdims=True)
  x1 = lax.index_in_dim(x, 1, axis, keepdims=True)
  shape = [1] * x.ndim
  shape[axis] = 2
  return x0 + jnp.asarray(np.array([1.0, -1.0]).reshape(shape), x.dtype) * x1


def _pixels_to_bands(x: jnp.ndarray, grid: Tuple[int, int], levels: int) -> jnp.ndarray:
  """Unscaled: [B, N, d] row-major tokens -> [B, N, d] wavelet tokens times 4**levels."""
  b, n, d = x.shape
  patch = 2**levels
  hl, wl = grid[0] // patch, grid[1] // patch
  y = x.reshape(b, hl, *(2,) * levels, wl, *(2,) * levels, d // patch**2, patch, patch)
  rows = [2 + levels - k for k in range(1, levels + 1)]  # r_1 .. r_L
  cols = [3 + 2 * levels - k for k in range(1, levels + 1)]  # q_1 .. q_L
  for axis in rows + cols:
    y = _butterfly(y, axis)
  bits = [a for k in range(levels) for a in (cols[k], rows[k])]
  c, p1, p2 = 3 + 2 * levels, 4 + 2 * levels, 5 + 2 * levels
  return y.transpose(0, 1, p1, 2 + levels, p2, *bits, c).reshape(b, n, d)


def _bands_to_pixels(v: jnp.ndarray, grid: Tuple[int, int], levels: int) -> jnp.ndarray:
  """Unscaled: [B, N, d] wavelet tokens -> [B, N, d] row-major tokens (the exact inverse)."""
  b, n, d = v.shape
  patch = 2**levels
  hl, wl = grid[0] // patch, grid[1] // patch
  y = v.reshape(b, hl, patch, wl, patch, *(2,) * (2 * levels), d // patch**2)
  for axis in range(5, 5 + 2 * levels):
    y = _butterfly(y, axis)
  cols = [5 + 2 * k for k in range(levels)]  # q_1 .. q_L
  rows = [6 + 2 * k for k in range(levels)]  # r_1 .. r_L
  return y.transpose(0, 1, *rows[::-1], 3, *cols[::-1], 5 + 2 * levels, 2, 4).reshape(b, n, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _direct_forward(x, grid, levels):
  return _pixels_to_bands(x, grid, levels) * 0.25**levels


def _direct_forward_fwd(x, grid, levels):
  return _direct_forward(x, grid, levels), None


def _direct_forward_bwd(grid, levels, _, ct):
  return (_bands_to_pixels(ct, grid, levels) * 0.25**levels,)


_direct_forward.defvjp(_direct_forward_fwd, _direct_forward_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _direct_inverse(v, grid, levels):
  return _bands_to_pixels(v, grid, levels)


def _direct_inverse_fwd(v, grid, levels):
  return _direct_inverse(v, grid, levels), None


def _direct_inverse_bwd(grid, levels, _, ct):
  return (_pixels_to_bands(ct, grid, levels),)


_direct_inverse.defvjp(_direct_inverse_fwd, _direct_inverse_bwd)


def wavelet_tokens(
  x: jnp.ndarray, grid: Tuple[int, int], levels: int = 2, impl: str = "jaxwt"
) -> jnp.ndarray:
  """Upstream `_dwt_fast`: row-major tokens -> wavelet-packet tokens (before the window scan).

  Args:
    x: [B, N, d] tokens, row-major over the grid (token index = row * w + col).
    grid: (h, w) token grid, h * w = N; h and w divisible by 2**levels.
    levels: 1 or 2 Haar levels (DiMSUM uses 2); d must be divisible by 4**levels.
    impl: 'jaxwt' (convolutions through jaxwt) or 'direct' (butterflies); same result.

  Returns:
    [B, N, d] in x's dtype: the layout described in the module docstring.
  """
  _check_layout(x.shape, grid, levels, impl)
  if impl == "direct":
    return _direct_forward(x.astype(_compute_dtype(x.dtype)), tuple(grid), levels).astype(x.dtype)
  b, _, d = x.shape
  h, w = grid
  images = jnp.swapaxes(x.astype(_compute_dtype(x.dtype)), 1, 2).reshape(b, d, h, w)
  bands = _packet(images, levels) / 2**levels
  return _bands_to_tokens(bands, levels).astype(x.dtype)


def inverse_wavelet_tokens(
  v: jnp.ndarray, grid: Tuple[int, int], levels: int = 2, impl: str = "jaxwt"
) -> jnp.ndarray:
  """Upstream `_idwt_fast`: the exact inverse of `wavelet_tokens`.

  Args:
    v: [B, N, d] tokens in the wavelet layout of `wavelet_tokens(., grid, levels)`.
    grid: (h, w) token grid, as for `wavelet_tokens`.
    levels: 1 or 2, as for `wavelet_tokens`.
    impl: 'jaxwt' or 'direct', as for `wavelet_tokens`.

  Returns:
    [B, N, d] row-major tokens in v's dtype.
  """
  _check_layout(v.shape, grid, levels, impl)
  if impl == "direct":
    return _direct_inverse(v.astype(_compute_dtype(v.dtype)), tuple(grid), levels).astype(v.dtype)
  b, n, d = v.shape
  bands = _tokens_to_bands(v.astype(_compute_dtype(v.dtype)), grid, levels) * 2**levels
  images = _unpacket(bands, levels)  # [B, d, h, w]
  return jnp.swapaxes(images.reshape(b, d, n), 1, 2).astype(v.dtype)
