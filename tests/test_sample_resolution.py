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
import jax.numpy as jnp
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
  c.update(
    name=name, depth=4, hidden_size=64, input_size=8, in_channels=1, num_classes=10, remat='none'
  )
  c.update(overrides)
  return c


def _write(tmp_path, config, seed):
  """A conversion (params/ + model_config.json) of `config` with weights N(0, 0.1^2) (the
  layers that start at zero too, so that every parameter matters)."""
  model = models.create_model(config)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
    lambda s: 0.1 * rng.normal(size=s.shape).astype(np.float32),
    models.abstract_params(model, config),
  )
  out = tmp_path / config.name.replace('/', '_')
  convert.save_params(str(out), params, config)
  return str(out), model, params


def _reference(family, config, model, params):
  """(module, params, model config) of the 16 px model, built without dimsum_jax.warm_start."""
  big = config.copy_and_resolve_references()
  big.input_size = 16
  if family == 'DiM':
    return model, params, big  # the 8 px model resizes its table for 16x16 inputs itself
  if family == 'DiMSUM':
    import torch  # pylint: disable=g-import-not-at-top

    table = torch.from_numpy(np.asarray(params['pos_embed'], np.float64).reshape(1, 4, 4, -1))
    table = torch.nn.functional.interpolate(
      table.permute(0, 3, 1, 2), size=(8, 8), mode='bicubic', align_corners=False
    ).permute(0, 2, 3, 1)
    params = dict(params, pos_embed=table.reshape(64, -1).numpy().astype(np.float32))
  return models.create_model(big), params, big


FAMILIES = pytest.mark.parametrize(
  'family,config',
  [
    ('DiMSUM', _config('DiMSUM-L/2')),
    ('DiT', _config('DiT-S/2', hidden_size=48, depth=2)),
    ('DiM', _config('DiM-L/2', hidden_size=32, depth=3, scan_impl='reference')),
  ],
  ids=['DiMSUM', 'DiT', 'DiM'],
)


@seeds.each(0)
@FAMILIES
def test_model_at_twice_the_trained_size_matches_an_independent_one(tmp_path, family, config, seed):
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
  expected = euler_samples(
    *_reference(family, config, model, params),
    np.arange(4),
    labels,
    seed=seed,
    num_steps=3,
    cfg_scale=2.0,
    latents=True,
  )
  np.testing.assert_allclose(images, expected, rtol=2e-4, atol=2e-4, err_msg=f'seed {seed}')


def test_the_command_samples_at_another_size(tmp_path):
  path, _, _ = _write(tmp_path, _config('DiMSUM-L/2'), 0)
  sample.run(
    checkpoint=path,
    out=str(tmp_path / 'out'),
    image_size=16,
    num_samples=2,
    batch_size=2,
    solver='euler',
    num_steps=2,
    pngs=False,
  )
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
    '8 px, e.g. 8 or 16.'
  )
  assert not os.path.exists(tmp_path / 'out')
  with pytest.raises(sample.SampleError, match='Unknown --interpolation=cubic'):
    sample.run(checkpoint=path, out=str(tmp_path / 'out'), image_size=16, interpolation='cubic')


# ------------------------------------------------------------------------------- Upsample Guidance


def _coefficients(path, t):
  """(alpha, sigma, alpha', sigma') in float64, from the path's definition."""
  if path == 'GVP':
    h = np.pi / 2
    return np.sin(h * t), np.cos(h * t), h * np.cos(h * t), -h * np.sin(h * t)
  return t, 1 - t, 1.0, -1.0


def _matching_time(path, t, m):
  """tau with alpha_tau / sigma_tau = m alpha_t / sigma_t, by bisection."""
  alpha, sigma, _, _ = _coefficients(path, t)
  lo, hi = 0.0, 1.0
  for _ in range(200):
    mid = (lo + hi) / 2
    a, s, _, _ = _coefficients(path, mid)
    lo, hi = (mid, hi) if a * sigma < m * alpha * s else (lo, mid)
  return (lo + hi) / 2


