"""Training: flow matching of a DiMSUM (or DiT) velocity field, as upstream's dimsum/train.py.

Each step: x1 = a batch of data (or VAE latents), t ~ U[0, 1], x0 ~ N(0, I), loss = mean
|v_theta(x_t, t, y) - u_t|^2 (dimsum_jax.transport), AdamW on the clipped gradient, then
ema <- decay * ema + (1 - decay) * params. The same code runs on one device, a multi-GPU host and
a multi-host pod: sharding.py holds every placement decision, checkpoint.py the Orbax side.
With config.eval on, EMA samples are scored every eval.every_steps steps and at the end
(dimsum_jax.evaluate.training): eval/<metric> scalars, the scores saved in that step's checkpoint,
and the checkpoint of the best eval.best_metric kept besides the last keep_checkpoints.
"""

import functools
import os
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dimsum_jax import checkpoint
from dimsum_jax import config_utils
from dimsum_jax import memory
from dimsum_jax import metrics as metrics_lib
from dimsum_jax import models
from dimsum_jax import optim as optim_lib
from dimsum_jax import sharding
from dimsum_jax import training_grids
from dimsum_jax import transport
from dimsum_jax import warm_start
from dimsum_jax import data as data_lib
from dimsum_jax.evaluate import config as eval_config
from dimsum_jax.evaluate import training as eval_training


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimiser steps done
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array  # base key; each step uses fold_in(rng, step)


class SetupError(ValueError):
  """A config/workdir/data mistake that the user fixes; the message says how."""


# ---------------------------------------------------------------------------------------------
# State and step (pure functions; jitted with explicit shardings below)


