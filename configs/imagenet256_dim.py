"""DiM-L/2 or DiM-H/2 on ImageNet 256 (class-conditional, SD-VAE latents): DiM's published runs.

  python -m dimsum_jax.main --config=configs/imagenet256_dim.py --workdir=$WORKDIR \
      --config.data.data_dir=$LATENTS --config.vae.dir=$VAE
  python -m dimsum_jax.main --config=configs/imagenet256_dim.py:H --workdir=$WORKDIR_H \
      --config.data.data_dir=$LATENTS --config.vae.dir=$VAE

`:L` (the default) or `:H`. $LATENTS and $VAE as for configs/imagenet256.py (upstream encodes
every image on the fly with a random flip; the flip-doubled latent set holds both mirrors).

Upstream (tyshiwo1/DiM-DiffusionMamba configs/imagenet256_{L,H}_DiM.py; reference section 11):
Stable Diffusion's discrete scaled-linear schedule with noise prediction (`LSimple`, transport
path ScaledLinear), AdamW lr 2e-4, weight decay 0.03 on every parameter, betas (0.99, 0.99),
eps 1e-15, linear warm-up over 5 000 steps then constant, grad-norm clip 1.0, EMA 0.9999 every
step, bf16 mixed precision. DiM-L/2 (D 1024, 49 blocks, 386.1 M parameters): batch 1024,
300 k steps, label dropout 0.15. DiM-H/2 (D 1536, 49 blocks, 862.4 M): batch 768, 750 k steps
(the released checkpoint is at 625 k), label dropout 0.1. Upstream evaluates with DPM-Solver
(50 steps, order 3, 'fast', time-uniform; dimsum_jax.sampling.sample_dpm_solver) and U-ViT
guidance scale 0.4, which is cfg_scale 1.4 in this package's convention (uncond + s (cond -
uncond)); the EMA grids here integrate the probability-flow ODE of the same model (heun, 50
evaluations). Not reproduced: upstream's bf16 rounding of the time input.
"""
from dimsum_jax import config_utils

SIZES = {  # variant: (model, global batch, steps, label dropout)
    'L': ('DiM-L/2', 1024, 300_000, 0.15),
    'H': ('DiM-H/2', 768, 750_000, 0.1),
}


def get_config(arg='L'):
  if arg not in SIZES:
    raise ValueError(f'Unknown variant {arg!r} of configs/imagenet256_dim.py: use L or H.')
  name, batch, steps, label_dropout = SIZES[arg]
  c = config_utils.base_config()
  c.data.name = 'latents'
  c.data.image_size = 32
  c.data.channels = 4
  c.data.global_batch_size = batch
  c.data.random_flip = False          # the set holds every image and its mirror

  c.model.name = name
  c.model.input_size = 32
  c.model.in_channels = 4
  c.model.dtype = 'bfloat16'          # bf16 compute, float32 parameters (upstream: bf16 autocast)
  c.model.num_classes = 1000
  c.model.label_dropout = label_dropout
  c.model.dim_padding = 'lateral'

  c.transport.path_type = 'ScaledLinear'
  c.transport.prediction = 'noise'

  c.num_train_steps = steps
  c.optim.learning_rate = 2e-4
  c.optim.b1 = 0.99
  c.optim.b2 = 0.99
  c.optim.eps = 1e-15
  c.optim.weight_decay = 0.03
  c.optim.warmup_steps = 5000
  c.optim.schedule = 'constant'
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999
  c.log_every_steps = 100
  c.checkpoint_every_steps = 25_000   # upstream's save_interval
  c.keep_checkpoints = 3

  c.sample.every_steps = 25_000
  c.sample.classes = (207, 360, 387, 974, 88, 979, 417, 279)
  c.sample.rows = 8
  c.sample.per_row = 8
  c.sample.solver = 'heun'
  c.sample.num_steps = 25
  c.sample.cfg_scale = 1.4            # U-ViT scale 0.4
  return c
