"""Training: flow matching of a DiMSUM (or DiT) velocity field, as upstream's dimsum/train.py.

Each step: x1 = a batch of data (or VAE latents), t ~ U[0, 1], x0 ~ N(0, I), loss = mean
|v_theta(x_t, t, y) - u_t|^2 (dimsum_jax.transport), AdamW on the clipped gradient, then
ema <- decay * ema + (1 - decay) * params. The same code runs on one device, a multi-GPU host and
a multi-host pod: sharding.py holds every placement decision, checkpoint.py the Orbax side.
"""
import functools
import os
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from dimsum_jax import checkpoint
from dimsum_jax import metrics as metrics_lib
from dimsum_jax import models
from dimsum_jax import sharding
from dimsum_jax import transport
from dimsum_jax import data as data_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # optimiser steps done
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array         # base key; each step uses fold_in(rng, step)


class SetupError(ValueError):
  """A config/workdir/data mistake that the user fixes; the message says how."""


# ---------------------------------------------------------------------------------------------
# Optimiser


def learning_rate_schedule(optim, num_train_steps):
  """Constant (upstream) or cosine / linear decay, each after an optional linear warmup."""
  lr, warmup = optim.learning_rate, optim.warmup_steps
  if optim.schedule == 'constant':
    decay = optax.constant_schedule(lr)
  elif optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(lr, max(num_train_steps - warmup, 1),
                                        alpha=optim.end_learning_rate / lr)
  elif optim.schedule == 'linear':
    decay = optax.linear_schedule(lr, optim.end_learning_rate, max(num_train_steps - warmup, 1))
  else:
    raise SetupError(f'config.optim.schedule is {optim.schedule!r}: use constant, cosine or linear.')
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(optim, schedule):
  """AdamW (torch defaults: eps outside the sqrt, decoupled decay) after global-norm clipping."""
  adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay)
  if optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
  return adamw


# ---------------------------------------------------------------------------------------------
# State and step (pure functions; jitted with explicit shardings below)


def init_state(rng, *, model, tx, image_shape, conditional):
  init_rng, dropout_rng, train_rng = jax.random.split(rng, 3)
  x = jnp.zeros((1, *image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  y = jnp.zeros((1,), jnp.int32) if conditional else None
  params = model.init({'params': init_rng, 'dropout': dropout_rng}, x, t, y)['params']
  return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),  # EMA starts as an exact copy
                    opt_state=tx.init(params), rng=train_rng)


def train_step(state, batch, *, model, tx, schedule, transport_config, ema_decay, conditional):
  """One optimiser step on a global batch {'image': x1 [B,H,W,C], 'label': y [B]}."""
  rng = jax.random.fold_in(state.rng, state.step)
  loss_rng, dropout_rng = jax.random.split(rng)
  y = batch['label'] if conditional else None

  def loss_fn(params):
    def velocity(x_t, t, y):
      return model.apply({'params': params}, x_t, t, y, train=True, rngs={'dropout': dropout_rng})
    return transport.training_loss(velocity, batch['image'], loss_rng, y, transport_config).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, step_size=1.0 - ema_decay)
  metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads),
             'param_norm': optax.global_norm(params), 'learning_rate': schedule(state.step)}
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                            opt_state=opt_state)
  return new_state, metrics


def sample(params, rng, labels, *, model, image_shape, transport_config, num_steps, cfg_scale,
           num_classes):
  """Euler integration of the probability-flow ODE from noise (t0 ~ 0) to data (t1 ~ 1)."""
  t0, t1 = transport.time_interval(transport_config, eval=True)
  velocity = transport.make_velocity_fn(
      lambda x, t, y: model.apply({'params': params}, x, t, y),
      path_type=transport_config.path_type, prediction=transport_config.prediction)
  x = jax.random.normal(rng, (labels.shape[0], *image_shape), jnp.float32)
  guided = num_classes > 0 and cfg_scale != 1.0

  def drift(x, t):
    tt = jnp.full((x.shape[0],), t, jnp.float32)
    if not num_classes:
      return velocity(x, tt, None)
    if not guided:
      return velocity(x, tt, labels)
    null = jnp.full_like(labels, num_classes)
    v = velocity(jnp.concatenate([x, x]), jnp.concatenate([tt, tt]),
                 jnp.concatenate([labels, null]))
    v_cond, v_uncond = jnp.split(v, 2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)

  dt = (t1 - t0) / num_steps
  x = jax.lax.fori_loop(0, num_steps, lambda i, x: x + dt * drift(x, t0 + i * dt), x)
  return x


# ---------------------------------------------------------------------------------------------
# Setup checks: one sentence each, before anything is written


