"""DiMSUM on LSUN Church 256 (unconditional; images encoded by the SD VAE each step).

  python -m dimsum_jax.main --config=configs/church256.py --workdir=$WORKDIR \
      --config.data.data_dir=$TFDS_DATA_DIR --config.vae.dir=$VAE
  python -m dimsum_jax.main --config=configs/church256.py:dit --workdir=$WORKDIR_DIT ...

$TFDS_DATA_DIR holds the prepared tfds lsun/church_outdoor; the first 120 000 training images
are used, as upstream. $VAE is the converted sd-vae-ft-ema.

Upstream (VinAIResearch/DiMSUM dimsum/train.py, scripts/train.sh): the training script names
DiMSUM-XL/2 (kept here), although the README's released church_395ep (FID-50k 3.76) is evaluated as
L/2: pass --config.model.name=DiMSUM-L/2 for that one. AdamW lr 5e-5 constant, grad clip 2.0, EMA
0.9999, global batch 128 (4 GPUs), drop path 0.1, fp32, 400 epochs of 120 000 images = 400 x 937
steps = 375 k steps.

dit: the DiT-XL/2 baseline. Same data pipeline (first 120 000 images, VAE-encoded each step),
objective, optimiser and schedule.
"""

from dimsum_jax import config_utils

VARIANTS = ('', 'dit')


def get_config(arg=''):
  config_utils.check_variant(arg, VARIANTS, 'configs/church256.py')
  c = config_utils.base_config()
  c.data.name = 'lsun_church'
  c.data.split = 'train[:120000]'
  c.data.image_size = 256
  c.data.channels = 3
  c.data.crop = 'resize_center'  # torchvision Resize + CenterCrop, as upstream
  c.data.random_flip = True
  c.data.class_conditional = False
  c.data.global_batch_size = 128

  c.model.name = 'DiMSUM-XL/2'
  c.model.input_size = 32
  c.model.in_channels = 4  # pixels are encoded by the VAE every step
  c.model.dtype = 'bfloat16'  # bf16 compute, float32 parameters (upstream: float32)
  c.model.num_classes = 0
  c.model.label_dropout = 0.0
  c.model.drop_path = 0.1

  c.num_train_steps = 375_000
  c.optim.learning_rate = 5e-5
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
