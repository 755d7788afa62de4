"""ImageNet 512 (class-conditional, SD-VAE latents [64, 64, 4]): DiMSUM, its DiT baseline, DiM.

  python -m dimsum_jax.main --config=configs/imagenet512.py --workdir=$WORKDIR \
      --config.data.data_dir=$LATENTS512 --config.vae.dir=$VAE
  python -m dimsum_jax.main --config=configs/imagenet512.py:dit --workdir=$WORKDIR_DIT ...
  python -m dimsum_jax.main --config=configs/imagenet512.py:dim --workdir=$WORKDIR_DIM ...
  python -m dimsum_jax.main --config=configs/imagenet512.py:finetune --workdir=$WORKDIR512 \
      --config.init_from.path=$WORKDIR256 --config.data.data_dir=$LATENTS512 --config.vae.dir=$VAE
  python -m dimsum_jax.main --config=configs/imagenet512.py:dim_finetune --workdir=$WORKDIR512_DIM \
      --config.init_from.path=$WORKDIR256_DIM_H --config.data.data_dir=$LATENTS512 ...

'' (default), DiMSUM-L/2: not an upstream run (DiMSUM publishes no ImageNet 512 model; its
512 px result is CelebA-HQ, see configs/celebahq512.py). It keeps the ImageNet 256 recipe (lr 1e-4
constant, clip 1.0, EMA 0.9999, label dropout 0.15, drop path 0.1) with DiT's 512 px batch of
256 and 1 M steps.

finetune: the weak-to-strong recipe (DiM's, arXiv 2405.14224) for DiMSUM: the 256 px DiMSUM-L/2
of configs/imagenet256.py warm-starts the 512 px model (dimsum_jax.warm_start: its params and
EMA, the 16x16 position table resized bicubically to 32x32 as upstream's interpolate_pos_embed, a
fresh optimiser), then trains 64 k steps with a 2 500-step warmup, the length and warmup of DiM's
512 px fine-tune. $WORKDIR256 is the 256 px run's workdir (its newest good checkpoint), its export
or a conversion of upstream's imnet256_510ep (python -m dimsum_jax.convert).

dit: the DiT-XL/2 baseline with the same data, objective, optimiser and schedule.

dim: DiM-H/2, DiM's fine-tune recipe (tyshiwo1/DiM-DiffusionMamba configs/imagenet512_H_DiM_ft.py):
863.6 M parameters, the pad layout rho_pad, 64 k steps at batch 240 (upstream sets
gradient_accumulation_steps 2, which its loop may not apply), AdamW lr 1e-4, no weight decay,
betas (0.99, 0.99), eps 1e-15, linear warm-up over 2 500 steps then constant, grad clip 1.0,
EMA 0.9999, label dropout 0.15, the discrete schedule with noise prediction; evaluation with
DPM-Solver (50 steps) and U-ViT guidance 0.7 (cfg_scale 1.7 here). `:dim` trains from scratch;
`:dim_finetune` is upstream's warm start from the 256 px DiM-H/2 at 425 k steps
(configs/imagenet256.py:dim_h; dimsum_jax.warm_start, the position table resized bilinearly,
DiM's own interpolation). Upstream starts both the weights and the EMA from the 256 px model's
online weights when it has them (its EMA otherwise); a workdir gives its params and its EMA here,
an export its EMA for both.
"""

from dimsum_jax import config_utils

VARIANTS = ('', 'dit', 'dim', 'finetune', 'dim_finetune')


def get_config(arg=''):
  config_utils.check_variant(arg, VARIANTS, 'configs/imagenet512.py')
  c = config_utils.base_config()
  c.data.name = 'latents'
  c.data.image_size = 64
  c.data.channels = 4
  c.data.global_batch_size = 256
  c.data.random_flip = False

  c.model.name = 'DiMSUM-L/2'
  c.model.input_size = 64
  c.model.in_channels = 4
  c.model.dtype = 'bfloat16'  # bf16 compute, float32 parameters (upstream: float32)
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

  if arg == 'dit':
    config_utils.as_dit(c)
  elif arg == 'finetune':
    c.init_from.path = 'runs/imagenet256'  # --config.init_from.path= the 256 px run
    c.num_train_steps = 64_000
    c.optim.warmup_steps = 2500
    c.checkpoint_every_steps = 8_000
    c.sample.every_steps = 8_000
  elif arg in ('dim', 'dim_finetune'):
    config_utils.as_dim(c, 'DiM-H/2')
    c.model.dim_padding = 'rho_pad'
    c.data.global_batch_size = 240
    c.num_train_steps = 64_000
    c.optim.warmup_steps = 2500
    c.checkpoint_every_steps = 10_000  # upstream's save_interval
    c.sample.every_steps = 10_000
    c.sample.cfg_scale = 1.7  # U-ViT scale 0.7
    if arg == 'dim_finetune':
      c.init_from.path = 'runs/imagenet256_dim_h'  # --config.init_from.path= the 256 px H run
  return c
