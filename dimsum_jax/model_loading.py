"""Loading a model to sample from: the EMA weights of an export, a conversion or a training
workdir, with the config that builds it and, for a latent model, its VAE.

Three layouts, told apart by their files (`read_config`):
  export      OUT/config.json + OUT/ema_params/ (+ step.txt)   `python -m dimsum_jax.export`
  converted   model_config.json + params/                      `python -m dimsum_jax.convert`
  workdir     config.json + checkpoints/<step>/                 a training run: its newest good
                                                                checkpoint, or --step
The weights are read by weights.restore_params (export, conversion) or weights.restore_newest
(workdir), after their shapes were checked against the config's model
(models.abstract_params), and are replicated over the sampling mesh. `load_model` returns a
`LoadedModel`: the model takes x [B, input_size, input_size, in_channels] float32, t [B] and labels
y [B] int32 (num_classes is the null label), and its outputs decode, for a latent model, to images
[B, H, W, C] in [-1, 1] (`LoadedModel.output_shape`). With `image_size` the model is rebuilt for
another size (warm_start.resize_model), the trained one kept as `LoadedModel.base`.

Every mistake (a missing directory, a missing VAE, weights of another model) is a SampleError in
one sentence.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from dimsum_jax import checkpoint
from dimsum_jax import config_utils
from dimsum_jax import io_utils
from dimsum_jax import models
from dimsum_jax import sharding
from dimsum_jax import warm_start
from dimsum_jax import weights


class SampleError(ValueError):
  """A flag, checkpoint or output-directory mistake; the message says what to do."""


@dataclasses.dataclass
class LoadedModel:
  """A model ready to sample from: its config, module and EMA parameters on a mesh."""

  config: ml_collections.ConfigDict  # the run's config (model, transport, vae, ...)
  model: Any  # Flax module
  params: Any  # EMA parameters, replicated over `mesh`
  mesh: jax.sharding.Mesh
  source: str  # absolute path of the checkpoint / workdir
  step: int | None  # training step of the weights, when known
  vae: Any = None  # (vae module, vae params) for latent models
  interpolation: str | None = None  # how the position table was resized (--image_size)
  base: Any = None  # (model, params) at the trained size, with --image_size

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
  return sharding.make_mesh(
    {'data': -1, 'fsdp': 1}, devices=None if devices is None else list(devices)
  )


def _read_json(path):
  try:
    return io_utils.read_json(path)
  except ValueError as e:
    raise SampleError(f'{e}: export or convert the model again.') from e


def read_config(*, checkpoint_dir=None, workdir=None):
  """(config, layout) of an export ('export'), a conversion ('converted') or a workdir."""
  if (checkpoint_dir is None) == (workdir is None):
    raise SampleError(
      'Pass exactly one of --checkpoint (an exported or converted model) and '
      '--workdir (a training directory).'
    )
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
      raise SampleError(
        f'{where} has config.json but no ema_params/: pass a directory written '
        'by `python -m dimsum_jax.export` (or use --workdir for a training run).'
      )
    layout = 'workdir' if workdir is not None else 'export'
  elif os.path.exists(os.path.join(where, 'model_config.json')):
    config = base
    config.model.update(_read_json(os.path.join(where, 'model_config.json')))
    if config.model.get('name') in models.DIM_SIZES:  # DiM's released weights: its objective
      config.transport.update(path_type='ScaledLinear', prediction='noise')
    layout = 'converted'
  else:
    raise SampleError(
      f'{where} holds no model: pass a directory written by '
      '`python -m dimsum_jax.export` or `python -m dimsum_jax.convert`, or a '
      'training --workdir.'
    )
  # Fields added to the config after a checkpoint was written take their defaults.
  for section in ('model', 'transport', 'vae'):
    merged = base[section].to_dict()
    if section in config:
      merged.update(config[section].to_dict())
    config[section] = ml_collections.ConfigDict(merged)
  # How inference runs is the sampling command's choice (load_model's inference_options): a
  # checkpoint stores the defaults of the code that trained it, and today's defaults apply.
  for field in models.INFERENCE_FIELDS:
    config.model[field] = base.model[field]
  return config, layout


def set_inference_options(config, options) -> None:
  """Sets model.inference_* fields (models.INFERENCE_FIELDS) of `config` from `options`, a dict
  whose None values keep the default; SampleError for a field that is none of them."""
  for field, value in (options or {}).items():
    if field not in models.INFERENCE_FIELDS:
      raise SampleError(
        f'{field} is not an inference option of the model: use one of '
        f'{", ".join(models.INFERENCE_FIELDS)}.'
      )
    if value is None:
      continue
    if field not in models.fields_read(config.model.name):
      raise SampleError(
        f'--{field} does not apply to {config.model.name} '
        f'({models.family(config.model.name)} models do not read it): leave it out.'
      )
    if field == 'inference_scan_unroll' and value < 0:
      raise SampleError(
        f'--inference_scan_unroll={value} must be 0 (the whole stack unrolled) or the number of '
        'blocks (DiMSUM: block groups) per loop iteration (1: a rolled loop).'
      )
    config.model[field] = value


def _restore_export(path, abstract):
  try:
    return weights.restore_params(path, abstract)
  except checkpoint.CheckpointError as e:
    raise SampleError(str(e)) from e


def _restore_workdir(workdir, abstract, step):
  try:
    state, step = weights.restore_newest(workdir, {'ema_params': abstract}, step=step)
  except checkpoint.CheckpointError as e:
    raise SampleError(str(e)) from e
  return state['ema_params'], step


def check_vae(config, vae_dir=None) -> str | None:
  """The VAE directory a latent model needs (None for pixel models); SampleError when missing."""
  if config.model.in_channels in (1, 3):
    return None
  vae_dir = vae_dir or config.vae.dir
  if not vae_dir:
    raise SampleError(
      f'This is a latent model ({config.model.in_channels} channels) and no VAE '
      'is configured: pass --vae_dir=DIR of a VAE converted with '
      '`python -m dimsum_jax.vae.convert`.'
    )
  vae_dir = os.path.abspath(vae_dir)
  for part in ('config.json', 'params'):
    if not os.path.exists(os.path.join(vae_dir, part)):
      raise SampleError(
        f'The VAE directory {vae_dir} has no {part}: pass --vae_dir=DIR of a VAE '
        'converted with `python -m dimsum_jax.vae.convert`.'
      )
  return vae_dir


def load_model(
  *,
  checkpoint_dir=None,
  workdir=None,
  step=None,
  vae_dir=None,
  mesh=None,
  image_size=None,
  interpolation='auto',
  inference_options=None,
) -> LoadedModel:
  """The EMA weights of an export, a conversion or a training workdir, replicated over `mesh`;
  with `image_size` (px) other than the trained one, the model rebuilt for that size
  (warm_start.resize_model: the position table interpolated, `interpolation` 'auto' = the
  family's own; scan orders and wavelet windows follow the new token grid).
  inference_options: {field: value or None} for the fields of models.INFERENCE_FIELDS (default:
  today's defaults, whatever the checkpoint stored)."""
  config, layout = read_config(checkpoint_dir=checkpoint_dir, workdir=workdir)
  set_inference_options(config, inference_options)
  vae_path = check_vae(config, vae_dir)
  mesh = sampling_mesh() if mesh is None else mesh
  where = os.path.abspath(checkpoint_dir or workdir)
  try:
    model = models.create_model(config.model)
    abstract = models.abstract_params(model, config.model)
  except ValueError as e:
    raise SampleError(
      f'The config in {where} does not describe a model this code can build: {e}'
    ) from e
  replicated = sharding.replicated(mesh)
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract
  )
  if layout == 'workdir':
    if step is not None and step < 0:
      raise SampleError(f'--step={step} must be a checkpoint step (>= 0).')
    params, step = _restore_workdir(where, abstract, step)
  else:
    if step is not None:
      raise SampleError('--step applies to --workdir only; an export holds one step.')
    params = _restore_export(
      os.path.join(where, 'ema_params' if layout == 'export' else 'params'), abstract
    )
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
      config.model, model, params = warm_start.resize_model(
        config.model, params, size, interpolation
      )
    except warm_start.WarmStartError as e:
      raise SampleError(f'--image_size={image_size}: {e}') from e
    params = warm_start.to_global(params, replicated)
    resized = interpolation
  return LoadedModel(
    config=config,
    model=model,
    params=params,
    mesh=mesh,
    source=where,
    step=step,
    vae=vae,
    interpolation=resized,
    base=base,
  )