def init_state(rng, *, model, tx, image_shape, conditional):
  init_rng, dropout_rng, train_rng = jax.random.split(rng, 3)
  x = jnp.zeros((1, *image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  y = jnp.zeros((1,), jnp.int32) if conditional else None
  params = model.init({'params': init_rng, 'dropout': dropout_rng}, x, t, y)['params']
  return TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    ema_params=jax.tree.map(jnp.copy, params),  # EMA starts as an exact copy
    opt_state=tx.init(params),
    rng=train_rng,
  )


def batch_loss(params, micro, rng, *, model, transport_config):
  """Mean flow-matching loss of a (micro-)batch {'x0', 'x1', 't', 'y'} with dropout key `rng`."""

  def velocity(x_t, t, y):
    return model.apply({'params': params}, x_t, t, y, train=True, rngs={'dropout': rng})

  return transport.loss_at(
    velocity, micro['x0'], micro['x1'], micro['t'], micro['y'], transport_config
  ).mean()


def train_step(
  state, batch, *, model, tx, schedule, transport_config, ema_decay, conditional, grad_accum_steps=1
):
  """One optimiser step on a global batch {'image': x1 [B,H,W,C], 'label': y [B]}.

  With grad_accum_steps = k > 1 the batch runs through the model as k micro-batches of B/k (a
  lax.scan, so only one micro-batch's activations are alive at a time); the loss and gradient are
  the means over the whole batch, and AdamW, the EMA, the step and the learning rate advance
  once. Noise and times are drawn for the whole batch first, so k changes only the order of the
  sums (and the dropout draws); micro-batch j takes rows j, j + k, j + 2k, ..., which keeps every
  device's rows on that device.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  loss_rng, dropout_rng = jax.random.split(rng)
  x0, t = transport.draw_noise_and_time(loss_rng, batch['image'], transport_config)
  data = {'x0': x0, 'x1': batch['image'], 't': t, 'y': batch['label'] if conditional else None}

  grad_fn = jax.value_and_grad(
    functools.partial(batch_loss, model=model, transport_config=transport_config)
  )
  k = grad_accum_steps
  if k == 1:
    loss, grads = grad_fn(state.params, data, dropout_rng)
  else:
    micro = jax.tree.map(lambda a: jnp.moveaxis(a.reshape(-1, k, *a.shape[1:]), 1, 0), data)

    def accumulate(total, xs):
      j, micro_batch = xs
      out = grad_fn(state.params, micro_batch, jax.random.fold_in(dropout_rng, j))
      return jax.tree.map(jnp.add, total, out), None

    zeros = (jnp.zeros([], jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
    loss, grads = jax.tree.map(lambda x: x / k, (loss, grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, step_size=1.0 - ema_decay)
  metrics = {
    'loss': loss,
    'grad_norm': optax.tree.norm(grads),
    'param_norm': optax.tree.norm(params),
    'learning_rate': schedule(state.step),
  }
  new_state = state.replace(
    step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
  )
  return new_state, metrics


# ---------------------------------------------------------------------------------------------
# Placement: the state is born sharded; one jitted step with explicit shardings


class Training(NamedTuple):
  model: Any
  abstract_state: Any  # ShapeDtypeStructs with their shardings: also the Orbax restore target
  state_sharding: Any
  init: Callable  # rng -> TrainState, created directly in its shards
  update: Callable  # (state, global batch) -> (state, metrics); donates the old state
  grad_accum_steps: int  # passes per step (config.optim.grad_accum_steps; 0 becomes 1 until
  # compile_update chooses it from the device's memory)
  make_update: Callable  # grad_accum_steps -> another `update`
  plan: Any  # memory.Plan behind a chosen grad_accum_steps (compile_update), or None


def abstract_batch(config, mesh):
  """The global batch the step takes: {'image': [B, H, W, C], 'label': [B]}, split over devices."""
  b, batch_sharding = config.data.global_batch_size, sharding.batch_sharding(mesh)
  return {
    'image': jax.ShapeDtypeStruct(
      (b, *config_utils.image_shape(config)), jnp.float32, sharding=batch_sharding
    ),
    'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding),
  }


def build(config, mesh):
  """Model, optimiser, state shardings (from config.sharding_rules) and the jitted functions."""
  try:
    model = models.create_model(config.model)
  except ValueError as e:  # unknown model name or dtype
    raise SetupError(str(e)) from e
  schedule = optim_lib.learning_rate_schedule(config.optim, config.num_train_steps)
  tx = optim_lib.make_optimizer(config.optim, schedule)
  conditional = config.model.num_classes > 0
  init = functools.partial(
    init_state,
    model=model,
    tx=tx,
    image_shape=config_utils.image_shape(config),
    conditional=conditional,
  )
  try:
    abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
  except ValueError as e:  # the model's own size checks (grid, heads, depth), run at init
    raise SetupError(f'config.model cannot be built: {e}') from e
  state_sharding = sharding.tree_shardings(abstract_state, mesh, config.sharding_rules)
  abstract_state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sharding
  )
  step = functools.partial(
    train_step,
    model=model,
    tx=tx,
    schedule=schedule,
    transport_config=config.transport,
    ema_decay=config.optim.ema_decay,
    conditional=conditional,
  )

  def make_update(grad_accum_steps):
    return jax.jit(
      functools.partial(step, grad_accum_steps=grad_accum_steps),
      in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=0,
    )

  k = check_grad_accum_steps(config, mesh) or 1  # 0 is resolved by compile_update
  return Training(
    model,
    abstract_state,
    state_sharding,
    jax.jit(init, out_shardings=state_sharding),
    make_update(k),
    k,
    make_update,
    None,
  )


def check_grad_accum_steps(config, mesh):
  """config.optim.grad_accum_steps, or a SetupError when it does not split the per-device batch."""
  per_device = config.data.global_batch_size // mesh.size
  k = config.optim.grad_accum_steps
  if k < 0 or (k and per_device % k):
    raise SetupError(
      f'--config.optim.grad_accum_steps={k} does not divide the per-device batch of '
      f'{per_device} ({config.data.global_batch_size} over {mesh.size} devices): use 0 (as '
      f'few passes as fit) or one of {memory.divisors(per_device)}.'
    )
  return k


def memory_plan(config, mesh, model, abstract_state):
  """memory.Plan of this model and state: residuals traced for global batches of 1x and 2x the
  device count (so the Pallas scan sees a batch it can split under the mesh)."""
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_state.params)
  image_shape = config_utils.image_shape(config)
  conditional = config.model.num_classes > 0
  loss = functools.partial(
    batch_loss, rng=jax.random.PRNGKey(0), model=model, transport_config=config.transport
  )

  def loss_of_batch(n):
    f32 = jnp.float32
    micro = {
      'x0': jax.ShapeDtypeStruct((n, *image_shape), f32),
      'x1': jax.ShapeDtypeStruct((n, *image_shape), f32),
      't': jax.ShapeDtypeStruct((n,), f32),
      'y': jax.ShapeDtypeStruct((n,), jnp.int32) if conditional else None,
    }
    return loss, (params, micro)

  d = mesh.size
  one, two = (memory.residual_bytes(loss_of_batch, n * d) for n in (1, 2))
  per_image = max(two - one, 0) / d  # grows with the batch: split over the devices
  fixed = max(one - per_image * d, 0)
  return memory.Plan(
    memory.bytes_on_one_device(abstract_state), memory.bytes_on_one_device(params), fixed, per_image
  )


def compile_update(training, config, mesh):
  """(training with the compiled update, seconds): the step compiled ahead, its memory plan read
  before any step runs. If XLA's plan exceeds the device's limit, a chosen (0) grad_accum_steps
  moves to the next divisor and compiles again; a set one stops with the fix."""
  per_device = config.data.global_batch_size // mesh.size
  limit = memory.device_limit_bytes()
  batch = abstract_batch(config, mesh)
  t, k, update = time.monotonic(), training.grad_accum_steps, training.update
  if not config.optim.grad_accum_steps and limit is not None:
    plan = memory_plan(config, mesh, training.model, training.abstract_state)
    k = memory.fewest_passes(per_device, plan, limit)
    training = training._replace(plan=plan)
    update = training.make_update(k) if k != training.grad_accum_steps else update
  planned_s = time.monotonic() - t
  while True:
    t_lower = time.monotonic()
    lowered = update.lower(training.abstract_state, batch)
    t_compile = time.monotonic()
    compiled = lowered.compile()
    logging.info(
      'Step with %d pass(es): planned in %.1f s, traced and lowered in %.1f s, compiled in %.1f s.',
      k,
      planned_s,
      t_compile - t_lower,
      time.monotonic() - t_compile,
    )
    planned = memory.plan_bytes(compiled)
    if limit is None or planned is None or planned <= memory.PLAN_HEADROOM * limit:
      break
    larger = [d for d in memory.divisors(per_device) if d > k]
    if config.optim.grad_accum_steps or not larger:
      raise SetupError(
        f'The train step with micro-batches of {per_device // k} images per device needs '
        f'{planned / memory.GIB:.1f} GiB but the device gives {limit / memory.GIB:.1f} GiB: '
        + (
          f'set --config.optim.grad_accum_steps={larger[0]} (or 0 to choose).'
          if larger
          else 'use a smaller model, input or --config.data.global_batch_size.'
        )
      )
    logging.warning(
      'The step with %d pass(es) plans %.1f GiB of %.1f: trying %d.',
      k,
      planned / memory.GIB,
      limit / memory.GIB,
      larger[0],
    )
    k = larger[0]
    update = training.make_update(k)
  return training._replace(update=compiled, grad_accum_steps=k), time.monotonic() - t


# ---------------------------------------------------------------------------------------------
# Setup checks: one sentence each, before anything is written


# (flag, choices, canonicaliser or None for an exact match): the enum-valued fields. A value
# passes exactly when the code that reads it would accept it, so the canonicalisers are that
# code's own (transport and the ODE solver accept other spellings; the model fields do not).
def check_choices(config):
  """SetupError naming the flag and its choices for a misspelt value, from each section's own
  validation (config_utils.validate).

  The transport, solver and model fields are read only when the step or the sampler is traced,
  after the workdir holds checkpoints/ and config.json (which a resumed run would overwrite with
  the bad value), and loss_weight with velocity prediction is never read at all: a mistake has to
  stop the run before anything is written, in one sentence."""
  try:
    config_utils.validate(config)
  except ValueError as e:
    raise SetupError(str(e)) from e


def check_config(config, dataset, vae_module=None):
  """One-sentence SetupErrors for data that does not fit the model; True when each pixel batch
  is to be encoded by the VAE (pixel data, a VAE and a model that does not take pixels).

  The latent shape comes from the VAE itself (its downsampling factor and latent channels), not
  from the SD VAE's 8x and 4 channels, so any converted AutoencoderKL works."""
  c = config
  h, w, ch = dataset.image_shape
  latent_from_vae = (
    vae_module is not None and ch == vae_module.in_channels and c.model.in_channels != ch
  )
  size, channels, note = h, ch, ''
  if latent_from_vae:
    factor = vae_module.downsampling_factor
    if h % factor or w % factor:
      raise SetupError(
        f'The data gives [{h}, {w}, {ch}] images but the VAE of config.vae.dir '
        f'downsamples {factor}x: set --config.data.image_size to a multiple of '
        f'{factor}.'
      )
    size, channels = h // factor, vae_module.latent_channels
    note = f' (VAE latents {[size, w // factor, channels]})'
  if (c.model.input_size, c.model.in_channels) != (size, channels):
    raise SetupError(
      f'The data gives [{h}, {w}, {ch}] inputs{note} but the model expects '
      f'[{c.model.input_size}, {c.model.input_size}, {c.model.in_channels}]: set '
      f'--config.model.input_size={size} --config.model.in_channels={channels}.'
    )
  if vae_module is not None and not latent_from_vae and channels != vae_module.latent_channels:
    # A pixel model with a VAE: its sample grids would be "decoded" as if they were latents.
    raise SetupError(
      f'config.vae.dir is set but the model works on [{size}, {size}, {channels}] '
      f'pixels, not the VAE\'s {vae_module.latent_channels}-channel latents: unset '
      f'it (--config.vae.dir=) or set --config.model.in_channels='
      f'{vae_module.latent_channels} to train on VAE latents.'
    )
  if c.model.num_classes != dataset.num_classes:
    raise SetupError(
      f'The data has {dataset.num_classes} classes (0 = unconditional) but '
      f'config.model.num_classes is {c.model.num_classes}: set '
      f'--config.model.num_classes={dataset.num_classes}.'
    )
  if c.num_train_steps <= 0 or c.log_every_steps <= 0 or c.checkpoint_every_steps <= 0:
    raise SetupError(
      'num_train_steps, log_every_steps and checkpoint_every_steps must be positive.'
    )
  return latent_from_vae


# Errors whose message is the whole story: the run stops with it and no traceback.
USER_ERRORS = (
  SetupError,
  checkpoint.CheckpointError,
  FloatingPointError,
  eval_config.EvalConfigError,
  warm_start.WarmStartError,
)


# ---------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir`, resuming from the newest good checkpoint there."""
  metrics_lib.quiet_library_logs()
  try:
    return _train_and_evaluate(config, workdir)
  except USER_ERRORS as e:
    logging.error('%s', e)
    raise SystemExit(f'error: {e}') from e


def _train_and_evaluate(config, workdir):
  check_choices(config)  # before anything, the workdir included, is touched
  checkpoint.check_workdir_free(workdir)  # another run trains there: stop before compiling
  sharding.initialize_distributed()
  if config.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache_dir))
  try:
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.data.global_batch_size, mesh)
  except ValueError as e:
    raise SetupError(str(e)) from e
  # config.eval's settings; its files are read by eval_training.prepare.
  eval_config.validate(config.eval, config.model, mesh.size, config.vae.dir)
  # Traced under the mesh, the Pallas selective scan (a custom call XLA cannot partition) runs on
  # each device's share of the batch instead of on an all-gathered batch.
  with jax.set_mesh(mesh), checkpoint.WorkdirLock(workdir) as lock:
    return _train(config, workdir, mesh, lock)


