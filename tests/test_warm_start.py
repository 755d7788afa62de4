"""Warm start and resolution change (dimsum_jax.warm_start), against independent references.

The interpolation is compared with torch's F.interpolate (upstream's own call), a float64 loop
over Keys' cubic kernel written from its definition, jax.image.resize and scipy.ndimage.zoom;
DiM's table with upstream's own transfer (golden pos_interp.npz); the patch crop with values
derived by hand. A run fine-tuned at 16 px from an 8 px run starts far below a fresh model's
loss, trains, and a rerun resumes it. Random inputs come from stated seeds (tests/seeds.py).
"""

import functools
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dimsum_jax import convert
from dimsum_jax import models
from dimsum_jax import train
from dimsum_jax import warm_start
from tests import seeds
from tests import train_util
from tests.golden import golden_file


def _config(name='DiMSUM-L/2', **overrides):
  c = models.default_model_config()
  c.update(
    name=name, depth=4, hidden_size=64, input_size=8, in_channels=1, num_classes=10, remat='none'
  )
  c.update(overrides)
  return c


def _shapes(config):
  return _traced_shapes(json.dumps(config.to_dict(), sort_keys=True))


@functools.lru_cache(None)
def _traced_shapes(config_json):
  """The parameter shapes of a model config (each traced once per session)."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  return models.abstract_params(models.create_model(config), config)


def _params(config, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), _shapes(config))


def _leaves(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


# ------------------------------------------------------------------------------- interpolation

SIZES = [
  ((4, 4), (8, 8)),
  ((8, 8), (4, 4)),
  ((5, 7), (9, 3)),
  ((16, 16), (32, 32)),
  ((2, 2), (7, 7)),
]


@seeds.each(0)
@pytest.mark.parametrize('method', ['bicubic', 'bilinear'])
@pytest.mark.parametrize('src,dst', SIZES, ids=lambda s: 'x'.join(map(str, s)))
def test_resize_matches_torch_interpolate(src, dst, method, seed):
  """torch.nn.functional.interpolate(align_corners=False), float64: what upstream DiMSUM
  (bicubic) and DiM (bilinear) call."""
  torch = pytest.importorskip('torch')
  grid = np.random.default_rng(seed).normal(size=(*src, 6))
  ours = warm_start.resize_table(grid.reshape(-1, 6), src, dst, method).reshape(*dst, 6)
  theirs = (
    torch.nn.functional.interpolate(
      torch.from_numpy(grid).permute(2, 0, 1)[None], size=dst, mode=method, align_corners=False
    )[0]
    .permute(1, 2, 0)
    .numpy()
  )
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-13, err_msg=f'seed {seed}')


def _keys(x, a=-0.75):
  """Keys' cubic convolution kernel W(x) (torch: a = -0.75)."""
  x = abs(x)
  if x <= 1:
    return (a + 2) * x**3 - (a + 3) * x**2 + 1
  return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0


def _bicubic_loop(grid, size):
  """Pixel by pixel: output (i, j) reads the point y = (i + 1/2) h / H - 1/2 (x likewise) and
  sums W(y - r) W(x - c) grid[r, c] over the 4 x 4 pixels around it, indices clamped."""
  h, w, d = grid.shape
  out = np.zeros((*size, d))
  for i in range(size[0]):
    y = (i + 0.5) * h / size[0] - 0.5
    for j in range(size[1]):
      x = (j + 0.5) * w / size[1] - 0.5
      for r in range(math.floor(y) - 1, math.floor(y) + 3):
        for c in range(math.floor(x) - 1, math.floor(x) + 3):
          out[i, j] += (
            _keys(y - r) * _keys(x - c) * grid[min(max(r, 0), h - 1), min(max(c, 0), w - 1)]
          )
  return out


@seeds.each(1)
@pytest.mark.parametrize('src,dst', SIZES, ids=lambda s: 'x'.join(map(str, s)))
def test_bicubic_matches_a_float64_loop(src, dst, seed):
  grid = np.random.default_rng(seed).normal(size=(*src, 3))
  ours = warm_start.resize_table(grid.reshape(-1, 3), src, dst, 'bicubic').reshape(*dst, 3)
  np.testing.assert_allclose(
    ours, _bicubic_loop(grid, dst), rtol=0, atol=1e-13, err_msg=f'seed {seed}'
  )


