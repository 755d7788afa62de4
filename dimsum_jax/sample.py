"""Sample images from a trained model: PNGs, a grid and samples.npz (resumable, multi-device).

  python -m dimsum_jax.sample --checkpoint=runs/digits/export --num_samples=100 --out=samples/digits
  python -m dimsum_jax.sample --workdir=runs/imagenet256 --num_samples=50000 --cfg_scale=1.4 \\
      --solver=dopri5 --seed=0 --out=samples/imagenet256_cfg1.4
  python -m dimsum_jax.sample --workdir=runs/in256_dim --mode=dpm --cfg_scale=1.4 --out=samples/dim

--mode=dpm is DiM's sampler for DiM's discrete noise-prediction models (transport path
ScaledLinear): DPM-Solver++ of order 3 ('fast', time-uniform, `sampling.sample_dpm_solver`)
with --dpm_steps model evaluations (50), and guidance --cfg_scale = 1 + DiM's U-ViT scale.

--checkpoint is a directory written by `python -m dimsum_jax.export` (config.json + ema_params/) or
by `python -m dimsum_jax.convert` (model_config.json + params/); --workdir is a training directory,
whose newest good checkpoint (or --step) gives the EMA parameters.

OUT receives
  images/000000.png ...   one PNG per sample, numbered by sample index
  grid.png                the first (up to) 100 samples; conditional: one column per class
  samples.npz             arr_0: uint8 [N, H, W, C]; labels: int32 [N]  (written last, atomically)
  summary.json            NFE per batch and timings
  manifest.json, chunks/  the settings of the run and the finished global batches (for resuming)

Sample i starts from the noise jax.random.normal(fold_in(k, i), (H, W, C)), k =
jax.random.split(PRNGKey(seed))[0], and carries label classes[i % len(classes)], so what sample i
is does not depend on the device count. Samples are made in global batches of --batch_size (split
over every device of every process); each finished batch is saved under chunks/ (each process its
own rows, each file renamed into place when complete), and a rerun with the same flags skips those
batches. Dopri5's step sizes are chosen per batch, as upstream (--per_sample: one step-size
sequence per sample), so a sample depends on its batch mates within the solver tolerances: keep
--batch_size when resuming. The SDE's Brownian noise is drawn per global batch.
Several processes need an --out on a file system they all share (process 0 assembles the result).

Latent models (4 channels) are decoded by the VAE of config.vae.dir or --vae_dir.

--evaluate=REF.npz scores samples.npz once it is written (dimsum_jax.evaluate): FID, sFID, IS,
precision/recall against an ADM-style reference batch with the Inception features of --inception
(pytorch-fid's weight file); --evaluate=digits uses the digits features against every digit at the
samples' size (no download). --features, --metrics and --preprocess are those of `python -m
dimsum_jax.evaluate`. Every evaluation check (weights, reference resolution, sample counts) runs
before any sampling; the scores go to OUT/evaluation-<reference name>.json and into summary.json.

--image_size=N samples at N px instead of the trained size: the model is rebuilt for the new
token grid (its scan orders and wavelet windows follow it) with the learned position table
interpolated (dimsum_jax.warm_start; --interpolation: auto = bicubic for DiMSUM, bilinear for
DiM; DiT's sin-cos table is rebuilt). A size that the patch or DiMSUM's wavelet layout cannot
take is refused by name. At m times the trained size, --upsample_guidance=THETA (--ug_eta)
adds Upsample Guidance from the model at its trained size (sampling.make_upsample_guided_model_fn:
the velocity form for flow matching, upstream's noise form for DiM), one trained-size evaluation
per guided step on top of the counted NFE.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import time
import zipfile
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from dimsum_jax import checkpoint
from dimsum_jax import config_utils
from dimsum_jax import io_utils
from dimsum_jax import models
from dimsum_jax import sampling
from dimsum_jax import sharding
from dimsum_jax import transport
from dimsum_jax import warm_start

GRID_MAX = 100
MANIFEST = 'manifest.json'
CHUNKS = 'chunks'
IMAGES = 'images'


class SampleError(ValueError):
  """A flag, checkpoint or output-directory mistake; the message says what to do."""


# ------------------------------------------------------------------------------------------------
# Options


def sampling_options(**overrides) -> ml_collections.ConfigDict:
  """`sampling.default_sampling_config()` plus the seed, with `overrides`, checked."""
  opts = sampling.default_sampling_config()
  opts.seed = 0
  unknown = set(overrides) - set(opts)
  if unknown:
    raise SampleError(f'Unknown sampling option(s) {sorted(unknown)}: valid ones are '
                      f'{sorted(opts)}.')
  opts.update(overrides)
  opts.mode = str(opts.mode).lower()
  if opts.mode not in ('ode', 'sde', 'dpm'):
    raise SampleError(f'Unknown --mode={opts.mode}: use ode, sde or dpm.')
  if opts.mode == 'dpm' and opts.dpm_steps < 3:
    raise SampleError(f'--dpm_steps={opts.dpm_steps} is too few for DPM-Solver of order 3: use '
                      f'at least 3 (DiM uses {sampling.DPM_STEPS}).')
  if str(opts.solver).lower() not in sampling.ODE_SOLVERS:
    raise SampleError(f'Unknown --solver={opts.solver}: choose one of '
                      f'{", ".join(sampling.ODE_SOLVERS)}.')
  opts.solver = str(opts.solver).lower()
  if str(opts.sde_method).lower() not in sampling.SDE_METHODS:
    raise SampleError(f'Unknown --sde_method={opts.sde_method}: choose one of '
                      f'{", ".join(sampling.SDE_METHODS)}.')
  opts.sde_method = str(opts.sde_method).lower()
  try:
    opts.diffusion_form = transport.canonical_diffusion_form(opts.diffusion_form)
    opts.last_step = sampling.canonical_last_step(opts.last_step)
  except ValueError as e:
    raise SampleError(str(e)) from e
  if opts.num_steps < 1 or opts.max_steps < 1:
    raise SampleError('--num_steps and --max_steps must be positive.')
  if opts.mode == 'sde' and (opts.num_steps if opts.sde_method == 'euler'
                             else opts.num_steps // 2) < 2:
    raise SampleError('The SDE sampler needs --num_steps of at least 2 (4 for heun).')
  for name in ('cfg_scale', 'atol', 'rtol', 'last_step_size', 'diffusion_norm'):
    if not math.isfinite(float(opts[name])):
      raise SampleError(f'--{name} must be a finite number, got {opts[name]}.')
  if opts.atol <= 0 or opts.rtol <= 0:
    raise SampleError('--atol and --rtol must be positive.')
  return opts


def _key_settings(opts) -> dict:
  """The options that change what the samples are (max_steps only decides failure)."""
  keys = ['mode', 'cfg_scale', 'seed']
  if opts.mode == 'ode':
    keys += ['solver'] + (['atol', 'rtol', 'per_sample'] if opts.solver == 'dopri5'
                          else ['num_steps'])
  elif opts.mode == 'dpm':
    keys += ['dpm_steps']
  else:
    keys += ['sde_method', 'num_steps', 'diffusion_form', 'diffusion_norm', 'last_step',
             'last_step_size']
  if float(opts.upsample_guidance):
    keys += ['upsample_guidance', 'ug_eta']
  return {k: opts[k] for k in keys}


# ------------------------------------------------------------------------------------------------
# Loading a model


@dataclasses.dataclass
class LoadedModel:
  config: ml_collections.ConfigDict   # the run's config (model, transport, vae, ...)
  model: Any                          # Flax module
  params: Any                         # EMA parameters, replicated over `mesh`
  mesh: jax.sharding.Mesh
  source: str                         # absolute path of the checkpoint / workdir
  step: int | None                    # training step of the weights, when known
  vae: Any = None                     # (vae module, vae params) for latent models
  interpolation: str | None = None    # how the position table was resized (--image_size)
  base: Any = None                    # (model, params) at the trained size, with --image_size

  @property
  def num_classes(self) -> int:
    return int(self.config.model.num_classes)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    m = self.config.model
    return (m.input_size, m.input_size, m.in_channels)

  @property
  def output_shape(self) -> tuple[int, int, int]:
    """Shape of one output image: the model's, or the VAE's decoding of it."""
    if self.vae is None:
      return self.image_shape
    module = self.vae[0]
    side = self.config.model.input_size * module.downsampling_factor
    return (side, side, module.out_channels)

  @property
  def is_latent(self) -> bool:
    return self.config.model.in_channels not in (1, 3)


def sampling_mesh(devices=None):
  """Pure data parallelism over `devices` (default: every device of every process)."""
  return sharding.make_mesh({'data': -1, 'fsdp': 1},
                            devices=None if devices is None else list(devices))


def _read_json(path):
  try:
    return io_utils.read_json(path)
  except ValueError as e:
    raise SampleError(f'{e}: export or convert the model again.') from e


def read_config(*, checkpoint_dir=None, workdir=None):
  """(config, layout) of an export ('export'), a conversion ('converted') or a workdir."""
  if (checkpoint_dir is None) == (workdir is None):
    raise SampleError('Pass exactly one of --checkpoint (an exported or converted model) and '
                      '--workdir (a training directory).')
  where = os.path.abspath(checkpoint_dir or workdir)
  flag = '--checkpoint' if checkpoint_dir else '--workdir'
  if not os.path.isdir(where):
    raise SampleError(f'{flag}={checkpoint_dir or workdir}: no such directory.')
  base = config_utils.base_config()
  if workdir is not None or os.path.exists(os.path.join(where, 'config.json')):
    path = os.path.join(where, 'config.json')
    if not os.path.exists(path):
      raise SampleError(f'{where} has no config.json: pass the --workdir of a training run.')
    config = ml_collections.ConfigDict(_read_json(path))
    if workdir is None and not os.path.isdir(os.path.join(where, 'ema_params')):
      raise SampleError(f'{where} has config.json but no ema_params/: pass a directory written '
                        'by `python -m dimsum_jax.export` (or use --workdir for a training run).')
    layout = 'workdir' if workdir is not None else 'export'
  elif os.path.exists(os.path.join(where, 'model_config.json')):
    config = base
    config.model.update(_read_json(os.path.join(where, 'model_config.json')))
    if config.model.get('name') in models.DIM_SIZES:   # DiM's released weights: its objective
      config.transport.update(path_type='ScaledLinear', prediction='noise')
    layout = 'converted'
  else:
    raise SampleError(f'{where} holds no model: pass a directory written by '
                      '`python -m dimsum_jax.export` or `python -m dimsum_jax.convert`, or a '
                      'training --workdir.')
  # Fields added to the config after a checkpoint was written take their defaults.
  for section in ('model', 'transport', 'vae'):
    merged = base[section].to_dict()
    if section in config:
      merged.update(config[section].to_dict())
    config[section] = ml_collections.ConfigDict(merged)
  return config, layout


def _restore_export(path, abstract):
  try:
    return checkpoint.restore_params(path, abstract)
  except checkpoint.CheckpointError as e:
    raise SampleError(str(e)) from e


def _restore_workdir(workdir, abstract, step):
  try:
    state, step = checkpoint.restore_newest(workdir, {'ema_params': abstract}, step=step)
  except checkpoint.CheckpointError as e:
    raise SampleError(str(e)) from e
  return state['ema_params'], step


def check_vae(config, vae_dir=None) -> str | None:
  """The VAE directory a latent model needs (None for pixel models); SampleError when missing."""
  if config.model.in_channels in (1, 3):
    return None
  vae_dir = vae_dir or config.vae.dir
  if not vae_dir:
    raise SampleError(f'This is a latent model ({config.model.in_channels} channels) and no VAE '
                      'is configured: pass --vae_dir=DIR of a VAE converted with '
                      '`python -m dimsum_jax.vae.convert`.')
  vae_dir = os.path.abspath(vae_dir)
  for part in ('config.json', 'params'):
    if not os.path.exists(os.path.join(vae_dir, part)):
      raise SampleError(f'The VAE directory {vae_dir} has no {part}: pass --vae_dir=DIR of a VAE '
                        'converted with `python -m dimsum_jax.vae.convert`.')
  return vae_dir


def load_model(*, checkpoint_dir=None, workdir=None, step=None, vae_dir=None, mesh=None,
               image_size=None, interpolation='auto') -> LoadedModel:
  """The EMA weights of an export, a conversion or a training workdir, replicated over `mesh`;
  with `image_size` (px) other than the trained one, the model rebuilt for that size
  (warm_start.resize_model: the position table interpolated, `interpolation` 'auto' = the
  family's own; scan orders and wavelet windows follow the new token grid)."""
  config, layout = read_config(checkpoint_dir=checkpoint_dir, workdir=workdir)
  vae_path = check_vae(config, vae_dir)
  mesh = sampling_mesh() if mesh is None else mesh
  where = os.path.abspath(checkpoint_dir or workdir)
  try:
    model = models.create_model(config.model)
    abstract = models.abstract_params(model, config.model)
  except ValueError as e:
    raise SampleError(f'The config in {where} does not describe a model this code can build: '
                      f'{e}') from e
  replicated = sharding.replicated(mesh)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          abstract)
  if layout == 'workdir':
    if step is not None and step < 0:
      raise SampleError(f'--step={step} must be a checkpoint step (>= 0).')
    params, step = _restore_workdir(where, abstract, step)
  else:
    if step is not None:
      raise SampleError('--step applies to --workdir only; an export holds one step.')
    params = _restore_export(
        os.path.join(where, 'ema_params' if layout == 'export' else 'params'), abstract)
    step_file = os.path.join(where, 'step.txt')
    step = None
    if os.path.exists(step_file):
      with open(step_file, encoding='utf-8') as f:
        step = int(f.read())
  vae = None
  if vae_path is not None:
    from dimsum_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top
    vae = vae_lib.load_vae(vae_path, sharding=replicated)
    with config.ignore_type():
      config.vae.dir = vae_path
  factor = vae[0].downsampling_factor if vae is not None else 1
  resized, base = None, None
  if image_size is not None and image_size != config.model.input_size * factor:
    try:
      size = warm_start.check_image_size(config.model, image_size, factor)
      base = (model, params)
      config.model, model, params = warm_start.resize_model(config.model, params, size,
                                                            interpolation)
    except warm_start.WarmStartError as e:
      raise SampleError(f'--image_size={image_size}: {e}') from e
    params = warm_start.to_global(params, replicated)
    resized = interpolation
  return LoadedModel(config=config, model=model, params=params, mesh=mesh, source=where,
                     step=step, vae=vae, interpolation=resized, base=base)


