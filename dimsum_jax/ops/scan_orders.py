"""Token scan orders of DiMSUM as precomputed NumPy permutations.

Convention: an order is an int array `perm` of length N = h * w with perm[k] = the row-major token
index read at sequence position k; a sequence is put in scan order with `x[:, perm]` and returned
to row-major order with `y[:, inverse_permutation(perm)]`. All functions are pure NumPy and run once
at model construction, so the orders are compile-time constants under jit.

Published configuration (upstream `--bimamba-type none`, `DiM.__init__` in dimsum/models_dim.py):
block i gets reverse = (i % 2 == 1) and transpose = (i % 4 >= 2).
  - spatial branch: `raster_order(h, w, transpose, reverse)`, a 4-cycle over depth;
  - wavelet branch: built with transpose = <the block's reverse flag> and never reversed, so even
    blocks use the row-first and odd blocks the column-first window scan (`window_order`).

Ablation scan types (upstream `SCAN_ZOO` in dimsum/scanning_orders.py, `--bimamba-type` sweep_8,
sweep_4, zigma_8, jpeg_8; jpeg_2 is used by the DCT ablation): eight paths, two per start corner
(top-left, top-right, bottom-left, bottom-right), "lr" reading rows first and "tb" columns first;
"<type>_<k>" keeps the first k paths and block i uses path i % k. For every scan type other than
"none", `DiM.__init__` sets reverse = transpose = False in every block, so:
  - the spatial Mamba sees exactly the path (no extra flip or transpose);
  - the wavelet branch uses the row-first window scan in every block, and, because its mixer is
    built from the same `CondMamba` partial (same layer_idx, same `zigzag_paths`), the mixer also
    gathers the window-ordered sequence with the same path (upstream dimsum/models_dim.py).
    `wavelet_orders` with scan_type composes the two. (Paths reach the mixer only with `--cond-mamba`, which every
    published script sets; `create_block` passes no paths to the plain `Mamba` partial. The final
    upstream mixer code with the gather was not readable here; this follows its forward.)

"v2" (bidirectional Vim): `DiM.__init__` gives reverse = transpose = False to every block (the flags
are set only when scan_type == "none"), so both branches see a fixed order in every block: spatial
row-major forward, wavelet row-first windows. The second direction is inside the mixer: a second
set of conv1d / x_proj / dt_proj / A_log / D weights scans the flipped sequence, its output is
flipped back and summed with the forward output before the shared out_proj. That flip belongs to
the model's mixer, not to these orders.

Upstream's paths and window scans assume a square grid; here they are written for any h x w grid
and agree with upstream on square grids (upstream's jpeg "lr" path is truncated for odd side
lengths, see `jpeg_paths`).
"""

from __future__ import annotations

from typing import Callable, Dict, List

import numpy as np

PUBLISHED_SCAN_TYPE = "none"
ZOO_SCAN_TYPES = ("sweep_8", "sweep_4", "zigma_8", "jpeg_8", "jpeg_2")
SCAN_TYPES = (PUBLISHED_SCAN_TYPE, "v2") + ZOO_SCAN_TYPES

# Start corners in upstream's list order, as (flip rows, flip columns).
_CORNERS = ((False, False), (False, True), (True, False), (True, True))


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
  """Inverse of a permutation along the last axis (works on stacks such as [depth, N] orders).

  inverse[perm[k]] = k, so `x[:, perm][:, inverse] == x`. Raises ValueError if `perm` is not a
  permutation of 0..N-1.
  """
  perm = np.asarray(perm)
  n = perm.shape[-1]
  if not np.array_equal(np.sort(perm, axis=-1), np.broadcast_to(np.arange(n), perm.shape)):
    raise ValueError(f"Not a permutation of 0..{n - 1}: {perm!r}")
  return np.argsort(perm, axis=-1).astype(perm.dtype)


def _grid(h: int, w: int) -> np.ndarray:
  """[h, w] array of row-major token indices."""
  if h < 1 or w < 1:
    raise ValueError(f"Grid sides must be positive, got ({h}, {w}).")
  return np.arange(h * w, dtype=np.int64).reshape(h, w)


