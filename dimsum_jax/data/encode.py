"""Encode an image set once into SD-VAE latents, in the latent-set format training reads.

  python -m dimsum_jax.data.encode --dataset=imagenet2012 --data_dir=$TFDS_DATA_DIR \
      --vae=$VAE --out=$LATENTS
  python -m dimsum_jax.data.encode --dataset=image_folder --data_dir=$IMAGES --vae=$VAE \
      --out=$LATENTS --image_size=256 [--class_conditional]

--dataset is imagenet2012, celeb_a_hq, lsun_church (tfds; see dimsum_jax.data.tfds_images for how
to prepare them) or image_folder; --vae is a VAE converted by `python -m dimsum_jax.vae.convert`.
As upstream's ImageNet latents (dimsum/datasets_prep), every image is ADM centre-cropped (CelebA-HQ
and LSUN: Resize + CenterCrop), scaled to [-1, 1] and encoded together with its horizontal mirror
(--noflip turns the mirror off), each as one posterior sample times 0.18215 (--mode=mean stores
the posterior mean instead).

Layout. With flips, row 2k of the set is the k-th usable image and row 2k + 1 its mirror (upstream
stores all originals first and the mirrors after them; training shuffles, so only the pairing
matters). The noise of a sampled latent depends only on (--seed, image index, mirror), so the set
does not depend on the batch size, the device count or where a run was resumed.

Processes and devices. Process p of P encodes the p-th contiguous part of the images (parts differ
in size by at most one) into OUT/part-0000p-of-0000P/, a latent set of its own written by
LatentShardWriter; its batch is split over its local devices by one jitted function. Processes are
found by JAX's distributed runtime (as in training), or named by --process_index/--process_count
for independent jobs sharing OUT.

Resume. Shards are written atomically; rerunning the same command skips the complete shards of
every part (images that could not be decoded are remembered in the part's skipped.json, written
before any later shard, so the position to resume from is exact). The settings of a run are kept
in the part's encode.json and a resume with other settings is refused.

Completion. When every part is complete, one verification pass reads every shard (row counts
against the image counts, shapes, labels in range, every value finite, SHA-256 of each file and
per-channel statistics), writes OUT/manifest.json and then OUT/meta.json, whose presence makes OUT
a finished latent set (dimsum_jax.data.latents) listing the shards of all parts.

Bad images (a file PIL cannot decode) are reported with their path: --on_bad_image=fail (default)
stops, --on_bad_image=skip logs a warning, leaves the image out and lists it in the manifest.
"""

from __future__ import annotations

import concurrent.futures
import functools
import glob
import hashlib
import io
import itertools
import json
import logging
import os
import queue
import re
import sys
import threading
import time
from typing import Any, Iterator

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from dimsum_jax import command_line
from dimsum_jax import io_utils
from dimsum_jax.data import latents as latents_lib
from dimsum_jax.data.crop import crop_pil
from dimsum_jax.data.image_folder import BadImageError, class_labels, list_images

log = logging.getLogger(__name__)

DATASETS = ("imagenet2012", "celeb_a_hq", "lsun_church", "image_folder")
# Upstream's crop per dataset: ADM's centre crop for ImageNet, torchvision Resize + CenterCrop for
# CelebA-HQ and LSUN (crop.py).
DEFAULT_CROP = {
  "imagenet2012": "adm",
  "celeb_a_hq": "resize_center",
  "lsun_church": "resize_center",
  "image_folder": "adm",
}
MODES = ("sample", "mean")
COMPUTE_DTYPES = ("float32", "bfloat16")
SETTINGS = "encode.json"
SKIPPED = "skipped.json"
MANIFEST = "manifest.json"
_PART = re.compile(r"^part-(\d{5})-of-(\d{5})$")
# Settings that change the stored values: a resumed part must have been started with the same.
_RESUME_KEYS = (
  "dataset",
  "split",
  "tfds_name",
  "image_size",
  "crop",
  "class_conditional",
  "flip",
  "mode",
  "seed",
  "dtype",
  "latent_dtype",
  "shard_size",
  "vae_name",
)


class EncodeError(ValueError):
  """A setting, input or output directory that the user fixes; the message says how."""


