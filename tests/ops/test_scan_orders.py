"""Tests of dimsum_jax.ops.scan_orders: bijections, upstream golden window orders, literal cases."""

import pathlib

import numpy as np
import pytest

from dimsum_jax.ops import scan_orders as so

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"
GRIDS = [(1, 1), (2, 3), (3, 3), (4, 4), (3, 5), (6, 4), (8, 8), (8, 12), (16, 16)]


@pytest.fixture(scope="module")
def golden():
  """wavelet.npz from upstream DiMSUM; a missing file is a failure, not a skip."""
  path = GOLDEN_DIR / "wavelet.npz"
  if not path.is_file():
    pytest.fail(f"Golden file {path} is missing: it must sit at <repo root>/../shared/golden/.")
  with np.load(path) as data:
    return {key: data[key] for key in data.files}


def _all_orders(h, w):
  """Every single order the module can build on an h x w grid."""
  orders = [so.raster_order(h, w, t, r) for t in (False, True) for r in (False, True)]
  for kind in so.SCAN_ZOO.values():
    orders += kind(h, w)
  for window in range(1, min(h, w) + 1):
    if h % window == 0 and w % window == 0:
      orders += [so.window_order(h, w, window, c) for c in (False, True)]
  for scan_type in so.SCAN_TYPES:
    orders += list(so.spatial_orders(scan_type, 9, h, w))
  for levels in (1, 2):
    patch = 2**levels
    if h % patch == 0 and w % patch == 0 and w % (h // patch) == 0:
      for scan_type in so.SCAN_TYPES:
        orders += list(so.wavelet_orders(9, h, w, levels, scan_type))
  return orders


# ---------------------------------------------------------------- bijections


@pytest.mark.parametrize("h,w", GRIDS)
def test_every_order_is_a_bijection_with_inverse(h, w):
  identity = np.arange(h * w)
  for perm in _all_orders(h, w):
    assert perm.shape == (h * w,)
    np.testing.assert_array_equal(np.sort(perm), identity)
    inverse = so.inverse_permutation(perm)
    np.testing.assert_array_equal(perm[inverse], identity)
    np.testing.assert_array_equal(inverse[perm], identity)


def test_inverse_permutation_on_stacks_and_rejects_non_permutations():
  stack = so.spatial_orders("none", 4, 3, 5)
  inverse = so.inverse_permutation(stack)
  assert inverse.shape == stack.shape and inverse.dtype == stack.dtype
  for perm, inv in zip(stack, inverse):
    np.testing.assert_array_equal(perm[inv], np.arange(15))
  np.testing.assert_array_equal(so.inverse_permutation(np.array([2, 0, 1])), [1, 2, 0])
  with pytest.raises(ValueError, match="Not a permutation"):
    so.inverse_permutation(np.array([0, 0, 1]))


# ---------------------------------------------------------------- golden window orders


@pytest.mark.parametrize("g", [8, 16])
def test_window_orders_match_upstream(golden, g):
  window = so.wavelet_window(g, g)
  assert window == g // 4
  for name, column_first in (("rowfirst", False), ("colfirst", True)):
    perm = so.window_order(g, g, window, column_first)
    np.testing.assert_array_equal(perm, golden[f"g{g}_perm_{name}"])
    np.testing.assert_array_equal(so.inverse_permutation(perm), golden[f"g{g}_invperm_{name}"])
    tokens = golden[f"g{g}_dwt_tokens_f64"]
    np.testing.assert_array_equal(tokens[:, perm], golden[f"g{g}_window_{name}_f64"])
    np.testing.assert_array_equal(
      golden[f"g{g}_window_{name}_f64"][:, so.inverse_permutation(perm)], tokens
    )


@pytest.mark.parametrize("g", [8, 16])
def test_published_wavelet_orders_alternate(golden, g):
  orders = so.wavelet_orders(5, g, g)
  assert orders.shape == (5, g * g) and orders.dtype == np.int32
  for i, perm in enumerate(orders):
    expected = golden[f"g{g}_perm_colfirst"] if i % 2 else golden[f"g{g}_perm_rowfirst"]
    np.testing.assert_array_equal(perm, expected)


# ---------------------------------------------------------------- literal cases


def test_raster_orders_2x3():
  # Grid  0 1 2
  #       3 4 5
  assert so.raster_order(2, 3).tolist() == [0, 1, 2, 3, 4, 5]
  assert so.raster_order(2, 3, reverse=True).tolist() == [5, 4, 3, 2, 1, 0]
  assert so.raster_order(2, 3, transpose=True).tolist() == [0, 3, 1, 4, 2, 5]
  assert so.raster_order(2, 3, transpose=True, reverse=True).tolist() == [5, 2, 4, 1, 3, 0]


def test_published_spatial_schedule_2x3():
  expected = [
    [0, 1, 2, 3, 4, 5],  # block 0: row-major
    [5, 4, 3, 2, 1, 0],  # block 1: row-major, reversed
    [0, 3, 1, 4, 2, 5],  # block 2: column-major
    [5, 2, 4, 1, 3, 0],  # block 3: column-major, reversed
    [0, 1, 2, 3, 4, 5],  # block 4: the cycle repeats
  ]
  orders = so.spatial_orders("none", 5, 2, 3)
  assert orders.dtype == np.int32
  assert orders.tolist() == expected
  assert [so.published_flags(i) for i in range(4)] == [
    (False, False),
    (False, True),
    (True, False),
    (True, True),
  ]


def test_window_orders_literal():
  # 4x4 grid, window 2:   0  1 |  2  3
  #                        4  5 |  6  7
  #                       ------+------
  #                        8  9 | 10 11
  #                       12 13 | 14 15
  assert so.window_order(4, 4, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
  assert so.window_order(4, 4, 2, column_first=True).tolist() == [
    0,
    4,
    1,
    5,
    8,
    12,
    9,
    13,
    2,
    6,
    3,
    7,
    10,
    14,
    11,
    15,
  ]
  # 2x4 grid, window 2: two windows side by side.
  assert so.window_order(2, 4, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
  assert so.window_order(2, 4, 2, column_first=True).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
  with pytest.raises(ValueError, match="divide"):
    so.window_order(4, 6, 4)


# 3x3 grid:  0 1 2
#            3 4 5
#            6 7 8
# Paths in upstream's order: [lr, tb] for the corners top-left, top-right, bottom-left,
# bottom-right.
SWEEP_3X3 = [
  [0, 1, 2, 3, 4, 5, 6, 7, 8],
  [0, 3, 6, 1, 4, 7, 2, 5, 8],
  [2, 1, 0, 5, 4, 3, 8, 7, 6],
  [2, 5, 8, 1, 4, 7, 0, 3, 6],
  [6, 7, 8, 3, 4, 5, 0, 1, 2],
  [6, 3, 0, 7, 4, 1, 8, 5, 2],
  [8, 7, 6, 5, 4, 3, 2, 1, 0],
  [8, 5, 2, 7, 4, 1, 6, 3, 0],
]
ZIGMA_3X3 = [
  [0, 1, 2, 5, 4, 3, 6, 7, 8],
  [0, 3, 6, 7, 4, 1, 2, 5, 8],
  [2, 1, 0, 3, 4, 5, 8, 7, 6],
  [2, 5, 8, 7, 4, 1, 0, 3, 6],
  [6, 7, 8, 5, 4, 3, 0, 1, 2],
  [6, 3, 0, 1, 4, 7, 8, 5, 2],
  [8, 7, 6, 3, 4, 5, 2, 1, 0],
  [8, 5, 2, 1, 4, 7, 6, 3, 0],
]
# 4x4 grid:  0  1  2  3
#            4  5  6  7
#            8  9 10 11
#           12 13 14 15
JPEG_4X4 = [
  [0, 1, 4, 8, 5, 2, 3, 6, 9, 12, 13, 10, 7, 11, 14, 15],
  [0, 4, 1, 2, 5, 8, 12, 9, 6, 3, 7, 10, 13, 14, 11, 15],
  [3, 2, 7, 11, 6, 1, 0, 5, 10, 15, 14, 9, 4, 8, 13, 12],
  [3, 7, 2, 1, 6, 11, 15, 10, 5, 0, 4, 9, 14, 13, 8, 12],
  [12, 13, 8, 4, 9, 14, 15, 10, 5, 0, 1, 6, 11, 7, 2, 3],
  [12, 8, 13, 14, 9, 4, 0, 5, 10, 15, 11, 6, 1, 2, 7, 3],
  [15, 14, 11, 7, 10, 13, 12, 9, 6, 3, 2, 5, 8, 4, 1, 0],
  [15, 11, 14, 13, 10, 7, 3, 6, 9, 12, 8, 5, 2, 1, 4, 0],
]


def test_sweep_paths_3x3():
  assert [p.tolist() for p in so.sweep_paths(3, 3)] == SWEEP_3X3


def test_zigma_paths_3x3():
  assert [p.tolist() for p in so.zigma_paths(3, 3)] == ZIGMA_3X3


def test_jpeg_paths_4x4():
  assert [p.tolist() for p in so.jpeg_paths(4, 4)] == JPEG_4X4


def test_paths_on_non_square_grid():
  # Grid  0 1 2
  #       3 4 5
  assert so.sweep_paths(2, 3)[3].tolist() == [2, 5, 1, 4, 0, 3]  # tb from the top-right
  assert so.zigma_paths(2, 3)[4].tolist() == [3, 4, 5, 2, 1, 0]  # lr snake from the bottom-left
  assert so.jpeg_paths(2, 3)[0].tolist() == [0, 1, 3, 4, 2, 5]
  assert so.jpeg_paths(2, 3)[1].tolist() == [0, 3, 1, 2, 4, 5]
  # Odd sides give the complete zig-zag (upstream's lr loop stops after the main anti-diagonal).
  assert so.jpeg_paths(3, 3)[0].tolist() == [0, 1, 3, 6, 4, 2, 5, 7, 8]


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize(
  "scan_type,paths,count",
  [
    ("sweep_8", SWEEP_3X3, 8),
    ("sweep_4", SWEEP_3X3, 4),
    ("zigma_8", ZIGMA_3X3, 8),
  ],
)
def test_zoo_schedules_tile_over_depth(scan_type, paths, count):
  orders = so.spatial_orders(scan_type, 11, 3, 3)
  assert orders.shape == (11, 9)
  assert orders.tolist() == [paths[i % count] for i in range(11)]


@pytest.mark.parametrize("scan_type,count", [("jpeg_8", 8), ("jpeg_2", 2)])
def test_jpeg_schedules_tile_over_depth(scan_type, count):
  assert so.spatial_orders(scan_type, 10, 4, 4).tolist() == [JPEG_4X4[i % count] for i in range(10)]


def test_v2_is_row_major_everywhere():
  assert so.spatial_orders("v2", 6, 2, 3).tolist() == [list(range(6))] * 6
  row_first = so.window_order(8, 8, 2)
  np.testing.assert_array_equal(so.wavelet_orders(6, 8, 8, scan_type="v2"), [row_first] * 6)


def test_zoo_wavelet_orders_compose_window_then_path():
  row_first = so.window_order(8, 8, 2)
  paths = so.sweep_paths(8, 8)[:4]
  orders = so.wavelet_orders(6, 8, 8, scan_type="sweep_4")
  for i, perm in enumerate(orders):
    # The mixer reads position k of the window-ordered sequence at path[k].
    np.testing.assert_array_equal(perm, row_first[paths[i % 4]])


def test_one_level_wavelet_window():
  assert so.wavelet_window(8, 8, levels=1) == 4
  orders = so.wavelet_orders(2, 8, 8, levels=1)
  np.testing.assert_array_equal(orders[0], so.window_order(8, 8, 4))
  np.testing.assert_array_equal(orders[1], so.window_order(8, 8, 4, column_first=True))
  # Non-square: the window side is h // 2**levels and must divide w.
  np.testing.assert_array_equal(so.wavelet_orders(1, 8, 12)[0], so.window_order(8, 12, 2))
  with pytest.raises(ValueError, match="must divide the grid width"):
    so.wavelet_window(12, 8)
  with pytest.raises(ValueError, match="divisible by 2\\*\\*levels = 4"):
    so.wavelet_window(6, 8)


def test_unknown_scan_type_lists_valid_names():
  with pytest.raises(ValueError, match="valid names: none, v2, sweep_8"):
    so.spatial_orders("zigzag_8", 4, 4, 4)
  with pytest.raises(ValueError, match="valid names"):
    so.wavelet_orders(4, 8, 8, scan_type="sweep_16")
  with pytest.raises(ValueError, match="depth"):
    so.spatial_orders("none", 0, 4, 4)
