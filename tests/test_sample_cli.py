"""The sampling command (dimsum_jax.sample) on a small digits checkpoint trained here.

The checkpoint: configs/digits.py:smoke_dit (a DiT on 8x8 digits, 10 classes, label dropout 0.1)
with depth 1, trained for 2 steps and exported; built once per session (`digits_run`) and shared
with tests/test_notebook.py. The samples are checked against a direct Euler loop over the model
(`reference_samples`), written here from the documented conventions.
"""

import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dimsum_jax import models
from dimsum_jax import sample
from dimsum_jax import sampler
from dimsum_jax import sampling
from dimsum_jax import weights
from tests import seeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 7  # of the samples' noise (and of the random weights below); -m slow tries 50 more
# Two global batches of 8 for 10 samples (the second padded), CFG on, a cheap fixed-step solver.
SETTINGS = dict(num_samples=10, batch_size=8, solver='euler', num_steps=4, cfg_scale=2.0, seed=SEED)


def _digits_config():
  path = os.path.join(ROOT, 'configs', 'digits.py')
  spec = importlib.util.spec_from_file_location('digits_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('smoke_dit')
  config.model.depth = 1
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  return config


def digits_run(tmp_path_factory):
  """(workdir, export dir) of the small digits run, trained and exported once per session."""
  base = tmp_path_factory.getbasetemp() / 'digits_run'
  workdir, export_dir = base / 'workdir', base / 'export'
  if not (export_dir / 'step.txt').exists():
    from dimsum_jax import export  # pylint: disable=g-import-not-at-top
    from dimsum_jax import train  # pylint: disable=g-import-not-at-top

    shutil.rmtree(base, ignore_errors=True)
    train.train_and_evaluate(_digits_config(), str(workdir))
    export.export(str(workdir), str(export_dir))
  return workdir, export_dir


def reference_run(tmp_path_factory):
  """The CLI's output directory for SETTINGS on the digits export (made once per session)."""
  _, export_dir = digits_run(tmp_path_factory)
  out = tmp_path_factory.getbasetemp() / 'digits_samples'
  if not (out / 'samples.npz').exists():
    sample.run(checkpoint=str(export_dir), out=str(out), **SETTINGS)
  return out


@pytest.fixture(scope='module')
def run_dirs(tmp_path_factory):
  workdir, export_dir = digits_run(tmp_path_factory)
  return workdir, export_dir, reference_run(tmp_path_factory)


def load_npz(path):
  with np.load(path) as z:
    return z['arr_0'], z['labels']


def reference_samples(export_dir, indices, labels, *, seed, num_steps, cfg_scale, latents=False):
  """`euler_samples` of the model and EMA weights of an export."""
  config, params = weights.load_exported(str(export_dir))
  return euler_samples(
    models.create_model(config.model),
    params,
    config.model,
    indices,
    labels,
    seed=seed,
    num_steps=num_steps,
    cfg_scale=cfg_scale,
    latents=latents,
  )


def euler_samples(
  model, params, model_config, indices, labels, *, seed, num_steps, cfg_scale, latents=False
):
  """Sample i from the documented noise (fold_in(split(PRNGKey(seed))[0], i)), then Euler steps
  of v = v_null + s (v_label - v_null) over [0, 1] with the conditional and null passes run
  separately; uint8 by upstream's 127.5 x + 128 (or the float latents). Takes the module and
  parameters directly, so it shares no loading code with the command it checks."""
  shape = (model_config.input_size, model_config.input_size, model_config.in_channels)
  noise_key = jax.random.split(jax.random.PRNGKey(seed))[0]
  x = np.stack(
    [np.asarray(jax.random.normal(jax.random.fold_in(noise_key, int(i)), shape)) for i in indices]
  ).astype(np.float64)
  apply = jax.jit(lambda x, t, y: model.apply({'params': params}, x, t, y))
  n = model_config.num_classes
  y = jnp.asarray(labels, jnp.int32) if n else None
  for k in range(num_steps):
    t = jnp.full((len(indices),), k / num_steps, jnp.float32)
    v = np.asarray(apply(jnp.asarray(x, jnp.float32), t, y), np.float64)
    if cfg_scale != 1:
      null = np.asarray(apply(jnp.asarray(x, jnp.float32), t, jnp.full_like(y, n)), np.float64)
      v = null + cfg_scale * (v - null)
    x = x + v / num_steps
  if latents:
    return x
  return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)