def check_config(config, dataset):
  c = config
  h, w, ch = dataset.image_shape
  latent_from_vae = bool(c.vae.dir) and ch == 3 and c.model.in_channels == 4
  size = h // 8 if latent_from_vae else h
  channels = 4 if latent_from_vae else ch
  if (c.model.input_size, c.model.in_channels) != (size, channels):
    raise SetupError(
        f'The data gives [{h}, {w}, {ch}] inputs{" (VAE latents " + str([size, size, 4]) + ")" if latent_from_vae else ""} '
        f'but the model expects [{c.model.input_size}, {c.model.input_size}, '
        f'{c.model.in_channels}]: set --config.model.input_size={size} '
        f'--config.model.in_channels={channels}.')
  if c.model.num_classes != dataset.num_classes:
    raise SetupError(f'The data has {dataset.num_classes} classes (0 = unconditional) but '
                     f'config.model.num_classes is {c.model.num_classes}: set '
                     f'--config.model.num_classes={dataset.num_classes}.')
  if c.num_train_steps <= 0 or c.log_every_steps <= 0 or c.checkpoint_every_steps <= 0:
    raise SetupError('num_train_steps, log_every_steps and checkpoint_every_steps must be positive.')
  return latent_from_vae


def _setup_errors():
  return (SetupError, checkpoint.CheckpointError, FileNotFoundError, NotADirectoryError)


# ---------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir`, resuming from the newest good checkpoint there."""
  try:
    return _train_and_evaluate(config, workdir)
  except _setup_errors() as e:
    logging.error('%s', e)
    raise SystemExit(f'error: {e}') from e


def _train_and_evaluate(config, workdir):
  sharding.initialize_distributed()
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if config.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', config.compilation_cache_dir)
  mesh = sharding.make_mesh(config.mesh)
  try:
    sharding.check_batch_size(config.data.global_batch_size, mesh)
  except ValueError as e:
    raise SetupError(str(e)) from e

  # This process's share of every global batch.
  dataset = data_lib.create_dataset(config.data, process_index=jax.process_index(),
                                    process_count=jax.process_count(), seed=config.seed)
  latent_from_vae = check_config(config, dataset)
  vae = _load_vae(config, mesh) if config.vae.dir else None
  image_shape = (config.model.input_size, config.model.input_size, config.model.in_channels)
  conditional = config.model.num_classes > 0

  model = models.create_model(config.model)
  schedule = learning_rate_schedule(config.optim, config.num_train_steps)
  tx = make_optimizer(config.optim, schedule)

  # Parameters born sharded: abstract state -> shardings from the rules -> jitted init.
  init = functools.partial(init_state, model=model, tx=tx, image_shape=image_shape,
                           conditional=conditional)
  rng = jax.random.PRNGKey(config.seed)
  abstract_state = jax.eval_shape(init, rng)
  state_sharding = sharding.tree_shardings(abstract_state, mesh, config.sharding_rules)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
      state_sharding)

  # Resume from the workdir, or start afresh.
  os.makedirs(workdir, exist_ok=True)
  manager = checkpoint.create_manager(workdir, keep=config.keep_checkpoints)
  restored = checkpoint.restore_latest(manager, abstract_state,
                                       checkpoint.abstract_data_state(mesh))
  if restored is not None:
    state, data_array = restored
    dataset.set_state(checkpoint.decode_data_state(data_array))
  else:
    state = jax.jit(init, out_shardings=state_sharding)(rng)
  checkpoint.save_config(workdir, config)
  start_step = int(jax.device_get(state.step))
  writer = metrics_lib.create_writer(workdir, just_logging=not is_main)
  if start_step == 0:
    num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    logging.info('%s: %.2f M parameters; mesh %s; global batch %d.', config.model.name,
                 num_params / 1e6, dict(mesh.shape), config.data.global_batch_size)
    writer.write_hparams({'num_params': num_params, **_flat(config)})

  # One jitted, donated step with explicit shardings; compiled ahead to log its time.
  batch_sharding = sharding.batch_sharding(mesh)
  abstract_batch = {
      'image': jax.ShapeDtypeStruct((config.data.global_batch_size, *image_shape), jnp.float32,
                                    sharding=batch_sharding),
      'label': jax.ShapeDtypeStruct((config.data.global_batch_size,), jnp.int32,
                                    sharding=batch_sharding)}
  step_fn = functools.partial(
      train_step, model=model, tx=tx, schedule=schedule, transport_config=config.transport,
      ema_decay=config.optim.ema_decay, conditional=conditional)
  t = time.monotonic()
  update = jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=0).lower(abstract_state, abstract_batch).compile()
  logging.info('Compiled the train step in %.1f s.', time.monotonic() - t)
  sampler = _make_sampler(config, model, mesh, state_sharding.ema_params, image_shape, vae)
  encode = _make_encoder(config, mesh, vae) if latent_from_vae else None

  progress = metrics_lib.ReportProgress(
      num_train_steps=config.num_train_steps, batch_size=config.data.global_batch_size,
      writer=writer, every_steps=config.log_every_steps)
  preemption = checkpoint.PreemptionWatch()
  pending = []  # per-step metrics (on device) since the last log
  last_saved = start_step if restored is not None else None
  step = start_step
  logging.info('Training from step %d to %d.', start_step, config.num_train_steps)
  try:
    with jax.transfer_guard('disallow'):
      for step in range(start_step + 1, config.num_train_steps + 1):
        with progress.timed('data'):
          batch = sharding.global_batch(next(dataset), mesh)
          if encode is not None:
            batch['image'] = encode(batch['image'], jax.device_put(step))
        state, step_metrics = update(state, batch)
        pending.append(step_metrics)
        progress(step)

        preempted = preemption.reached(step, manager)
        done = step == config.num_train_steps
        save_now = preempted or done or step % config.checkpoint_every_steps == 0
        if save_now or step % config.log_every_steps == 0:
          _check_finite(pending, step, last_saved, manager)
        if step % config.log_every_steps == 0 or done:
          means = jax.device_get(jax.tree.map(lambda *v: jnp.mean(jnp.stack(v)), *pending))
          writer.write_scalars(step, {k: float(v) for k, v in means.items()})
          pending = []
        if save_now:
          with progress.timed('checkpoint'):
            checkpoint.save(manager, step, state, checkpoint.encode_data_state(
                dataset.get_state(), mesh), force=True)
          last_saved = step
        if config.sample.every_steps and step % config.sample.every_steps == 0 or done:
          with progress.timed('sample'):
            _write_samples(config, workdir, sampler, state.ema_params, step, writer, is_main,
                           mesh)
        if preempted:
          logging.warning('Preempted: saved step %d to %s; run the same command to resume.',
                          step, checkpoint.checkpoint_dir(workdir))
          break
  finally:
    manager.wait_until_finished()
    writer.flush()
    preemption.close()
  manager.close()
  logging.info('Finished at step %d.', step)
  return state


