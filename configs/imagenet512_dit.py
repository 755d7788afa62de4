"""DiT-XL/2 baseline on ImageNet 512 latents, trained exactly like configs/imagenet512.py.

  python -m dimsum_jax.main --config=configs/imagenet512_dit.py --workdir=$WORKDIR \
      --config.data.data_dir=$LATENTS512 --config.vae.dir=$VAE
"""
from dimsum_jax import config_utils


def get_config():
  c = config_utils.base_config()
  c.data.name = 'latents'
  c.data.image_size = 64
  c.data.channels = 4
  c.data.global_batch_size = 256
  c.data.random_flip = False

  c.model.name = 'DiT-XL/2'
  c.model.input_size = 64
  c.model.in_channels = 4
  c.model.dtype = 'bfloat16'         # bf16 compute, float32 parameters (upstream: float32)
  c.model.num_classes = 1000
  c.model.label_dropout = 0.15
  c.model.drop_path = 0.1             # unused by DiT

  c.num_train_steps = 1_000_000
  c.optim.learning_rate = 1e-4
  c.optim.grad_clip = 1.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 10_000
  c.keep_checkpoints = 3

  c.sample.every_steps = 20_000
  c.sample.classes = (207, 360, 387, 974, 88, 979, 417, 279)
  c.sample.rows = 8
  c.sample.per_row = 4
  c.sample.cfg_scale = 4.0
  return c