@seeds.each(2)
@pytest.mark.parametrize('dst', [(8, 12), (12, 18), (5, 9)])
def test_bilinear_upsampling_matches_jax_image_and_scipy(dst, seed):
  """Upsampling: jax.image.resize('linear') and scipy's zoom(order=1, grid_mode=True,
  mode='nearest') use the same half-pixel centres and edge clamping."""
  import scipy.ndimage  # pylint: disable=g-import-not-at-top

  grid = np.random.default_rng(seed).normal(size=(4, 6))
  ours = warm_start.resize_table(grid.reshape(-1, 1), (4, 6), dst, 'bilinear').reshape(dst)
  jax_out = np.asarray(
    jax.image.resize(jnp.asarray(grid, jnp.float32), dst, 'linear', antialias=False)
  )  # float32
  scipy_out = scipy.ndimage.zoom(
    grid, (dst[0] / 4, dst[1] / 6), order=1, grid_mode=True, mode='nearest'
  )
  np.testing.assert_allclose(ours, jax_out, rtol=0, atol=1e-5, err_msg=f'seed {seed}')
  np.testing.assert_allclose(ours, scipy_out, rtol=0, atol=1e-13, err_msg=f'seed {seed}')


@pytest.mark.parametrize('method', ['bicubic', 'bilinear'])
def test_same_size_is_the_identity(method):
  for n in (1, 2, 5, 16):
    assert np.array_equal(warm_start.resize_matrix(n, n, method), np.eye(n))


@seeds.each(3)
def test_same_model_round_trips_bit_for_bit(seed):
  config = _config()
  params = _params(config, seed)
  out, notes = warm_start.adapt(params, config, config, _shapes(config))
  assert notes == []
  a, b = _leaves(out), _leaves(params)
  assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


# ------------------------------------------------------------------------------- adaptation


@seeds.each(4)
@pytest.mark.parametrize('interpolation,method', [('auto', 'bicubic'), ('bilinear', 'bilinear')])
def test_dimsum_position_table_resized_and_the_rest_copied(interpolation, method, seed):
  """8 px -> 16 px (4x4 -> 8x8 tokens): pos_embed as torch resizes it (bicubic by default,
  upstream's interpolate_pos_embed), every other parameter unchanged."""
  torch = pytest.importorskip('torch')
  source, target = _config(), _config(input_size=16)
  params = _params(source, seed)
  out, notes = warm_start.adapt(params, source, target, _shapes(target), interpolation)
  table = torch.from_numpy(params['pos_embed'].astype(np.float64).reshape(1, 4, 4, 64))
  expected = torch.nn.functional.interpolate(
    table.permute(0, 3, 1, 2), size=(8, 8), mode=method, align_corners=False
  ).permute(0, 2, 3, 1)
  np.testing.assert_allclose(
    out['pos_embed'], expected.reshape(64, 64).numpy(), rtol=1e-6, atol=1e-6, err_msg=f'seed {seed}'
  )
  assert notes == [f'pos_embed 4x4 -> 8x8 ({method})']
  a, b = _leaves(out), _leaves(params)
  assert all(np.array_equal(a[k], b[k]) for k in a if k != "['pos_embed']")


def test_dim_table_is_resized_as_upstream_transfers_it():
  """DiM's `load_pretrained_model` on a 4x4-token table (D = 32; the 2 time/class rows kept),
  upstream's own output in golden pos_interp.npz; bilinear is DiM's default."""
  data = dict(np.load(golden_file('dim/pos_interp.npz')))
  source = _config('DiM-L/2', hidden_size=32, depth=3, input_size=8, scan_impl='reference')
  target = _config('DiM-L/2', hidden_size=32, depth=3, input_size=16, scan_impl='reference')
  params = _params(source, 5)
  params['additional_embed'] = data['transfer_additional_embed_src'][0]
  out, notes = warm_start.adapt(params, source, target, _shapes(target))
  assert notes == ['additional_embed 4x4 -> 8x8 (bilinear)']
  np.testing.assert_allclose(
    out['additional_embed'], data['transfer_additional_embed_dst'][0], rtol=1e-6, atol=1e-7
  )


