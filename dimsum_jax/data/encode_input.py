"""The images of the encoding step: this process's part of an image folder or a tfds split, in file
order, decoded and cropped by threads ahead of the device.

`decode_image(path or encoded bytes, size, crop, name)` -> uint8 [size, size, 3] (crop: adm |
resize_center | none, dimsum_jax.data.crop), or BadImageError naming the image. `FolderImages`
and `TfdsImages` are the p-th of P contiguous parts of the sorted folder or of the split
(`even_parts`: sizes differ by at most one, the first n % P one larger, as tfds), with `offset`
(the part's first image in the whole set), `num_images`, `total_images`, `num_classes`, `source`
and `iterate(start) -> (position in the part, payload, label, name)`.

`decoded_batches` turns a stream into batches {pixels uint8 [b, size, size, 3], labels int32 [b],
positions int64 [b], names, bad, end} decoded by a thread pool; images that do not decode either
stop the step (on_bad_image='fail', EncodeError naming the file) or are left out and reported in
`bad` (on_bad_image='skip'). `Prefetch` runs such an iterator in a daemon thread, batches ahead.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import queue
import threading
from typing import Any, Iterator

import numpy as np
from PIL import Image

from dimsum_jax.data.crop import crop_pil
from dimsum_jax.data.image_folder import BadImageError, class_labels, list_images
from dimsum_jax.data.latent_parts import EncodeError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Images: one decode function and two ordered streams (image folder, tfds)


def decode_image(source, size: int, crop: str, name: str) -> np.ndarray:
  """A file path or encoded bytes -> uint8 [size, size, 3]; BadImageError naming `name`."""
  try:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
      image = image.convert("RGB")
  except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError...)
    raise BadImageError(f"Cannot decode image {name}: {type(e).__name__}: {e}") from e
  try:
    return crop_pil(image, size, crop)
  except ValueError as e:
    raise EncodeError(f"{name}: {e}") from e


def even_parts(n: int, count: int) -> list[int]:
  """Sizes of `count` contiguous parts of n items, the first n % count one larger (as tfds)."""
  base, extra = divmod(n, count)
  return [base + (i < extra) for i in range(count)]


class FolderImages:
  """This process's contiguous part of a sorted image folder."""

  def __init__(self, root: str, class_conditional: bool, process_index: int, process_count: int):
    try:
      paths = list_images(root)
      labels, classes = (
        class_labels(paths) if class_conditional else (np.zeros(len(paths), np.int32), [])
      )
    except (FileNotFoundError, ValueError) as e:
      raise EncodeError(
        str(e)
        .replace("config.data.data_dir", "--data_dir")
        .replace("set class_conditional=False", "leave out --class_conditional")
      ) from e
    sizes = even_parts(len(paths), process_count)
    self.offset = sum(sizes[:process_index])
    self.num_images = sizes[process_index]
    self.total_images = len(paths)
    self.num_classes = len(classes)
    self.source = f"image_folder:{os.path.basename(os.path.abspath(root))}"
    self._root = root
    self._paths = paths[self.offset : self.offset + self.num_images]
    self._labels = labels[self.offset : self.offset + self.num_images]

  def iterate(self, start: int) -> Iterator[tuple[int, Any, int, str]]:
    """(position in this part, path, label, name) from position `start` on."""
    for pos in range(start, self.num_images):
      path = os.path.join(self._root, *self._paths[pos].split("/"))
      yield pos, path, int(self._labels[pos]), path


