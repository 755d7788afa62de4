"""The whole latent path, small: image folder -> encode (random tiny VAE) -> train a tiny DiMSUM on
the latent set -> sample -> decode to images; and the other way, pixels encoded in each step.

References: the training-time sample grid and the sampling command's samples.npz are compared
with the EMA samples decoded independently (training_grids.sample from the same noise, then the VAE
decoder and metrics.image_grid); the latent set's rows are checked against the VAE's posterior
mean of the images and of their mirrors, and the batches encoded in the step against posterior
samples drawn by hand.
"""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from dimsum_jax import config_utils, metrics, models, sample, train, training_grids
from dimsum_jax.data import encode
from dimsum_jax.data.image_folder import load_image
from dimsum_jax import vae as vae_package
from dimsum_jax.vae import model as vae_model
from tests import train_util
from tests.data.test_encode import SIZE, expected_latents, make_image_folder, make_vae_dir, read_set

LATENT = SIZE // 2  # the tiny VAE halves once


def latent_config(latents_dir, vae_dir):
  """A tiny class-conditional DiMSUM on [8, 8, 4] latents, two steps, samples decoded."""
  c = config_utils.base_config()
  c.data.name = "latents"
  c.data.data_dir = str(latents_dir)
  c.data.image_size = LATENT
  c.data.channels = 4
  c.data.global_batch_size = 4
  c.data.random_flip = False
  c.data.prefetch = 0
  c.model.name = "DiMSUM-L/2"
  c.model.depth = 1
  c.model.hidden_size = 32
  c.model.attn_every = 0
  c.model.input_size = LATENT
  c.model.in_channels = 4
  c.model.num_classes = 2
  c.num_train_steps = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.optim.learning_rate = 1e-3
  c.sample.every_steps = 0  # one grid, at the end
  c.sample.rows = 2
  c.sample.per_row = 2
  c.sample.num_steps = 2
  c.vae.dir = str(vae_dir)
  return c


@pytest.fixture(scope="module")
def latent_set(tmp_path_factory):
  root = tmp_path_factory.mktemp("latent_path")
  vae, params = make_vae_dir(root / "vae", seed=5)
  names = [f"class_a/{i}.png" for i in range(4)] + [f"class_b/{i}.png" for i in range(4)]
  paths = make_image_folder(root / "images", names, seed=5)
  meta = encode.encode_dataset(
    dict(
      dataset="image_folder",
      data_dir=str(root / "images"),
      vae=str(root / "vae"),
      out=str(root / "latents"),
      image_size=SIZE,
      class_conditional=True,
      mode="mean",
      batch_size=4,
      shard_size=8,
      log_every_s=0.0,
      num_workers=2,
      process_index=0,
      process_count=1,
    )
  )
  return root, vae, params, paths, meta


def test_encode_train_sample_decode(latent_set):
  root, vae, params, paths, meta = latent_set
  assert (meta["num_examples"], meta["latent_shape"], meta["num_classes"]) == (16, [8, 8, 4], 2)
  latents, labels, _ = read_set(root / "latents")
  pixels = np.stack([load_image(p, SIZE, 3, "adm") for p in paths])
  np.testing.assert_allclose(latents, expected_latents(vae, params, pixels), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels, [0] * 8 + [1] * 8)

  config = latent_config(root / "latents", root / "vae")
  workdir = root / "work"
  state = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 2
  with open(workdir / "metrics.jsonl") as f:
    losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
  assert len(losses) == 2 and np.all(np.isfinite(losses))

  # Sample the EMA model (2 Euler steps, labels as the grid's rows) and decode.
  labels = np.asarray([0, 0, 1, 1], np.int32)
  x0 = jax.random.normal(jax.random.PRNGKey(config.sample.seed), (4, LATENT, LATENT, 4))
  sample_fn = jax.jit(
    lambda p, x, y: (
      training_grids.sample(
        p,
        x,
        y,
        model=models.create_model(config.model),
        transport_config=config.transport,
        sample_config=config.sample,
        num_classes=2,
      ).x1
    )
  )
  sampled = sample_fn(state.ema_params, x0, labels)
  assert sampled.shape == (4, LATENT, LATENT, 4) and bool(np.isfinite(sampled).all())
  images = jax.jit(vae_model.latents_to_images, static_argnums=0)(vae, params, sampled)
  pixels_of = jax.jit(lambda latents: vae_model.decode_latents(vae, params, latents))
  pixels = pixels_of(sampled)
  assert images.shape == (4, SIZE, SIZE, 3) and pixels.shape == (4, SIZE, SIZE, 3)
  assert pixels.dtype == np.uint8

  # The training-time grid holds these decoded images (4x upscaled 16 px tiles), not latents.
  grid = np.asarray(Image.open(workdir / "samples" / "ema_00000002.png"))
  want = metrics.image_grid(np.asarray(images), rows=2)
  want = np.repeat(np.repeat(want, 4, axis=0), 4, axis=1)
  assert grid.shape == want.shape == (4 * (2 * (SIZE + 2) + 2),) * 2 + (3,)
  difference = np.abs(grid.astype(int) - want.astype(int))
  assert difference.max() <= 1 and np.mean(difference == 0) > 0.99

  # The sampling command on the workdir (its newest checkpoint: the EMA above). Its sample i
  # starts from normal(fold_in(split(PRNGKey(seed))[0], i)) with label i % 2, so its samples are
  # training_grids.sample from that noise, decoded (computed as rows 0-1 of a batch of 4, the shape the
  # jitted functions above were compiled for).
  sample.run(
    out=str(root / "sampled"),
    workdir=str(workdir),
    num_samples=2,
    batch_size=2,
    solver="euler",
    num_steps=2,
    pngs=False,
  )
  with np.load(root / "sampled" / "samples.npz") as f:
    arr, sampled_labels = f["arr_0"], f["labels"]
  assert arr.dtype == np.uint8 and arr.shape == (2, SIZE, SIZE, 3)
  np.testing.assert_array_equal(sampled_labels, [0, 1])
  key = jax.random.split(jax.random.PRNGKey(0))[0]
  x0 = np.stack(
    [jax.random.normal(jax.random.fold_in(key, i), (LATENT, LATENT, 4)) for i in range(4)]
  )
  want = np.asarray(pixels_of(sample_fn(state.ema_params, x0, np.asarray([0, 1, 0, 1], np.int32))))
  difference = np.abs(arr.astype(int) - want[:2].astype(int))  # uint8 truncation may flip by 1
  assert difference.max() <= 1 and np.mean(difference == 0) > 0.99
  assert all(image.std() > 1 for image in arr)  # decoded images, not constants


