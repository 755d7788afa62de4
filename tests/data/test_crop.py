"""ADM centre crop and torchvision-style resize + centre crop on hand-computed cases."""

import numpy as np
import pytest

from dimsum_jax.data.crop import adm_center_crop, crop_array, resize_center_crop, to_unit_range


def test_adm_box_halving_then_centre():
  # 4 x 8 (h x w), size 2: short side 4 >= 2 * 2 -> one BOX halving to 2 x 4; short side 2, so
  # the BICUBIC step keeps 2 x 4; columns (4 - 2) // 2 = 1 .. 2 remain.
  a = np.arange(32, dtype=np.uint8).reshape(4, 8) * 4
  # 2x2 block means: rows 0-1, cols 2-3: (8 + 12 + 40 + 44) / 4 = 26, cols 4-5: 34;
  # rows 2-3: 90 and 98.
  np.testing.assert_array_equal(adm_center_crop(a, 2), [[26, 34], [90, 98]])


def test_adm_halves_repeatedly_and_keeps_channels():
  # 16 x 40 RGB, size 4: 16 >= 8 -> 8 x 20, 8 >= 8 -> 4 x 10; crop columns 3 .. 6.
  # Each channel is constant per 4-column stripe, so BOX means are exact.
  cols = np.repeat(np.arange(10, dtype=np.uint8) * 20, 4)  # 40 columns
  a = np.stack(
    [np.tile(cols, (16, 1)), np.full((16, 40), 7, np.uint8), np.tile(cols, (16, 1)) // 2], axis=-1
  )
  out = adm_center_crop(a, 4)
  assert out.shape == (4, 4, 3)
  np.testing.assert_array_equal(out[0, :, 0], [60, 80, 100, 120])
  np.testing.assert_array_equal(out[..., 1], 7)
  np.testing.assert_array_equal(out[0, :, 2], [30, 40, 50, 60])


def test_adm_bicubic_branch_geometry():
  # 7 x 12, size 4: 7 < 8, no halving; scale 4 / 7 -> (round(12 * 4 / 7), 4) = 7 x 4 (w x h);
  # crop columns (7 - 4) // 2 = 1 .. 4. A constant image stays constant through BICUBIC.
  out = adm_center_crop(np.full((7, 12), 200, np.uint8), 4)
  np.testing.assert_array_equal(out, np.full((4, 4), 200))
  # A left/right split image: the crop is centred, so the two halves stay balanced.
  a = np.zeros((7, 12, 1), np.uint8)
  a[:, 6:] = 255
  out = crop_array(a, 4, "adm")[..., 0].astype(int)
  assert out.shape == (4, 4)
  assert out[:, 0].max() < 60 and out[:, 3].min() > 195


def test_resize_center_crop_rounds_like_torchvision():
  # 4 x 9, size 4: no resize (short side is 4); left offset round(5 / 2) = 2 (half to even).
  a = np.tile(np.arange(9, dtype=np.uint8), (4, 1))
  np.testing.assert_array_equal(resize_center_crop(a, 4)[0], [2, 3, 4, 5])
  # 4 x 7: offset round(1.5) = 2.
  a = np.tile(np.arange(7, dtype=np.uint8), (4, 1))
  np.testing.assert_array_equal(resize_center_crop(a, 4)[0], [2, 3, 4, 5])


def test_unit_range_and_none_crop():
  np.testing.assert_allclose(to_unit_range(np.array([0, 255], np.uint8)), [-1.0, 1.0])
  assert to_unit_range(np.array([128], np.uint8))[0] == pytest.approx(128 / 127.5 - 1, abs=1e-7)
  with pytest.raises(ValueError, match="crop='none' needs 4x4"):
    crop_array(np.zeros((4, 5, 3), np.uint8), 4, "none")
