"""DiMSUM-L/2 on ImageNet 512 (class-conditional, SD-VAE latents [64, 64, 4]).

  python -m dimsum_jax.main --config=configs/imagenet512.py --workdir=$WORKDIR \
      --config.data.data_dir=$LATENTS512 --config.vae.dir=$VAE

Not an upstream run: DiMSUM publishes no ImageNet 512 model (its 512 px result is CelebA-HQ, see
configs/celebahq512.py). This keeps the ImageNet 256 recipe (lr 1e-4 constant, clip 1.0, EMA
0.9999, label dropout 0.15, drop path 0.1) with DiT's 512 px batch of 256 and 1 M steps.

`:finetune` is the weak-to-strong recipe (DiM's, arXiv 2405.14224) for DiMSUM: the 256 px
DiMSUM-L/2 of configs/imagenet256.py warm-starts the 512 px model (dimsum_jax.warm_start: its
params and EMA, the 16x16 position table resized bicubically to 32x32 as upstream's
interpolate_pos_embed, a fresh optimiser), then trains 64 k steps with a 2 500-step warmup, the
length and warmup of DiM's 512 px fine-tune:

  python -m dimsum_jax.main --config=configs/imagenet512.py:finetune --workdir=$WORKDIR512 \
      --config.init_from.path=$WORKDIR256 --config.data.data_dir=$LATENTS512 --config.vae.dir=$VAE

$WORKDIR256 is the 256 px run's workdir (its newest good checkpoint), its export or a conversion
of upstream's imnet256_510ep (python -m dimsum_jax.convert).
"""
from dimsum_jax import config_utils


def get_config(arg=''):
  if arg not in ('', 'finetune'):
    raise ValueError(f'Unknown variant {arg!r} of configs/imagenet512.py: use "" or finetune.')
  c = config_utils.base_config()
  c.data.name = 'latents'
  c.data.image_size = 64
  c.data.channels = 4
  c.data.global_batch_size = 256
  c.data.random_flip = False

  c.model.name = 'DiMSUM-L/2'
  c.model.input_size = 64
  c.model.in_channels = 4
  c.model.dtype = 'bfloat16'         # bf16 compute, float32 parameters (upstream: float32)
  c.model.num_classes = 1000
  c.model.label_dropout = 0.15
  c.model.drop_path = 0.1

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

  if arg == 'finetune':
    c.init_from.path = 'runs/imagenet256'   # --config.init_from.path= the 256 px run
    c.num_train_steps = 64_000
    c.optim.warmup_steps = 2500
    c.checkpoint_every_steps = 8_000
    c.sample.every_steps = 8_000
  return c
