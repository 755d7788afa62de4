"""DiM-H/2 on ImageNet 512 (class-conditional, SD-VAE latents [64, 64, 4]): DiM's fine-tune.

  python -m dimsum_jax.main --config=configs/imagenet512_dim.py --workdir=$WORKDIR \
      --config.data.data_dir=$LATENTS512 --config.vae.dir=$VAE

Upstream (configs/imagenet512_H_DiM_ft.py; reference sections 10-11): the 256 px DiM-H/2 at
425 k steps warm-starts the 512 px model (863.6 M parameters: the position table resized
bilinearly to the 32x32 grid, `dimsum_jax.models.dim_convert.transfer_state_dict`; the pad
layout switches to rho_pad), then 64 k steps at batch 240 (upstream sets
gradient_accumulation_steps 2, which its loop may not apply), AdamW lr 1e-4, no weight decay,
betas (0.99, 0.99), eps 1e-15, linear warm-up over 2 500 steps then constant, grad clip 1.0,
EMA 0.9999, label dropout 0.15, the discrete schedule with noise prediction; evaluation with
DPM-Solver (50 steps) and U-ViT guidance 0.7 (cfg_scale 1.7 here). The default trains from
scratch; `:finetune` is upstream's warm start (dimsum_jax.warm_start; the position table resized
bilinearly, DiM's own interpolation):

  python -m dimsum_jax.main --config=configs/imagenet512_dim.py:finetune --workdir=$WORKDIR512 \
      --config.init_from.path=$WORKDIR256_H --config.data.data_dir=$LATENTS512 --config.vae.dir=$VAE

with $WORKDIR256_H the DiM-H/2 run of configs/imagenet256_dim.py:H (or its export). Upstream
starts both the weights and the EMA from the 256 px model's online weights when it has them
(its EMA otherwise); a workdir gives its params and its EMA here, an export its EMA for both.
"""
from dimsum_jax import config_utils


def get_config(arg=''):
  if arg not in ('', 'finetune'):
    raise ValueError(f'Unknown variant {arg!r} of configs/imagenet512_dim.py: use "" or '
                     f'finetune.')
  c = config_utils.base_config()
  c.data.name = 'latents'
  c.data.image_size = 64
  c.data.channels = 4
  c.data.global_batch_size = 240
  c.data.random_flip = False

  c.model.name = 'DiM-H/2'
  c.model.input_size = 64
  c.model.in_channels = 4
  c.model.dtype = 'bfloat16'          # bf16 compute, float32 parameters (upstream: bf16 autocast)
  c.model.num_classes = 1000
  c.model.label_dropout = 0.15
  c.model.dim_padding = 'rho_pad'

  c.transport.path_type = 'ScaledLinear'
  c.transport.prediction = 'noise'

  c.num_train_steps = 64_000
  c.optim.learning_rate = 1e-4
  c.optim.b1 = 0.99
  c.optim.b2 = 0.99
  c.optim.eps = 1e-15
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 2500
  c.optim.schedule = 'constant'
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999
  c.log_every_steps = 100
  c.checkpoint_every_steps = 10_000   # upstream's save_interval
  c.keep_checkpoints = 3

  c.sample.every_steps = 10_000
  c.sample.classes = (207, 360, 387, 974, 88, 979, 417, 279)
  c.sample.rows = 8
  c.sample.per_row = 4
  c.sample.solver = 'heun'
  c.sample.num_steps = 25
  c.sample.cfg_scale = 1.7            # U-ViT scale 0.7
  if arg == 'finetune':
    c.init_from.path = 'runs/imagenet256_dim_H'   # --config.init_from.path= the 256 px H run
  return c
