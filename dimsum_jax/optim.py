"""The optimiser section of the config: its defaults, its validation, AdamW and the schedule.

Upstream DiMSUM trains with AdamW at torch's defaults (no weight decay), a constant learning rate,
global-norm clipping and an EMA of the parameters every step; DiM adds a linear warm-up and weight
decay. `config.optim` holds every field below; train.py reads it through these functions.
"""

from __future__ import annotations

import ml_collections
import optax

from dimsum_jax import choices

SCHEDULES = ('constant', 'cosine', 'linear')


def default_optim_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.learning_rate = 1e-4
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.0
  c.grad_clip = 2.0  # max global gradient norm (0 = no clipping)
  c.schedule = 'constant'  # constant | cosine | linear (decay after the warmup)
  c.warmup_steps = 0
  c.end_learning_rate = 1e-6  # where cosine / linear decay ends (at num_train_steps)
  c.ema_decay = 0.9999
  # Passes per step: the per-device batch runs through the model as this many micro-batches
  # (gradients averaged, one AdamW and EMA update). 0 = as few as fit the device's memory
  # (dimsum_jax.memory; one pass where the device reports no limit, as on CPU).
  c.grad_accum_steps = 0
  return c


def validate(c) -> None:
  """One sentence (ValueError) for a value the optimiser cannot take."""
  choices.check('optim.schedule', c.schedule, SCHEDULES)
  if not c.learning_rate > 0:
    raise ValueError(f'--config.optim.learning_rate={c.learning_rate} must be positive.')
  if not 0 <= c.ema_decay < 1:
    raise ValueError(f'--config.optim.ema_decay={c.ema_decay} must be in [0, 1).')
  if c.grad_accum_steps < 0 or c.warmup_steps < 0 or c.grad_clip < 0:
    raise ValueError(
      '--config.optim.grad_accum_steps, warmup_steps and grad_clip must not be negative.'
    )


def learning_rate_schedule(optim, num_train_steps):
  """Constant (upstream) or cosine / linear decay, each after an optional linear warmup."""
  validate(optim)
  lr, warmup = optim.learning_rate, optim.warmup_steps
  if optim.schedule == 'constant':
    decay = optax.constant_schedule(lr)
  elif optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(
      lr, max(num_train_steps - warmup, 1), alpha=optim.end_learning_rate / lr
    )
  else:
    decay = optax.linear_schedule(lr, optim.end_learning_rate, max(num_train_steps - warmup, 1))
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(optim, schedule):
  """AdamW (torch defaults: eps outside the sqrt, decoupled decay) after global-norm clipping."""
  adamw = optax.adamw(
    schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
  )
  if optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
  return adamw