def test_patch_4_to_2_is_cropped_as_upstream():
  """Upstream's --model-ckpt keeps x_embedder.proj.weight[:, :, :2, :2] and the first p p C = 4
  rows of final_layer.linear (here kernels [kh, kw, C, D] and [D, p p C]). With kernel values
  100 i + 10 j + d / 100 and outputs numbered k + 1000 d by hand, the 2x2 kernel holds
  100 i + 10 j + d / 100 for i, j < 2, and the final projection outputs 0..3: the top row of
  the 4x4 patch ((p_row, p_col, C) order, C = 1)."""
  source = _config('DiMSUM-L/4', input_size=16)
  target = _config('DiMSUM-L/2', input_size=16)
  params = _params(source, 6)
  i, j, d = np.meshgrid(np.arange(4), np.arange(4), np.arange(64), indexing='ij')
  params['x_embedder']['proj']['kernel'] = (100 * i + 10 * j + d / 100)[:, :, None].astype(
    np.float32
  )
  params['final_layer']['linear']['kernel'] = (
    np.arange(16)[None] + 1000 * np.arange(64)[:, None]
  ).astype(np.float32)
  params['final_layer']['linear']['bias'] = np.arange(16, dtype=np.float32)
  out, notes = warm_start.adapt(params, source, target, _shapes(target))
  kernel = out['x_embedder']['proj']['kernel']
  assert kernel.shape == (2, 2, 1, 64)
  assert kernel[0, 0, 0, 0] == 0 and kernel[1, 0, 0, 0] == 100 and kernel[0, 1, 0, 0] == 10
  assert kernel[1, 1, 0, 63] == np.float32(110.63)
  final = out['final_layer']['linear']
  assert final['kernel'].shape == (64, 4) and final['kernel'][5, 3] == 5003
  assert final['bias'].tolist() == [0, 1, 2, 3]
  assert notes[0] == 'final_layer/linear/bias [16] -> [4] (patch 4 -> 2)'
  assert 'pos_embed 4x4 -> 8x8 (bicubic)' in notes
  # The other way (2 -> 4) pads with zeros.
  back, _ = warm_start.adapt(out, target, source, _shapes(source))
  grown = back['x_embedder']['proj']['kernel']
  assert np.array_equal(grown[:2, :2], kernel) and not grown[2:].any() and not grown[:, 2:].any()
  assert back['final_layer']['linear']['bias'].tolist() == [0, 1, 2, 3] + [0] * 12


def test_label_table_gains_a_zero_null_row():
  """A table of n rows without the null row (an upstream model trained without label dropout)
  into a model of n classes: the n rows copied, the null row (index n) zero."""
  source, target = _config(num_classes=9), _config(num_classes=10)
  params = _params(source, 8)
  out, notes = warm_start.adapt(params, source, target, _shapes(target))
  table = out['y_embedder']['embedding_table']['embedding']
  assert table.shape == (11, 64) and not table[10].any()
  assert np.array_equal(table[:10], params['y_embedder']['embedding_table']['embedding'])
  assert notes == ['y_embedder/embedding_table/embedding null row added']


@pytest.mark.parametrize(
  'source,target,message',
  [
    (
      dict(hidden_size=128),
      {},
      'init_from does not fit this DiMSUM-L/2: attn_block/adaLN_modulation/linear/bias is [768] '
      'there and [384] here (check model.name, depth, hidden_size, in_channels and '
      'num_classes).',
    ),
    (
      dict(depth=8),
      {},
      'init_from does not fit this DiMSUM-L/2: groups/block_0/adaLN_modulation/linear/bias is '
      '[2, 192] there and [1, 192] here (check model.name, depth, hidden_size, in_channels and '
      'num_classes).',
    ),
    (
      dict(in_channels=3),
      {},
      'init_from does not fit this DiMSUM-L/2: final_layer/linear/bias is [12] there and [4] '
      'here (check model.name, depth, hidden_size, in_channels and num_classes).',
    ),
    (
      dict(num_classes=12),
      {},
      'init_from does not fit this DiMSUM-L/2: y_embedder/embedding_table/embedding is [13, 64] '
      'there and [11, 64] here (check model.name, depth, hidden_size, in_channels and '
      'num_classes).',
    ),
    (
      dict(num_classes=10),
      dict(num_classes=9),
      'init_from does not fit this DiMSUM-L/2: y_embedder/embedding_table/embedding is [11, 64] '
      'there and [10, 64] here (check model.name, depth, hidden_size, in_channels and '
      'num_classes).',
    ),
    (
      dict(attn_every=0),
      {},
      'init_from has no parameter attn_block/adaLN_modulation/linear/bias (this DiMSUM-L/2 needs '
      '[384]): the checkpoint is of another architecture.',
    ),
    (
      {},
      dict(attn_every=0),
      'init_from has a parameter attn_block/adaLN_modulation/linear/bias that this DiMSUM-L/2 '
      'lacks: the checkpoint is of another architecture.',
    ),
    (
      dict(name='DiT-S/2', hidden_size=48, depth=1),
      {},
      'init_from holds a DiT-S/2, which cannot start a DiMSUM-L/2: use weights of the same model '
      'family.',
    ),
  ],
  ids=['width', 'depth', 'channels', 'classes', 'fewer-classes', 'missing', 'extra', 'family'],
)
def test_mismatch_is_one_sentence_naming_the_first_parameter(source, target, message):
  source, target = _config(**source), _config(**target)
  with pytest.raises(warm_start.WarmStartError) as e:
    warm_start.adapt(_params(source, 9), source, target, _shapes(target))
  assert str(e.value) == message


