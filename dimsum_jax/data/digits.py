"""The offline default: scikit-learn's bundled 8x8 handwritten digits, pure NumPy.

1 797 images, 10 classes, values 0..16 (16 = full ink). Upscaled to image_size with separable
nearest or bilinear resampling (half-pixel centres, edges clamped: the convention of
jax.image.resize and PIL for upsampling), then mapped linearly to [-1, 1]: x / 8 - 1, so
background is -1 and ink +1. Three channels repeat the grey value.
"""

from __future__ import annotations

import numpy as np

from dimsum_jax.data.source import IndexedSource

NUM_CLASSES = 10
SOURCE_SIZE = 8


def resize_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
  """[out, in] weights: out = W @ in along one axis."""
  centres = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
  w = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  if method == "nearest":
    w[rows, np.clip(np.floor(centres + 0.5), 0, in_size - 1).astype(int)] = 1.0
    return w
  if method != "bilinear":
    raise ValueError(f"Unknown resize method {method!r}; use 'nearest' or 'bilinear'.")
  src = np.clip(centres, 0, in_size - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  np.add.at(w, (rows, lo), 1.0 - frac)
  np.add.at(w, (rows, hi), frac)
  return w


def load_digits_images(
  image_size: int = 16, channels: int = 1, resize: str = "bilinear"
) -> tuple[np.ndarray, np.ndarray]:
  """All 1 797 digits as (float32 [n, size, size, channels] in [-1, 1], int32 [n] labels)."""
  from sklearn.datasets import load_digits  # scikit-learn ships the data; no download

  digits = load_digits()
  raw = digits.images.astype(np.float64)  # [n, 8, 8], 0..16
  w = resize_matrix(SOURCE_SIZE, image_size, resize)
  big = np.einsum("yi,nij,xj->nyx", w, raw, w)
  images = (big / 8.0 - 1.0).astype(np.float32)[..., None]
  if channels == 3:
    images = np.repeat(images, 3, axis=-1)
  elif channels != 1:
    raise ValueError(f"Digits have 1 or 3 channels, not {channels}.")
  return np.ascontiguousarray(images), digits.target.astype(np.int32)


class DigitsSource(IndexedSource):
  """The digits held in memory; the order and state rules are IndexedSource's."""

  def __init__(self, config, *, process_index: int, process_count: int, seed: int):
    self.images, self.labels = load_digits_images(config.image_size, config.channels, config.resize)
    if not config.class_conditional:
      self.labels = np.zeros_like(self.labels)
    super().__init__(
      num_examples=len(self.images),
      num_classes=NUM_CLASSES if config.class_conditional else 0,
      image_shape=self.images.shape[1:],
      global_batch_size=config.global_batch_size,
      process_index=process_index,
      process_count=process_count,
      seed=seed,
      shuffle=config.shuffle,
      random_flip=config.random_flip,
      num_epochs=config.num_epochs,
      drop_remainder=config.drop_remainder,
      prefetch=0,
    )

  def _gather(self, ids, flips):
    images = self.images[ids]
    images[flips] = images[flips][:, :, ::-1]
    return images, self.labels[ids]
