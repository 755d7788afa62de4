"""The iterator contract every dataset follows, and its in-memory / random-access implementation.

A `DataSource` is an endless (or `num_epochs`-long) iterator over THIS process's share of each
global batch:

  {"image": float32 [b_local, H, W, C], "label": int32 [b_local]},   b_local = global // processes

"image" holds pixels in [-1, 1] or VAE latents already multiplied by the scaling factor; "label"
is the class id, or 0 everywhere for unconditional sets (num_classes == 0).

Order. Each process owns a fixed, disjoint part of the examples (`process_split`: every
process_count-th example, all parts the same size, so at most process_count - 1 examples are never
read). Every epoch visits that part in a permutation drawn from (seed, epoch, process_index).
Batches run on across epoch boundaries: one batch may hold the last examples of epoch e and the
first of epoch e + 1, so no example is dropped at an epoch's end.

State. `get_state()` is {"epoch": e, "index": i}: the next example is position i of epoch e's
permutation. It counts examples, not batches, and is the same on every process (all parts have
the same size), so saving process 0's state is enough. `set_state` on a fresh source built with
the same config, seed and process layout continues the stream exactly where it stopped.
"""

from __future__ import annotations

import abc
import queue
import threading
from typing import Any, Iterator

import numpy as np

Batch = dict[str, np.ndarray]


def epoch_rng(seed: int, epoch: int, process_index: int) -> np.random.Generator:
  """The generator for one epoch of one process: independent of everything else that was drawn."""
  return np.random.default_rng([int(seed), int(epoch), int(process_index)])