class TfdsImages:
  """This process's contiguous part of a tfds split, undecoded, in file order."""

  def __init__(
    self,
    dataset: str,
    data_dir: str,
    split: str,
    tfds_name: str,
    image_size: int,
    class_conditional: bool,
    process_index: int,
    process_count: int,
  ):
    from dimsum_jax.data import tfds_images  # pylint: disable=g-import-not-at-top

    name = tfds_name or tfds_images.TFDS_NAMES[dataset].format(image_size=image_size)
    tf, tfds = tfds_images.import_tensorflow(name)
    del tf
    self._tfds = tfds
    self._builder = tfds.builder(name, data_dir=data_dir or None)
    if not self._builder.is_prepared():
      where = data_dir or "the tfds default data_dir (~/tensorflow_datasets)"
      how = tfds_images.HOW_TO_PREPARE.get(
        dataset, "run `tfds build {tfds_name} --data_dir={data_dir}`"
      )
      how = how.format(data_dir=data_dir or "~/tensorflow_datasets", tfds_name=name)
      raise EncodeError(f"tfds dataset {name} is not prepared under {where}: {how}.")
    features = self._builder.info.features
    if class_conditional and "label" not in features:
      raise EncodeError(f"tfds dataset {name} has no labels: leave out --class_conditional.")
    self._conditional = class_conditional
    self.num_classes = int(features["label"].num_classes) if class_conditional else 0
    self._has_file_name = "file_name" in features
    try:
      self._parts = tfds.even_splits(split, n=process_count)
      sizes = [int(self._builder.info.splits[s].num_examples) for s in self._parts]
    except (KeyError, ValueError) as e:
      raise EncodeError(
        f"tfds dataset {name} has no split {split!r} "
        f"(it has {sorted(self._builder.info.splits)}): set --split."
      ) from e
    self._part = self._parts[process_index]
    self.offset = sum(sizes[:process_index])
    self.num_images = sizes[process_index]
    self.total_images = sum(sizes)
    self.source = f"{dataset}:{split}" if not tfds_name else f"{tfds_name}:{split}"
    self._name = name

  def iterate(self, start: int) -> Iterator[tuple[int, Any, int, str]]:
    """(position in this part, encoded bytes, label, name) from position `start` on."""
    tfds = self._tfds
    read_config = tfds.ReadConfig(try_autocache=False)
    ds = self._builder.as_dataset(
      split=self._part,
      shuffle_files=False,
      read_config=read_config,
      decoders={"image": tfds.decode.SkipDecoding()},
    )
    ds = ds.skip(start).prefetch(64)
    for pos, example in enumerate(ds.as_numpy_iterator(), start):
      label = int(example["label"]) if self._conditional else 0
      if self._has_file_name:
        name = f"{self._name} {example['file_name'].decode()}"
      else:
        name = f"{self._name} example {self.offset + pos}"
      yield pos, example["image"], label, name


# ---------------------------------------------------------------------------------------------
# Host side: decoding threads ahead of the device


def decoded_batches(
  stream, start: int, batch_size: int, size: int, crop: str, on_bad_image: str, pool
) -> Iterator[dict]:
  """Batches of decoded images from position `start`: pixels, labels, positions, names and the
  (position, name, error) of images that could not be decoded (on_bad_image='skip')."""
  records = stream.iterate(start)
  while True:
    chunk = list(itertools.islice(records, batch_size))
    if not chunk:
      return
    futures = [
      pool.submit(decode_image, payload, size, crop, name) for _, payload, _, name in chunk
    ]
    pixels, labels, positions, names, bad = [], [], [], [], []
    for (pos, _, label, name), future in zip(chunk, futures):
      try:
        image = future.result()
      except BadImageError as e:
        if on_bad_image == "fail":
          raise EncodeError(
            f"{e}; remove or replace the file, or pass --on_bad_image=skip to leave it out."
          ) from e
        log.warning("Skipping an image that cannot be decoded (--on_bad_image=skip): %s", e)
        bad.append({"position": pos, "name": name, "error": str(e)})
        continue
      pixels.append(image)
      labels.append(label)
      positions.append(pos)
      names.append(name)
    yield {
      "pixels": np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8),
      "labels": np.asarray(labels, np.int32),
      "positions": np.asarray(positions, np.int64),
      "names": names,
      "bad": bad,
      "end": chunk[-1][0] + 1,
    }


class Prefetch:
  """Runs an iterator in a daemon thread, `size` items ahead; re-raises its errors."""

  _END = object()

  def __init__(self, iterator, size: int):
    self._queue = queue.Queue(maxsize=max(1, size))
    self._stop = threading.Event()

    def work():
      try:
        for item in iterator:
          if not self._put(item):
            return
        self._put(self._END)
      except BaseException as e:  # pylint: disable=broad-except
        self._put(e)

    self._thread = threading.Thread(target=work, daemon=True, name="dimsum-encode-decode")
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def __iter__(self):
    while True:
      item = self._queue.get()
      if item is self._END:
        return
      if isinstance(item, BaseException):
        raise item
      yield item

  def close(self):
    self._stop.set()
    self._thread.join()
