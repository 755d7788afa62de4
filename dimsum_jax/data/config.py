"""The `config.data` block: one ConfigDict shared by every dataset."""

from __future__ import annotations

import ml_collections

NAMES = ("digits", "imagenet2012", "celeb_a_hq", "lsun_church", "image_folder", "latents")
CROPS = ("adm", "resize_center", "none")
RESIZES = ("nearest", "bilinear")
ON_BAD_IMAGE = ("skip", "fail")


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults: the offline digits set at 16 px, one channel, class-conditional."""
  c = ml_collections.ConfigDict()
  c.name = "digits"  # one of NAMES
  # tfds data_dir ('' = tfds default), the image folder root, or the latent set directory.
  c.data_dir = ""
  c.split = "train"  # tfds split, slicing allowed: "train[:120000]"
  c.tfds_name = ""  # '' = the usual builder for `name` (see tfds_images.TFDS_NAMES)
  # Shape of what batch["image"] holds: pixels for image sets, the latent grid for "latents"
  # (32 and 4 for 256-px images through the SD VAE).
  c.image_size = 16
  c.channels = 1
  c.global_batch_size = 64
  c.class_conditional = True  # False: labels are all 0 and num_classes is 0
  c.random_flip = False  # horizontal flip with probability 1/2
  c.shuffle = True  # False: every epoch in file order (latent encoding, evaluation)
  c.shuffle_buffer = 10_000  # tfds only; the other sources permute the whole split
  c.num_epochs = 0  # 0: repeat forever
  c.drop_remainder = True  # finite runs: drop the last short batch
  c.resize = "bilinear"  # digits upscaling: one of RESIZES
  c.crop = "adm"  # image sets: one of CROPS ("none": images must already fit)
  c.on_bad_image = "fail"  # image_folder: one of ON_BAD_IMAGE
  c.num_workers = 8  # decode threads (image_folder) / tf.data parallel calls (tfds)
  c.prefetch = 2  # batches prepared ahead in a background thread (0: none)
  return c


def validate(c) -> None:
  """One clear sentence per mistake, before any file is touched."""
  if c.name not in NAMES:
    raise ValueError(f"config.data.name is {c.name!r}; choose one of {NAMES}.")
  if c.crop not in CROPS:
    raise ValueError(f"config.data.crop is {c.crop!r}; choose one of {CROPS}.")
  if c.resize not in RESIZES:
    raise ValueError(f"config.data.resize is {c.resize!r}; choose one of {RESIZES}.")
  if c.on_bad_image not in ON_BAD_IMAGE:
    raise ValueError(
      f"config.data.on_bad_image is {c.on_bad_image!r}; choose one of {ON_BAD_IMAGE}."
    )
  if c.channels not in (1, 3) and c.name != "latents":
    raise ValueError(f"config.data.channels is {c.channels}; image sets have 1 or 3 channels.")
  if c.image_size <= 0 or c.global_batch_size <= 0:
    raise ValueError("config.data.image_size and global_batch_size must be positive.")
  if c.name in ("image_folder", "latents") and not c.data_dir:
    raise ValueError(f"config.data.data_dir must name the {c.name} directory.")
