"""DiMSUM-L/2 on CelebA-HQ 512 (unconditional; images encoded by the SD VAE each step).

  python -m dimsum_jax.main --config=configs/celebahq512.py --workdir=$WORKDIR \
      --config.data.data_dir=$TFDS_DATA_DIR --config.vae.dir=$VAE
  python -m dimsum_jax.main --config=configs/celebahq512.py:dit --workdir=$WORKDIR_DIT ...

$TFDS_DATA_DIR holds the prepared tfds celeb_a_hq/512; $VAE the converted sd-vae-ft-ema.

Upstream (VinAIResearch/DiMSUM dimsum/train.py, scripts/train.sh): AdamW lr 1e-4 constant, grad
clip 2.0, EMA 0.9999, global batch 32 (4 GPUs), drop path 0.1, fp32, 250 epochs of 27 000 images =
250 x 844 steps = 211 k steps. Expected: FID-50k 6.09 (README, celeb512_165ep). Latents are [64,
64, 4]: 1 024 tokens.

dit: the DiT-XL/2 baseline with the same data pipeline (VAE-encoded each step), objective,
optimiser and schedule.
"""

from dimsum_jax import config_utils

VARIANTS = ('', 'dit')


def get_config(arg=''):
  config_utils.check_variant(arg, VARIANTS, 'configs/celebahq512.py')
  c = config_utils.base_config()
  c.data.name = 'celeb_a_hq'
  c.data.split = 'train'
  c.data.image_size = 512
  c.data.channels = 3
  c.data.crop = 'resize_center'  # torchvision Resize + CenterCrop, as upstream
  c.data.random_flip = True
  c.data.class_conditional = False
  c.data.global_batch_size = 32

  c.model.name = 'DiMSUM-L/2'
  c.model.input_size = 64
  c.model.in_channels = 4  # pixels are encoded by the VAE every step
  c.model.dtype = 'bfloat16'  # bf16 compute, float32 parameters (upstream: float32)
  c.model.num_classes = 0
  c.model.label_dropout = 0.0
  c.model.drop_path = 0.1

  c.num_train_steps = 211_000
  c.optim.learning_rate = 1e-4
  c.optim.grad_clip = 2.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 10_000
  c.keep_checkpoints = 3

  c.sample.every_steps = 20_000
  c.sample.rows = 4
  c.sample.per_row = 8

  if arg == 'dit':
    config_utils.as_dit(c)
  return c