def assert_close_uint8(actual, expected, max_mismatch=0.02, what=f'seed {SEED}'):
  """Equal up to float rounding: |diff| <= 1 everywhere and only a few pixels off."""
  assert actual.shape == expected.shape and actual.dtype == np.uint8, what
  diff = np.abs(actual.astype(int) - expected.astype(int))
  assert diff.max() <= 1, (diff.max(), what)
  assert (diff > 0).mean() <= max_mismatch, ((diff > 0).mean(), what)


# ------------------------------------------------------------------------------------------------


def test_samples_match_a_direct_euler_loop(run_dirs):
  _, export_dir, out = run_dirs
  images, labels = load_npz(out / 'samples.npz')
  assert images.dtype == np.uint8 and images.shape == (10, 8, 8, 1)
  np.testing.assert_array_equal(labels, np.arange(10) % 10)  # every class, in order
  expected = reference_samples(export_dir, range(10), labels, seed=SEED, num_steps=4, cfg_scale=2.0)
  assert_close_uint8(images, expected)
  # One PNG per sample, the same pixels.
  pngs = sorted(os.listdir(out / 'images'))
  assert pngs == [f'{i:06d}.png' for i in range(10)]
  for i in (0, 9):
    png = np.asarray(Image.open(out / 'images' / pngs[i]))
    np.testing.assert_array_equal(png, images[i, ..., 0])
  # The grid: one column per class, 2 px white gaps; tile (0, c) is sample c.
  grid = np.asarray(Image.open(out / 'grid.png'))
  assert grid.shape == (2 + 10, 2 + 10 * 10, 3)
  for c in (0, 7):
    np.testing.assert_array_equal(grid[2:10, 2 + 10 * c : 10 + 10 * c, 0], images[c, ..., 0])
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['nfe_per_batch'] == [4, 4] and summary['step'] == 2
  assert summary['batch_size'] == 8 and summary['num_batches'] == 2


@pytest.mark.slow
def test_samples_match_a_direct_euler_loop_for_many_seeds(run_dirs, tmp_path):
  """The check above for 50 more noise seeds (a sampler compiled for each)."""
  _, export_dir, _ = run_dirs
  for seed in seeds.seed_list(SEED)[1:]:
    out = tmp_path / f'seed{seed}'
    sample.run(checkpoint=str(export_dir), out=str(out), pngs=False, **dict(SETTINGS, seed=seed))
    images, labels = load_npz(out / 'samples.npz')
    expected = reference_samples(
      export_dir, range(10), labels, seed=seed, num_steps=4, cfg_scale=2.0
    )
    assert_close_uint8(images, expected, what=f'seed {seed}')
    shutil.rmtree(out)