def process_split(num_examples: int, process_index: int, process_count: int) -> np.ndarray:
  """Example ids owned by one process: process_index, process_index + P, ...; equal sizes."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  per_process = num_examples // process_count
  if per_process == 0:
    raise ValueError(f"{num_examples} examples cannot be split over {process_count} processes.")
  return process_index + process_count * np.arange(per_process, dtype=np.int64)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size {global_batch_size} is not divisible by the {process_count} processes."
    )
  return global_batch_size // process_count


class DataSource(abc.ABC):
  """What training consumes. Subclasses set the metadata fields in __init__."""

  num_classes: int  # 0 for unconditional sets
  image_shape: tuple  # (H, W, C) of one "image" entry
  num_examples: int  # examples in the whole split, all processes together
  local_batch_size: int  # rows per yielded batch (the last one may be short if finite)
  process_index: int
  process_count: int

  def __iter__(self) -> Iterator[Batch]:
    return self

  @abc.abstractmethod
  def __next__(self) -> Batch: ...

  @abc.abstractmethod
  def get_state(self) -> dict[str, int]: ...

  @abc.abstractmethod
  def set_state(self, state: dict[str, int]) -> None: ...

  def close(self) -> None:
    """Stops background work; the source can still be restarted with set_state."""

  @property
  def examples_per_process(self) -> int:
    return self.num_examples // self.process_count

  @property
  def steps_per_epoch(self) -> float:
    """Batches per pass over this process's part (fractional: batches straddle epochs)."""
    return self.examples_per_process / self.local_batch_size

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _check_state(state: dict[str, Any]) -> tuple[int, int]:
  try:
    epoch, index = int(state["epoch"]), int(state["index"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(
      f"A data state needs integer 'epoch' and 'index' entries, got {state!r}."
    ) from e
  if epoch < 0 or index < 0:
    raise ValueError(f"A data state cannot be negative, got {state!r}.")
  return epoch, index


class _Stop:
  """End-of-stream marker passed through the prefetch queue."""


class IndexedSource(DataSource):
  """A source whose examples can be loaded by id: in-memory arrays, memory maps, image files.

  Subclasses implement `_gather(ids, flips)`. Flips are drawn per epoch with the permutation, so
  they are part of the deterministic stream too.
  """

  def __init__(
    self,
    *,
    num_examples: int,
    num_classes: int,
    image_shape: tuple,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    seed: int,
    shuffle: bool = True,
    random_flip: bool = False,
    num_epochs: int = 0,
    drop_remainder: bool = True,
    prefetch: int = 0,
  ):
    self.num_examples = int(num_examples)
    self.num_classes = int(num_classes)
    self.image_shape = tuple(int(s) for s in image_shape)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.local_batch_size = local_batch_size(global_batch_size, process_count)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.random_flip = bool(random_flip)
    self.num_epochs = int(num_epochs)  # 0: repeat forever
    self.drop_remainder = bool(drop_remainder)
    self.prefetch = int(prefetch)
    self._ids = process_split(self.num_examples, self.process_index, self.process_count)
    self._state = (0, 0)
    self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
    self._producer: Iterator | None = None
    self._thread: threading.Thread | None = None
    self._queue: queue.Queue | None = None
    self._stop = threading.Event()

  # ---- order -------------------------------------------------------------------------------
  def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(example ids, flip flags) in the order epoch `epoch` visits them on this process."""
    cached = self._epoch_cache  # one read: the prefetch thread may replace it
    if cached is not None and cached[0] == epoch:
      return cached[1], cached[2]
    n = len(self._ids)
    rng = epoch_rng(self.seed, epoch, self.process_index)
    order = rng.permutation(n) if self.shuffle else np.arange(n)
    flips = rng.random(n) < 0.5 if self.random_flip else np.zeros(n, bool)
    self._epoch_cache = (epoch, self._ids[order], flips)
    return self._ids[order], flips

  # ---- loading -----------------------------------------------------------------------------
  @abc.abstractmethod
  def _gather(self, ids: np.ndarray, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images [k, H, W, C] float32, labels [k] int32) for the usable ones of `ids`, in order.

    k < len(ids) when some examples are unusable (a corrupt file): the subclass reports them and
    the stream goes on with the next ids, so the skip is deterministic too.
    """

  def _batches(self, epoch: int, index: int) -> Iterator[tuple[Batch, tuple[int, int]]]:
    """Yields (batch, state after it), starting from position `index` of epoch `epoch`."""
    b, n = self.local_batch_size, len(self._ids)
    unusable_run = 0
    while True:
      images, labels, have = [], [], 0
      while have < b and not (self.num_epochs and epoch >= self.num_epochs):
        ids, flips = self.epoch_order(epoch)
        take = min(b - have, n - index)
        x, y = self._gather(ids[index : index + take], flips[index : index + take])
        images.append(x)
        labels.append(y)
        have += len(y)
        index += take
        unusable_run = 0 if len(y) else unusable_run + take
        if unusable_run >= n:
          raise RuntimeError(
            f"None of the {n} examples of process {self.process_index} can be "
            "loaded; see the warnings above for their paths."
          )
        if index == n:
          epoch, index = epoch + 1, 0
      if have == 0 or (have < b and self.drop_remainder):
        return
      batch = {
        "image": images[0] if len(images) == 1 else np.concatenate(images),
        "label": labels[0] if len(labels) == 1 else np.concatenate(labels),
      }
      yield batch, (epoch, index)

  # ---- iteration, with an optional background thread ----------------------------------------
  def _start(self) -> None:
    self._producer = self._batches(*self._state)
    if self.prefetch <= 0:
      return
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=self.prefetch)
    producer, out, stop = self._producer, self._queue, self._stop

    def work():
      try:
        for item in producer:
          while not stop.is_set():
            try:
              out.put(item, timeout=0.1)
              break
            except queue.Full:
              pass
          if stop.is_set():
            return
        item = _Stop()
      except BaseException as e:  # re-raised in the consumer
        item = e
      while not stop.is_set():
        try:
          out.put(item, timeout=0.1)
          return
        except queue.Full:
          pass

    self._thread = threading.Thread(target=work, daemon=True, name="dimsum-data-prefetch")
    self._thread.start()

  def __next__(self) -> Batch:
    if self._producer is None:
      self._start()
    if self._queue is None:
      batch, self._state = next(self._producer)
      return batch
    item = self._queue.get()
    if isinstance(item, _Stop):
      self._queue.put(item)
      raise StopIteration
    if isinstance(item, BaseException):
      self._queue.put(item)
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> dict[str, int]:
    return {"epoch": self._state[0], "index": self._state[1]}

  def set_state(self, state: dict[str, int]) -> None:
    epoch, index = _check_state(state)
    if index >= len(self._ids):
      raise ValueError(
        f"Data state index {index} is past this process's {len(self._ids)} "
        "examples; was it saved with another dataset or process count?"
      )
    self.close()
    self._state = (epoch, index)

  def close(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
    self._thread, self._queue, self._producer = None, None, None
