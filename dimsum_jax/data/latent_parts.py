"""A latent set written in parts by the encoding step: the part directories, their resume state,
and the verification that joins them. Pure NumPy.

`python -m dimsum_jax.data.encode` (dimsum_jax.data.encode) run by P processes writes

  OUT/part-0000p-of-0000P/     process p's contiguous part of the images, a latent set of its own
                               (dimsum_jax.data.latents: LatentShardWriter, meta.json when complete)
  OUT/part-.../encode.json     the settings the part was started with (RESUME_KEYS)
  OUT/part-.../skipped.json    {"skipped": [{"position", "name", "error"}, ...]}: images that could
                               not be decoded, written before any later shard
  OUT/manifest.json            written by `finish` once every part is complete
  OUT/meta.json                written last: the finished latent set, listing the shards of all
                               parts as "part-.../latents-*.npy"

Resume. Shards are written atomically; rerunning the same command skips the complete shards of
every part (`resume_position` steps over the images of skipped.json, so the position to resume
from is exact). A resume with other settings (`check_settings`: encode.json) or another process
count is refused.

Completion. When every part is complete, `finish` reads every shard once (row counts against the
image counts, shapes and dtype, labels in range, every value finite, SHA-256 of each file and
per-channel statistics), writes OUT/manifest.json and then OUT/meta.json, whose presence makes OUT
a finished latent set (dimsum_jax.data.latents). manifest.json adds to meta.json's fields the
image and skipped counts, the skipped images' names, the encoder's mode, seed, dtype and crop, the
latent_shape [h, w, c], channel_mean and channel_std [c], min, max, the parts and per shard
{latents, labels, num_examples, sha256_latents, sha256_labels}.

EncodeError, the one error class of the encoding step (a setting, input or output directory that
the user fixes), is defined here, the lowest of its modules.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import time

import numpy as np

from dimsum_jax import io_utils
from dimsum_jax.data import latents as latents_lib

log = logging.getLogger(__name__)

SETTINGS = "encode.json"
SKIPPED = "skipped.json"
MANIFEST = "manifest.json"
_PART = re.compile(r"^part-(\d{5})-of-(\d{5})$")
# Settings that change the stored values: a resumed part must have been started with the same.
RESUME_KEYS = (
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


# ---------------------------------------------------------------------------------------------
# Part directories and their resume state


def part_name(process_index: int, process_count: int) -> str:
  return f"part-{process_index:05d}-of-{process_count:05d}"


def _write_json(path: str, obj) -> None:
  io_utils.write_json(path, obj)


def read_json(path: str, default=None):
  """A part's JSON file (encode.json, skipped.json), `default` if absent, EncodeError if damaged."""
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


def check_settings(out: str, part_dir: str, settings: dict, process_count: int) -> None:
  """Refuses to mix parts of another process count or a part started with other settings."""
  for path in glob.glob(os.path.join(out, "part-*-of-*")):
    match = _PART.match(os.path.basename(path))
    if match and int(match.group(2)) != process_count:
      raise EncodeError(
        f"{out} holds parts of an encoding with {int(match.group(2))} processes "
        f"({os.path.basename(path)}), not {process_count}: resume with "
        f"{int(match.group(2))} processes or write to a new --out directory."
      )
  previous = read_json(os.path.join(part_dir, SETTINGS))
  if previous is None:
    return
  for key in RESUME_KEYS:
    if previous.get(key) != settings[key]:
      raise EncodeError(
        f"{part_dir} was started with {key}={previous.get(key)!r}, not "
        f"{settings[key]!r}: resume with the same settings or write to a new "
        "--out directory."
      )


def resume_position(good_images: int, skipped_positions) -> int:
  """Stream position after the `good_images`-th usable image, stepping over known bad ones."""
  position = good_images
  for s in sorted(skipped_positions):
    if s < position:
      position += 1
    else:
      break
  return position


def duration(seconds: float) -> str:
  """'1h02m03s' or '2m03s': the times of the progress and completion lines."""
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


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
  identity = {k: metas[0][k] for k in latents_lib.IDENTITY}
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
    duration(time.monotonic() - t0),
    np.round(mean, 3).tolist(),
    np.round(std, 3).tolist(),
    os.path.join(out, latents_lib.META),
  )
  return meta
