"""Warm start and resolution change: a model's weights carried to another token grid or patch.

`config.init_from` (this module's section, `default_config`):
  path           '' (none), or where the new run's weights come from:
                   an export (config.json + ema_params/, python -m dimsum_jax.export): params and
                     EMA both start as the exported EMA;
                   a training workdir (config.json + checkpoints/): the params and the EMA of its
                     newest checkpoint that restores (read only; a damaged one is skipped);
                   a conversion of upstream weights (model_config.json + params/,
                     python -m dimsum_jax.convert): params and EMA both start as them.
  interpolation  'auto' (the source family's own: bicubic for DiMSUM, as upstream's
                 interpolate_pos_embed; bilinear for DiM, as its pos_embed_inteplot), 'bicubic'
                 or 'bilinear'.
The run starts at step 0 with a fresh optimiser and its own seed; a workdir that already holds
checkpoints resumes them instead and ignores init_from (it says so in the log).

`adapt(params, source, target, shapes)` carries a parameter tree of model config `source` to
model config `target` (parameter shapes `shapes`):
  position table  DiMSUM `pos_embed` [g g, D] and DiM `additional_embed` [E + h w, D] (its E
                  time/class rows kept) are resized on the token grid as torch's
                  F.interpolate(align_corners=False, no antialias), in float64 (`resize_matrix`).
                  DiT's sin-cos table is no parameter: the model rebuilds it for its grid.
  patch           the patch embedding kernel [p, p, C, D] and the final projection [D, p p C]
                  (+ bias [p p C]) of another patch size keep their top-left p x p block and
                  their first p p C outputs: cropped as upstream DiMSUM's --model-ckpt does for
                  patch 4 -> 2; a larger patch is zero-padded.
  label table     a table of the n classes without the null row ([n, D]: an upstream model
                  trained without label dropout) into a model of n classes ([n + 1, D]): the
                  class rows copied, the null row (the last) started at zero.
Every other parameter must have the same shape; the first that does not stops with one
sentence naming it and both shapes. `check_image_size` and `resize_model` give a trained model
another input size for sampling (the scan orders and the wavelet windows follow the grid).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, NamedTuple

from absl import logging
import jax
import ml_collections
import numpy as np

from dimsum_jax import checkpoint
from dimsum_jax import io_utils
from dimsum_jax import models
from dimsum_jax import sharding
from dimsum_jax import weights
from dimsum_jax.models import dim

INTERPOLATIONS = ('auto', 'bicubic', 'bilinear')
CUBIC_A = -0.75  # torch's bicubic (cubic convolution, Keys' a)

# The parameters whose shape may differ, by path: position tables, patch parameters (-> the
# axes that change with the patch) and label tables.
_POSITION = {'pos_embed', 'additional_embed'}
_PATCH = {
  'x_embedder/proj/kernel': (0, 1),
  'final_layer/linear/kernel': (1,),
  'final_layer/linear/bias': (0,),
  'x_embedder/kernel': (0, 1),
  'proj_out_2/kernel': (1,),
  'proj_out_2/bias': (0,),
}
_LABELS = {
  'y_embedder/embedding_table/embedding',
  'label_emb/embedding',
  'class_embedder/embedding',
}


class WarmStartError(ValueError):
  """init_from or a sampling size that cannot be used; the message says what to do."""


def default_config() -> ml_collections.ConfigDict:
  """The `init_from` section: no warm start."""
  return ml_collections.ConfigDict({'path': '', 'interpolation': 'auto'})


def validate(section) -> None:
  if section.interpolation not in INTERPOLATIONS:
    raise WarmStartError(
      f'--config.init_from.interpolation={section.interpolation} is not a '
      f'valid choice: use one of {", ".join(INTERPOLATIONS)}.'
    )


# ------------------------------------------------------------------------------------------------
# Interpolation (torch's F.interpolate with align_corners=False)


def _cubic(t: float) -> tuple[float, float, float, float]:
  """Weights of the taps floor - 1 .. floor + 2 at fraction t (torch's
  get_cubic_upsample_coefficients)."""
  a = CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return far(t + 1), near(t), near(1 - t), far(2 - t)


def resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
  """[n_out, n_in] float64 weights of 1-D resizing as torch (align_corners=False, no
  antialias): output i reads the source coordinate s = (i + 1/2) n_in / n_out - 1/2.
  'bilinear': s clamped at 0, its two neighbours (DiM's `interpolation_matrix`); 'bicubic': the
  four taps floor(s) - 1 .. floor(s) + 2 with cubic convolution weights (a = -0.75), indices
  clamped to the edge. Equal sizes give the identity."""
  if method == 'bilinear':
    return dim.interpolation_matrix(n_in, n_out)
  if method != 'bicubic':
    raise ValueError(f'Unknown interpolation {method!r}: use bicubic or bilinear.')
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    s = (i + 0.5) * n_in / n_out - 0.5
    base = math.floor(s)
    for k, w in enumerate(_cubic(s - base)):
      m[i, min(max(base - 1 + k, 0), n_in - 1)] += w
  return m


def resize_table(
  table, src: tuple[int, int], dst: tuple[int, int], method: str, extra: int = 0
) -> np.ndarray:
  """A position table [extra + hs ws, D] (grid rows row-major) -> [extra + hd wd, D], float64:
  the first `extra` rows kept, the grid resized separably by `resize_matrix`."""
  table = np.asarray(table, np.float64)
  (hs, ws), (hd, wd) = src, dst
  grid = table[extra:].reshape(hs, ws, -1)
  out = np.einsum(
    'ia,jb,abd->ijd', resize_matrix(hs, hd, method), resize_matrix(ws, wd, method), grid
  )
  return np.concatenate([table[:extra], out.reshape(hd * wd, -1)])


def _fit(a, shape) -> np.ndarray:
  """`a` cropped or zero-padded at the end of every axis to `shape`."""
  a = np.asarray(a)
  out = np.zeros(shape, a.dtype)
  common = tuple(slice(0, min(m, n)) for m, n in zip(a.shape, shape))
  out[common] = a[common]
  return out


# ------------------------------------------------------------------------------------------------
# Model layouts and the adaptation


class Layout(NamedTuple):
  family: str  # 'DiMSUM', 'DiT' or 'DiM'
  name: str  # registry name
  patch: int
  grid: tuple[int, int]  # token grid of the position table
  extra: int  # table rows before the grid (DiM's time and class tokens)


def layout(model_config) -> Layout:
  """Family, patch and token grid of a model config (built, not run)."""
  model = models.create_model(model_config)
  family = model_config.name.split('-')[0]
  if family == 'DiM':
    return Layout(
      family, model_config.name, model.patch_size, model.table_grid(), 2 if model.num_classes else 1
    )
  g = model.input_size // model.patch_size
  return Layout(family, model_config.name, model.patch_size, (g, g), 0)


def default_interpolation(source: Layout, interpolation: str = 'auto') -> str:
  if interpolation == 'auto':
    return 'bilinear' if source.family == 'DiM' else 'bicubic'
  return interpolation


def _flat(tree) -> dict:
  return {sharding.leaf_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _carry(name, value, shape, src: Layout, dst: Layout, method: str):
  """(value with `shape`, what was done) for a parameter of another shape that may be adapted;
  None when it may not."""
  if (
    name in _POSITION
    and value.shape[1:] == shape[1:]
    and src.extra == dst.extra
    and (value.shape[0] == src.extra + math.prod(src.grid))
    and (shape[0] == dst.extra + math.prod(dst.grid))
  ):
    return (
      resize_table(value, src.grid, dst.grid, method, src.extra),
      f'{name} {src.grid[0]}x{src.grid[1]} -> {dst.grid[0]}x{dst.grid[1]} ({method})',
    )
  same_elsewhere = value.ndim == len(shape) and all(
    a == b for i, (a, b) in enumerate(zip(value.shape, shape)) if i not in _PATCH.get(name, ())
  )
  if name in _PATCH and src.patch != dst.patch and same_elsewhere:
    return _fit(value, shape), (
      f'{name} {list(value.shape)} -> {list(shape)} (patch {src.patch} -> {dst.patch})'
    )
  if name in _LABELS and value.shape[1:] == shape[1:] and value.shape[0] + 1 == shape[0]:
    return _fit(value, shape), f'{name} null row added'
  return None


def adapt(params, source, target, shapes, interpolation: str = 'auto', *, where='init_from'):
  """`params` of model config `source` carried to model config `target` whose parameter tree
  has `shapes` (arrays or ShapeDtypeStructs): (float32 NumPy tree shaped like `shapes`, notes on
  what was adapted). WarmStartError names the first parameter that cannot be carried over."""
  src, dst = layout(source), layout(target)
  if src.family != dst.family:
    raise WarmStartError(
      f'{where} holds a {src.name}, which cannot start a {dst.name}: use '
      f'weights of the same model family.'
    )
  method = default_interpolation(src, interpolation)
  have = _flat(jax.device_get(params))
  out, notes = {}, []
  for name, spec in _flat(shapes).items():
    shape = tuple(spec.shape)
    if name not in have:
      raise WarmStartError(
        f'{where} has no parameter {name} (this {dst.name} needs '
        f'{list(shape)}): the checkpoint is of another architecture.'
      )
    value = np.asarray(have[name])
    if value.shape != shape:
      carried = _carry(name, value, shape, src, dst, method)
      if carried is None:
        raise WarmStartError(
          f'{where} does not fit this {dst.name}: {name} is '
          f'{list(value.shape)} there and {list(shape)} here (check '
          'model.name, depth, hidden_size, in_channels and num_classes).'
        )
      value, note = carried
      notes.append(note)
    out[name] = value.astype(np.float32)
  extra = sorted(set(have) - set(out))
  if extra:
    raise WarmStartError(
      f'{where} has a parameter {extra[0]} that this {dst.name} lacks: the '
      'checkpoint is of another architecture.'
    )
  leaves = [out[name] for name in _flat(shapes)]
  return jax.tree.unflatten(jax.tree.structure(shapes), leaves), notes


# ------------------------------------------------------------------------------------------------
# Sampling at another size


def check_image_size(model_config, image_size: int, factor: int = 1) -> int:
  """The model input size of `image_size` px (`factor`: the VAE's downsampling, 1 for pixel
  models), or WarmStartError in one sentence naming what refuses it: the VAE, the patch, or
  DiMSUM's wavelet window layout."""
  name, size = model_config.name, image_size // factor
  if image_size < 1 or image_size % factor:
    raise WarmStartError(
      f'{image_size} px is not a positive multiple of the VAE\'s {factor}x '
      f'downsampling: use a multiple of {factor}.'
    )
  model = models.create_model(model_config)
  p = model.patch_size
  if size % p:
    raise WarmStartError(
      f'{image_size} px gives a {size}x{size} input that the patch {p} of '
      f'{name} does not divide: use a multiple of {p * factor} px.'
    )
  step = 2 ** getattr(model, 'wavelet_levels', 0)
  g = size // p
  if g % step:
    unit = step * p * factor
    near = sorted({max(unit, image_size // unit * unit), -(-image_size // unit) * unit})
    raise WarmStartError(
      f'{image_size} px gives {name} a {g}x{g} token grid, which its '
      f'{model.wavelet_levels}-level wavelet window layout cannot take (the side must be a '
      f'multiple of {step} tokens): use a multiple of {unit} px, e.g. '
      f'{" or ".join(map(str, near))}.'
    )
  return size


def resize_model(model_config, params, input_size: int, interpolation: str = 'auto'):
  """(model config, model, NumPy params) of a trained model rebuilt for `input_size`: the
  position table interpolated (`adapt`); scan orders and wavelet windows follow the new grid."""
  target = ml_collections.ConfigDict(model_config.to_dict())
  target.input_size = input_size
  model = models.create_model(target)
  shapes = models.abstract_params(model, target)
  resized, notes = adapt(
    params, model_config, target, shapes, interpolation, where='the checkpoint'
  )
  if notes:
    logging.info('Resized for input size %d: %s.', input_size, '; '.join(notes))
  return target, model, resized


# ------------------------------------------------------------------------------------------------
# Reading init_from


class Source(NamedTuple):
  kind: str  # 'export', 'workdir' or 'conversion'
  model: Any  # its model ConfigDict
  params: Any  # NumPy trees
  ema_params: Any
  step: int | None


def _model_config(config_dict) -> ml_collections.ConfigDict:
  """A saved model section with the fields added since then at their defaults."""
  model = models.default_model_config()
  model.update(dict(config_dict))
  return model


def _read_json(path, where):
  try:
    return io_utils.read_json(path)
  except ValueError as e:
    raise WarmStartError(f'{where}: {e}.') from e


def read_source(path: str, mesh) -> Source:
  """The weights at `path` (an export, a workdir or a conversion) as NumPy trees."""
  where = f'--config.init_from.path={path}'
  path = os.path.abspath(os.path.expanduser(path))
  has = lambda *names: os.path.exists(os.path.join(path, *names))
  if has('config.json') and has('ema_params'):
    config = _read_json(os.path.join(path, 'config.json'), where)
    params = _restore(os.path.join(path, 'ema_params'), where)
    return Source('export', _model_config(config.get('model', {})), params, params, None)
  if has('config.json') and has('checkpoints'):
    config = _read_json(os.path.join(path, 'config.json'), where)
    model_config = _model_config(config.get('model', {}))
    model = models.create_model(model_config)
    abstract = models.abstract_params(model, model_config)
    abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.replicated(mesh)), abstract
    )
    state, step = weights.restore_newest(path, {'params': abstract, 'ema_params': abstract})
    params, ema = (
      jax.tree.map(np.asarray, jax.device_get(state[k])) for k in ('params', 'ema_params')
    )
    return Source('workdir', model_config, params, ema, step)
  if has('model_config.json') and has('params'):
    model_config = _model_config(_read_json(os.path.join(path, 'model_config.json'), where))
    params = _restore(os.path.join(path, 'params'), where)
    return Source('conversion', model_config, params, params, None)
  raise WarmStartError(
    f'{where} holds nothing to start from: pass an export (config.json + '
    'ema_params/), a training workdir (config.json + checkpoints/) or a '
    'conversion (model_config.json + params/).'
  )


def _restore(path, where):
  """An Orbax parameter tree (an export's ema_params/, a conversion's params/) as NumPy."""
  try:
    return weights.restore_params(path)
  except Exception as e:  # pylint: disable=broad-except
    raise WarmStartError(
      f'{where}: {path} cannot be read ({str(e).splitlines()[0][:200]}): '
      'export or convert the model again.'
    ) from e


def _has_checkpoints(workdir) -> bool:
  ckdir = checkpoint.checkpoint_dir(workdir)
  return os.path.isdir(ckdir) and any(re.fullmatch(r'\d+', n) for n in os.listdir(ckdir))


class Start(NamedTuple):
  params: Any  # NumPy trees shaped like the new model's parameters
  ema_params: Any


def prepare(config, workdir, shapes, mesh) -> Start | None:
  """The adapted weights of config.init_from for a run in `workdir` whose parameters have
  `shapes`, or None (no init_from, or a workdir with checkpoints, which resume instead).
  Reads only: call it before anything is written so that a bad source stops the run clean."""
  section = config.init_from
  validate(section)
  if not section.path:
    return None
  if _has_checkpoints(workdir):
    logging.info(
      '%s holds checkpoints: resuming them; config.init_from.path=%s is ignored.',
      checkpoint.checkpoint_dir(workdir),
      section.path,
    )
    return None
  where = f'--config.init_from.path={section.path}'
  try:
    source = read_source(section.path, mesh)
    params, notes = adapt(
      source.params, source.model, config.model, shapes, section.interpolation, where=where
    )
    ema, _ = adapt(
      source.ema_params, source.model, config.model, shapes, section.interpolation, where=where
    )
  except WarmStartError:
    raise
  except ValueError as e:  # the source's model config cannot be built
    raise WarmStartError(f'{where}: its model cannot be built here ({e}).') from e
  logging.info(
    'Warm start from the %s %s (step %s): params and EMA%s; fresh optimiser at step 0.',
    source.kind,
    os.path.abspath(section.path),
    source.step,
    ''.join(f'; {n}' for n in notes) or ', unchanged',
  )
  return Start(params, ema)


def to_global(tree, shardings):
  """A NumPy tree (whole on every process) as global arrays with `shardings` (a tree, or one
  sharding for every leaf)."""
  if not isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(to_global, tree, shardings)
  return jax.tree.map(
    lambda a: jax.make_array_from_callback(
      np.shape(a), shardings, lambda index: np.asarray(a)[index]
    ),
    tree,
  )


def place(start: Start, params_sharding) -> dict:
  """{'params', 'ema_params'} as global arrays with the run's parameter shardings."""
  return {
    'params': to_global(start.params, params_sharding),
    'ema_params': to_global(start.ema_params, params_sharding),
  }
