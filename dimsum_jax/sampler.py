"""The sampler: checked sampling options, the jitted batch sampler and in-memory generation.

Sample i starts from the noise x0 [H, W, C] = jax.random.normal(fold_in(k, i)), k =
jax.random.split(PRNGKey(seed))[0], and carries label classes[i % len(classes)] (`labels_for`), so
what sample i is does not depend on the device count. `sample_batch` takes one global batch of
sample indices [B] int32 and labels [B] int32 and solves the ODE (diffrax: dopri5, euler, heun),
the SDE or DiM's DPM-Solver from noise (t = 0) to data (t = 1) with classifier-free guidance and
optional Upsample Guidance, then decodes latents with the VAE; it returns (images [B, H, W, C]
uint8, or float32 in [-1, 1], or the latents; nfe; status; num_steps; finite). `BatchSampler`
compiles it once per settings for a mesh, the batch split over every device (a process-wide cache,
so a rerun in a notebook reuses it); `check_batch_result` turns a failed solve into one sentence;
`generate` samples N images in memory, as the command line would.

The options are `sampling.default_sampling_config()` (`sampling_options` checks them);
`check_mode`, `check_guidance`, `check_upsample_guidance` and `check_classes` refuse settings
the loaded model cannot take, each with a SampleError in one sentence, before anything compiles.
"""

from __future__ import annotations

import functools
import json
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dimsum_jax import dpm_solver
from dimsum_jax import precast
from dimsum_jax import sampling
from dimsum_jax import sharding
from dimsum_jax import transport
from dimsum_jax import upsample_guidance
from dimsum_jax.model_loading import LoadedModel
from dimsum_jax.model_loading import SampleError


