"""The full training ConfigDict with every field and its default; configs/*.py start from it.

Sections: model (dimsum_jax.models), transport (dimsum_jax.transport), data (dimsum_jax.data),
init_from (dimsum_jax.warm_start), optim, mesh + sharding_rules, sample, vae, and the loop's own
fields below. Every field exists here, so `--config.x.y=v` overrides are type-checked and
unknown keys are refused.
"""
import ml_collections

from dimsum_jax import models
from dimsum_jax import transport
from dimsum_jax import warm_start
from dimsum_jax.data import config as data_config


def base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = models.default_model_config()
  c.transport = transport.default_transport_config()
  c.data = data_config.default_data_config()
  c.init_from = warm_start.default_config()   # start from another run's weights ('' = none)

  c.num_train_steps = 100_000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5_000
  c.keep_checkpoints = 3              # the last k checkpoints are kept
  # Persistent XLA compilation cache: a second run of the same step loads it instead of
  # compiling ('' = off; ~ is the user's home).
  c.compilation_cache_dir = '~/.cache/dimsum_jax/xla'

  # Upstream: AdamW (torch defaults, no weight decay), constant lr, grad-norm clip, EMA 0.9999.
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 2.0             # max global gradient norm (0 = no clipping)
  c.optim.schedule = 'constant'       # constant | cosine | linear (decay after the warmup)
  c.optim.warmup_steps = 0
  c.optim.end_learning_rate = 1e-6    # where cosine / linear decay ends (at num_train_steps)
  c.optim.ema_decay = 0.9999
  # Passes per step: the per-device batch runs through the model as this many micro-batches
  # (gradients averaged, one AdamW and EMA update). 0 = as few as fit the device's memory
  # (dimsum_jax.memory; one pass where the device reports no limit, as on CPU).
  c.optim.grad_accum_steps = 0

  # Devices: a mesh of (data, fsdp); -1 takes the remaining devices. Parameters, EMA and
  # optimiser state are placed by (regex on the leaf path, 'fsdp' | 'replicate') rules.
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1})
  c.sharding_rules = (('(params|ema_params|opt_state)/.*', 'fsdp'), ('.*', 'replicate'))

  # EMA sample grids written to WORKDIR/samples/ every `every_steps` and at the end
  # (0 = only at the end, -1 = never).
  c.sample = ml_collections.ConfigDict()
  c.sample.every_steps = 10_000
  c.sample.rows = 10                  # one class per row (conditional data)
  c.sample.per_row = 8
  c.sample.classes = ()               # row classes; () = spread evenly over all classes
  c.sample.solver = 'euler'           # ODE solver of dimsum_jax.sampling: euler | heun | dopri5
  c.sample.num_steps = 50             # euler / heun steps from noise (t = 0) to data (t = 1)
  c.sample.cfg_scale = 1.0            # classifier-free guidance scale (1 = none)
  c.sample.seed = 0
  c.sample.png_scale = 0              # integer upscaling of the PNG (0 = to at least 64 px tiles)

  # SD VAE converted by `python -m dimsum_jax.vae.convert` ('' = none). With pixel data and a
  # latent model, each batch is encoded (a fresh posterior sample every step, as upstream);
  # sample grids of latent models are decoded with it.
  c.vae = ml_collections.ConfigDict({'dir': ''})
  return c