def _pool(a, m=2):
  b, h, w, c = a.shape
  return a.reshape(b, h // m, m, w // m, m, c).mean(axis=(2, 4))


@seeds.each(0)
@pytest.mark.parametrize('path', ['GVP', 'Linear'])
def test_velocity_guidance_sets_the_block_means_to_the_pooled_path_velocity(path, seed):
  """Full guidance (w = 1): the m x m block means of the guided velocity are the trained-size
  network's estimate of d/dt AvgPool(x_t) = alpha'_t x1' + sigma'_t x0' / m, its data and noise
  predictions x1', x0' solved from (x_low, v_low) at the time tau of equal SNR (found here by
  bisection, x_low = AvgPool(x) alpha_tau / alpha_t); the detail within the blocks is v's."""
  from dimsum_jax import upsample_guidance  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3, 8, 8, 2))
  t = np.asarray([0.05, 0.15, 0.25])
  w_full, w_low = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
  model_fn = lambda x, t, y: jnp.tanh(x @ w_full) * (1 + t[:, None, None, None])
  low_fn = lambda x, t, y: jnp.cos(x @ w_low) - t[:, None, None, None]
  fn = upsample_guidance.make_upsample_guided_velocity_fn(
    model_fn, low_fn, 2, path_type=path, theta=1.0, eta=0.3
  )
  guided = np.asarray(fn(np.float32(x), np.float32(t), None), np.float64)
  v = np.asarray(model_fn(x, t, None))
  for i in range(3):
    tau = _matching_time(path, t[i], 2)
    a_t, _, da_t, ds_t = _coefficients(path, t[i])
    a_tau, s_tau, da_tau, ds_tau = _coefficients(path, tau)
    x_low = _pool(x[i : i + 1]) * a_tau / a_t
    v_low = np.asarray(low_fn(x_low, np.asarray([tau]), None))
    x1, x0 = np.linalg.solve(
      [[a_tau, s_tau], [da_tau, ds_tau]], np.stack([x_low, v_low]).reshape(2, -1)
    )
    expected = (da_t * x1 + ds_t * x0 / 2).reshape(x_low.shape)
    np.testing.assert_allclose(
      _pool(guided[i : i + 1]),
      expected,
      rtol=1e-4,
      atol=1e-4,
      err_msg=f'{path} t={t[i]} seed {seed}',
    )
    detail = lambda a: a - np.repeat(np.repeat(_pool(a), 2, 1), 2, 2)
    np.testing.assert_allclose(
      detail(guided[i : i + 1]), detail(v[i : i + 1]), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize('path', ['GVP', 'Linear'])
def test_velocity_guidance_vanishes_where_the_schedule_says(path):
  """w = theta [t <= 1 - (1 - eta) T]: nothing is added after the first eta of the way."""
  from dimsum_jax import upsample_guidance  # pylint: disable=g-import-not-at-top

  x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  model_fn = lambda x, t, y: x * t[:, None, None, None]
  low_fn = lambda x, t, y: 1 - x
  fn = upsample_guidance.make_upsample_guided_velocity_fn(
    model_fn, low_fn, 2, path_type=path, theta=0.7, eta=0.3
  )
  for t, active in ((0.31, False), (0.9, False), (0.29, True), (0.0, True)):
    out = np.asarray(fn(x, np.full(4, t, np.float32), None))
    plain = np.asarray(model_fn(x, np.full(4, t, np.float32), None))
    assert np.array_equal(out, plain) != active, (path, t)


@pytest.mark.parametrize(
  'config,size',
  [(_config('DiMSUM-L/2'), None), (_config('DiT-S/2', hidden_size=48, depth=1), 12)],
  ids=['trained-size', 'not-a-multiple'],
)
def test_upsample_guidance_flag_is_refused_where_it_cannot_apply(tmp_path, config, size):
  path, _, _ = _write(tmp_path, config, 0)
  with pytest.raises(sample.SampleError) as e:
    sample.run(checkpoint=path, out=str(tmp_path / 'out'), image_size=size, upsample_guidance=1.0)
  assert str(e.value) == (
    '--upsample_guidance needs --image_size at a whole multiple (2 or more) of the trained '
    f'size; the model takes 8x8 inputs and is sampled at {size or 8}.'
  )
  assert not os.path.exists(tmp_path / 'out')


@pytest.mark.slow
def test_guided_samples_match_a_direct_loop(tmp_path):
  """Two Euler steps at 16 px, both guided (eta 1), against the loop written from the
  derivation with the 16 px and the 8 px networks applied directly."""
  config = _config('DiMSUM-L/2')
  path, model, params = _write(tmp_path, config, 3)
  loaded = sample.load_model(checkpoint_dir=path, image_size=16)
  opts = sample.sampling_options(
    seed=3, solver='euler', num_steps=2, upsample_guidance=1.0, ug_eta=1.0
  )
  images, labels, _ = sample.generate(loaded, 2, batch_size=2, opts=opts, output='latents')
  big, big_params, big_config = _reference('DiMSUM', config, model, params)
  apply_big = jax.jit(lambda x, t, y: big.apply({'params': big_params}, x, t, y))
  apply_small = jax.jit(lambda x, t, y: model.apply({'params': params}, x, t, y))
  noise_key = jax.random.split(jax.random.PRNGKey(3))[0]
  x = np.stack(
    [np.asarray(jax.random.normal(jax.random.fold_in(noise_key, i), (16, 16, 1))) for i in range(2)]
  ).astype(np.float64)
  y = np.asarray(labels, np.int32)
  for k in range(2):
    t = k / 2
    v = np.asarray(apply_big(np.float32(x), np.full(2, t, np.float32), y), np.float64)
    tau = _matching_time('GVP', t, 2)
    a_t, s_t, da_t, ds_t = _coefficients('GVP', t)
    a_tau, s_tau, da_tau, ds_tau = _coefficients('GVP', tau)
    x_low = _pool(x) / np.sqrt(a_t**2 + s_t**2 / 4)
    v_low = np.asarray(apply_small(np.float32(x_low), np.full(2, tau, np.float32), y), np.float64)
    x1 = (ds_tau * x_low - s_tau * v_low) / (a_tau * ds_tau - s_tau * da_tau)
    x0 = (a_tau * v_low - da_tau * x_low) / (a_tau * ds_tau - s_tau * da_tau)
    v = v + np.repeat(np.repeat(da_t * x1 + ds_t * x0 / 2 - _pool(v), 2, 1), 2, 2)
    x = x + v / 2
  np.testing.assert_allclose(images, x, rtol=2e-4, atol=2e-4)
