"""The digits set: pixel values against scikit-learn's array, labels, channels."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from dimsum_jax.data import create_dataset, default_data_config
from dimsum_jax.data.digits import load_digits_images, resize_matrix


@pytest.fixture(scope="module")
def raw():
  d = load_digits()
  return d.images, d.target


def bilinear_pixel(img, size, y, x):
  """One output pixel by the textbook formula: half-pixel centres, edges clamped."""

  def taps(i):
    src = min(max((i + 0.5) * img.shape[0] / size - 0.5, 0.0), img.shape[0] - 1.0)
    lo = int(np.floor(src))
    return lo, min(lo + 1, img.shape[0] - 1), src - lo

  y0, y1, fy = taps(y)
  x0, x1, fx = taps(x)
  top = (1 - fx) * img[y0, x0] + fx * img[y0, x1]
  bottom = (1 - fx) * img[y1, x0] + fx * img[y1, x1]
  return (1 - fy) * top + fy * bottom


def test_bilinear_pixels_match_sklearn(raw):
  images, labels = load_digits_images(16, 1, "bilinear")
  assert images.shape == (1797, 16, 16, 1) and images.dtype == np.float32
  np.testing.assert_array_equal(labels, raw[1])
  # Hand values for digit 0 (rows 0-1 start 0 0 5 / 0 0 13): output (0, 0) is source (0, 0);
  # output (1, 3) sits at source (0.25, 1.25): 3/4 row 0 + 1/4 row 1, 3/4 col 1 + 1/4 col 2.
  r = raw[0][0]
  assert (r[0, 1], r[0, 2], r[1, 1], r[1, 2]) == (0, 5, 0, 13)
  assert images[0, 0, 0, 0] == -1.0
  want = 0.75 * (0.25 * 5) + 0.25 * (0.25 * 13)  # = 1.75
  assert images[0, 1, 3, 0] == pytest.approx(want / 8 - 1, abs=1e-6)  # -0.78125
  for n, y, x in [(0, 5, 7), (17, 15, 0), (1796, 8, 9), (500, 3, 12)]:
    want = bilinear_pixel(raw[0][n], 16, y, x) / 8 - 1
    assert images[n, y, x, 0] == pytest.approx(want, abs=1e-6)


def test_nearest_is_pixel_repeat_and_three_channels(raw):
  images, _ = load_digits_images(32, 3, "nearest")
  want = np.repeat(np.repeat(raw[0] / 8 - 1, 4, axis=1), 4, axis=2)
  np.testing.assert_allclose(images[..., 0], want, atol=1e-6)
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  assert images.min() == -1.0 and images.max() == 1.0


def test_non_integer_scale_rows_sum_to_one():
  w = resize_matrix(8, 20, "bilinear")
  np.testing.assert_allclose(w.sum(1), 1.0)
  # Output 7 of 20 sits at source (7 + 0.5) * 8 / 20 - 0.5 = 2.5: halfway between pixels 2 and 3.
  np.testing.assert_allclose(w[7], np.eye(8)[2] * 0.5 + np.eye(8)[3] * 0.5)


def test_source_batches_hold_the_dataset(raw):
  c = default_data_config()
  c.global_batch_size = 1797
  c.shuffle = False
  source = create_dataset(c, seed=0)
  assert (source.num_classes, source.image_shape, source.num_examples) == (10, (16, 16, 1), 1797)
  batch = next(source)
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  np.testing.assert_array_equal(batch["label"], raw[1])
  np.testing.assert_allclose(
    batch["image"][:, ::5, ::5, 0], load_digits_images(16)[0][:, ::5, ::5, 0]
  )


def test_unconditional_labels_are_zero():
  c = default_data_config()
  c.class_conditional = False
  source = create_dataset(c, seed=0)
  assert source.num_classes == 0
  assert not next(source)["label"].any()
