"""The whole latent path, small: image folder -> encode (random tiny VAE) -> train a tiny DiMSUM on
the latent set -> sample -> decode to images.

References: the training-time sample grid is compared with the EMA samples decoded independently
(train.sample, then the VAE decoder and metrics.image_grid); the latent set's rows are checked
against the VAE's posterior mean of the images and of their mirrors.
"""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from dimsum_jax import config_utils, metrics, models, train
from dimsum_jax.data import encode
from dimsum_jax.data.image_folder import load_image
from dimsum_jax.vae import model as vae_model
from tests.data.test_encode import SIZE, expected_latents, make_image_folder, make_vae_dir, read_set

LATENT = SIZE // 2   # the tiny VAE halves once


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
  c.sample.every_steps = 0          # one grid, at the end
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
  meta = encode.encode_dataset(dict(
      dataset="image_folder", data_dir=str(root / "images"), vae=str(root / "vae"),
      out=str(root / "latents"), image_size=SIZE, class_conditional=True, mode="mean",
      batch_size=4, shard_size=8, log_every_s=0.0, num_workers=2, process_index=0,
      process_count=1))
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
  sample = jax.jit(lambda p, x, y: train.sample(
      p, x, y, model=models.create_model(config.model), transport_config=config.transport,
      sample_config=config.sample, num_classes=2).x1)
  sampled = sample(state.ema_params, x0, labels)
  assert sampled.shape == (4, LATENT, LATENT, 4) and bool(np.isfinite(sampled).all())
  images = jax.jit(vae_model.latents_to_images, static_argnums=0)(vae, params, sampled)
  pixels = jax.jit(vae_model.decode_latents, static_argnums=0)(vae, params, sampled)
  assert images.shape == (4, SIZE, SIZE, 3) and pixels.shape == (4, SIZE, SIZE, 3)
  assert pixels.dtype == np.uint8

  # The training-time grid holds these decoded images (4x upscaled 16 px tiles), not latents.
  grid = np.asarray(Image.open(workdir / "samples" / "ema_00000002.png"))
  want = metrics.image_grid(np.asarray(images), rows=2)
  want = np.repeat(np.repeat(want, 4, axis=0), 4, axis=1)
  assert grid.shape == want.shape == (4 * (2 * (SIZE + 2) + 2),) * 2 + (3,)
  difference = np.abs(grid.astype(int) - want.astype(int))
  assert difference.max() <= 1 and np.mean(difference == 0) > 0.99


def test_a_latent_set_of_another_shape_is_one_sentence(latent_set):
  root = latent_set[0]
  config = latent_config(root / "latents", root / "vae")
  config.data.image_size = SIZE                 # pixels, not the latent grid
  config.model.input_size = SIZE
  with pytest.raises(SystemExit) as error:
    train.train_and_evaluate(config, str(root / "work_wrong_shape"))
  message = str(error.value)
  assert "holds latents of shape [8, 8, 4] (h, w, c) but config.data asks for image_size=16" in (
      message) and "\n" not in message
  assert not os.path.exists(root / "work_wrong_shape" / "checkpoints")


@pytest.mark.slow
def test_on_the_fly_encoding_stays_a_config_choice(tmp_path):
  """Upstream's CelebA-HQ / LSUN way: pixels in the data, each batch encoded by the VAE in the
  step (config.vae.dir with a 4-channel model); a VAE that downsamples 8x, like the SD VAE."""
  vae_config = dict(block_out_channels=[8] * 4, layers_per_block=1, norm_num_groups=4,
                    latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
                    up_block_types=["UpDecoderBlock2D"] * 4)
  make_vae_dir(tmp_path / "vae", vae_config=vae_config)
  make_image_folder(tmp_path / "images", [f"{c}/{i}.png" for c in "ab" for i in range(4)],
                    size=64)
  config = latent_config(tmp_path / "unused", tmp_path / "vae")
  config.data.name = "image_folder"
  config.data.data_dir = str(tmp_path / "images")
  config.data.image_size = 64
  config.data.channels = 3
  config.data.random_flip = True
  config.data.num_workers = 1
  state = train.train_and_evaluate(config, str(tmp_path / "work"))
  assert int(state.step) == 2
  with open(tmp_path / "work" / "metrics.jsonl") as f:
    losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
  grid = np.asarray(Image.open(tmp_path / "work" / "samples" / "ema_00000002.png"))
  assert grid.shape == (2 * (64 + 2) + 2, 2 * (64 + 2) + 2, 3)   # decoded 64 px tiles