# ------------------------------------------------------------------------------------------------
# Labels, batches and the jitted sampler


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
    raise SampleError(f'--mode=dpm (DPM-Solver) samples models of DiM\'s discrete '
                      f'noise-prediction objective (transport path ScaledLinear), and this one '
                      f'was trained on path {path}: use --mode=ode or --mode=sde.')


def check_guidance(loaded: LoadedModel, opts) -> None:
  if float(opts.cfg_scale) == 1.0:
    return
  if loaded.num_classes == 0:
    raise SampleError('--cfg_scale needs a class-conditional model; this one is unconditional: '
                      'use --cfg_scale=1.')
  if float(loaded.config.model.label_dropout) <= 0:
    raise SampleError('This model was trained without label dropout, so its null class was never '
                      'trained and guidance is meaningless: use --cfg_scale=1.')


def check_upsample_guidance(loaded: LoadedModel, opts) -> int:
  """The factor m of --upsample_guidance (0 when off); SampleError when it cannot apply."""
  theta, eta = float(opts.upsample_guidance), float(opts.ug_eta)
  if theta == 0:
    return 0
  if not (math.isfinite(theta) and theta > 0 and 0 <= eta <= 1):
    raise SampleError(f'--upsample_guidance={theta} --ug_eta={eta}: the scale must be positive '
                      'and ug_eta in [0, 1].')
  trained = loaded.base[0].input_size if loaded.base is not None else loaded.image_shape[0]
  m, rest = divmod(loaded.image_shape[0], trained)
  if loaded.base is None or rest or m < 2:
    raise SampleError(f'--upsample_guidance needs --image_size at a whole multiple (2 or more) '
                      f'of the trained size; the model takes {trained}x{trained} inputs and is '
                      f'sampled at {loaded.image_shape[0]}.')
  transport_config = loaded.config.transport
  try:
    sampling.make_upsample_guided_model_fn(None, None, m, path_type=transport_config.path_type,
                                           prediction=transport_config.prediction, theta=theta)
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
    raise SampleError(f'--batch_size={batch_size} does not divide over {num_devices} devices: '
                      f'use a multiple of {num_devices}.')
  return min(batch_size, -(-num_samples // num_devices) * num_devices)


def time_interval(config, opts) -> tuple[float, float]:
  if opts.mode != 'sde':
    return transport.time_interval(config.transport, eval=True)
  return transport.time_interval(
      config.transport, eval=True, sde=True, diffusion_form=opts.diffusion_form,
      last_step_size=opts.last_step_size if opts.last_step else 0.0)


def to_uint8(images):
  """[-1, 1] -> uint8 as upstream: clip(127.5 x + 128, 0, 255), truncated."""
  return jnp.clip(127.5 * images + 128.0, 0.0, 255.0).astype(jnp.uint8)


def sample_batch(params, vae_params, indices, labels, *, model, config, opts, image_shape,
                 vae_module=None, output='uint8', base_model=None):
  """One global batch: noise of sample indices -> ODE/SDE -> (VAE) -> images. Pure, jit-able.

  Returns (images, nfe, status, num_steps, finite): images uint8 (or float32 in [-1, 1] when
  output='float', or the latents before the VAE when output='latents'). With Upsample Guidance
  (opts.upsample_guidance), params is (params, trained-size params of `base_model`) and nfe
  counts the sampled-size evaluations only.
  """
  num_classes = int(config.model.num_classes)
  noise_key, sde_key = jax.random.split(jax.random.PRNGKey(opts.seed))
  x0 = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), image_shape,
                                            jnp.float32))(indices)

  if base_model is not None:
    params, base_params = params

  def model_fn(x, t, y):
    return model.apply({'params': params}, x, t, y if num_classes else None)

  if base_model is not None:
    model_fn = sampling.make_upsample_guided_model_fn(
        model_fn, lambda x, t, y: base_model.apply({'params': base_params}, x, t,
                                                   y if num_classes else None),
        image_shape[0] // base_model.input_size, path_type=config.transport.path_type,
        prediction=config.transport.prediction, theta=float(opts.upsample_guidance),
        eta=float(opts.ug_eta))
  velocity = sampling.make_sampling_velocity_fn(
      model_fn, path_type=config.transport.path_type, prediction=config.transport.prediction,
      cfg_scale=float(opts.cfg_scale), null_label=num_classes if num_classes else None)
  t0, t1 = time_interval(config, opts)
  args = labels if num_classes else None
  if opts.mode == 'ode':
    res = sampling.solve_ode(velocity, x0, solver=opts.solver, num_steps=opts.num_steps,
                             atol=opts.atol, rtol=opts.rtol, t0=t0, t1=t1,
                             max_steps=opts.max_steps, per_sample=bool(opts.per_sample),
                             args=args)
    x1, nfe, status, steps = res.x1, res.nfe, jnp.max(res.status), jnp.max(res.num_steps)
  elif opts.mode == 'dpm':   # DiM's sampler, in DiM's time 1 - t; U-ViT scale cfg_scale - 1
    noise = sampling.make_noise_fn(model_fn, cfg_scale=float(opts.cfg_scale) - 1.0,
                                   null_label=num_classes if num_classes else None)
    x1, nfe = sampling.sample_dpm_solver(
        noise, x0, steps=opts.dpm_steps, t_end=transport.resolve_eps(config.transport)[1],
        args=args)
    nfe = jnp.asarray(nfe, jnp.int32)
    status = steps = jnp.zeros([], jnp.int32)
  else:
    # One key per global batch: the Brownian increments of a sample depend on its batch.
    batch_key = jax.random.fold_in(sde_key, indices[0])
    x1, nfe = sampling.sample_sde(
        velocity, x0, batch_key, path_type=config.transport.path_type,
        num_steps=opts.num_steps, method=opts.sde_method, diffusion_form=opts.diffusion_form,
        diffusion_norm=opts.diffusion_norm, last_step=opts.last_step,
        last_step_size=opts.last_step_size, t0=t0, t1=t1, args=args)
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
    key = json.dumps([loaded.config.model.to_dict(), loaded.config.transport.to_dict(),
                      loaded.config.vae.dir if vae_module is not None else None, opts.to_dict(),
                      batch_size, [d.id for d in mesh.devices.flat], list(mesh.devices.shape),
                      output, base_model and base_model.input_size], sort_keys=True, default=str)
    start = time.monotonic()
    if key not in _COMPILED:
      fn = functools.partial(sample_batch, model=loaded.model, config=loaded.config, opts=opts,
                             image_shape=loaded.image_shape, vae_module=vae_module, output=output,
                             base_model=base_model)
      abstract = lambda dtype: jax.ShapeDtypeStruct((batch_size,), dtype,
                                                    sharding=self.batch_sharding)
      # Under the mesh, the Pallas selective scan runs on each device's share of the batch.
      with jax.set_mesh(mesh):
        _COMPILED[key] = jax.jit(
            fn, out_shardings=(self.batch_sharding, replicated, replicated, replicated, replicated)
        ).lower(self._params, vae_params, abstract(jnp.int32), abstract(jnp.int32)).compile()
    self._compiled = _COMPILED[key]
    self.compile_seconds = time.monotonic() - start

  def _global(self, host_array):
    return jax.device_put(host_array, self.batch_sharding)  # the same on every process

  def __call__(self, indices, labels):
    """Global arrays for sample `indices` [batch] (numpy, the same on every process)."""
    out = self._compiled(self._params, self._vae_params,
                         self._global(np.asarray(indices, np.int32)),
                         self._global(np.asarray(labels, np.int32)))
    return out