def raster_order(h: int, w: int, transpose: bool = False, reverse: bool = False) -> np.ndarray:
  """Spatial order of upstream `DiMBlockRaw`.

  transpose: read the row-major grid column by column (einops "(h w) -> (w h)");
  reverse: then flip the whole sequence.
  """
  grid = _grid(h, w)
  order = (grid.T if transpose else grid).reshape(-1)
  return order[::-1].copy() if reverse else order


def published_flags(block: int) -> tuple[bool, bool]:
  """(transpose, reverse) of block `block` in the published schedule (scan type "none")."""
  return block % 4 >= 2, block % 2 == 1


def window_order(h: int, w: int, window: int, column_first: bool = False) -> np.ndarray:
  """Upstream `local_scan` (LocalMamba) order with square windows of side `window`.

  Row-first: windows in row-major order, tokens row-major inside each window. Column-first: windows
  in column-major order, tokens column-major inside each window. `inverse_permutation` of it is
  upstream `local_reverse`. Upstream zero-pads grids that the window does not divide; that never
  happens in DiMSUM and is not supported here.
  """
  if window < 1 or h % window or w % window:
    raise ValueError(
      f"Window {window} must be positive and divide both grid sides ({h}, {w}); "
      "choose a window that divides the grid."
    )
  blocks = _grid(h, w).reshape(h // window, window, w // window, window)  # [Hg, r, Wg, c]
  axes = (2, 0, 3, 1) if column_first else (0, 2, 1, 3)
  return blocks.transpose(axes).reshape(-1)


def wavelet_window(h: int, w: int, levels: int = 2) -> int:
  """Window side of the wavelet-branch scan: h // 2**levels (upstream: grid side // patch_size).

  For the 16x16 grid of DiM-L/2 at 256 px this is 4 (each window = the 16 tokens of one
  low-resolution position); for 32x32 (512 px) it is 8. Upstream grids are square; for h != w the
  same side h // 2**levels is used and must divide w.
  """
  if levels not in (1, 2):
    raise ValueError(f"levels must be 1 or 2 (upstream num_wavelet_lv), got {levels}.")
  patch = 2**levels
  if h % patch or w % patch:
    raise ValueError(
      f"Grid ({h}, {w}) must have sides divisible by 2**levels = {patch} for the "
      "wavelet branch; change the grid or use fewer levels."
    )
  window = h // patch
  if w % window:
    raise ValueError(
      f"Wavelet window h // 2**levels = {window} must divide the grid width {w}; "
      "use a grid whose width is a multiple of it."
    )
  return window


def _snake(rows: np.ndarray) -> np.ndarray:
  """Reverse every odd row of a 2-D index array (boustrophedon), then flatten."""
  rows = rows.copy()
  rows[1::2] = rows[1::2, ::-1]
  return rows.reshape(-1)


def _zigzag(grid: np.ndarray) -> np.ndarray:
  """JPEG zig-zag over anti-diagonals of a 2-D index array, starting at [0, 0].

  Diagonal s = row + col is walked with the row decreasing (up and right) for even s and the row
  increasing (down and left) for odd s: (0,0), (0,1), (1,0), (2,0), (1,1), (0,2), ...
  """
  h, w = grid.shape
  order = []
  for s in range(h + w - 1):
    rows = np.arange(max(0, s - w + 1), min(s, h - 1) + 1)
    if s % 2 == 0:
      rows = rows[::-1]
    order.append(grid[rows, s - rows])
  return np.concatenate(order)


def _corner_views(h: int, w: int) -> List[np.ndarray]:
  """The row-major index grid seen from each start corner, in upstream's corner order."""
  grid = _grid(h, w)
  return [grid[:: -1 if flip_r else 1, :: -1 if flip_c else 1] for flip_r, flip_c in _CORNERS]


def sweep_paths(h: int, w: int) -> List[np.ndarray]:
  """Upstream `sweep_path`: [lr, tb] raster from each corner (TL, TR, BL, BR), 8 paths."""
  paths = []
  for view in _corner_views(h, w):
    paths += [view.reshape(-1), view.T.reshape(-1)]
  return paths


def zigma_paths(h: int, w: int) -> List[np.ndarray]:
  """Upstream `zigma_path`: like `sweep_paths` but snake (boustrophedon) rows / columns."""
  paths = []
  for view in _corner_views(h, w):
    paths += [_snake(view), _snake(view.T)]
  return paths


def jpeg_paths(h: int, w: int) -> List[np.ndarray]:
  """Upstream `jpeg_zigzag`: JPEG diagonal zig-zag from each corner, lr then tb (its transpose).

  "lr" leaves the corner along the row ((0,0) -> (0,1) -> (1,0) ...), "tb" along the column
  ((0,0) -> (1,0) -> (0,1) ...). Upstream's "lr" loop stops early on odd square sides (it steps
  past the last column at the top edge, leaving N(N+1)/2 of the N*N tokens), so its jpeg scans only
  work for even sides, the only ones DiMSUM uses. (Since `DiM.__init__` always builds "jpeg_2" for
  the DCT ablation, upstream cannot even be constructed on an odd token grid: inverting the short
  path raises IndexError.) The complete zig-zag is returned here for every size.
  """
  paths = []
  for view in _corner_views(h, w):
    paths += [_zigzag(view), _zigzag(view.T)]
  return paths


SCAN_ZOO: Dict[str, Callable[[int, int], List[np.ndarray]]] = {
  "sweep": sweep_paths,
  "zigma": zigma_paths,
  "jpeg": jpeg_paths,
}


def _check_scan_type(scan_type: str, depth: int) -> None:
  if depth < 1:
    raise ValueError(f"depth must be at least 1, got {depth}.")
  if scan_type not in SCAN_TYPES:
    raise ValueError(f"Unknown scan type {scan_type!r}; valid names: {', '.join(SCAN_TYPES)}.")


def zoo_paths(scan_type: str, h: int, w: int) -> List[np.ndarray]:
  """The k paths of a "<type>_<k>" scan type (the first k of the type's 8)."""
  kind, count = scan_type.split("_")
  return SCAN_ZOO[kind](h, w)[: int(count)]


def spatial_orders(scan_type: str, depth: int, h: int, w: int) -> np.ndarray:
  """Per-block order of the spatial branch: [depth, h*w] int32.

  "none": published 4-cycle of `raster_order` (`published_flags`); "v2": row-major in every block
  (the mixer adds the flipped direction itself); "<type>_<k>": block i uses path i % k.
  """
  _check_scan_type(scan_type, depth)
  if scan_type == PUBLISHED_SCAN_TYPE:
    rows = [raster_order(h, w, *published_flags(i)) for i in range(depth)]
  elif scan_type == "v2":
    rows = [raster_order(h, w)] * depth
  else:
    paths = zoo_paths(scan_type, h, w)
    rows = [paths[i % len(paths)] for i in range(depth)]
  return np.stack(rows).astype(np.int32)


def wavelet_orders(
  depth: int, h: int, w: int, levels: int = 2, scan_type: str = PUBLISHED_SCAN_TYPE
) -> np.ndarray:
  """Per-block order of the wavelet branch over `haar.wavelet_tokens` output: [depth, h*w] int32.

  "none" (published): even blocks row-first, odd blocks column-first window scan, window side
  `wavelet_window(h, w, levels)`. "v2": row-first in every block. "<type>_<k>": row-first windows,
  then block i's mixer path i % k applied to that window-ordered sequence (perm = window[path]).
  """
  _check_scan_type(scan_type, depth)
  window = wavelet_window(h, w, levels)
  row_first = window_order(h, w, window, column_first=False)
  if scan_type == PUBLISHED_SCAN_TYPE:
    col_first = window_order(h, w, window, column_first=True)
    rows = [col_first if i % 2 else row_first for i in range(depth)]
  elif scan_type == "v2":
    rows = [row_first] * depth
  else:
    paths = zoo_paths(scan_type, h, w)
    rows = [row_first[paths[i % len(paths)]] for i in range(depth)]
  return np.stack(rows).astype(np.int32)
