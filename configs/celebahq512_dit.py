"""DiT-XL/2 baseline on CelebA-HQ 512, trained exactly like configs/celebahq512.py.

  python -m dimsum_jax.main --config=configs/celebahq512_dit.py --workdir=$WORKDIR \
      --config.data.data_dir=$TFDS_DATA_DIR --config.vae.dir=$VAE

Same data pipeline, objective, optimiser and schedule as the DiMSUM run.
"""
from dimsum_jax import config_utils


def get_config():
  c = config_utils.base_config()
  c.data.name = 'celeb_a_hq'
  c.data.split = 'train'
  c.data.image_size = 512
  c.data.channels = 3
  c.data.crop = 'resize_center'       # torchvision Resize + CenterCrop, as upstream
  c.data.random_flip = True
  c.data.class_conditional = False
  c.data.global_batch_size = 32

  c.model.name = 'DiT-XL/2'
  c.model.input_size = 64
  c.model.in_channels = 4             # pixels are encoded by the VAE every step
  c.model.dtype = 'bfloat16'         # bf16 compute, float32 parameters (upstream: float32)
  c.model.num_classes = 0
  c.model.label_dropout = 0.0
  c.model.drop_path = 0.1             # unused by DiT

  c.num_train_steps = 211_000
  c.optim.learning_rate = 1e-4
  c.optim.grad_clip = 2.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 10_000
  c.keep_checkpoints = 3

  c.sample.every_steps = 20_000
  c.sample.rows = 4
  c.sample.per_row = 8
  return c
