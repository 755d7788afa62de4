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

The Haar levels go through jaxwt (`wavedec2` / `waverec2`, level 1, spatial axes last), whose
(cA, (cH, cV, cD)) output is exactly upstream's (LL, LH, HL, HH) including signs. We use the exact
taps 1/sqrt(2); upstream's float32 buffers hold 0.49999997 for the 2-D taps, a 6e-8 relative
difference.

Inputs of a dtype narrower than float32 (bfloat16, float16) are transformed in float32 and cast
back; float32 and float64 are transformed in their own precision. The transform is linear and
orthogonal up to the factor 1/P: inverse_wavelet_tokens(v) = P**2 * (adjoint of wavelet_tokens)(v).
"""
from __future__ import annotations

from typing import Tuple

import jax.numpy as jnp
import jaxwt

LEVELS = (1, 2)
_WAVELET = "haar"


def _check_layout(shape: Tuple[int, ...], grid: Tuple[int, int], levels: int) -> None:
  """Raises ValueError, saying what to change, when (shape, grid, levels) cannot be transformed."""
  if levels not in LEVELS:
    raise ValueError(f"levels must be one of {LEVELS} (upstream num_wavelet_lv), got {levels}.")
  if len(shape) != 3:
    raise ValueError(f"Expected tokens of shape [batch, N, d], got shape {tuple(shape)}.")
  h, w = grid
  _, n, d = shape
  if h * w != n:
    raise ValueError(f"grid {tuple(grid)} has {h * w} cells but the tokens have N = {n}; "
                     "pass the token grid (h, w) with h * w = N.")
  patch = 2**levels
  if h % patch or w % patch:
    raise ValueError(f"A {levels}-level Haar packet needs grid sides divisible by {patch}, got "
                     f"grid {tuple(grid)}; change the image or patch size, or use fewer levels.")
  if d % (patch * patch):
    raise ValueError(f"A {levels}-level Haar packet needs the channel count d divisible by "
                     f"{patch * patch} (4**levels), got d = {d}; change the hidden size "
                     "(d is half of it) or use fewer levels.")


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


def wavelet_tokens(x: jnp.ndarray, grid: Tuple[int, int], levels: int = 2) -> jnp.ndarray:
  """Upstream `_dwt_fast`: row-major tokens -> wavelet-packet tokens (before the window scan).

  Args:
    x: [B, N, d] tokens, row-major over the grid (token index = row * w + col).
    grid: (h, w) token grid, h * w = N; h and w divisible by 2**levels.
    levels: 1 or 2 Haar levels (DiMSUM uses 2); d must be divisible by 4**levels.

  Returns:
    [B, N, d] in x's dtype: the layout described in the module docstring.
  """
  _check_layout(x.shape, grid, levels)
  b, _, d = x.shape
  h, w = grid
  images = jnp.swapaxes(x.astype(_compute_dtype(x.dtype)), 1, 2).reshape(b, d, h, w)
  bands = _packet(images, levels) / 2**levels
  return _bands_to_tokens(bands, levels).astype(x.dtype)


def inverse_wavelet_tokens(v: jnp.ndarray, grid: Tuple[int, int], levels: int = 2) -> jnp.ndarray:
  """Upstream `_idwt_fast`: the exact inverse of `wavelet_tokens`.

  Args:
    v: [B, N, d] tokens in the wavelet layout of `wavelet_tokens(., grid, levels)`.
    grid: (h, w) token grid, as for `wavelet_tokens`.
    levels: 1 or 2, as for `wavelet_tokens`.

  Returns:
    [B, N, d] row-major tokens in v's dtype.
  """
  _check_layout(v.shape, grid, levels)
  b, n, d = v.shape
  bands = _tokens_to_bands(v.astype(_compute_dtype(v.dtype)), grid, levels) * 2**levels
  images = _unpacket(bands, levels)  # [B, d, h, w]
  return jnp.swapaxes(images.reshape(b, d, n), 1, 2).astype(v.dtype)