@pytest.mark.parametrize(
  'config,size,factor,message',
  [
    (
      _config(),
      12,
      1,
      '12 px gives DiMSUM-L/2 a 6x6 token grid, which its 2-level wavelet '
      'window layout cannot take (the side must be a multiple of 4 tokens): use a multiple of 8 '
      'px, e.g. 8 or 16.',
    ),
    (
      _config('DiMSUM-L/4', input_size=16),
      40,
      1,
      '40 px gives DiMSUM-L/4 a 10x10 token grid, '
      'which its 2-level wavelet window layout cannot take (the side must be a multiple of 4 '
      'tokens): use a multiple of 16 px, e.g. 32 or 48.',
    ),
    (
      _config('DiT-S/2', hidden_size=48),
      9,
      1,
      '9 px gives a 9x9 input that the patch 2 of DiT-S/2 does not divide: use a multiple of 2 px.',
    ),
    (
      _config(in_channels=4),
      100,
      8,
      "100 px is not a positive multiple of the VAE's 8x downsampling: use a multiple of 8.",
    ),
  ],
  ids=['wavelet', 'wavelet-L4', 'patch', 'vae'],
)
def test_sizes_the_model_cannot_take_are_refused_by_name(config, size, factor, message):
  with pytest.raises(warm_start.WarmStartError) as e:
    warm_start.check_image_size(config, size, factor)
  assert str(e.value) == message


def test_sizes_the_model_takes():
  assert warm_start.check_image_size(_config(), 24 + 8, 1) == 32
  assert warm_start.check_image_size(_config('DiT-S/2', hidden_size=48), 10, 1) == 10
  assert warm_start.check_image_size(_config('DiM-L/2', hidden_size=32, depth=3), 12, 1) == 12
  assert warm_start.check_image_size(_config(in_channels=4), 512, 8) == 64


def test_a_path_with_nothing_to_start_from_is_refused(tmp_path):
  for path in (tmp_path / 'nowhere', tmp_path):
    with pytest.raises(
      warm_start.WarmStartError,
      match='holds nothing to start from: pass an '
      r'export \(config.json \+ ema_params/\), a training workdir',
    ):
      warm_start.read_source(str(path), train_util.one_device_mesh())


# ------------------------------------------------------------------------------- training


@pytest.fixture(scope='module')
def source_run(tmp_path_factory):
  """The smoke DiMSUM (depth 4, hidden 64, 4x4 tokens) trained 100 steps on 8x8 digits."""
  workdir = tmp_path_factory.mktemp('warm') / 'source'
  config = train_util.digits_config(
    'smoke',
    num_train_steps=100,
    checkpoint_every_steps=100,
    log_every_steps=50,
    optim__learning_rate=3e-3,
    sample__every_steps=-1,
  )
  train.train_and_evaluate(config, str(workdir))
  return workdir


def _at_16px(**overrides):
  """The same model on 16x16 digits (8x8 tokens); one config but for init_from and the steps, so
  that the fresh and the fine-tuned run compile the same step (XLA's cache)."""
  return train_util.digits_config(
    'smoke',
    data__image_size=16,
    model__input_size=16,
    data__global_batch_size=32,
    optim__learning_rate=3e-4,
    log_every_steps=1,
    sample__every_steps=-1,
    **overrides,
  )


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  return [r['loss'] for r in rows if 'loss' in r]


