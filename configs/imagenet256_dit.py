"""DiT-XL/2 baseline on ImageNet 256 latents, trained exactly like configs/imagenet256.py.

  python -m dimsum_jax.main --config=configs/imagenet256_dit.py --workdir=$WORKDIR \
      --config.data.data_dir=$LATENTS --config.vae.dir=$VAE

Same data, objective (GVP flow matching, SiT-style), optimiser and schedule as the DiMSUM run,
so the two differ only in the network. (DiT/SiT's own recipe: batch 256, no clipping, 7 M steps.)
"""
from dimsum_jax import config_utils


def get_config():
  c = config_utils.base_config()
  c.data.name = 'latents'
  c.data.image_size = 32
  c.data.channels = 4
  c.data.global_batch_size = 704
  c.data.random_flip = False

  c.model.name = 'DiT-XL/2'
  c.model.input_size = 32
  c.model.in_channels = 4
  c.model.dtype = 'bfloat16'         # bf16 compute, float32 parameters (upstream: float32)
  c.model.num_classes = 1000
  c.model.label_dropout = 0.15
  c.model.drop_path = 0.1             # unused by DiT

  c.num_train_steps = 1_820_000
  c.optim.learning_rate = 1e-4
  c.optim.grad_clip = 1.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 7_280
  c.keep_checkpoints = 3

  c.sample.every_steps = 20_000
  c.sample.classes = (207, 360, 387, 974, 88, 979, 417, 279)
  c.sample.rows = 8
  c.sample.per_row = 8
  c.sample.cfg_scale = 4.0
  return c