def check_batch_result(out, opts, rows: str) -> tuple[int, int]:
  """(nfe, steps) of a finished batch; SampleError / ODESolveError when it failed."""
  _, nfe, status, steps, finite = out
  nfe, status, steps, finite = (int(v) for v in jax.device_get((nfe, status, steps, finite)))
  if status == sampling.STATUS_MAX_STEPS:
    raise sampling.ODESolveError(
        f'The ODE solve of samples {rows} stopped at --max_steps={opts.max_steps} before '
        'reaching t = 1: raise --max_steps, loosen --atol/--rtol, or use a fixed-step solver.')
  if status != sampling.STATUS_OK:
    raise sampling.ODESolveError(f'The ODE solve of samples {rows} failed (step size underflow): '
                                 'check the checkpoint for NaN weights.')
  if not finite:
    raise SampleError(f'The model produced NaN or inf for samples {rows}: check the checkpoint '
                      '(was its training stopped by a NaN loss?).')
  return nfe, steps


def generate(loaded: LoadedModel, num_samples: int, *, classes=None, batch_size: int = 64,
             opts=None, output='uint8'):
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


# ------------------------------------------------------------------------------------------------
# Files


def make_grid(images, cols: int, pad: int = 2) -> np.ndarray:
  """uint8 [n, H, W, C] -> one uint8 RGB image, `cols` per row, white gaps; blanks fill the end."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  if c == 1:
    images = np.repeat(images, 3, axis=-1)
  elif c != 3:
    images = np.repeat(images[..., :1], 3, axis=-1)
  cols = max(1, min(cols, n))
  rows = -(-n // cols)
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
  return grid


def grid_columns(n: int, classes: Sequence[int]) -> int:
  if 1 < len(classes) <= 20:
    return len(classes)
  return max(1, math.ceil(math.sqrt(n)))


def _tmp_name(path):
  d, b = os.path.split(path)
  return os.path.join(d, f'.{b}.tmp-{jax.process_index()}-{os.getpid()}')


def _atomic_write(path, write):
  tmp = _tmp_name(path)
  with open(tmp, 'wb') as f:
    write(f)
  os.replace(tmp, path)


def _save_png(path, image):
  image = np.asarray(image)
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  _atomic_write(path, lambda f: pil.save(f, format='PNG'))


def _chunk_name(start, stop):
  return f'{start:09d}-{stop:09d}.npz'


def _parse_chunk(name):
  if not name.endswith('.npz') or name.startswith('.'):
    return None
  try:
    a, b = name[:-4].split('-')
    return int(a), int(b)
  except ValueError:
    return None


def _chunk_files(chunk_dir):
  if not os.path.isdir(chunk_dir):
    return {}
  out = {}
  for name in os.listdir(chunk_dir):
    rng = _parse_chunk(name)
    if rng is not None:
      out[rng] = os.path.join(chunk_dir, name)
  return out


def _done_batches(chunk_dir, batch, num_batches):
  """Which global batches are fully covered by chunk files."""
  covered = np.zeros(num_batches * batch, bool)
  for (a, b) in _chunk_files(chunk_dir):
    covered[a:min(b, covered.size)] = True
  return covered.reshape(num_batches, batch).all(axis=1)


def _own_rows(array):
  """[(start, stop, rows)] of this process's rows of a batch-sharded global array (contiguous
  runs merged); each row once even when replicated across devices."""
  pieces = []
  for shard in array.addressable_shards:
    if shard.replica_id != 0:
      continue
    sl = shard.index[0]
    pieces.append((sl.start or 0, sl.stop if sl.stop is not None else array.shape[0],
                   jax.device_get(shard.data)))
  pieces.sort(key=lambda p: p[0])
  merged = []
  for a, b, rows in pieces:
    if merged and merged[-1][1] == a:
      pa, _, prow = merged[-1]
      merged[-1] = (pa, b, np.concatenate([prow, rows]))
    else:
      merged.append((a, b, rows))
  return merged


def _manifest(loaded, opts, batch, classes):
  return {
      'format': 1,
      'source': loaded.source,
      'step': loaded.step,
      'vae_dir': loaded.config.vae.dir if loaded.is_latent else None,
      'image_shape': list(loaded.output_shape),
      'batch_size': batch,
      'classes': list(classes),
      'interpolation': loaded.interpolation,
      **_key_settings(opts),
  }


def _check_manifest(out, manifest):
  path = os.path.join(out, MANIFEST)
  if not os.path.exists(path):
    if _chunk_files(os.path.join(out, CHUNKS)):
      raise SampleError(f'{out} holds sample chunks but no {MANIFEST}: choose another --out.')
    return False
  try:
    old = _read_json(path)
  except ValueError as e:
    raise SampleError(f'{path} is damaged: choose another --out.') from e
  for key in sorted(set(old) | set(manifest)):
    if old.get(key) != manifest.get(key):
      flag = {'source': 'checkpoint', 'vae_dir': 'vae_dir', 'image_shape': 'checkpoint'}.get(key,
                                                                                          key)
      raise SampleError(
          f'{out} holds samples made with other settings ({key} was {old.get(key)!r}, now '
          f'{manifest.get(key)!r}): rerun with the same flags (--{flag}) to resume, or choose '
          'another --out.')
  return True


def _write_npz(path, num_samples, image_shape, chunk_iter, labels):
  """samples.npz (arr_0 uint8 [N, H, W, C], labels) streamed chunk by chunk, renamed at the end."""
  shape = (num_samples, *image_shape)
  header = {'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint8)), 'fortran_order': False,
            'shape': shape}

  def write(f):
    with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED, allowZip64=True) as z:
      with z.open('arr_0.npy', 'w', force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        written = 0
        for rows in chunk_iter:
          if rows.shape[1:] != tuple(image_shape):
            raise ValueError(f'chunk rows of shape {rows.shape[1:]}, expected {image_shape}')
          member.write(np.ascontiguousarray(rows, np.uint8).tobytes())
          written += rows.shape[0]
        assert written == num_samples, (written, num_samples)
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.asarray(labels, np.int32))
      # A fixed date, as arr_0.npy has: the same samples give the same bytes whenever written.
      z.writestr(zipfile.ZipInfo('labels.npy', date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
  _atomic_write(path, write)


def _iter_rows(chunk_dir, num_samples, classes, image_dir, write_pngs):
  """Rows 0..N-1 from the chunk files in order (checking their labels); fills in missing PNGs."""
  files = sorted(_chunk_files(chunk_dir).items())
  pos = 0
  for (a, b), path in files:
    if b <= pos:
      continue
    if a > pos:
      break
    with np.load(path, allow_pickle=False) as z:
      images, labels = z['images'], z['labels']
    take = slice(pos - a, min(b, num_samples) - a)
    if not np.array_equal(labels[take], labels_for(np.arange(a, b), classes)[take]):
      raise SampleError(f'{path} holds other labels than this run expects: choose another --out.')
    rows = images[take]
    if write_pngs:
      for k, image in enumerate(rows):
        png = os.path.join(image_dir, f'{pos + k:06d}.png')
        if not os.path.exists(png):
          _save_png(png, image)
    yield rows
    pos += rows.shape[0]
    if pos >= num_samples:
      return
  if pos < num_samples:
    raise SampleError(f'The chunk files of samples {pos} onwards are missing from {chunk_dir}: '
                      'with several processes, --out must be on a file system that all of them '
                      'share.')


def _sync(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _broadcast(array):
  if jax.process_count() == 1:
    return array
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.broadcast_one_to_all(array))


def _hms(seconds):
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


# ------------------------------------------------------------------------------------------------
# The command


def _prepare_evaluation(evaluate, eval_options, loaded, num_samples):
  """(evaluate.command args, what its prepare() returned) for --evaluate, or None; SampleError
  for any setting that would fail, before anything is sampled."""
  eval_options = dict(eval_options or {})
  if not evaluate:
    if eval_options:
      names = ', '.join(f'--{k}' for k in sorted(eval_options))
      raise SampleError(f'{names} {"applies" if len(eval_options) == 1 else "apply"} only with '
                        '--evaluate: pass --evaluate=REF.npz (or --evaluate=digits), or leave '
                        f'{"it" if len(eval_options) == 1 else "them"} out.')
    return None
  from dimsum_jax.evaluate import command  # pylint: disable=g-import-not-at-top
  if evaluate == 'digits':
    if eval_options.setdefault('features', 'digits') != 'digits':
      raise SampleError(f'--evaluate=digits scores with the digits features, not '
                        f'--features={eval_options["features"]}: leave --features out, or pass '
                        '--evaluate=REF.npz.')
  try:
    args = command.eval_args(reference='' if evaluate == 'digits' else evaluate, **eval_options)
    prepared = command.prepare(args, loaded.output_shape, num_samples,
                               has_labels=loaded.num_classes > 0)
  except ValueError as e:  # EvaluationError, WeightsError, NpzError: one sentence each
    raise SampleError(str(e)) from e
  args.metrics = ','.join(prepared[2])
  return args, prepared


def _evaluate(evaluation, samples_path):
  """evaluate.command.run on the written samples: its result (also written as JSON beside)."""
  from dimsum_jax.evaluate import command  # pylint: disable=g-import-not-at-top
  args, prepared = evaluation
  args.samples = samples_path
  try:
    result = command.run(args, prepared)
  except ValueError as e:
    raise SampleError(str(e)) from e
  logging.info('Evaluation (%d samples, %s features): %s; written to %s.', result['num_samples'],
               result['feature_net'], ', '.join(f'{label} {result[key]:.6g}' for key, label in
                                                command.LABELS.items() if key in result),
               result['written_to'])
  return result


def run(*, out, checkpoint=None, workdir=None, step=None, num_samples=64, batch_size=64,
        classes=None, vae_dir=None, pngs=True, devices=None, image_size=None,
        interpolation='auto', evaluate=None, eval_options=None, **options):
  """The CLI without flags (see the module docstring); returns the summary dict (process 0).

  options: `sampling_options` fields (mode, solver, num_steps, atol, rtol, max_steps, per_sample,
  cfg_scale, sde_method, diffusion_form, diffusion_norm, last_step, last_step_size, seed).
  devices: the devices to use (default: all of every process).
  evaluate: a reference batch .npz or 'digits' to score samples.npz once written; eval_options:
  options of `python -m dimsum_jax.evaluate` (features, inception, metrics, preprocess,
  batch_size, split_size, cache_dir).
  image_size, interpolation: sample at another size than trained (see load_model).
  """
  opts = sampling_options(**options)  # flags first: nothing loaded or written on a typo
  if not out:
    raise SampleError('Pass --out=DIR for the samples.')
  if num_samples < 1:
    raise SampleError('--num_samples must be positive.')
  out = os.path.abspath(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise SampleError(f'--out={out} is a file: choose a directory.')
  if interpolation not in warm_start.INTERPOLATIONS:
    raise SampleError(f'Unknown --interpolation={interpolation}: use one of '
                      f'{", ".join(warm_start.INTERPOLATIONS)}.')
  loaded = load_model(checkpoint_dir=checkpoint, workdir=workdir, step=step, vae_dir=vae_dir,
                      mesh=sampling_mesh(devices), image_size=image_size,
                      interpolation=interpolation)
  check_mode(loaded, opts)
  classes = check_classes(loaded, classes)
  check_guidance(loaded, opts)
  check_upsample_guidance(loaded, opts)
  evaluation = _prepare_evaluation(evaluate, eval_options, loaded, num_samples)
  num_devices = loaded.mesh.devices.size
  batch = batch_size_for(num_samples, batch_size, num_devices)
  manifest = _manifest(loaded, opts, batch, classes)
  resuming = _check_manifest(out, manifest)
  is_main = jax.process_index() == 0
  chunk_dir, image_dir = os.path.join(out, CHUNKS), os.path.join(out, IMAGES)
  num_batches = -(-num_samples // batch)

  if is_main:
    os.makedirs(chunk_dir, exist_ok=True)
    os.makedirs(image_dir, exist_ok=True)
    for d in (out, chunk_dir, image_dir):  # leftovers of an interrupted run
      for name in os.listdir(d):
        if name.startswith('.') and '.tmp-' in name:
          os.remove(os.path.join(d, name))
    for name in ('samples.npz', 'grid.png', 'summary.json'):  # rewritten at the end
      if os.path.exists(os.path.join(out, name)):
        os.remove(os.path.join(out, name))
    if not resuming:
      _atomic_write(os.path.join(out, MANIFEST),
                    lambda f: f.write(json.dumps(manifest, indent=2).encode()))
  _sync('dimsum_jax.sample.setup')
  done = _broadcast(_done_batches(chunk_dir, batch, num_batches).astype(np.int32)).astype(bool)
  todo = [k for k in range(num_batches) if not done[k]]
  if is_main:
    logging.info('Sampling %d images of %s (step %s) on %d devices, %d processes: %d global '
                 'batches of %d, %d already done; %s, cfg %.3g, seed %d; writing to %s.',
                 num_samples, loaded.config.model.name, loaded.step, num_devices,
                 jax.process_count(), num_batches, batch, num_batches - len(todo),
                 {'ode': opts.solver, 'dpm': f'DPM-Solver ({opts.dpm_steps} steps)'}.get(
                     opts.mode, f'SDE {opts.sde_method}'),
                 opts.cfg_scale, opts.seed, out)

  sample_seconds = 0.0
  if todo:
    sampler = BatchSampler(loaded, opts, batch)
    logging.info('Compiled the sampler in %.1f s.', sampler.compile_seconds)
    start_time = time.monotonic()
    with jax.transfer_guard('disallow'):
      for n, k in enumerate(todo):
        indices = np.arange(k * batch, (k + 1) * batch)
        labels = labels_for(indices, classes)
        result = sampler(indices, labels)
        last = min(num_samples, (k + 1) * batch) - 1
        nfe, steps = check_batch_result(result, opts, f'{k * batch}-{last}')
        for a, b, rows in _own_rows(result[0]):  # a, b: rows of this batch
          first = k * batch + a                   # the sample index of rows[0]
          if pngs:
            for i in range(first, min(first + b - a, num_samples)):
              _save_png(os.path.join(image_dir, f'{i:06d}.png'), rows[i - first])
          arrays = dict(images=rows, indices=np.arange(first, first + b - a),
                        labels=labels[a:b], nfe=np.int32(nfe), num_steps=np.int32(steps))
          _atomic_write(os.path.join(chunk_dir, _chunk_name(first, first + b - a)),
                        lambda f, arrays=arrays: np.savez(f, **arrays))
        sample_seconds = time.monotonic() - start_time
        rate = (n + 1) * batch / sample_seconds
        remaining = (len(todo) - n - 1) * batch / rate
        if is_main:
          logging.info('Batch %d/%d (samples %d-%d): NFE %d%s, %.3g samples/s, ETA %s.', k + 1,
                       num_batches, k * batch, last, nfe,
                       f' ({steps} steps)' if opts.mode == 'ode' and opts.solver == 'dopri5'
                       else '', rate, _hms(remaining))

  _sync('dimsum_jax.sample.chunks_written')
  summary = None
  if is_main:
    nfe_all = {}
    for (a, _), path in _chunk_files(chunk_dir).items():
      if a % batch == 0 and a // batch < num_batches:
        with np.load(path, allow_pickle=False) as z:
          nfe_all[a // batch] = int(z['nfe'])
    summary = {
        'num_samples': num_samples, 'num_batches': num_batches,
        'nfe_per_batch': [nfe_all.get(k) for k in range(num_batches)],
        'nfe_mean': float(np.mean(list(nfe_all.values()))) if nfe_all else None,
        'batches_sampled_now': len(todo), 'sampling_seconds_now': round(sample_seconds, 3),
        'devices': num_devices, 'processes': jax.process_count(), **manifest}
    n_grid = min(num_samples, GRID_MAX)
    first = np.concatenate(list(_iter_rows(chunk_dir, n_grid, classes, image_dir, False)))
    _save_png(os.path.join(out, 'grid.png'), make_grid(first, grid_columns(n_grid, classes)))
    _atomic_write(os.path.join(out, 'summary.json'),
                  lambda f: f.write(json.dumps(summary, indent=2).encode()))
    # samples.npz last, renamed into place when whole: its presence means the run is complete.
    _write_npz(os.path.join(out, 'samples.npz'), num_samples, loaded.output_shape,
               _iter_rows(chunk_dir, num_samples, classes, image_dir, pngs),
               labels_for(np.arange(num_samples), classes))
    logging.info('Wrote %d samples to %s (samples.npz, grid.png%s); NFE per batch: mean %.1f.',
                 num_samples, out, ', images/' if pngs else '', summary['nfe_mean'] or 0)
    if evaluation is not None:
      summary['evaluation'] = _evaluate(evaluation, os.path.join(out, 'samples.npz'))
      _atomic_write(os.path.join(out, 'summary.json'),
                    lambda f: f.write(json.dumps(summary, indent=2).encode()))
  _sync('dimsum_jax.sample.done')
  return summary


# ------------------------------------------------------------------------------------------------
# Flags

FLAGS = flags.FLAGS


def define_flags():
  """The CLI flags (defined only when run as a program, so that importing this module next to
  other entry points, e.g. in a notebook, defines nothing)."""
  flags.DEFINE_string('checkpoint', None, 'Exported (dimsum_jax.export) or converted model dir.')
  flags.DEFINE_string('workdir', None, 'Training workdir: its newest good checkpoint (or --step).')
  flags.DEFINE_integer('step', None, 'With --workdir: the checkpoint step to sample from.')
  flags.DEFINE_string('out', None, 'Output directory (PNGs, grid.png, samples.npz).')
  flags.DEFINE_integer('num_samples', 64, 'How many samples.')
  flags.DEFINE_integer('batch_size', 64, 'Global batch (over all devices); keep it when resuming.')
  flags.DEFINE_list('classes', [], 'Class indices the samples cycle through (default: all).')
  flags.DEFINE_string('vae_dir', None, 'VAE for latent models (default: config.vae.dir).')
  flags.DEFINE_boolean('pngs', True, 'Write one PNG per sample under OUT/images/.')
  flags.DEFINE_string('mode', 'ode', 'ode (probability flow), sde (Euler-Maruyama / Heun) or dpm '
                      "(DPM-Solver, DiM's sampler for its discrete noise-prediction models).")
  flags.DEFINE_integer('dpm_steps', sampling.DPM_STEPS, '--mode=dpm: model evaluations.')
  flags.DEFINE_string('solver', 'dopri5', 'ODE solver: dopri5 (adaptive), euler or heun.')
  flags.DEFINE_integer('num_steps', 250, 'euler/heun steps; SDE grid points; unused by dopri5.')
  flags.DEFINE_float('atol', 1e-6, 'dopri5 absolute tolerance.')
  flags.DEFINE_float('rtol', 1e-3, 'dopri5 relative tolerance.')
  flags.DEFINE_integer('max_steps', 4096, 'dopri5 step budget per batch (accepted + rejected).')
  flags.DEFINE_boolean('per_sample', False, 'dopri5: step sizes per sample instead of per batch.')
  flags.DEFINE_float('cfg_scale', 1.0, 'Classifier-free guidance scale (1 = none).')
  flags.DEFINE_string('sde_method', 'euler', 'SDE: euler (Euler-Maruyama) or heun.')
  flags.DEFINE_string('diffusion_form', 'sigma', 'SDE diffusion form (transport.DIFFUSION_FORMS).')
  flags.DEFINE_float('diffusion_norm', 1.0, 'SDE diffusion scale.')
  flags.DEFINE_string('last_step', 'Mean', 'SDE last step: Mean, Tweedie, Euler or None.')
  flags.DEFINE_float('last_step_size', 0.04, 'SDE last step size.')
  flags.DEFINE_integer('seed', 0, 'Sample i starts from the noise of fold_in(key(seed), i).')
  flags.DEFINE_string('evaluate', None, 'Score samples.npz once written: an ADM-style reference '
                      'batch .npz (Inception features), or "digits" (the digits features).')
  flags.DEFINE_string('inception', None, "With --evaluate: pytorch-fid's "
                      'pt_inception-2015-12-05-6726825d.pth (read from disk, never downloaded).')
  flags.DEFINE_enum('features', None, ['inception', 'digits'], 'With --evaluate: the features '
                    '(default: inception; digits with --evaluate=digits).')
  flags.DEFINE_string('metrics', None, 'With --evaluate: a subset of '
                      'fid,sfid,is,precision,recall,accuracy (default: all that apply).')
  flags.DEFINE_enum('preprocess', None, ['pytorch_fid', 'tf'], 'With --evaluate and Inception '
                    "features: pytorch-fid's input resize (default) or the TF graph's.")
  flags.DEFINE_integer('image_size', None, 'Sample at this many px (default: the trained size).')
  flags.DEFINE_string('interpolation', 'auto', 'With --image_size: the position table\'s '
                      'resizing, auto (the family\'s own), bicubic or bilinear.')
  flags.DEFINE_float('upsample_guidance', 0.0, 'With --image_size m times the trained size: '
                     'Upsample Guidance scale (0 = off).')
  flags.DEFINE_float('ug_eta', 0.3, 'Upsample Guidance acts over the first ug_eta of the way '
                     'from noise.')


RUN_FLAGS = ('checkpoint', 'workdir', 'step', 'out', 'num_samples', 'batch_size', 'vae_dir',
             'pngs', 'mode', 'dpm_steps', 'solver', 'num_steps', 'atol', 'rtol', 'max_steps',
             'per_sample',
             'cfg_scale', 'sde_method', 'diffusion_form', 'diffusion_norm', 'last_step',
             'last_step_size', 'seed', 'image_size', 'interpolation', 'upsample_guidance',
             'ug_eta')
EVAL_FLAGS = ('inception', 'features', 'metrics', 'preprocess')  # options of dimsum_jax.evaluate
USER_ERRORS = (SampleError, checkpoint.CheckpointError, sampling.ODESolveError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    try:
      classes = [int(c) for c in FLAGS.classes]
    except ValueError as e:
      raise SampleError(f'--classes={",".join(FLAGS.classes)} must be integers, e.g. '
                        '--classes=0,3,7.') from e
    sharding.initialize_distributed()
    eval_options = {name: FLAGS[name].value for name in EVAL_FLAGS
                    if FLAGS[name].value is not None}
    run(classes=classes, evaluate=FLAGS.evaluate, eval_options=eval_options,
        **{name: FLAGS[name].value for name in RUN_FLAGS})
  except USER_ERRORS as e:
    logging.error('%s', e)
    raise SystemExit(f'error: {e}') from e


def cli():
  """The `dimsum-sample` console script."""
  define_flags()
  app.run(main)


if __name__ == '__main__':
  cli()