@pytest.mark.slow  # 31 s on 2 cores; configs/digits.py:finetune32 is loaded by test_configs
def test_finetune_starts_from_the_low_resolution_weights_and_trains(source_run, tmp_path, caplog):
  """The step-0 loss (the same batch, noise and times in both runs) of the 8 px weights at
  16 px is about half a fresh model's (1.03 against 1.93; the source's own loss at 8 px after its
  100 steps is about 1.1), and stays there while it trains; a rerun resumes."""
  fresh = _at_16px(num_train_steps=1, checkpoint_every_steps=1)
  train.train_and_evaluate(fresh, str(tmp_path / 'fresh'))
  steps = 6
  tuned = _at_16px(
    num_train_steps=steps, checkpoint_every_steps=steps, init_from__path=str(source_run)
  )
  with caplog.at_level(logging.INFO, logger='absl'):  # whatever verbosity earlier tests left
    state = train.train_and_evaluate(tuned, str(tmp_path / 'tuned'))
  fresh_loss, tuned_losses = _losses(tmp_path / 'fresh')[0], _losses(tmp_path / 'tuned')
  assert int(state.step) == steps and len(tuned_losses) == steps
  assert tuned_losses[0] < 0.6 * fresh_loss, (tuned_losses, fresh_loss)
  assert np.mean(tuned_losses) < 0.6 * fresh_loss and np.all(np.isfinite(tuned_losses))
  assert 'pos_embed 4x4 -> 8x8 (bicubic); fresh optimiser at step 0' in caplog.text

  # A rerun in that workdir resumes its checkpoint (tests/test_checkpoint.py) and ignores
  # init_from, which now names nothing usable.
  caplog.clear()
  tuned.init_from.path = str(tmp_path / 'nowhere')
  with caplog.at_level(logging.INFO, logger='absl'):  # whatever verbosity earlier tests left
    assert warm_start.prepare(tuned, str(tmp_path / 'tuned'), None, None) is None
  assert 'holds checkpoints: resuming them; config.init_from.path=' in caplog.text


def test_each_kind_of_source_is_read(source_run, tmp_path):
  """A workdir gives its newest checkpoint's params and EMA; its export and a conversion of
  that EMA give the EMA as both."""
  from dimsum_jax import export  # pylint: disable=g-import-not-at-top

  mesh = train_util.one_device_mesh()
  run = warm_start.read_source(str(source_run), mesh)
  state, _ = train_util.restore(
    str(source_run), train_util.digits_config('smoke', num_train_steps=100)
  )
  assert (run.kind, run.step, run.model.input_size) == ('workdir', 100, 8)
  for got, want in ((run.params, state.params), (run.ema_params, state.ema_params)):
    a, b = _leaves(got), _leaves(want)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(run.params['pos_embed'], run.ema_params['pos_embed'])
  export.export(str(source_run), str(tmp_path / 'export'))
  convert.save_params(str(tmp_path / 'conversion'), run.ema_params, run.model)
  for kind in ('export', 'conversion'):
    source = warm_start.read_source(str(tmp_path / kind), mesh)
    assert source.kind == kind and source.model.to_dict() == run.model.to_dict()
    a, b, c = _leaves(source.params), _leaves(source.ema_params), _leaves(run.ema_params)
    assert all(np.array_equal(a[k], c[k]) and np.array_equal(b[k], c[k]) for k in c)


@pytest.mark.parametrize('what', ['nothing', 'other model'])
def test_bad_init_from_stops_in_one_sentence_and_writes_nothing(source_run, tmp_path, what):
  path = str(tmp_path / 'empty') if what == 'nothing' else str(source_run)
  os.makedirs(tmp_path / 'empty')
  config = _at_16px(init_from__path=path)
  if what == 'other model':
    config.model.hidden_size = 128
  with pytest.raises(SystemExit) as e:
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  expected = (
    'holds nothing to start from'
    if what == 'nothing'
    else 'does not fit this DiMSUM-L/2: attn_block/adaLN_modulation/linear/bias is [384] '
    'there and [768] here'
  )
  assert expected in str(e.value) and '\n' not in str(e.value)
  assert not (tmp_path / 'workdir').exists()