def sampling_options(**overrides) -> ml_collections.ConfigDict:
  """`sampling.default_sampling_config()` (the seed among them) with `overrides`, checked."""
  opts = sampling.default_sampling_config()
  unknown = set(overrides) - set(opts)
  if unknown:
    raise SampleError(
      f'Unknown sampling option(s) {sorted(unknown)}: valid ones are {sorted(opts)}.'
    )
  opts.update(overrides)
  opts.mode = str(opts.mode).lower()
  if opts.mode not in ('ode', 'sde', 'dpm'):
    raise SampleError(f'Unknown --mode={opts.mode}: use ode, sde or dpm.')
  if opts.mode == 'dpm' and opts.dpm_steps < 3:
    raise SampleError(
      f'--dpm_steps={opts.dpm_steps} is too few for DPM-Solver of order 3: use '
      f'at least 3 (DiM uses {sampling.DPM_STEPS}).'
    )
  if str(opts.solver).lower() not in sampling.ODE_SOLVERS:
    raise SampleError(
      f'Unknown --solver={opts.solver}: choose one of {", ".join(sampling.ODE_SOLVERS)}.'
    )
  opts.solver = str(opts.solver).lower()
  if str(opts.sde_method).lower() not in sampling.SDE_METHODS:
    raise SampleError(
      f'Unknown --sde_method={opts.sde_method}: choose one of {", ".join(sampling.SDE_METHODS)}.'
    )
  opts.sde_method = str(opts.sde_method).lower()
  try:
    opts.diffusion_form = transport.canonical_diffusion_form(opts.diffusion_form)
    opts.last_step = sampling.canonical_last_step(opts.last_step)
  except ValueError as e:
    raise SampleError(str(e)) from e
  if opts.num_steps < 1 or opts.max_steps < 1:
    raise SampleError('--num_steps and --max_steps must be positive.')
  if (
    opts.mode == 'sde'
    and (opts.num_steps if opts.sde_method == 'euler' else opts.num_steps // 2) < 2
  ):
    raise SampleError('The SDE sampler needs --num_steps of at least 2 (4 for heun).')
  for name in ('cfg_scale', 'atol', 'rtol', 'last_step_size', 'diffusion_norm'):
    if not math.isfinite(float(opts[name])):
      raise SampleError(f'--{name} must be a finite number, got {opts[name]}.')
  if opts.atol <= 0 or opts.rtol <= 0:
    raise SampleError('--atol and --rtol must be positive.')
  return opts


def key_settings(opts) -> dict:
  """The options that change what the samples are (max_steps only decides failure)."""
  keys = ['mode', 'cfg_scale', 'seed']
  if opts.mode == 'ode':
    keys += ['solver'] + (
      ['atol', 'rtol', 'per_sample'] if opts.solver == 'dopri5' else ['num_steps']
    )
  elif opts.mode == 'dpm':
    keys += ['dpm_steps']
  else:
    keys += [
      'sde_method',
      'num_steps',
      'diffusion_form',
      'diffusion_norm',
      'last_step',
      'last_step_size',
    ]
  if float(opts.upsample_guidance):
    keys += ['upsample_guidance', 'ug_eta']
  return {k: opts[k] for k in keys}


def check_classes(loaded: LoadedModel, classes: Sequence[int] | None) -> tuple[int, ...]:
  """The classes that samples cycle through (all by default); () for unconditional models."""
  n = loaded.num_classes
  if n == 0:
    if classes:
      raise SampleError('This model is unconditional: leave out --classes.')
    return ()
  if not classes:
    return tuple(range(n))
  for c in classes:
    if not 0 <= int(c) < n:
      raise SampleError(f'Class {c} is out of range: this model has {n} classes (0 to {n - 1}).')
  return tuple(int(c) for c in classes)


def check_mode(loaded: LoadedModel, opts) -> None:
  """--mode=dpm only on a model of DiM's discrete noise-prediction objective."""
  path = loaded.config.transport.path_type
  if opts.mode == 'dpm' and transport.canonical_path(path) != 'ScaledLinear':
    raise SampleError(
      f'--mode=dpm (DPM-Solver) samples models of DiM\'s discrete '
      f'noise-prediction objective (transport path ScaledLinear), and this one '
      f'was trained on path {path}: use --mode=ode or --mode=sde.'
    )


def check_guidance(loaded: LoadedModel, opts) -> None:
  if float(opts.cfg_scale) == 1.0:
    return
  if loaded.num_classes == 0:
    raise SampleError(
      '--cfg_scale needs a class-conditional model; this one is unconditional: use --cfg_scale=1.'
    )
  if float(loaded.config.model.label_dropout) <= 0:
    raise SampleError(
      'This model was trained without label dropout, so its null class was never '
      'trained and guidance is meaningless: use --cfg_scale=1.'
    )


def check_upsample_guidance(loaded: LoadedModel, opts) -> int:
  """The factor m of --upsample_guidance (0 when off); SampleError when it cannot apply."""
  theta, eta = float(opts.upsample_guidance), float(opts.ug_eta)
  if theta == 0:
    return 0
  if not (math.isfinite(theta) and theta > 0 and 0 <= eta <= 1):
    raise SampleError(
      f'--upsample_guidance={theta} --ug_eta={eta}: the scale must be positive '
      'and ug_eta in [0, 1].'
    )
  trained = loaded.base[0].input_size if loaded.base is not None else loaded.image_shape[0]
  m, rest = divmod(loaded.image_shape[0], trained)
  if loaded.base is None or rest or m < 2:
    raise SampleError(
      f'--upsample_guidance needs --image_size at a whole multiple (2 or more) '
      f'of the trained size; the model takes {trained}x{trained} inputs and is '
      f'sampled at {loaded.image_shape[0]}.'
    )
  transport_config = loaded.config.transport
  try:
    upsample_guidance.make_upsample_guided_model_fn(
      None,
      None,
      m,
      path_type=transport_config.path_type,
      prediction=transport_config.prediction,
      theta=theta,
    )
  except ValueError as e:
    raise SampleError(f'--upsample_guidance: {e}') from e
  return m


def labels_for(indices, classes: Sequence[int]) -> np.ndarray:
  """Label of each sample index: classes[i % len(classes)] (zeros when unconditional)."""
  indices = np.asarray(indices, np.int64)
  if not classes:
    return np.zeros(indices.shape, np.int32)
  return np.asarray(classes, np.int32)[indices % len(classes)]


def batch_size_for(num_samples: int, batch_size: int, num_devices: int) -> int:
  """The global batch: `batch_size`, or fewer (a multiple of the device count) for small runs."""
  if batch_size < 1 or num_samples < 1:
    raise SampleError('--batch_size and --num_samples must be positive.')
  if batch_size % num_devices:
    raise SampleError(
      f'--batch_size={batch_size} does not divide over {num_devices} devices: '
      f'use a multiple of {num_devices}.'
    )
  return min(batch_size, -(-num_samples // num_devices) * num_devices)


def time_interval(config, opts) -> tuple[float, float]:
  """(t0, t1) of the solve: the transport's evaluation interval, shortened for the SDE's last
  step."""
  if opts.mode != 'sde':
    return transport.time_interval(config.transport, eval=True)
  return transport.time_interval(
    config.transport,
    eval=True,
    sde=True,
    diffusion_form=opts.diffusion_form,
    last_step_size=opts.last_step_size if opts.last_step else 0.0,
  )


def to_uint8(images):
  """[-1, 1] -> uint8 as upstream: clip(127.5 x + 128, 0, 255), truncated."""
  return jnp.clip(127.5 * images + 128.0, 0.0, 255.0).astype(jnp.uint8)


def sample_batch(
  params,
  vae_params,
  indices,
  labels,
  *,
  model,
  config,
  opts,
  image_shape,
  vae_module=None,
  output='uint8',
  base_model=None,
):
  """One global batch: noise of sample indices -> ODE/SDE -> (VAE) -> images. Pure, jit-able.

  Returns (images, nfe, status, num_steps, finite): images uint8 (or float32 in [-1, 1] when
  output='float', or the latents before the VAE when output='latents'). With Upsample Guidance
  (opts.upsample_guidance), params is (params, trained-size params of `base_model`) and nfe
  counts the sampled-size evaluations only.
  """
  num_classes = int(config.model.num_classes)
  noise_key, sde_key = jax.random.split(jax.random.PRNGKey(opts.seed))
  x0 = jax.vmap(
    lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), image_shape, jnp.float32)
  )(indices)

  # Weights cast once per batch to the dtype the model reads them in, not once per evaluation.
  y = labels if num_classes else None
  if base_model is not None:
    params, base_params = params
    s = base_model.input_size
    base_x = jax.ShapeDtypeStruct((x0.shape[0], s, s, x0.shape[-1]), x0.dtype)
    base_params = precast.precast_model_params(base_model, base_params, base_x, y)
  params = precast.precast_model_params(model, params, x0, y)

  def model_fn(x, t, y):
    return model.apply({'params': params}, x, t, y if num_classes else None)

  if base_model is not None:
    model_fn = upsample_guidance.make_upsample_guided_model_fn(
      model_fn,
      lambda x, t, y: base_model.apply({'params': base_params}, x, t, y if num_classes else None),
      image_shape[0] // base_model.input_size,
      path_type=config.transport.path_type,
      prediction=config.transport.prediction,
      theta=float(opts.upsample_guidance),
      eta=float(opts.ug_eta),
    )
  velocity = sampling.make_sampling_velocity_fn(
    model_fn,
    path_type=config.transport.path_type,
    prediction=config.transport.prediction,
    cfg_scale=float(opts.cfg_scale),
    null_label=num_classes if num_classes else None,
  )
  t0, t1 = time_interval(config, opts)
  args = labels if num_classes else None
  if opts.mode == 'ode':
    res = sampling.solve_ode(
      velocity,
      x0,
      solver=opts.solver,
      num_steps=opts.num_steps,
      atol=opts.atol,
      rtol=opts.rtol,
      t0=t0,
      t1=t1,
      max_steps=opts.max_steps,
      per_sample=bool(opts.per_sample),
      args=args,
    )
    x1, nfe, status, steps = res.x1, res.nfe, jnp.max(res.status), jnp.max(res.num_steps)
  elif opts.mode == 'dpm':  # DiM's sampler, in DiM's time 1 - t; U-ViT scale cfg_scale - 1
    noise = dpm_solver.make_noise_fn(
      model_fn,
      cfg_scale=float(opts.cfg_scale) - 1.0,
      null_label=num_classes if num_classes else None,
    )
    x1, nfe = dpm_solver.sample_dpm_solver(
      noise, x0, steps=opts.dpm_steps, t_end=transport.resolve_eps(config.transport)[1], args=args
    )
    nfe = jnp.asarray(nfe, jnp.int32)
    status = steps = jnp.zeros([], jnp.int32)
  else:
    # One key per global batch: the Brownian increments of a sample depend on its batch.
    batch_key = jax.random.fold_in(sde_key, indices[0])
    x1, nfe = sampling.sample_sde(
      velocity,
      x0,
      batch_key,
      path_type=config.transport.path_type,
      num_steps=opts.num_steps,
      method=opts.sde_method,
      diffusion_form=opts.diffusion_form,
      diffusion_norm=opts.diffusion_norm,
      last_step=opts.last_step,
      last_step_size=opts.last_step_size,
      t0=t0,
      t1=t1,
      args=args,
    )
    nfe = jnp.asarray(nfe, jnp.int32)
    status = steps = jnp.zeros([], jnp.int32)
  finite = jnp.all(jnp.isfinite(x1))
  if output == 'latents':
    return x1, nfe, status, steps, finite
  if vae_module is not None:
    from dimsum_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top

    x1 = vae_lib.latents_to_images(vae_module, vae_params, x1)
  images = x1.astype(jnp.float32) if output == 'float' else to_uint8(x1)
  return images, nfe, status, steps, finite


_COMPILED = {}  # settings -> compiled batch sampler: a rerun in one process (a notebook) reuses it


class BatchSampler:
  """The compiled `sample_batch` for one global batch size on `loaded.mesh`."""

  def __init__(self, loaded: LoadedModel, opts, batch_size: int, output='uint8'):
    self.loaded, self.opts, self.batch_size = loaded, opts, batch_size
    mesh = loaded.mesh
    self.batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    vae_module, vae_params = loaded.vae if loaded.vae is not None else (None, None)
    self._vae_params = vae_params
    base_model = loaded.base[0] if float(opts.upsample_guidance) else None
    self._params = (loaded.params, loaded.base[1]) if base_model else loaded.params
    key = json.dumps(
      [
        loaded.config.model.to_dict(),
        loaded.config.transport.to_dict(),
        loaded.config.vae.dir if vae_module is not None else None,
        opts.to_dict(),
        batch_size,
        [d.id for d in mesh.devices.flat],
        list(mesh.devices.shape),
        output,
        base_model and base_model.input_size,
      ],
      sort_keys=True,
      default=str,
    )
    start = time.monotonic()
    if key not in _COMPILED:
      fn = functools.partial(
        sample_batch,
        model=loaded.model,
        config=loaded.config,
        opts=opts,
        image_shape=loaded.image_shape,
        vae_module=vae_module,
        output=output,
        base_model=base_model,
      )
      abstract = lambda dtype: jax.ShapeDtypeStruct(
        (batch_size,), dtype, sharding=self.batch_sharding
      )
      # Under the mesh, the Pallas selective scan runs on each device's share of the batch.
      with jax.set_mesh(mesh):
        _COMPILED[key] = (
          jax.jit(
            fn, out_shardings=(self.batch_sharding, replicated, replicated, replicated, replicated)
          )
          .lower(self._params, vae_params, abstract(jnp.int32), abstract(jnp.int32))
          .compile()
        )
    self._compiled = _COMPILED[key]
    self.compile_seconds = time.monotonic() - start

  def _global(self, host_array):
    return jax.device_put(host_array, self.batch_sharding)  # the same on every process

  def __call__(self, indices, labels):
    """Global arrays for sample `indices` [batch] (numpy, the same on every process)."""
    out = self._compiled(
      self._params,
      self._vae_params,
      self._global(np.asarray(indices, np.int32)),
      self._global(np.asarray(labels, np.int32)),
    )
    return out


def check_batch_result(out, opts, rows: str) -> tuple[int, int]:
  """(nfe, steps) of a finished batch; SampleError / ODESolveError when it failed."""
  _, nfe, status, steps, finite = out
  nfe, status, steps, finite = (int(v) for v in jax.device_get((nfe, status, steps, finite)))
  if status == sampling.STATUS_MAX_STEPS:
    raise sampling.ODESolveError(
      f'The ODE solve of samples {rows} stopped at --max_steps={opts.max_steps} before '
      'reaching t = 1: raise --max_steps, loosen --atol/--rtol, or use a fixed-step solver.'
    )
  if status != sampling.STATUS_OK:
    raise sampling.ODESolveError(
      f'The ODE solve of samples {rows} failed (step size underflow): '
      'check the checkpoint for NaN weights.'
    )
  if not finite:
    raise SampleError(
      f'The model produced NaN or inf for samples {rows}: check the checkpoint '
      '(was its training stopped by a NaN loss?).'
    )
  return nfe, steps


def generate(
  loaded: LoadedModel,
  num_samples: int,
  *,
  classes=None,
  batch_size: int = 64,
  opts=None,
  output='uint8',
):
  """In memory: (images [N, H, W, C] uint8 or float, labels [N], NFE per batch). Sample i is the
  same as sample i of the CLI with the same seed, batch size and device count."""
  opts = sampling_options() if opts is None else opts
  classes = check_classes(loaded, classes)
  check_guidance(loaded, opts)
  check_mode(loaded, opts)
  check_upsample_guidance(loaded, opts)
  batch = batch_size_for(num_samples, batch_size, loaded.mesh.devices.size)
  sampler = BatchSampler(loaded, opts, batch, output=output)
  images, nfes = [], []
  for start in range(0, num_samples, batch):
    indices = np.arange(start, start + batch)
    out = sampler(indices, labels_for(indices, classes))
    nfes.append(check_batch_result(out, opts, f'{start}-{start + batch - 1}')[0])
    images.append(np.asarray(jax.device_get(out[0])))  # all rows: fine in one process
  labels = labels_for(np.arange(num_samples), classes)
  return np.concatenate(images)[:num_samples], labels, nfes