def _train(config, workdir, mesh, lock):
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0

  # This process's share of every global batch.
  try:
    dataset = data_lib.create_dataset(
      config.data,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      seed=config.seed,
    )
  except (ValueError, OSError, ImportError) as e:  # the data module's one-sentence errors
    raise SetupError(str(e)) from e
  vae = _load_vae(config, mesh) if config.vae.dir else None
  latent_from_vae = check_config(config, dataset, vae_module=vae[1] if vae else None)
  training = build(config, mesh)
  # config.eval: the feature net, the reference and the sampler, before anything is written.
  evaluator = eval_training.prepare(
    config, mesh, training.model, training.abstract_state.ema_params, vae
  )
  start = warm_start.prepare(config, workdir, training.abstract_state.params, mesh)  # reads only
  # The jitted, donated step, compiled ahead (before the workdir is touched) to check its memory.
  training, seconds = compile_update(training, config, mesh)
  update = training.update
  logging.info(
    'Compiled the train step in %.1f s (%d pass(es) of %d images per device).',
    seconds,
    training.grad_accum_steps,
    config.data.global_batch_size // mesh.size // training.grad_accum_steps,
  )
  abstract_state = training.abstract_state

  # Resume from the workdir, or start afresh.
  os.makedirs(workdir, exist_ok=True)
  lock.acquire()  # one run per workdir: stops, naming the other run, before anything is written
  manager = checkpoint.create_manager(
    workdir, keep=config.keep_checkpoints, best=eval_config.best(config.eval)
  )
  restored = checkpoint.restore_latest(manager, abstract_state, mesh)
  if restored is not None:
    state, data_state = restored
    try:
      dataset.set_state(data_state)
    except ValueError as e:
      raise SetupError(str(e)) from e
  else:
    state = training.init(jax.random.PRNGKey(config.seed))
    if start is not None:  # config.init_from: its weights, a fresh optimiser at step 0
      state = state.replace(**warm_start.place(start, training.state_sharding.params))
  checkpoint.save_config(workdir, config)
  start_step = int(jax.device_get(state.step))
  writer = metrics_lib.create_writer(workdir, just_logging=not is_main)
  if start_step == 0:
    num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    logging.info(
      '%s: %.2f M parameters; mesh %s; global batch %d.',
      config.model.name,
      num_params / 1e6,
      dict(mesh.shape),
      config.data.global_batch_size,
    )
    writer.write_hparams({'num_params': num_params, **metrics_lib.flat_config(config)})

  sampler = training_grids.make_sampler(
    config, training.model, mesh, training.state_sharding.ema_params, vae
  )
  encode = None
  if latent_from_vae:  # a fresh posterior sample per step, as upstream
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    encode = vae[0].batch_encoder(*vae[1:], rng, sharding.batch_sharding(mesh))

  replicated = sharding.replicated(mesh)
  progress = metrics_lib.ReportProgress(
    num_train_steps=config.num_train_steps,
    batch_size=config.data.global_batch_size,
    writer=writer,
    every_steps=config.log_every_steps,
  )
  preemption = checkpoint.PreemptionWatch()
  on_device, on_host = [], []  # per-step metrics not yet fetched / fetched but not yet logged
  last_saved = start_step if restored is not None else None
  step = start_step
  logging.info('Training from step %d to %d.', start_step, config.num_train_steps)
  progress(start_step)
  try:
    with jax.transfer_guard('disallow'):
      while step < config.num_train_steps:
        with progress.timed('data'):
          local_batch = next(dataset, None)
          if local_batch is None:
            logging.warning('The data ran out after step %d (config.data.num_epochs).', step)
            break
          batch = sharding.global_batch(local_batch, mesh)
          if encode is not None:
            batch['image'] = encode(batch['image'], jax.device_put(np.int32(step), replicated))
        state, step_metrics = update(state, batch)
        step += 1
        on_device.append(step_metrics)

        preempted = preemption.reached(step, manager)
        done = step == config.num_train_steps
        # config.eval (not when preempted: save now): its scores go into this step's checkpoint.
        evaluate = evaluator is not None and not preempted and evaluator.due(step, done)
        save_now = preempted or done or step % config.checkpoint_every_steps == 0 or evaluate
        if save_now or step % config.log_every_steps == 0:
          on_host += jax.device_get(on_device)
          on_device = []
          _stop_if_not_finite(on_host, step, last_saved, manager)
        if step % config.log_every_steps == 0 or done:
          writer.write_scalars(step, {k: np.mean([m[k] for m in on_host]) for k in on_host[0]})
          on_host = []
          progress(step)  # after the metrics fetch, so steps/s counts finished steps
        if save_now:
          scores = None
          if evaluate:
            with progress.timed('eval'):
              scores = evaluator(step, state.ema_params, writer, manager)
          with progress.timed('checkpoint'):
            _save(manager, step, state, dataset, mesh, metrics=scores)
          last_saved = step
        if training_grids.sample_due(config.sample.every_steps, step, done):
          with progress.timed('sample'):
            training_grids.write_samples(
              config, workdir, sampler, state.ema_params, step, writer, is_main
            )
        if preempted:
          logging.warning(
            'Preempted: saved step %d to %s; run the same command to resume.',
            step,
            checkpoint.checkpoint_dir(workdir),
          )
          break
    if last_saved != step:  # the data ran out
      _stop_if_not_finite(on_host + jax.device_get(on_device), step, last_saved, manager)
      _save(manager, step, state, dataset, mesh)
  finally:
    dataset.close()
    manager.wait_until_finished()
    writer.close()
    preemption.close()
  manager.close()
  logging.info('Finished at step %d.', step)
  return state


