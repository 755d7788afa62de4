"""Any folder of images (recursive; jpg, jpeg, png, webp), NumPy + PIL only.

Files are listed once, sorted by their path relative to the root, so every process sees the same
list and takes its own part of it (see source.process_split). With class_conditional, the class
of a file is the first directory under the root that holds it (sorted names -> 0, 1, ...); files
directly in the root are then an error. Images are converted to RGB (channels 3) or L (channels
1), cropped to image_size (config.crop, ADM by default) and scaled to [-1, 1].

An image that PIL cannot decode is never passed over silently: on_bad_image='fail' raises
BadImageError naming its path; 'skip' logs a warning with the path once, records it in
`skipped`, and fills its slot with the next example of the stream (deterministically).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os

import numpy as np
from PIL import Image

from dimsum_jax.data.crop import crop_pil, to_unit_range
from dimsum_jax.data.source import IndexedSource

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
log = logging.getLogger(__name__)


class BadImageError(ValueError):
  """An image file that cannot be decoded."""


def list_images(root: str) -> list[str]:
  """Relative paths (with '/') of every image under root, sorted."""
  if not os.path.isdir(root):
    raise FileNotFoundError(
      f"Image folder {root!r} does not exist; point config.data.data_dir at "
      "a directory of .jpg/.png/.webp files (class subfolders if "
      "conditional)."
    )
  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    rel_dir = os.path.relpath(dirpath, root)
    for f in filenames:
      if f.lower().endswith(EXTENSIONS) and not f.startswith("."):
        found.append(f if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{f}")
  found.sort()
  if not found:
    raise FileNotFoundError(f"Image folder {root!r} holds no .jpg/.jpeg/.png/.webp files.")
  return found


def class_labels(paths: list[str]) -> tuple[np.ndarray, list[str]]:
  """Label per path from its top-level directory, and the sorted class names."""
  loose = [p for p in paths if "/" not in p]
  if loose:
    raise ValueError(
      f"class_conditional needs one subfolder per class, but {loose[0]!r} (and "
      f"{len(loose) - 1} more) lie directly in the root; "
      "set class_conditional=False."
    )
  tops = [p.split("/", 1)[0] for p in paths]
  classes = sorted(set(tops))
  index = {c: i for i, c in enumerate(classes)}
  return np.asarray([index[t] for t in tops], np.int32), classes


def load_image(path: str, size: int, channels: int, crop: str) -> np.ndarray:
  """One file -> float32 [size, size, channels] in [-1, 1]; BadImageError if it cannot be read."""
  try:
    with Image.open(path) as image:
      image = image.convert("RGB" if channels == 3 else "L")
  except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError...)
    raise BadImageError(f"Cannot decode image {path}: {type(e).__name__}: {e}") from e
  return to_unit_range(crop_pil(image, size, crop))


class ImageFolderSource(IndexedSource):
  """Images from a directory tree, decoded by a thread pool, optionally prefetched."""

  def __init__(self, config, *, process_index: int, process_count: int, seed: int):
    self.root = config.data_dir
    self.paths = list_images(self.root)
    if config.class_conditional:
      self.labels, self.classes = class_labels(self.paths)
    else:
      self.labels, self.classes = np.zeros(len(self.paths), np.int32), []
    self.size, self.channels, self.crop = config.image_size, config.channels, config.crop
    self.on_bad_image = config.on_bad_image
    self.skipped: list[str] = []
    self._bad: set[int] = set()
    self._pool = (
      concurrent.futures.ThreadPoolExecutor(config.num_workers) if config.num_workers > 1 else None
    )
    super().__init__(
      num_examples=len(self.paths),
      num_classes=len(self.classes),
      image_shape=(config.image_size, config.image_size, config.channels),
      global_batch_size=config.global_batch_size,
      process_index=process_index,
      process_count=process_count,
      seed=seed,
      shuffle=config.shuffle,
      random_flip=config.random_flip,
      num_epochs=config.num_epochs,
      drop_remainder=config.drop_remainder,
      prefetch=config.prefetch,
    )

  def path(self, i: int) -> str:
    return os.path.join(self.root, *self.paths[i].split("/"))

  def _load_one(self, i: int):
    if i in self._bad:
      return None
    try:
      return load_image(self.path(i), self.size, self.channels, self.crop)
    except BadImageError as e:
      if self.on_bad_image == "fail":
        raise
      return e

  def _gather(self, ids, flips):
    ids = ids.tolist()
    loaded = (
      list(self._pool.map(self._load_one, ids)) if self._pool else [self._load_one(i) for i in ids]
    )
    images, labels = [], []
    for i, image, flip in zip(ids, loaded, flips):
      if isinstance(image, BadImageError):
        self._bad.add(i)
        self.skipped.append(self.path(i))
        log.warning("Skipping an image that cannot be decoded (on_bad_image='skip'): %s", image)
        continue
      if image is None:
        continue
      images.append(image[:, ::-1] if flip else image)
      labels.append(self.labels[i])
    if not images:
      return np.zeros((0,) + self.image_shape, np.float32), np.zeros((0,), np.int32)
    return np.stack(images), np.asarray(labels, np.int32)

  def __del__(self):
    pool = getattr(self, "_pool", None)
    if pool is not None:
      pool.shutdown(wait=False, cancel_futures=True)
