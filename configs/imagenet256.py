"""DiMSUM-L/2 on ImageNet 256 (class-conditional, SD-VAE latents): upstream's published run.

  python -m dimsum_jax.main --config=configs/imagenet256.py --workdir=$WORKDIR \
      --config.data.data_dir=$LATENTS --config.vae.dir=$VAE

$LATENTS: the flip-doubled latent set (2 x 1 281 167 latents [32, 32, 4], written by the data
module's VAE encoding step); $VAE: the converted sd-vae-ft-ema (python -m dimsum_jax.vae.convert),
used only to decode the sample grids. Multi-host: see launch/.

Upstream (reference section 10): AdamW lr 1e-4, betas 0.9/0.999, no weight decay, constant lr,
grad clip 1.0, EMA 0.9999, global batch 704 (8 GPUs x 88), label dropout 0.15, drop path 0.1,
fp32. 500 epochs of the flip-doubled set = 500 x 3 640 steps = 1.82 M steps (the released
imnet256_510ep is about 1.86 M). Expected: FID-50k 2.11 with CFG 1.4 (dopri5 sampling).
The global batch 704 divides 8, 16, 32 or 64 devices (704 = 64 x 11).
"""
from dimsum_jax import config_utils


def get_config():
  c = config_utils.base_config()
  c.data.name = 'latents'
  c.data.image_size = 32
  c.data.channels = 4
  c.data.global_batch_size = 704
  c.data.random_flip = False          # the set holds every image and its mirror

  c.model.name = 'DiMSUM-L/2'
  c.model.input_size = 32
  c.model.in_channels = 4
  c.model.dtype = 'bfloat16'         # bf16 compute, float32 parameters (upstream: float32)
  c.model.num_classes = 1000
  c.model.label_dropout = 0.15
  c.model.drop_path = 0.1

  c.num_train_steps = 1_820_000
  c.optim.learning_rate = 1e-4
  c.optim.grad_clip = 1.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 7_280    # 2 epochs, as upstream's ckpt_every
  c.keep_checkpoints = 3

  c.sample.every_steps = 20_000
  c.sample.classes = (207, 360, 387, 974, 88, 979, 417, 279)  # upstream sample.py's classes
  c.sample.rows = 8
  c.sample.per_row = 8
  c.sample.cfg_scale = 4.0            # upstream's visual samples (FID uses 1.4)
  return c
