"""Latent shards: VAE latents written once by the encoding step and read by training. Pure NumPy.

A latent set is a directory:

  meta.json                          written last and atomically: its presence means "complete"
  latents-00000-of-00012.npy ...     float32 (or float16) [n, h, w, c], NHWC, memory-mappable
  labels-00000-of-00012.npy  ...     int32 [n]  (all 0 for unconditional sets)

meta.json (FORMAT, version 1):
  format          "dimsum_jax.latents"
  version         1
  latent_shape    [h, w, c] of one example, NHWC (the SD VAE at 256 px: [32, 32, 4])
  dtype           "float32" or "float16", as stored
  scaled          true: stored values are posterior samples already multiplied by scaling_factor
                  (what the model trains on); false: raw samples, the reader multiplies
  scaling_factor  0.18215 for the SD VAE (decode divides by it)
  num_examples    total rows over all shards
  num_classes     0 for unconditional sets
  source          e.g. "imagenet2012:train"
  image_size      pixel size the latents were encoded from (0: unknown)
  flip_doubled    true when the set also holds the horizontal mirror of every image (then
                  num_examples is twice the image count; training must not flip latents)
  vae             e.g. "stabilityai/sd-vae-ft-ema"
  extra           free-form dict (layout notes, encoder seed, ...)
  shards          [{"latents": file, "labels": file, "num_examples": n}, ...] in order

While a set is being written there is no meta.json; completed shards are named without the
"-of-" part (latents-00003.npy) and listed in progress.json, which is replaced atomically after
every shard. Re-opening the directory with LatentShardWriter continues after the last complete
shard: `num_written` tells the encoder how many examples of its (deterministic) input to skip.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from dimsum_jax import io_utils
from dimsum_jax.data.source import IndexedSource

FORMAT = "dimsum_jax.latents"
VERSION = 1
META = "meta.json"
PROGRESS = "progress.json"
DTYPES = ("float32", "float16")
SD_VAE_SCALING = 0.18215
# Fields that must agree when a partial set is re-opened.
IDENTITY = (
  "latent_shape",
  "dtype",
  "scaled",
  "scaling_factor",
  "num_classes",
  "source",
  "image_size",
  "flip_doubled",
  "vae",
)


class LatentSetError(ValueError):
  """A latent set that is missing, incomplete, or does not fit the config."""


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
  io_utils.atomic_write(path, lambda f: np.save(f, array))


def _shard_names(k: int, total: int | None) -> tuple[str, str]:
  suffix = f"{k:05d}.npy" if total is None else f"{k:05d}-of-{total:05d}.npy"
  return f"latents-{suffix}", f"labels-{suffix}"


class LatentShardWriter:
  """Appends batches of latents and labels; `finalize()` makes the set readable.

    with LatentShardWriter(out_dir, latent_shape=(32, 32, 4), num_classes=1000,
                           source="imagenet2012:train", image_size=256, flip_doubled=True,
                           vae="stabilityai/sd-vae-ft-ema") as writer:
      for batch in input_stream_skipping(writer.num_written):
        writer.append(encode(batch) * 0.18215, batch["label"])
    # leaving the block without an exception calls finalize()

  Only complete shards survive a crash; the rows of the open shard are encoded again.
  """

  def __init__(
    self,
    directory: str,
    *,
    latent_shape,
    num_classes: int = 0,
    source: str = "",
    image_size: int = 0,
    flip_doubled: bool = False,
    vae: str = "",
    scaled: bool = True,
    scaling_factor: float = SD_VAE_SCALING,
    dtype: str = "float32",
    shard_size: int = 8192,
    extra: dict | None = None,
  ):
    if dtype not in DTYPES:
      raise ValueError(f"Latent dtype {dtype!r} is not one of {DTYPES}.")
    if shard_size <= 0:
      raise ValueError("shard_size must be positive.")
    self.directory = directory
    self.shard_size = int(shard_size)
    self.identity = {
      "latent_shape": [int(s) for s in latent_shape],
      "dtype": dtype,
      "scaled": bool(scaled),
      "scaling_factor": float(scaling_factor),
      "num_classes": int(num_classes),
      "source": str(source),
      "image_size": int(image_size),
      "flip_doubled": bool(flip_doubled),
      "vae": str(vae),
    }
    self.extra = dict(extra or {})
    self.shards: list[dict] = []
    self._latents: list[np.ndarray] = []
    self._labels: list[np.ndarray] = []
    self._buffered = 0
    self.finalized = False
    if os.path.exists(os.path.join(directory, META)):
      raise LatentSetError(
        f"Latent set {directory} is already complete (meta.json exists); "
        "write a new set to another directory or delete this one."
      )
    os.makedirs(directory, exist_ok=True)
    progress = os.path.join(directory, PROGRESS)
    if os.path.exists(progress):
      with open(progress) as f:
        state = json.load(f)
      for key in IDENTITY:
        if state[key] != self.identity[key]:
          raise LatentSetError(
            f"Partial latent set {directory} was started with {key}={state[key]!r}, not "
            f"{self.identity[key]!r}; resume it with the same settings or use a new directory."
          )
      self.shards = state["shards"]
      for k in range(len(self.shards)):
        if self._locate(k)[0] is None:
          raise LatentSetError(
            f"Partial latent set {directory} lists shard {k} in progress.json "
            "but its file is gone; delete the directory and encode again."
          )
    self.resumed_from = self.num_written

  @property
  def num_written(self) -> int:
    """Examples in complete shards (durable); the encoder resumes its input after these."""
    return sum(s["num_examples"] for s in self.shards)

  @property
  def num_appended(self) -> int:
    """Durable plus buffered examples."""
    return self.num_written + self._buffered

  def _locate(self, k: int) -> tuple[str | None, str | None]:
    for name in (
      _shard_names(k, None)[0],
      *sorted(
        os.path.basename(p)
        for p in glob.glob(os.path.join(self.directory, f"latents-{k:05d}-of-*.npy"))
      ),
    ):
      labels = "labels" + name[len("latents") :]
      if os.path.exists(os.path.join(self.directory, name)) and os.path.exists(
        os.path.join(self.directory, labels)
      ):
        return name, labels
    return None, None

  def append(self, latents, labels=None) -> None:
    if self.finalized:
      raise LatentSetError("This latent set is finalized; open a new writer.")
    latents = np.asarray(latents)
    shape = tuple(self.identity["latent_shape"])
    if latents.ndim != 4 or latents.shape[1:] != shape:
      raise LatentSetError(
        f"Latents of shape {latents.shape} do not match this set's "
        f"[n, {', '.join(map(str, shape))}] (NHWC)."
      )
    n = latents.shape[0]
    labels = np.zeros(n, np.int32) if labels is None else np.asarray(labels).astype(np.int32)
    if labels.shape != (n,):
      raise LatentSetError(f"Labels of shape {labels.shape} do not match {n} latents.")
    k = self.identity["num_classes"]
    if n and (labels.min() < 0 or (k and labels.max() >= k) or (not k and labels.any())):
      raise LatentSetError(
        f"Labels must lie in [0, {max(k, 1)}), got [{labels.min()}, {labels.max()}]."
      )
    self._latents.append(latents.astype(self.identity["dtype"]))
    self._labels.append(labels)
    self._buffered += n
    while self._buffered >= self.shard_size:
      self._flush(self.shard_size)

  def _flush(self, count: int) -> None:
    latents = np.concatenate(self._latents)
    labels = np.concatenate(self._labels)
    k = len(self.shards)
    lat_name, lab_name = _shard_names(k, None)
    _save_npy_atomic(os.path.join(self.directory, lab_name), labels[:count])
    _save_npy_atomic(os.path.join(self.directory, lat_name), latents[:count])
    self.shards.append({"latents": lat_name, "labels": lab_name, "num_examples": int(count)})
    io_utils.write_json(
      os.path.join(self.directory, PROGRESS), {**self.identity, "shards": self.shards}
    )
    self._latents, self._labels = [latents[count:]], [labels[count:]]
    self._buffered -= count

  def finalize(self) -> dict:
    """Writes the last short shard, gives shards their final names, writes meta.json."""
    if self.finalized:
      raise LatentSetError("This latent set is already finalized.")
    if self._buffered:
      self._flush(self._buffered)
    if not self.shards:
      raise LatentSetError(f"Latent set {self.directory} has no examples to finalize.")
    total = len(self.shards)
    for k, shard in enumerate(self.shards):
      final = _shard_names(k, total)
      for have, want in zip(self._locate(k), final):
        if have != want:
          os.replace(os.path.join(self.directory, have), os.path.join(self.directory, want))
      shard["latents"], shard["labels"] = final
    meta = {
      "format": FORMAT,
      "version": VERSION,
      **self.identity,
      "num_examples": self.num_written,
      "extra": self.extra,
      "shards": self.shards,
    }
    io_utils.write_json(os.path.join(self.directory, META), meta)
    os.remove(os.path.join(self.directory, PROGRESS))
    self.finalized = True
    return meta

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None and not self.finalized:
      self.finalize()


def read_meta(directory: str) -> dict:
  """meta.json of a complete set, or LatentSetError saying what is missing."""
  path = os.path.join(directory, META)
  if not os.path.exists(path):
    progress = os.path.join(directory, PROGRESS)
    if os.path.exists(progress):
      with open(progress) as f:
        n = sum(s["num_examples"] for s in json.load(f)["shards"])
      raise LatentSetError(
        f"Latent set {directory} is incomplete ({n} examples written, no "
        "meta.json); re-run the encoding step, which resumes and finalizes it."
      )
    raise LatentSetError(
      f"No latent set at {directory} (meta.json is missing); create one with "
      "the VAE encoding step, which writes meta.json and latents-*.npy there."
    )
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise LatentSetError(f"{path} is not a {FORMAT} version {VERSION} file.")
  return meta


def check_meta(meta: dict, config, directory: str = "") -> None:
  """One sentence when the set does not fit config.data (shape, classes, flips)."""
  want = [config.image_size, config.image_size, config.channels]
  if list(meta["latent_shape"]) != want:
    raise LatentSetError(
      f"Latent set {directory} holds latents of shape {meta['latent_shape']} (h, w, c) but "
      f"config.data asks for image_size={config.image_size}, channels={config.channels} "
      f"({want}); point data_dir at a matching set or change the config."
    )
  if config.class_conditional and not meta["num_classes"]:
    raise LatentSetError(
      f"Latent set {directory} is unconditional (num_classes 0) but "
      "config.data.class_conditional is True."
    )
  if config.random_flip:
    raise LatentSetError(
      "config.data.random_flip would flip latents, which is not a flip of the "
      "image; encode a flip_doubled set instead and set random_flip=False."
    )


class LatentSource(IndexedSource):
  """A finished latent set, memory-mapped; rows are read only when a batch needs them."""

  def __init__(self, config, *, process_index: int, process_count: int, seed: int):
    self.directory = config.data_dir
    self.meta = meta = read_meta(self.directory)
    check_meta(meta, config, self.directory)
    self.latents, self.labels = [], []
    for shard in meta["shards"]:
      lat = np.load(
        os.path.join(self.directory, shard["latents"]), mmap_mode="r", allow_pickle=False
      )
      lab = np.load(
        os.path.join(self.directory, shard["labels"]), mmap_mode="r", allow_pickle=False
      )
      n = shard["num_examples"]
      if lat.shape != (n, *meta["latent_shape"]) or lab.shape != (n,):
        raise LatentSetError(
          f"Shard {shard['latents']} of {self.directory} holds {lat.shape} and "
          f"{lab.shape}, but meta.json promises {n} rows of "
          f"{meta['latent_shape']}; the set is damaged, encode it again."
        )
      self.latents.append(lat)
      self.labels.append(lab)
    self.offsets = np.cumsum([0] + [s["num_examples"] for s in meta["shards"]])
    if self.offsets[-1] != meta["num_examples"]:
      raise LatentSetError(
        f"Latent set {self.directory}: shards hold {self.offsets[-1]} rows, "
        f"meta.json says {meta['num_examples']}."
      )
    self.scaling_factor = float(meta["scaling_factor"])
    self._scale = 1.0 if meta["scaled"] else self.scaling_factor
    self._conditional = bool(config.class_conditional)
    super().__init__(
      num_examples=meta["num_examples"],
      num_classes=meta["num_classes"] if config.class_conditional else 0,
      image_shape=tuple(meta["latent_shape"]),
      global_batch_size=config.global_batch_size,
      process_index=process_index,
      process_count=process_count,
      seed=seed,
      shuffle=config.shuffle,
      random_flip=False,
      num_epochs=config.num_epochs,
      drop_remainder=config.drop_remainder,
      prefetch=config.prefetch,
    )

  def _gather(self, ids, flips):
    del flips  # never set for latents (check_meta)
    shard = np.searchsorted(self.offsets, ids, side="right") - 1
    images = np.empty((len(ids), *self.image_shape), np.float32)
    labels = np.empty((len(ids),), np.int32)
    for s in np.unique(shard):
      rows = np.flatnonzero(shard == s)
      local = ids[rows] - self.offsets[s]
      order = np.argsort(local, kind="stable")  # read each shard front to back
      images[rows[order]] = self.latents[s][local[order]]
      labels[rows[order]] = self.labels[s][local[order]]
    if self._scale != 1.0:
      images *= np.float32(self._scale)
    if not self._conditional:
      labels[:] = 0
    return images, labels