def test_a_latent_set_of_another_shape_is_one_sentence(latent_set):
  root = latent_set[0]
  config = latent_config(root / "latents", root / "vae")
  config.data.image_size = SIZE  # pixels, not the latent grid
  config.model.input_size = SIZE
  with pytest.raises(SystemExit) as error:
    train.train_and_evaluate(config, str(root / "work_wrong_shape"))
  message = str(error.value)
  assert (
    "holds latents of shape [8, 8, 4] (h, w, c) but config.data asks for image_size=16" in (message)
    and "\n" not in message
  )
  assert not os.path.exists(root / "work_wrong_shape" / "checkpoints")


def test_on_the_fly_encoding_trains_on_scaled_posterior_samples(latent_set, tmp_path, monkeypatch):
  """Upstream's CelebA-HQ / LSUN way: pixels in the data, each batch encoded by the VAE in the
  step (config.vae.dir with a latent model). The latent shape is the VAE's own: this one halves
  once, so 16 px images give the [8, 8, 4] model input (the SD VAE's 8x is not assumed)."""
  root, vae, params, _, _ = latent_set
  config = latent_config(root / "unused", root / "vae")
  config.data.name = "image_folder"
  config.data.data_dir = str(root / "images")
  config.data.image_size = SIZE
  config.data.channels = 3
  config.data.num_workers = 1
  config.num_train_steps = 1
  config.checkpoint_every_steps = 1
  config.sample.every_steps = -1
  config.model.name = "DiT-S/2"  # the encoding is the point: the cheapest model to compile
  config.model.hidden_size = 48  # 6 heads of 8
  config.model.attn_every = 4  # a DiMSUM field: back at its default for the DiT
  # A model sized for an 8x VAE is refused with the size this VAE gives, before any writing.
  config.model.input_size = SIZE // 8
  with pytest.raises(SystemExit) as error:
    train.train_and_evaluate(config, str(tmp_path / "work"))
  assert str(error.value) == (
    f"error: The data gives [{SIZE}, {SIZE}, 3] inputs (VAE latents [8, 8, 4]) but the model "
    f"expects [2, 2, 4]: set --config.model.input_size=8 --config.model.in_channels=4."
  )
  assert not os.path.exists(tmp_path / "work")
  # A pixel model with a VAE set is refused too: its sample grids would be decoded as latents.
  pixel = config.copy_and_resolve_references()
  pixel.model.input_size, pixel.model.in_channels = SIZE, 3
  with pytest.raises(SystemExit) as error:
    train.train_and_evaluate(pixel, str(tmp_path / "work"))
  assert str(error.value) == (
    f"error: config.vae.dir is set but the model works on [{SIZE}, {SIZE}, 3] pixels, not the "
    f"VAE's 4-channel latents: unset it (--config.vae.dir=) or set "
    f"--config.model.in_channels=4 to train on VAE latents."
  )
  assert not os.path.exists(tmp_path / "work")

  seen = []  # (pixels, latents) of each step: the latents are the batch the step is given
  make_encoder = vae_package.batch_encoder

  def recording_encoder(*args):
    encode_fn = make_encoder(*args)

    def encode_and_record(images, step):
      latents = encode_fn(images, step)
      seen.append(jax.device_get((images, latents)))
      return latents

    return encode_and_record

  monkeypatch.setattr(vae_package, "batch_encoder", recording_encoder)

  config.model.input_size = LATENT
  state = train.train_and_evaluate(config, str(tmp_path / "work"))
  assert int(state.step) == 1 and len(seen) == 1
  with open(tmp_path / "work" / "metrics.jsonl") as f:
    losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
  assert len(losses) == 1 and np.isfinite(losses[0])

  # The step's batch by hand: the run's first pixel batch, a posterior sample of the VAE with the
  # documented key (fold_in(fold_in(PRNGKey(seed), 1), step)), times 0.18215.
  pixels, latents = seen[0]
  batch = next(train_util.global_batches(config, 1))
  np.testing.assert_array_equal(pixels, batch["image"])
  mean, logvar = (
    np.asarray(m, np.float64)
    for m in jax.jit(vae_model.encode, static_argnums=0)(vae, params, batch["image"])
  )
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1), 0)
  noise = np.asarray(jax.random.normal(key, mean.shape), np.float64)
  assert latents.shape == (4, LATENT, LATENT, 4)
  np.testing.assert_allclose(
    latents, (mean + np.exp(0.5 * logvar) * noise) * 0.18215, rtol=1e-5, atol=1e-6
  )
  assert np.abs(latents - mean * 0.18215).max() > 1e-2  # a sample, not the posterior mean