def test_interrupted_run_resumes_without_redoing_or_skipping(
  run_dirs, tmp_path, monkeypatch, caplog
):
  _, export_dir, ref_out = run_dirs
  reference, _ = load_npz(ref_out / 'samples.npz')
  out = tmp_path / 'out'
  real_check = sampler.check_batch_result
  calls = []

  def interrupt_second_batch(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real_check(*args, **kwargs)

  monkeypatch.setattr(sampler, 'check_batch_result', interrupt_second_batch)
  with pytest.raises(KeyboardInterrupt):
    sample.run(checkpoint=str(export_dir), out=str(out), **SETTINGS)
  # Nothing looks complete: batch 0 is saved, batch 1 and the final files are not.
  assert sorted(os.listdir(out / 'chunks')) == ['000000000-000000008.npz']
  assert not (out / 'samples.npz').exists() and not (out / 'grid.png').exists()
  assert len(os.listdir(out / 'images')) == 8
  (out / 'chunks' / '.000000008-000000016.npz.tmp-0-1').write_bytes(b'torn write')
  monkeypatch.setattr(sampler, 'check_batch_result', real_check)

  sampled = []
  real_call = sampler.BatchSampler.__call__

  def counting(self, indices, labels):
    sampled.append(int(indices[0]))
    return real_call(self, indices, labels)

  monkeypatch.setattr(sampler.BatchSampler, '__call__', counting)
  caplog.set_level(logging.INFO, logger='absl')  # whatever verbosity earlier tests left
  summary = sample.run(checkpoint=str(export_dir), out=str(out), **SETTINGS)
  assert sampled == [8]  # only the missing batch
  assert '2 global batches of 8, 1 already done' in caplog.text
  assert re.search(
    r'Batch 2/2 \(samples 8-9\): NFE 4, [0-9.e+]+ samples/s, ETA 0h00m00s\.', caplog.text
  ), caplog.text
  images, _ = load_npz(out / 'samples.npz')
  np.testing.assert_array_equal(images, reference)
  assert summary['batches_sampled_now'] == 1 and summary['nfe_per_batch'] == [4, 4]
  assert not any(name.startswith('.') for name in os.listdir(out / 'chunks'))
  assert len(os.listdir(out / 'images')) == 10

  # More samples later: rows 10-15 were computed with batch 1 already, so nothing is sampled.
  sampled.clear()
  sample.run(checkpoint=str(export_dir), out=str(out), **dict(SETTINGS, num_samples=12))
  images, labels = load_npz(out / 'samples.npz')
  assert sampled == [] and images.shape[0] == 12 and list(labels[10:]) == [0, 1]
  np.testing.assert_array_equal(images[:10], reference)

  # Other settings into the same directory: refused, and the finished samples stay.
  with pytest.raises(sample.SampleError, match=r'other settings \(cfg_scale was 2.0, now 3.0\)'):
    sample.run(checkpoint=str(export_dir), out=str(out), **dict(SETTINGS, cfg_scale=3.0))
  assert (out / 'samples.npz').exists()


def test_workdir_gives_the_exported_weights(run_dirs, tmp_path):
  workdir, _, ref_out = run_dirs
  summary = sample.run(workdir=str(workdir), out=str(tmp_path / 'out'), pngs=False, **SETTINGS)
  images, _ = load_npz(tmp_path / 'out' / 'samples.npz')
  np.testing.assert_array_equal(images, load_npz(ref_out / 'samples.npz')[0])
  assert summary['step'] == 2 and summary['source'] == str(workdir)
  assert not os.listdir(tmp_path / 'out' / 'images')
  with pytest.raises(sample.SampleError, match='has no checkpoint of step 7'):
    sample.run(workdir=str(workdir), step=7, out=str(tmp_path / 'other'), **SETTINGS)
  assert not (tmp_path / 'other').exists()


def test_bad_input_is_one_clear_sentence_and_writes_nothing(run_dirs, tmp_path):
  workdir, export_dir, _ = run_dirs
  out = tmp_path / 'out'
  misfit = tmp_path / 'misfit'
  shutil.copytree(export_dir, misfit)
  misfit_workdir = tmp_path / 'misfit_workdir'
  shutil.copytree(workdir, misfit_workdir)
  for d in (misfit, misfit_workdir):
    config = json.loads((d / 'config.json').read_text())
    config['model']['hidden_size'] = 96
    (d / 'config.json').write_text(json.dumps(config))
  cases = [
    (dict(checkpoint=str(tmp_path / 'nope')), r'--checkpoint=.*nope: no such directory\.$'),
    (dict(checkpoint=str(workdir)), r'has config.json but no ema_params/'),
    (
      dict(checkpoint=str(misfit)),
      r'do not fit its config \(.* has shape \(.*\) there, the config needs \(.*\)\)',
    ),
    (
      dict(workdir=str(misfit_workdir)),
      r'checkpoint of step 2 in .* does not fit config.json \(.* has shape \(.*\) there',
    ),
    (
      dict(checkpoint=str(export_dir), classes=[3, 10]),
      r'^Class 10 is out of range: this model has 10 classes \(0 to 9\)\.$',
    ),
    (
      dict(checkpoint=str(export_dir), solver='rk4'),
      r'^Unknown --solver=rk4: choose one of dopri5, euler, heun\.$',
    ),
    (
      dict(checkpoint=str(export_dir), mode='ddim'),
      r'^Unknown --mode=ddim: use ode, sde or dpm\.$',
    ),
    (dict(checkpoint=str(export_dir), workdir=str(workdir)), r'exactly one of --checkpoint'),
    (dict(), r'exactly one of --checkpoint'),
  ]
  for overrides, message in cases:
    with pytest.raises(sample.SampleError, match=message):
      sample.run(out=str(out), **dict(SETTINGS, **overrides))
    assert not out.exists(), overrides


def test_inference_options_come_from_the_command_not_the_checkpoint(run_dirs, tmp_path):
  """model.inference_* (models.INFERENCE_FIELDS) stored in a checkpoint's config give way to
  today's defaults and to the command's flags; they change how the model runs, not the samples."""
  _, export_dir, ref_out = run_dirs
  stored = tmp_path / 'stored'
  shutil.copytree(export_dir, stored)
  config = json.loads((stored / 'config.json').read_text())
  config['model']['inference_scan_unroll'] = 5  # what an older run might have stored
  (stored / 'config.json').write_text(json.dumps(config))
  defaults = models.default_model_config()
  for field in models.INFERENCE_FIELDS:  # each a flag of the command, defaulting to None
    assert field in defaults and sample.FLAGS[field].default is None, field
  loaded = sample.load_model(checkpoint_dir=str(stored))
  assert loaded.config.model.inference_scan_unroll == defaults.inference_scan_unroll
  assert loaded.model.inference_scan_unroll == defaults.inference_scan_unroll
  options = {'inference_scan_unroll': 0, 'inference_hoist_adaln': None}
  loaded = sample.load_model(checkpoint_dir=str(stored), inference_options=options)
  assert loaded.model.inference_scan_unroll == 0
  sample.run(
    checkpoint=str(stored),
    out=str(tmp_path / 'out'),
    pngs=False,
    inference_options=options,
    **SETTINGS,
  )
  images, _ = load_npz(tmp_path / 'out' / 'samples.npz')
  np.testing.assert_array_equal(images, load_npz(ref_out / 'samples.npz')[0])
  cases = [
    (
      {'inference_hoist_adaln': True},
      r'^--inference_hoist_adaln does not apply to DiT-S/2 \(DiT models do not read it\): '
      r'leave it out\.$',
    ),
    ({'inference_scan_unroll': -1}, r'^--inference_scan_unroll=-1 must be 0 .*\.$'),
    ({'scan_unroll': 0}, r'^scan_unroll is not an inference option of the model: use one of '),
  ]
  for options, message in cases:
    with pytest.raises(sample.SampleError, match=message):
      sample.run(
        checkpoint=str(stored), out=str(tmp_path / 'bad'), inference_options=options, **SETTINGS
      )
    assert not (tmp_path / 'bad').exists(), options


def test_failed_batches_are_reported():
  opts = sample.sampling_options(solver='dopri5', max_steps=64)
  images = jnp.zeros((2, 1, 1, 1), jnp.uint8)
  z = lambda v: jnp.asarray(v, jnp.int32)
  with pytest.raises(
    sampling.ODESolveError,
    match=r'samples 8-9 stopped at --max_steps=64 .*'
    r'raise --max_steps, loosen --atol/--rtol, or use a fixed-step solver',
  ):
    sampler.check_batch_result(
      (images, z(392), z(sampling.STATUS_MAX_STEPS), z(64), True), opts, '8-9'
    )
  with pytest.raises(sample.SampleError, match=r'NaN or inf for samples 0-7'):
    sampler.check_batch_result((images, z(20), z(0), z(3), False), opts, '0-7')
  assert sampler.check_batch_result((images, z(20), z(0), z(3), True), opts, '0-7') == (20, 3)


def test_every_sampling_option_is_a_flag_made_from_its_default():
  """sampling.SAMPLING_OPTIONS gives the command its flags (name, default, type, help) and run()
  its keyword options, so that an option is added in one place."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  flag_values = flags.FlagValues()
  sample.define_option_flags(flag_values)
  assert set(sample.sampling_options()) == set(sampling.SAMPLING_OPTIONS) == set(flag_values)
  assert set(sampling.SAMPLING_OPTIONS) <= set(sample.RUN_FLAGS)
  for name, (default, help_text) in sampling.SAMPLING_OPTIONS.items():
    assert flag_values[name].default == default and flag_values[name].help == help_text, name
    assert type(flag_values[name].value) is type(default), name
  flag_values(['sample', '--num_steps=7', '--per_sample', '--atol=1e-4', '--last_step=None'])
  assert (
    flag_values.num_steps,
    flag_values.per_sample,
    flag_values.atol,
    flag_values.last_step,
  ) == (7, True, 1e-4, 'None')


def _python(*args, env, timeout):
  """This Python on `args` in the repository root, its output captured as text."""
  return subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )


def test_command_line_errors_exit_nonzero(run_dirs, tmp_path):
  _, export_dir, _ = run_dirs
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  cases = [
    (
      ['--classes=0,11', '--inference_scan_unroll=0'],
      'error: Class 11 is out of range: this model has 10 classes (0 to 9).',
    ),
    (
      ['--inference_hoist_adaln'],
      'error: --inference_hoist_adaln does not apply to DiT-S/2 (DiT models do not read it): '
      'leave it out.',
    ),
  ]
  for flags, message in cases:
    args = ['-m', 'dimsum_jax.sample', f'--checkpoint={export_dir}', f'--out={tmp_path / "out"}']
    r = _python(*args, '--num_samples=2', *flags, env=env, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == message
    assert not (tmp_path / 'out').exists()


_DEVICES = textwrap.dedent("""
  import json, sys
  import jax, numpy as np
  from dimsum_jax import sample
  assert jax.device_count() == 8
  export, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
  settings = dict(num_samples=10, batch_size=8, solver='dopri5', cfg_scale=2.0, seed=seed,
                  pngs=False)
  runs = {}
  for n in (8, 1):
    summary = sample.run(checkpoint=export, out=f'{out}/{n}', devices=jax.devices()[:n],
                         **settings)
    with np.load(f'{out}/{n}/samples.npz') as z:
      runs[n] = (z['arr_0'], summary['nfe_per_batch'], summary['devices'])
  diff = np.abs(runs[8][0].astype(int) - runs[1][0].astype(int))
  print(json.dumps({'max_diff': int(diff.max()), 'mismatch': float((diff > 0).mean()),
                    'nfe': [runs[8][1], runs[1][1]], 'devices': [runs[8][2], runs[1][2]]}))
""")


def test_same_seed_same_samples_on_1_and_8_devices(run_dirs, tmp_path):
  """Dopri5 with guidance: batches sharded over 8 (CPU) devices or on one give the same samples
  and take the same steps (the adaptive step sizes are shared by each global batch)."""
  _, export_dir, _ = run_dirs
  env = dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0',
    JAX_PLATFORMS='cpu',
  )
  r = _python('-c', _DEVICES, str(export_dir), str(tmp_path), str(SEED), env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert result['devices'] == [8, 1]
  assert result['nfe'][0] == result['nfe'][1] and min(result['nfe'][0]) >= 8
  assert result['max_diff'] <= 1 and result['mismatch'] <= 0.01, result


def _random_like(abstract, rng, scale):
  return jax.tree.map(lambda a: (scale * rng.normal(size=a.shape)).astype(np.float32), abstract)


def _tiny_latent_export(root, vae_dir):
  """A latent DiT (4 x 4 x 4, unconditional) with random weights (no zero layers, so the samples
  depend on all of it), exported with its config, and a tiny random VAE (factor 2)."""
  from dimsum_jax import config_utils  # pylint: disable=g-import-not-at-top
  from dimsum_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(SEED)
  vae_config = dict(
    block_out_channels=[8, 8],
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    down_block_types=['DownEncoderBlock2D'] * 2,
    up_block_types=['UpDecoderBlock2D'] * 2,
  )
  vae = vae_lib.vae_from_config(vae_config)
  vae_params = _random_like(vae_lib.abstract_params(vae), rng, 0.2)
  vae_lib.save_vae(str(vae_dir), vae_config, vae_params)
  config = config_utils.base_config()
  config.model.update(
    name='DiT-S/2',
    depth=1,
    hidden_size=48,
    input_size=4,
    in_channels=4,
    num_classes=0,
    label_dropout=0.0,
  )
  config.vae.dir = str(vae_dir)
  model = models.create_model(config.model)
  params = _random_like(
    jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,)), None)
    )['params'],
    rng,
    0.1,
  )
  os.makedirs(root)
  (root / 'config.json').write_text(config.to_json())
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(root / 'ema_params'), params)
  return vae, vae_params


def test_latent_model_decodes_through_the_vae(tmp_path):
  export_dir, vae_dir = tmp_path / 'latent', tmp_path / 'vae'
  vae, vae_params = _tiny_latent_export(export_dir, vae_dir)
  settings = dict(num_samples=3, batch_size=4, solver='euler', num_steps=2, seed=SEED)
  sample.run(checkpoint=str(export_dir), out=str(tmp_path / 'out'), **settings)
  images, labels = load_npz(tmp_path / 'out' / 'samples.npz')
  assert images.shape == (3, 8, 8, 3) and list(labels) == [0, 0, 0]
  from dimsum_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top

  latents = reference_samples(
    export_dir, range(3), None, seed=SEED, num_steps=2, cfg_scale=1, latents=True
  )
  decode = jax.jit(lambda z: vae_lib.latents_to_images(vae, vae_params, z))
  decoded = np.asarray(decode(jnp.asarray(latents, jnp.float32)))
  assert_close_uint8(images, np.clip(127.5 * decoded + 128.0, 0, 255).astype(np.uint8))

  # Without a VAE: one sentence naming the fix, nothing written.
  config = json.loads((export_dir / 'config.json').read_text())
  config['vae']['dir'] = ''
  (export_dir / 'config.json').write_text(json.dumps(config))
  with pytest.raises(
    sample.SampleError,
    match=r'latent model \(4 channels\) and no VAE is '
    r'configured: pass --vae_dir=DIR',
  ):
    sample.run(checkpoint=str(export_dir), out=str(tmp_path / 'none'), **settings)
  with pytest.raises(sample.SampleError, match=r'The VAE directory .*empty has no config.json'):
    sample.run(
      checkpoint=str(export_dir),
      out=str(tmp_path / 'none'),
      vae_dir=str(tmp_path / 'empty'),
      **settings,
    )
  assert not (tmp_path / 'none').exists()
  # --vae_dir supplies it.
  sample.run(
    checkpoint=str(export_dir), out=str(tmp_path / 'flag'), vae_dir=str(vae_dir), **settings
  )
  np.testing.assert_array_equal(load_npz(tmp_path / 'flag' / 'samples.npz')[0], images)


def test_converted_upstream_layout_samples_like_a_direct_euler_loop(tmp_path):
  """A DiMSUM in the layout `python -m dimsum_jax.convert` writes (model_config.json + params/,
  no config.json or step.txt), its weights an upstream-named state dict (every parameter
  non-zero) mapped by from_upstream: sampled with guidance, so the null row (label 10) runs, and
  with class 9, the last real row, so a null index off by one would show."""
  from dimsum_jax import convert  # pylint: disable=g-import-not-at-top
  from tests.models import common  # pylint: disable=g-import-not-at-top

  mc = common.tiny_config(in_channels=3)  # pixels: no VAE needed
  model = models.create_model(mc)
  params = common.filled_params(model, mc)
  converted = tmp_path / 'converted'
  convert.save_params(str(converted), params, mc)
  assert sorted(os.listdir(converted)) == ['model_config.json', 'params']
  settings = dict(
    num_samples=3,
    batch_size=4,
    classes=[9, 0],
    solver='euler',
    num_steps=3,
    cfg_scale=2.0,
    seed=SEED,
  )
  summary = sample.run(checkpoint=str(converted), out=str(tmp_path / 'out'), pngs=False, **settings)
  images, labels = load_npz(tmp_path / 'out' / 'samples.npz')
  assert images.shape == (3, 8, 8, 3) and list(labels) == [9, 0, 9]
  guided = euler_samples(model, params, mc, range(3), labels, seed=SEED, num_steps=3, cfg_scale=2.0)
  assert_close_uint8(images, guided)
  # Not a trivial match: many pixels are unclipped, and guidance moves them.
  assert ((guided > 0) & (guided < 255)).mean() > 0.1
  unguided = euler_samples(model, params, mc, range(3), labels, seed=SEED, num_steps=3, cfg_scale=1)
  assert np.abs(unguided.astype(int) - guided.astype(int)).max() > 8
  assert summary['source'] == str(converted) and summary['step'] is None
  assert summary['nfe_per_batch'] == [3] and summary['batch_size'] == 3


_PROCESS = textwrap.dedent("""
  import sys
  from dimsum_jax import sample, sharding
  sharding.initialize_distributed()
  import jax
  assert jax.process_count() == 2 and jax.device_count() == 4
  sample.run(checkpoint=sys.argv[1], out=sys.argv[2], num_samples=10, batch_size=8,
             solver='euler', num_steps=4, cfg_scale=2.0, seed=int(sys.argv[3]))
  print('done', jax.process_index())
""")


def test_two_processes_write_one_result(run_dirs, tmp_path):
  """2 processes x 2 CPU devices: each writes its rows, process 0 assembles; same samples."""
  _, export_dir, ref_out = run_dirs
  with socket.socket() as s:  # a free port for the coordinator
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    env = dict(
      os.environ,
      XLA_FLAGS='--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0',
      JAX_PLATFORMS='cpu',
      JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
      JAX_NUM_PROCESSES='2',
      JAX_PROCESS_ID=str(pid),
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, '-c', _PROCESS, str(export_dir), str(tmp_path / 'out'), str(SEED)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (stdout, stderr) in zip(procs, outputs):
    assert p.returncode == 0 and 'done' in stdout, stderr[-3000:]
  chunks = sorted(os.listdir(tmp_path / 'out' / 'chunks'))
  # Each process wrote its own rows of each global batch (2 devices x 2 rows each).
  assert chunks == [
    '000000000-000000004.npz',
    '000000004-000000008.npz',
    '000000008-000000012.npz',
    '000000012-000000016.npz',
  ]
  images, _ = load_npz(tmp_path / 'out' / 'samples.npz')
  assert_close_uint8(images, load_npz(ref_out / 'samples.npz')[0])
  assert len(os.listdir(tmp_path / 'out' / 'images')) == 10
