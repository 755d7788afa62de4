"""Sampling at another size than trained (dimsum_jax.sample --image_size), per model family.

Small 8 px models with seeded random weights, written as conversions, are loaded at 16 px and
compared with a model built independently: DiMSUM at 16 px with its table resized by torch's
bicubic F.interpolate; DiT at 16 px (its sin-cos table is rebuilt); DiM's own 8 px model, which
resizes its table bilinearly on every call that sees another grid, as upstream does. The
default run compares one forward pass per family and samples once through the command; -m slow
compares whole samplings with a direct Euler loop (tests/test_sample_cli.euler_samples).
"""
import json
import os

import jax
import numpy as np
import pytest

from dimsum_jax import convert
from dimsum_jax import models
from dimsum_jax import sample
from tests import seeds
from tests.test_sample_cli import euler_samples

OPTIONS = dict(solver='euler', num_steps=3, cfg_scale=2.0)


def _config(name, **overrides):
  c = models.default_model_config()
  c.update(name=name, depth=4, hidden_size=64, input_size=8, in_channels=1, num_classes=10,
           remat='none')
  c.update(overrides)
  return c


def _write(tmp_path, config, seed):
  """A conversion (params/ + model_config.json) of `config` with weights N(0, 0.1^2) (the
  layers that start at zero too, so that every parameter matters)."""
  model = models.create_model(config)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: 0.1 * rng.normal(size=s.shape).astype(np.float32),
                        convert.abstract_params(model, config))
  out = tmp_path / config.name.replace('/', '_')
  convert.save_params(str(out), params, config)
  return str(out), model, params


def _reference(family, config, model, params):
  """(module, params, model config) of the 16 px model, built without dimsum_jax.warm_start."""
  big = config.copy_and_resolve_references()
  big.input_size = 16
  if family == 'DiM':
    return model, params, big   # the 8 px model resizes its table for 16x16 inputs itself
  if family == 'DiMSUM':
    import torch  # pylint: disable=g-import-not-at-top
    table = torch.from_numpy(np.asarray(params['pos_embed'], np.float64).reshape(1, 4, 4, -1))
    table = torch.nn.functional.interpolate(table.permute(0, 3, 1, 2), size=(8, 8), mode='bicubic',
                                            align_corners=False).permute(0, 2, 3, 1)
    params = dict(params, pos_embed=table.reshape(64, -1).numpy().astype(np.float32))
  return models.create_model(big), params, big


FAMILIES = pytest.mark.parametrize('family,config', [
    ('DiMSUM', _config('DiMSUM-L/2')),
    ('DiT', _config('DiT-S/2', hidden_size=48, depth=2)),
    ('DiM', _config('DiM-L/2', hidden_size=32, depth=3, scan_impl='reference')),
], ids=['DiMSUM', 'DiT', 'DiM'])


@seeds.each(0)
@FAMILIES
def test_model_at_twice_the_trained_size_matches_an_independent_one(tmp_path, family, config,
                                                                      seed):
  pytest.importorskip('torch')
  path, model, params = _write(tmp_path, config, seed)
  loaded = sample.load_model(checkpoint_dir=path, image_size=16)
  assert loaded.image_shape == (16, 16, 1) and loaded.config.model.input_size == 16
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, 16, 16, 1)).astype(np.float32)
  t, y = np.asarray([0.3, 0.8], np.float32), np.asarray([1, 10], np.int32)
  ours = jax.jit(loaded.model.apply)({'params': loaded.params}, x, t, y)
  ref_model, ref_params, _ = _reference(family, config, model, params)
  expected = jax.jit(ref_model.apply)({'params': ref_params}, x, t, y)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5, err_msg=f'seed {seed}')


@pytest.mark.slow
@seeds.each(0)
@FAMILIES
def test_samples_at_twice_the_trained_size_match_a_direct_loop(tmp_path, family, config, seed):
  pytest.importorskip('torch')
  path, model, params = _write(tmp_path, config, seed)
  loaded = sample.load_model(checkpoint_dir=path, image_size=16)
  opts = sample.sampling_options(seed=seed, **OPTIONS)
  images, labels, _ = sample.generate(loaded, 4, batch_size=4, opts=opts, output='latents')
  expected = euler_samples(*_reference(family, config, model, params), np.arange(4), labels,
                           seed=seed, num_steps=3, cfg_scale=2.0, latents=True)
  np.testing.assert_allclose(images, expected, rtol=2e-4, atol=2e-4, err_msg=f'seed {seed}')


def test_the_command_samples_at_another_size(tmp_path):
  path, _, _ = _write(tmp_path, _config('DiMSUM-L/2'), 0)
  sample.run(checkpoint=path, out=str(tmp_path / 'out'), image_size=16, num_samples=2,
             batch_size=2, solver='euler', num_steps=2, pngs=False)
  with np.load(tmp_path / 'out' / 'samples.npz') as z:
    assert z['arr_0'].shape == (2, 16, 16, 1)
  with open(tmp_path / 'out' / 'manifest.json', encoding='utf-8') as f:
    manifest = json.load(f)
  assert manifest['image_shape'] == [16, 16, 1] and manifest['interpolation'] == 'auto'


def test_a_size_the_wavelet_layout_cannot_take_is_refused_and_nothing_written(tmp_path):
  path, _, _ = _write(tmp_path, _config('DiMSUM-L/2'), 0)
  with pytest.raises(sample.SampleError) as e:
    sample.run(checkpoint=path, out=str(tmp_path / 'out'), image_size=12, num_samples=2)
  assert str(e.value) == (
      '--image_size=12: 12 px gives DiMSUM-L/2 a 6x6 token grid, which its 2-level wavelet '
      'window layout cannot take (the side must be a multiple of 4 tokens): use a multiple of '
      '8 px, e.g. 8 or 16.')
  assert not os.path.exists(tmp_path / 'out')
  with pytest.raises(sample.SampleError, match='Unknown --interpolation=cubic'):
    sample.run(checkpoint=path, out=str(tmp_path / 'out'), image_size=16, interpolation='cubic')
