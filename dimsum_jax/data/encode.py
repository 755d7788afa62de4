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

Resume and completion. Rerunning the same command skips the complete shards of every part and
resumes exactly after them; a resume with other settings is refused. When every part is complete,
one verification pass reads every shard, writes OUT/manifest.json and then OUT/meta.json, whose
presence makes OUT a finished latent set (dimsum_jax.data.latents) listing the shards of all
parts. The parts' files, what is checked and what manifest.json holds: dimsum_jax.data.latent_parts.

Bad images (a file PIL cannot decode) are reported with their path: --on_bad_image=fail (default)
stops, --on_bad_image=skip logs a warning, leaves the image out and lists it in the manifest.

This module holds the settings, the flags and `encode_dataset` (the whole step); the images and
their decoding threads are dimsum_jax.data.encode_input, the VAE on this process's devices and the
loop over one part dimsum_jax.data.encoder, the part directories, their resume state and the
verification dimsum_jax.data.latent_parts.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from absl import app
from absl import flags

from dimsum_jax import command_line
from dimsum_jax.data import latents as latents_lib
from dimsum_jax.data.encode_input import FolderImages, TfdsImages
from dimsum_jax.data.encoder import MODES, encode_part, load_encoder_vae, local_mesh
from dimsum_jax.data.latent_parts import EncodeError, check_settings, finish, part_name

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
  check_settings(out, part_dir, c, count)
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