def default_config() -> dict[str, Any]:
  """Every setting of the encoding step with its default (the CLI flags have the same names)."""
  return dict(
    dataset="imagenet2012",  # one of DATASETS
    data_dir="",  # tfds data_dir ('' = tfds default) or the image folder
    split="train",  # tfds split; slicing allowed ("train[:120000]")
    tfds_name="",  # '' = the usual builder for the dataset (tfds_images.TFDS_NAMES)
    vae="",  # a converted VAE directory (python -m dimsum_jax.vae.convert)
    out="",  # the latent set directory to write
    image_size=256,  # pixels; latents are image_size / 8 for the SD VAE
    crop="",  # adm | resize_center | none; '' = the dataset's (DEFAULT_CROP)
    class_conditional=None,  # None: True for imagenet2012, else False (image_folder: subfolders)
    flip=True,  # also encode the horizontal mirror of every image
    mode="sample",  # sample: one posterior sample (upstream); mean: the posterior mean
    seed=0,  # noise of the posterior samples
    dtype="float32",  # VAE compute dtype (float32 as upstream, or bfloat16)
    latent_dtype="float32",  # stored dtype (float32 or float16)
    batch_size=0,  # images per step of this process; 0 = 32 per local device
    shard_size=8192,  # latent rows per shard file (even when flip is on)
    on_bad_image="fail",  # fail | skip
    num_workers=0,  # decoding threads; 0 = the CPU count (at most 32)
    prefetch=4,  # batches decoded ahead
    log_every_s=30.0,  # progress line period
    process_index=None,  # None: from the JAX distributed runtime
    process_count=None,
  )


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
      how = tfds_images._HOW_TO_PREPARE.get(  # pylint: disable=protected-access
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
# The encoder: one jitted function over the local devices


@functools.lru_cache(maxsize=8)  # resumed or repeated runs in one process reuse the compile
def make_encode_fn(vae, mesh, *, mode: str, seed: int, flip: bool, out_dtype="float32"):
  """jit(fn(params, pixels uint8 [b, H, W, 3], ids int32 [b])) -> scaled latents.

  Rows come out as [image 0, mirror 0, image 1, mirror 1, ...] with flip, else one per image;
  mode 'sample' draws the noise of row (id, mirror) from fold_in(fold_in(key(seed), id), mirror).
  The batch is split over the mesh's devices (sharding.batch_sharding); the parameters are
  replicated.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dimsum_jax import sharding  # pylint: disable=g-import-not-at-top
  from dimsum_jax.vae import model  # pylint: disable=g-import-not-at-top

  if mode not in MODES:
    raise EncodeError(f"--mode is {mode!r}; choose one of {MODES}.")
  batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  key = jax.random.key(seed)

  def fn(params, pixels, ids):
    images = pixels.astype(jnp.float32) / 127.5 - 1.0  # crop.to_unit_range
    mirrors = jnp.zeros_like(ids)
    if flip:
      images = jnp.stack([images, images[:, :, ::-1]], axis=1).reshape(-1, *images.shape[1:])
      ids = jnp.repeat(ids, 2)
      mirrors = jnp.tile(jnp.asarray([0, 1], ids.dtype), pixels.shape[0])
    mean, logvar = model.encode(vae, params, images)
    if mode == "mean":
      z = mean
    else:

      def noise(i, m):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), m), mean.shape[1:])

      z = mean + jnp.exp(0.5 * logvar) * jax.vmap(noise)(ids, mirrors)
    return (z * model.SCALING_FACTOR).astype(out_dtype)

  return jax.jit(fn, in_shardings=(replicated, batch, batch), out_shardings=batch)


def local_mesh():
  """The training mesh (sharding.make_mesh) over this process's devices only, every device on
  the batch: processes encode independently."""
  import jax  # pylint: disable=g-import-not-at-top
  from dimsum_jax import sharding  # pylint: disable=g-import-not-at-top

  return sharding.make_mesh({"data": -1, "fsdp": 1}, devices=jax.local_devices())


def load_encoder_vae(directory: str, dtype: str, mesh):
  """(module, replicated params, name) of a converted VAE, or EncodeError in one sentence."""
  import jax  # pylint: disable=g-import-not-at-top
  from dimsum_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top

  if dtype not in COMPUTE_DTYPES:
    raise EncodeError(f"--dtype is {dtype!r}; choose one of {COMPUTE_DTYPES}.")
  try:
    module, params = vae_lib.load_vae(
      directory, dtype=dtype, sharding=jax.sharding.NamedSharding(mesh, jax.P())
    )
  except (FileNotFoundError, ValueError) as e:
    raise EncodeError(f"--vae: {e}") from e
  with open(os.path.join(directory, vae_lib.checkpoint.CONFIG_FILE)) as f:
    name = json.load(f).get("_name_or_path") or ""
  return module, params, name or os.path.basename(os.path.abspath(directory))


# ---------------------------------------------------------------------------------------------
# Host side: decoding threads ahead of the device


def _decoded_batches(
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


class _Prefetch:
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


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


# ---------------------------------------------------------------------------------------------
# One process's part


def part_name(process_index: int, process_count: int) -> str:
  return f"part-{process_index:05d}-of-{process_count:05d}"


def _write_json(path: str, obj) -> None:
  io_utils.write_json(path, obj)


def _read_json(path: str, default=None):
  if not os.path.exists(path):
    return default
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:  # not JSON (an interrupted write by hand, a damaged disk)
    raise EncodeError(
      f"{path} is not valid JSON ({e}): delete its part directory and run the encoding again."
    ) from e


def _load_shard(path: str, out: str) -> np.ndarray:
  """A shard .npy, memory-mapped and never unpickled (allow_pickle=False: an object array, whose
  loading could run code, is refused), or EncodeError naming it."""
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except  (missing, truncated, object arrays...)
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    raise EncodeError(
      f"Shard {os.path.relpath(path, out)} cannot be read as a numeric array "
      f"({type(e).__name__}: {reason}); delete its part and run the encoding "
      "again."
    ) from e


def _check_settings(out: str, part_dir: str, settings: dict, process_count: int) -> None:
  """Refuses to mix parts of another process count or a part started with other settings."""
  for path in glob.glob(os.path.join(out, "part-*-of-*")):
    match = _PART.match(os.path.basename(path))
    if match and int(match.group(2)) != process_count:
      raise EncodeError(
        f"{out} holds parts of an encoding with {int(match.group(2))} processes "
        f"({os.path.basename(path)}), not {process_count}: resume with "
        f"{int(match.group(2))} processes or write to a new --out directory."
      )
  previous = _read_json(os.path.join(part_dir, SETTINGS))
  if previous is None:
    return
  for key in _RESUME_KEYS:
    if previous.get(key) != settings[key]:
      raise EncodeError(
        f"{part_dir} was started with {key}={previous.get(key)!r}, not "
        f"{settings[key]!r}: resume with the same settings or write to a new "
        "--out directory."
      )


def _resume_position(good_images: int, skipped_positions) -> int:
  """Stream position after the `good_images`-th usable image, stepping over known bad ones."""
  position = good_images
  for s in sorted(skipped_positions):
    if s < position:
      position += 1
    else:
      break
  return position


def encode_part(
  config: dict, stream, vae, params, vae_name: str, mesh, part_dir: str, batch_size: int
) -> dict:
  """Encodes this process's images into `part_dir` (resuming there); returns the part's meta."""
  c = config
  if os.path.exists(os.path.join(part_dir, latents_lib.META)):
    log.info("%s is already complete.", part_dir)
    return latents_lib.read_meta(part_dir)
  mult = 2 if c["flip"] else 1
  factor = vae.downsampling_factor
  latent_shape = (c["image_size"] // factor, c["image_size"] // factor, vae.latent_channels)
  skipped = _read_json(os.path.join(part_dir, SKIPPED), {"skipped": []})["skipped"]
  os.makedirs(part_dir, exist_ok=True)
  _write_json(os.path.join(part_dir, SETTINGS), {k: c[k] for k in _RESUME_KEYS})
  writer = latents_lib.LatentShardWriter(
    part_dir,
    latent_shape=latent_shape,
    num_classes=stream.num_classes,
    source=stream.source,
    image_size=c["image_size"],
    flip_doubled=c["flip"],
    vae=vae_name,
    scaled=True,
    scaling_factor=latents_lib.SD_VAE_SCALING,
    dtype=c["latent_dtype"],
    shard_size=c["shard_size"],
  )
  if writer.num_written % mult:
    raise EncodeError(
      f"{part_dir} holds an odd number of rows with flips on; it is damaged: "
      "delete the directory and encode again."
    )
  start = _resume_position(writer.num_written // mult, [s["position"] for s in skipped])
  if start:
    log.info(
      "Resuming %s at image %d of %d (%d latents in complete shards).",
      part_dir,
      start,
      stream.num_images,
      writer.num_written,
    )

  encode = make_encode_fn(
    vae, mesh, mode=c["mode"], seed=c["seed"], flip=c["flip"], out_dtype=c["latent_dtype"]
  )
  import jax  # pylint: disable=g-import-not-at-top
  from dimsum_jax import sharding  # pylint: disable=g-import-not-at-top

  batch_sharding = sharding.batch_sharding(mesh)
  known_bad = {s["position"] for s in skipped}
  workers = c["num_workers"] or min(32, os.cpu_count() or 1)
  pool = concurrent.futures.ThreadPoolExecutor(workers)
  batches = _Prefetch(
    _decoded_batches(
      stream, start, batch_size, c["image_size"], c["crop"], c["on_bad_image"], pool
    ),
    c["prefetch"],
  )
  pending = None
  t0 = last_log = time.monotonic()
  first = [None]  # (time, position) when the first batch was retired

  def retire(item):
    """Fetches a finished batch from the devices and appends its rows to the shards."""
    nonlocal last_log
    batch, device_latents = item
    rows = len(batch["labels"]) * mult
    values = np.asarray(device_latents)[:rows]
    finite = np.isfinite(values).all(axis=(1, 2, 3))
    if not finite.all():
      name = batch["names"][int(np.flatnonzero(~finite)[0]) // mult]
      raise FloatingPointError(
        f"The VAE latents of {name} are not finite (NaN or inf); check the "
        "VAE weights, or encode with --dtype=float32."
      )
    writer.append(values, np.repeat(batch["labels"], mult))
    now = time.monotonic()
    if first[0] is None:  # the rate leaves out the first batch, which waited for the compile
      first[0] = (now, batch["end"])
    if now - last_log >= c["log_every_s"] or batch["end"] == stream.num_images:
      since, at = first[0] if batch["end"] > first[0][1] else (t0, start)
      rate = (batch["end"] - at) / max(now - since, 1e-9)
      left = stream.num_images - batch["end"]
      log.info(
        "%s: %d/%d images (%.1f%%), %.1f images/s, ETA %s",
        os.path.basename(part_dir),
        batch["end"],
        stream.num_images,
        100 * batch["end"] / max(stream.num_images, 1),
        rate,
        _duration(left / rate) if rate > 0 else "?",
      )
      last_log = now

  try:
    for batch in batches:
      new_bad = [b for b in batch["bad"] if b["position"] not in known_bad]
      if new_bad:  # durable before any later row can be: the resume position stays exact
        skipped += new_bad
        known_bad.update(b["position"] for b in new_bad)
        _write_json(os.path.join(part_dir, SKIPPED), {"skipped": skipped})
      n = len(batch["labels"])
      device_latents = None
      if n:
        pixels = np.zeros((batch_size, *batch["pixels"].shape[1:]), np.uint8)
        pixels[:n] = batch["pixels"]
        ids = np.zeros((batch_size,), np.int32)
        ids[:n] = stream.offset + batch["positions"]
        device_latents = encode(
          params, jax.device_put(pixels, batch_sharding), jax.device_put(ids, batch_sharding)
        )
      if pending is not None:
        retire(pending)
      pending = (batch, device_latents if n else np.zeros((0, *latent_shape), np.float32))
    if pending is not None:
      retire(pending)
  except KeyboardInterrupt:
    log.warning(
      "Interrupted: %d latents of %s are in complete shards; run the same command to resume.",
      writer.num_written,
      part_dir,
    )
    raise
  finally:
    batches.close()
    pool.shutdown(wait=False, cancel_futures=True)

  writer.extra = {
    "mode": c["mode"],
    "seed": c["seed"],
    "dtype": c["dtype"],
    "crop": c["crop"],
    "first_image": stream.offset,
    "num_images": stream.num_images,
    "total_images": stream.total_images,
    "skipped": skipped,
  }
  meta = writer.finalize()
  elapsed = time.monotonic() - t0
  log.info(
    "%s complete: %d latents of %d images (%d skipped) in %s.",
    part_dir,
    meta["num_examples"],
    stream.num_images,
    len(skipped),
    _duration(elapsed),
  )
  return meta


# ---------------------------------------------------------------------------------------------
# Verification of all parts -> manifest.json, meta.json


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def _part_dirs(out: str) -> tuple[list[str], int]:
  found = {}
  for path in glob.glob(os.path.join(out, "part-*-of-*")):
    match = _PART.match(os.path.basename(path))
    if match:
      found.setdefault(int(match.group(2)), []).append(path)
  if len(found) != 1:
    raise EncodeError(
      f"{out} holds parts of {len(found)} different encodings "
      f"({sorted(found)} processes); write to an empty --out directory."
    )
  ((count, dirs),) = found.items()
  return sorted(dirs), count


def finish(out: str, chunk_rows: int = 4096) -> dict | None:
  """If every part of OUT is complete: verify them all, write manifest.json, then meta.json.

  Returns the final meta, or None while some part is still missing. Raises EncodeError naming the
  shard (and row) that fails a check.
  """
  if os.path.exists(os.path.join(out, latents_lib.META)):
    return latents_lib.read_meta(out)
  dirs, count = _part_dirs(out)
  if len(dirs) != count or not all(os.path.exists(os.path.join(d, latents_lib.META)) for d in dirs):
    return None
  metas = [latents_lib.read_meta(d) for d in dirs]
  identity = {k: metas[0][k] for k in latents_lib._IDENTITY}  # pylint: disable=protected-access
  shape = tuple(identity["latent_shape"])
  channels = shape[-1]
  k = identity["num_classes"]
  mult = 2 if identity["flip_doubled"] else 1
  total = np.zeros(channels), np.zeros(channels)
  low, high, rows_seen = np.inf, -np.inf, 0
  shards, skipped, images = [], [], 0
  t0 = time.monotonic()
  for part_dir, meta in zip(dirs, metas):
    for key, value in identity.items():
      if meta[key] != value:
        raise EncodeError(
          f"{part_dir} has {key}={meta[key]!r} but the first part has {value!r}; "
          "the parts come from different runs: delete OUT and encode again."
        )
    extra = meta["extra"]
    images += extra["num_images"]
    skipped += [s["name"] for s in extra["skipped"]]
    want = (extra["num_images"] - len(extra["skipped"])) * mult
    if meta["num_examples"] != want:
      raise EncodeError(
        f"{part_dir} holds {meta['num_examples']} latents but its "
        f"{extra['num_images']} images ({len(extra['skipped'])} skipped) give "
        f"{want}; delete the part and run the encoding again."
      )
    part_rows = 0
    for shard in meta["shards"]:
      lat_path = os.path.join(part_dir, shard["latents"])
      lab_path = os.path.join(part_dir, shard["labels"])
      relative = os.path.relpath(lat_path, out)
      lat = _load_shard(lat_path, out)
      lab = _load_shard(lab_path, out)
      n = shard["num_examples"]
      if lat.shape != (n, *shape) or lat.dtype != np.dtype(identity["dtype"]) or lab.shape != (n,):
        raise EncodeError(
          f"Shard {relative} holds {lat.dtype} {lat.shape} and labels "
          f"{lab.shape}, not {n} rows of {list(shape)} {identity['dtype']}; "
          "delete its part and run the encoding again."
        )
      labels = np.asarray(lab)
      if n and (labels.min() < 0 or labels.max() >= max(k, 1)):
        raise EncodeError(
          f"Shard {os.path.relpath(lab_path, out)} has labels in "
          f"[{labels.min()}, {labels.max()}], outside [0, {max(k, 1)}); delete its "
          "part and run the encoding again."
        )
      for i in range(0, n, chunk_rows):
        block = np.asarray(lat[i : i + chunk_rows], np.float64)
        bad = ~np.isfinite(block).all(axis=(1, 2, 3))
        if bad.any():
          raise EncodeError(
            f"Shard {relative} row {i + int(np.flatnonzero(bad)[0])} is not "
            "finite (NaN or inf); delete its part and run the encoding again "
            "(with --dtype=float32 if it was bfloat16)."
          )
        total[0][:] += block.sum(axis=(0, 1, 2))
        total[1][:] += np.square(block).sum(axis=(0, 1, 2))
        low, high = min(low, float(block.min())), max(high, float(block.max()))
      rows_seen += n
      part_rows += n
      shards.append(
        {
          "latents": relative,
          "labels": os.path.relpath(lab_path, out),
          "num_examples": n,
          "sha256_latents": _sha256(lat_path),
          "sha256_labels": _sha256(lab_path),
        }
      )
    if part_rows != meta["num_examples"]:
      raise EncodeError(
        f"The shards of {part_dir} hold {part_rows} rows, its meta.json says "
        f"{meta['num_examples']}; delete the part and run the encoding again."
      )
  if images != metas[0]["extra"]["total_images"]:
    raise EncodeError(
      f"The parts of {out} cover {images} images, but the dataset has "
      f"{metas[0]['extra']['total_images']}; delete OUT and encode again."
    )
  values = rows_seen * shape[0] * shape[1]
  mean = total[0] / max(values, 1)
  std = np.sqrt(np.maximum(total[1] / max(values, 1) - np.square(mean), 0.0))
  extra0 = metas[0]["extra"]
  manifest = {
    "num_examples": rows_seen,
    "num_images": images,
    "num_skipped": len(skipped),
    "skipped": skipped,
    "flip_doubled": identity["flip_doubled"],
    "mode": extra0["mode"],
    "seed": extra0["seed"],
    "dtype": extra0["dtype"],
    "crop": extra0["crop"],
    "latent_shape": list(shape),
    "channel_mean": mean.tolist(),
    "channel_std": std.tolist(),
    "min": low,
    "max": high,
    "parts": [os.path.basename(d) for d in dirs],
    "shards": shards,
    "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  _write_json(os.path.join(out, MANIFEST), manifest)
  meta = {
    "format": latents_lib.FORMAT,
    "version": latents_lib.VERSION,
    **identity,
    "num_examples": rows_seen,
    "extra": {
      "mode": extra0["mode"],
      "seed": extra0["seed"],
      "dtype": extra0["dtype"],
      "crop": extra0["crop"],
      "num_images": images,
      "num_skipped": len(skipped),
      "manifest": MANIFEST,
      "layout": ("row 2k: image k, row 2k+1: its mirror" if mult == 2 else "row k: image k"),
    },
    "shards": [{k_: s[k_] for k_ in ("latents", "labels", "num_examples")} for s in shards],
  }
  _write_json(os.path.join(out, latents_lib.META), meta)
  log.info(
    "Verified %d latents %s of %d images (%d skipped) in %s: channel mean %s, std %s. Wrote %s.",
    rows_seen,
    list(shape),
    images,
    len(skipped),
    _duration(time.monotonic() - t0),
    np.round(mean, 3).tolist(),
    np.round(std, 3).tolist(),
    os.path.join(out, latents_lib.META),
  )
  return meta


# ---------------------------------------------------------------------------------------------
# The whole step


def check_config(config: dict) -> dict:
  """Fills the dataset-dependent defaults; one sentence per mistake, before anything is read."""
  c = {**default_config(), **config}
  unknown = set(config) - set(default_config())
  if unknown:
    raise EncodeError(
      f"Unknown encoding settings {sorted(unknown)}; valid ones: {sorted(default_config())}."
    )
  if c["dataset"] not in DATASETS:
    raise EncodeError(f"--dataset is {c['dataset']!r}; choose one of {DATASETS}.")
  if not c["out"]:
    raise EncodeError("--out must name the latent set directory to write.")
  if not c["vae"]:
    raise EncodeError("--vae must name a converted VAE (python -m dimsum_jax.vae.convert).")
  if c["dataset"] == "image_folder" and not c["data_dir"]:
    raise EncodeError("--data_dir must name the image folder.")
  c["crop"] = c["crop"] or DEFAULT_CROP[c["dataset"]]
  if c["crop"] not in ("adm", "resize_center", "none"):
    raise EncodeError(f"--crop is {c['crop']!r}; choose adm, resize_center or none.")
  if c["class_conditional"] is None:
    c["class_conditional"] = c["dataset"] == "imagenet2012"
  if c["mode"] not in MODES:
    raise EncodeError(f"--mode is {c['mode']!r}; choose one of {MODES}.")
  if c["latent_dtype"] not in latents_lib.DTYPES:
    raise EncodeError(
      f"--latent_dtype is {c['latent_dtype']!r}; choose one of {latents_lib.DTYPES}."
    )
  if c["on_bad_image"] not in ("fail", "skip"):
    raise EncodeError(f"--on_bad_image is {c['on_bad_image']!r}; choose fail or skip.")
  if c["shard_size"] <= 0 or (c["flip"] and c["shard_size"] % 2):
    raise EncodeError(
      f"--shard_size is {c['shard_size']}; it must be positive, and even when "
      "mirrors are encoded (image and mirror share a shard)."
    )
  if c["image_size"] <= 0 or c["batch_size"] < 0:
    raise EncodeError("--image_size must be positive and --batch_size not negative.")
  return c


def encode_dataset(config: dict) -> dict | None:
  """Encodes this process's part of the dataset into config['out'], then, once every part is
  complete, verifies them and writes the set's meta.json. Returns that meta (None on a process
  that finished before the others)."""
  import jax  # pylint: disable=g-import-not-at-top
  from dimsum_jax import sharding  # pylint: disable=g-import-not-at-top

  c = check_config(config)
  out = os.path.abspath(c["out"])
  if os.path.exists(os.path.join(out, latents_lib.META)):
    log.info("%s is already a complete latent set; nothing to do.", out)
    return latents_lib.read_meta(out)
  distributed = c["process_index"] is None
  if distributed:
    sharding.initialize_distributed()
    c["process_index"], c["process_count"] = jax.process_index(), jax.process_count()
  p, count = int(c["process_index"]), int(c["process_count"] or 1)
  if not 0 <= p < count:
    raise EncodeError(f"--process_index {p} is not in [0, {count}) (--process_count {count}).")

  mesh = local_mesh()
  devices = mesh.devices.size
  batch_size = c["batch_size"] or 32 * devices
  if batch_size % devices:
    raise EncodeError(
      f"--batch_size {batch_size} does not split over the {devices} local "
      f"devices: use a multiple of {devices}."
    )
  vae, params, vae_name = load_encoder_vae(c["vae"], c["dtype"], mesh)
  if c["image_size"] % vae.downsampling_factor:
    raise EncodeError(
      f"--image_size {c['image_size']} is not a multiple of the VAE's "
      f"downsampling factor {vae.downsampling_factor}."
    )
  c["vae_name"] = vae_name
  if c["dataset"] == "image_folder":
    stream = FolderImages(c["data_dir"], c["class_conditional"], p, count)
  else:
    stream = TfdsImages(
      c["dataset"],
      c["data_dir"],
      c["split"],
      c["tfds_name"],
      c["image_size"],
      c["class_conditional"],
      p,
      count,
    )
  if stream.total_images < count:
    raise EncodeError(f"{stream.total_images} images cannot be split over {count} processes.")
  part_dir = os.path.join(out, part_name(p, count))
  _check_settings(out, part_dir, c, count)
  log.info(
    "Process %d of %d: images %d..%d of %d from %s, %d local devices, batch %d%s.",
    p,
    count,
    stream.offset,
    stream.offset + stream.num_images - 1,
    stream.total_images,
    stream.source,
    devices,
    batch_size,
    " (+ mirrors)" if c["flip"] else "",
  )
  encode_part(c, stream, vae, params, vae_name, mesh, part_dir, batch_size)
  if distributed and count > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("dimsum_jax.data.encode: all parts written")
    if p != 0:
      return None
  meta = finish(out)
  if meta is None:
    log.info(
      "Part %d is complete; the set is finalized by whichever process completes the last part.", p
    )
  return meta


FLAGS = flags.FlagValues()  # this command's own (see dimsum_jax.command_line)
_D = default_config()  # the flags are its settings, by the same names and defaults
flags.DEFINE_string(
  "dataset",
  _D["dataset"],
  f"{', '.join(DATASETS[:-1])} (tfds; see dimsum_jax.data.tfds_images) or image_folder.",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "data_dir",
  _D["data_dir"],
  "The tfds data_dir ('' = tfds's default) or the image folder.",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "split", _D["split"], "tfds split; slicing allowed (train[:120000]).", flag_values=FLAGS
)
flags.DEFINE_string(
  "tfds_name",
  _D["tfds_name"],
  "tfds builder ('' = the usual one of --dataset, tfds_images.TFDS_NAMES).",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "vae", _D["vae"], "A VAE converted by python -m dimsum_jax.vae.convert.", flag_values=FLAGS
)
flags.DEFINE_string(
  "out", _D["out"], "The latent set directory to write (or to resume).", flag_values=FLAGS
)
flags.DEFINE_integer(
  "image_size",
  _D["image_size"],
  "Pixels; latents are image_size / 8 for the SD VAE.",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "crop",
  _D["crop"],
  "adm, resize_center or none ('' = the dataset's: ADM's "
  "centre crop for ImageNet and image folders, else resize_center).",
  flag_values=FLAGS,
)
flags.DEFINE_boolean(
  "class_conditional",
  _D["class_conditional"],
  "Store labels (default: for imagenet2012 only; an image folder's labels are its subfolders).",
  flag_values=FLAGS,
)
flags.DEFINE_boolean(
  "flip", _D["flip"], "Also encode the horizontal mirror of every image.", flag_values=FLAGS
)
flags.DEFINE_string(
  "mode",
  _D["mode"],
  "sample: one posterior sample (as upstream); mean: the posterior mean.",
  flag_values=FLAGS,
)
flags.DEFINE_integer("seed", _D["seed"], "Noise of the posterior samples.", flag_values=FLAGS)
flags.DEFINE_string(
  "dtype", _D["dtype"], "VAE compute dtype: float32 (as upstream) or bfloat16.", flag_values=FLAGS
)
flags.DEFINE_string(
  "latent_dtype", _D["latent_dtype"], "Stored dtype: float32 or float16.", flag_values=FLAGS
)
flags.DEFINE_integer(
  "batch_size",
  _D["batch_size"],
  "Images per step of this process; 0 = 32 per local device.",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "shard_size",
  _D["shard_size"],
  "Latent rows per shard file (even when mirrors are encoded).",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "on_bad_image",
  _D["on_bad_image"],
  "An image that does not decode: fail "
  "(stop, naming it) or skip (warn, leave it out, list it in the manifest).",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "num_workers",
  _D["num_workers"],
  "Decoding threads; 0 = the CPU count (at most 32).",
  flag_values=FLAGS,
)
flags.DEFINE_integer("prefetch", _D["prefetch"], "Batches decoded ahead.", flag_values=FLAGS)
flags.DEFINE_float(
  "log_every_s", _D["log_every_s"], "Seconds between progress lines.", flag_values=FLAGS
)
flags.DEFINE_integer(
  "process_index",
  _D["process_index"],
  "This process's part (default: from "
  "JAX's distributed runtime); for independent jobs sharing --out.",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "process_count", _D["process_count"], "How many parts, with --process_index.", flag_values=FLAGS
)
del _D


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for name in ("absl", "jax"):  # Orbax's and JAX's chatter
    logging.getLogger(name).setLevel(logging.WARNING)
  try:
    encode_dataset({key: FLAGS[key].value for key in default_config()})
  except (EncodeError, FloatingPointError, latents_lib.LatentSetError, ImportError) as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:
    sys.exit("Interrupted; run the same command to resume.")


def cli():
  """The `dimsum-encode` console script."""
  command_line.run(main, FLAGS)


if __name__ == "__main__":
  cli()
