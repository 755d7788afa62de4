"""The device side of the encoding step and the loop that encodes one process's part.

`load_encoder_vae` loads a converted VAE (`python -m dimsum_jax.vae.convert`) replicated over
`local_mesh()`, the training mesh over this process's devices only (processes encode
independently). `make_encode_fn` is one jitted function over those devices,

  fn(params, pixels uint8 [b, H, W, 3], ids int32 [b]) -> latents [b * (2 if flip else 1), h, w, c]

scaled by the SD VAE's 0.18215: each image and its horizontal mirror as rows 2k and 2k + 1
(flip), each row one posterior sample (mode 'sample', as upstream) or the posterior mean (mode
'mean'). The noise of a sampled latent depends only on (seed, image id, mirror), so the set does
not depend on the batch size, the device count or where a run was resumed.

`encode_part` encodes this process's images (dimsum_jax.data.encode_input) into its part
directory with a LatentShardWriter (dimsum_jax.data.latents), decoding the next batch while the
devices encode the current one, and resumes there after the last complete shard
(dimsum_jax.data.latent_parts).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import time

import numpy as np

from dimsum_jax import io_utils
from dimsum_jax.data import latents as latents_lib
from dimsum_jax.data.encode_input import Prefetch, decoded_batches
from dimsum_jax.data.latent_parts import (
  RESUME_KEYS,
  SETTINGS,
  SKIPPED,
  EncodeError,
  duration,
  read_json,
  resume_position,
)

log = logging.getLogger(__name__)

MODES = ("sample", "mean")
COMPUTE_DTYPES = ("float32", "bfloat16")


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
# One process's part


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
  skipped = read_json(os.path.join(part_dir, SKIPPED), {"skipped": []})["skipped"]
  os.makedirs(part_dir, exist_ok=True)
  io_utils.write_json(os.path.join(part_dir, SETTINGS), {k: c[k] for k in RESUME_KEYS})
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
  start = resume_position(writer.num_written // mult, [s["position"] for s in skipped])
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
  batches = Prefetch(
    decoded_batches(stream, start, batch_size, c["image_size"], c["crop"], c["on_bad_image"], pool),
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
        duration(left / rate) if rate > 0 else "?",
      )
      last_log = now

  try:
    for batch in batches:
      new_bad = [b for b in batch["bad"] if b["position"] not in known_bad]
      if new_bad:  # durable before any later row can be: the resume position stays exact
        skipped += new_bad
        known_bad.update(b["position"] for b in new_bad)
        io_utils.write_json(os.path.join(part_dir, SKIPPED), {"skipped": skipped})
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
    duration(elapsed),
  )
  return meta
