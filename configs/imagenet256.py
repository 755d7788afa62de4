"""ImageNet 256 (class-conditional, SD-VAE latents [32, 32, 4]): DiMSUM, its DiT baseline, DiM.

  python -m dimsum_jax.main --config=configs/imagenet256.py --workdir=$WORKDIR \
      --config.data.data_dir=$LATENTS --config.vae.dir=$VAE
  python -m dimsum_jax.main --config=configs/imagenet256.py:dit --workdir=$WORKDIR_DIT ...
  python -m dimsum_jax.main --config=configs/imagenet256.py:dim --workdir=$WORKDIR_DIM ...
  python -m dimsum_jax.main --config=configs/imagenet256.py:dim_h --workdir=$WORKDIR_DIM_H ...

$LATENTS: the flip-doubled latent set (2 x 1 281 167 latents [32, 32, 4], written by the data
module's VAE encoding step); $VAE: the converted sd-vae-ft-ema (python -m dimsum_jax.vae.convert),
used only to decode the sample grids. Multi-host: see launch/.

'' (default), DiMSUM-L/2, upstream DiMSUM's published run (VinAIResearch/DiMSUM train.py and its
ImageNet script): AdamW lr 1e-4, betas 0.9/0.999, no weight decay, constant lr, grad clip 1.0,
EMA 0.9999, global batch 704 (8 GPUs x 88), label dropout 0.15, drop path 0.1, fp32. 500 epochs
of the flip-doubled set = 500 x 3 640 steps = 1.82 M steps (the released imnet256_510ep is about
1.86 M). Expected: FID-50k 2.11 with CFG 1.4 (dopri5 sampling). The global batch 704 divides 8,
16, 32 or 64 devices (704 = 64 x 11).

dit: the DiT-XL/2 baseline with the same data, objective (GVP flow matching, SiT-style),
optimiser and schedule, so that the two differ only in the network. (DiT/SiT's own recipe: batch
256, no clipping, 7 M steps.)

dim / dim_h: DiM-L/2 / DiM-H/2, DiM's published runs (tyshiwo1/DiM-DiffusionMamba
configs/imagenet256_{L,H}_DiM.py): Stable Diffusion's discrete scaled-linear schedule with noise
prediction (`LSimple`, transport path ScaledLinear), AdamW lr 2e-4, weight decay 0.03 on every
parameter, betas (0.99, 0.99), eps 1e-15, linear warm-up over 5 000 steps then constant,
grad-norm clip 1.0, EMA 0.9999 every step, bf16 mixed precision. DiM-L/2 (D 1024, 49 blocks,
386.1 M parameters): batch 1024, 300 k steps, label dropout 0.15. DiM-H/2 (D 1536, 49 blocks,
862.4 M): batch 768, 750 k steps (the released checkpoint is at 625 k), label dropout 0.1.
Upstream evaluates with DPM-Solver (50 steps, order 3, 'fast', time-uniform;
dimsum_jax.dpm_solver.sample_dpm_solver) and U-ViT guidance scale 0.4, which is cfg_scale 1.4 in
this package's convention (uncond + s (cond - uncond)); the EMA grids here integrate the
probability-flow ODE of the same model (heun, 50 evaluations). Upstream encodes every image on the
fly with a random flip; the flip-doubled latent set holds both mirrors. Not reproduced: upstream's
bf16 rounding of the time input.
"""

from dimsum_jax import config_utils

VARIANTS = ('', 'dit', 'dim', 'dim_h')
DIM_SIZES = {  # variant: (model, global batch, steps, label dropout)
  'dim': ('DiM-L/2', 1024, 300_000, 0.15),
  'dim_h': ('DiM-H/2', 768, 750_000, 0.1),
}


def get_config(arg=''):
  config_utils.check_variant(arg, VARIANTS, 'configs/imagenet256.py')
  c = config_utils.base_config()
  c.data.name = 'latents'
  c.data.image_size = 32
  c.data.channels = 4
  c.data.global_batch_size = 704
  c.data.random_flip = False  # the set holds every image and its mirror

  c.model.name = 'DiMSUM-L/2'
  c.model.input_size = 32
  c.model.in_channels = 4
  c.model.dtype = 'bfloat16'  # bf16 compute, float32 parameters (upstream: float32)
  c.model.num_classes = 1000
  c.model.label_dropout = 0.15
  c.model.drop_path = 0.1

  c.num_train_steps = 1_820_000
  c.optim.learning_rate = 1e-4
  c.optim.grad_clip = 1.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 7_280  # 2 epochs, as upstream's ckpt_every
  c.keep_checkpoints = 3

  c.sample.every_steps = 20_000
  c.sample.classes = (207, 360, 387, 974, 88, 979, 417, 279)  # upstream sample.py's classes
  c.sample.rows = 8
  c.sample.per_row = 8
  c.sample.cfg_scale = 4.0  # upstream's visual samples (FID uses 1.4)

  if arg == 'dit':
    config_utils.as_dit(c)
  elif arg in DIM_SIZES:
    name, batch, steps, label_dropout = DIM_SIZES[arg]
    config_utils.as_dim(c, name)
    c.data.global_batch_size = batch
    c.model.label_dropout = label_dropout
    c.num_train_steps = steps
    c.optim.learning_rate = 2e-4
    c.optim.weight_decay = 0.03
    c.optim.warmup_steps = 5000
    c.checkpoint_every_steps = 25_000  # upstream's save_interval
    c.sample.every_steps = 25_000
    c.sample.cfg_scale = 1.4  # U-ViT scale 0.4
  return c