def _save(manager, step, state, dataset, mesh, metrics=None):
  data_state = checkpoint.encode_data_state(dataset.get_state(), mesh)
  checkpoint.save(manager, step, state, data_state, force=True, metrics=metrics)


def _stop_if_not_finite(host_metrics, step, last_saved, manager):
  """Stops the run at the first non-finite loss or parameter norm; nothing of it is saved."""
  for i, m in enumerate(host_metrics):
    if not (np.isfinite(m['loss']) and np.isfinite(m['param_norm'])):
      bad = step - len(host_metrics) + 1 + i
      manager.wait_until_finished()
      kept = (
        f'the last good checkpoint, {manager.directory}/{last_saved}, is intact'
        if last_saved is not None
        else 'no checkpoint was saved'
      )
      raise FloatingPointError(
        f'Loss is {m["loss"]} (parameter norm {m["param_norm"]}) at step {bad}: stopping; '
        f'{kept}. Lower the learning rate or check the data before resuming.'
      )


# ---------------------------------------------------------------------------------------------
# VAE


def _load_vae(config, mesh):
  from dimsum_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top

  try:
    module, params = vae_lib.load_vae(config.vae.dir, sharding=sharding.replicated(mesh))
  except (FileNotFoundError, ValueError) as e:  # vae.load_vae's one-sentence errors
    raise SetupError(str(e)) from e
  return vae_lib, module, params
