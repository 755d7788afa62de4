"""The sample grids of a training run: EMA samples, one class per row, as PNG files.

`sample` integrates the probability-flow ODE (config.sample: solver, steps, CFG scale) from noise
x0 [n, H, W, C] to data; `make_sampler` jits it over the mesh (noise and labels split like a
training batch, the VAE decoding latents to pixels) and returns images [rows * per_row, H', W',
C'] in [-1, 1] on the host; `write_samples` saves WORKDIR/samples/ema_<step>.png atomically and
as an image summary. The training loop (train.py) calls them every sample.every_steps steps.
"""

import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dimsum_jax import config_utils
from dimsum_jax import io_utils
from dimsum_jax import metrics as metrics_lib
from dimsum_jax import sampling
from dimsum_jax import sharding
from dimsum_jax import transport


def sample(params, x0, labels, *, model, transport_config, sample_config, num_classes):
  """EMA samples: the probability-flow ODE from noise x0 (t0 ~ 0) to data (t1 ~ 1), with CFG.

  Returns sampling.ODEResult (x1 and the solver's status; check it with
  sampling.check_ode_result outside jit)."""
  t0, t1 = transport.time_interval(transport_config, eval=True)
  velocity = sampling.make_sampling_velocity_fn(
    lambda x, t, y: model.apply({'params': params}, x, t, y),
    labels if num_classes else None,
    path_type=transport_config.path_type,
    prediction=transport_config.prediction,
    cfg_scale=sample_config.cfg_scale if num_classes else 1.0,
    null_label=num_classes,
  )
  return sampling.solve_ode(
    velocity, x0, solver=sample_config.solver, num_steps=sample_config.num_steps, t0=t0, t1=t1
  )


def sample_labels(config):
  """Labels of the grid, row by row: one class per row (evenly spread unless listed)."""
  c = config.sample
  if config.model.num_classes == 0:
    return np.zeros([c.rows * c.per_row], np.int32), c.rows
  classes = list(c.classes) or list(
    np.linspace(0, config.model.num_classes - 1, min(c.rows, config.model.num_classes)).round()
  )
  return np.repeat(np.asarray(classes, np.int32), c.per_row), len(classes)


def make_sampler(config, model, mesh, params_sharding, vae):
  """ema_params -> (images [rows * per_row, H, W, C] in [-1, 1] on the host, rows, ODEResult).

  Noise and labels are split over the devices like a training batch (padded up to a multiple
  of the device count); the images come back whole on every process."""
  labels, rows = sample_labels(config)
  image_shape = config_utils.image_shape(config)
  n = len(labels)
  padded = -(-n // mesh.size) * mesh.size
  labels = np.concatenate([labels, np.repeat(labels[-1:], padded - n)])
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)

  def fn(params, rng, labels):
    x0 = jax.random.normal(rng, (n, *image_shape), jnp.float32)  # the same for any padding
    x0 = jnp.pad(x0, [(0, padded - n)] + [(0, 0)] * len(image_shape))
    x0 = jax.lax.with_sharding_constraint(x0, batch_sharding)  # the ODE runs split over devices
    result = sample(
      params,
      x0,
      labels,
      model=model,
      transport_config=config.transport,
      sample_config=config.sample,
      num_classes=config.model.num_classes,
    )
    images = result.x1
    if vae is not None:
      vae_lib, module, vae_params = vae
      images = vae_lib.latents_to_images(module, vae_params, images)
    return images, result._replace(x1=None)

  jitted = jax.jit(
    fn, in_shardings=(params_sharding, replicated, batch_sharding), out_shardings=replicated
  )
  rng = jax.device_put(jax.random.PRNGKey(config.sample.seed), replicated)
  labels = jax.make_array_from_callback(labels.shape, batch_sharding, lambda i: labels[i])

  def sampler(ema_params):
    images, result = jax.device_get(jitted(ema_params, rng, labels))
    return images[:n], rows, result

  return sampler


def sample_due(every_steps, step, done):
  """every_steps > 0: every that many steps and at the end; 0: only at the end; -1: never."""
  return every_steps >= 0 and (done or every_steps > 0 and step % every_steps == 0)


def write_samples(config, workdir, sampler, ema_params, step, writer, is_main):
  """A grid of EMA samples, one class per row, as WORKDIR/samples/ema_<step>.png + a summary."""
  images, rows, result = sampler(ema_params)
  try:
    sampling.check_ode_result(result)
  except sampling.ODESolveError as e:
    logging.error('No sample grid at step %d: %s', step, e)
    return
  if not is_main:
    return
  grid = metrics_lib.image_grid(images, rows)
  scale = config.sample.png_scale or max(1, -(-64 // images.shape[1]))
  if scale > 1:
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
  path = os.path.join(workdir, 'samples', f'ema_{step:08d}.png')
  # A kill never leaves a cut-off grid.
  io_utils.atomic_write(path, lambda f: Image.fromarray(grid).save(f, format='PNG'))
  writer.write_images(step, {'ema_samples': grid[None]})
  logging.info('Wrote %s.', path)