def _check_finite(pending, step, last_saved, manager):
  """Stops the run at the first non-finite loss or parameter norm; nothing of it is saved."""
  values = jax.device_get(pending)
  for i, m in enumerate(values):
    if not (np.isfinite(m['loss']) and np.isfinite(m['param_norm'])):
      bad = step - len(values) + 1 + i
      manager.wait_until_finished()
      kept = (f'the last good checkpoint (step {last_saved}) is intact'
              if last_saved is not None else 'no checkpoint was saved')
      raise FloatingPointError(
          f'Loss is {m["loss"]} (parameter norm {m["param_norm"]}) at step {bad}: stopping; '
          f'{kept}. Lower the learning rate or check the data before resuming.')


# ---------------------------------------------------------------------------------------------
# Samples and VAE


def _load_vae(config, mesh):
  from dimsum_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top
  module, params = vae_lib.load_vae(config.vae.dir, sharding=sharding.replicated(mesh))
  return vae_lib, module, params


def _make_encoder(config, mesh, vae):
  """Pixel batch -> scaled VAE latents (a fresh posterior sample per step, as upstream)."""
  vae_lib, module, params = vae
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  batch_sharding = sharding.batch_sharding(mesh)

  @functools.partial(jax.jit, out_shardings=batch_sharding)
  def encode(images, step):
    return vae_lib.images_to_latents(module, params, images, jax.random.fold_in(rng, step))
  return encode


def _sample_labels(config):
  c = config.sample
  if config.model.num_classes == 0:
    return np.zeros([c.rows * c.per_row], np.int32), c.rows
  classes = list(c.classes) or list(np.linspace(0, config.model.num_classes - 1,
                                                min(c.rows, config.model.num_classes)).round())
  return np.repeat(np.asarray(classes, np.int32), c.per_row), len(classes)


def _make_sampler(config, model, mesh, params_sharding, image_shape, vae):
  fn = functools.partial(
      sample, model=model, image_shape=image_shape, transport_config=config.transport,
      num_steps=config.sample.num_steps, cfg_scale=config.sample.cfg_scale,
      num_classes=config.model.num_classes)
  if vae is not None:
    vae_lib, module, vae_params = vae
    latent = fn
    fn = lambda p, r, y: vae_lib.latents_to_images(module, vae_params, latent(p, r, y))
  return jax.jit(fn, in_shardings=(params_sharding, None, None),
                 out_shardings=sharding.replicated(mesh))


def _write_samples(config, workdir, sampler, ema_params, step, writer, is_main, mesh):
  labels, rows = _sample_labels(config)
  rng = jax.random.PRNGKey(config.sample.seed)
  images = jax.device_get(sampler(ema_params, jax.device_put(rng, sharding.replicated(mesh)),
                                  jax.device_put(labels, sharding.replicated(mesh))))
  if not is_main:
    return
  grid = metrics_lib.image_grid(images, rows)
  scale = config.sample.png_scale or max(1, -(-64 // images.shape[1]))
  if scale > 1:
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
  path = os.path.join(workdir, 'samples', f'ema_{step:08d}.png')
  Image.fromarray(grid).save(path)
  writer.write_images(step, {'ema_samples': grid[None]})
  logging.info('Wrote %s.', path)


def _flat(config):
  out = {}
  for k, v in config.items():
    if hasattr(v, 'items'):
      out.update({f'{k}.{kk}': vv for kk, vv in _flat(v).items()})
    else:
      out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
