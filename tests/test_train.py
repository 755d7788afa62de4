"""The training step, optimiser and setup checks of dimsum_jax.train.

The sharded step runs in a subprocess with 8 fake CPU devices and is compared with the same
step on one device; the optimiser pieces are compared with float64 NumPy loops and closed forms.
"""
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dimsum_jax import checkpoint
from dimsum_jax import sampling
from dimsum_jax import sharding
from dimsum_jax import train
from dimsum_jax import transport
from tests import train_util

# --------------------------------------------------------------------------------------------
# 8 devices (data 2 x fsdp 4) vs 1 device

SHARDED_STEP = r'''
import json, os, sys
import jax, numpy as np
from dimsum_jax import sharding, train
from tests import train_util

seed, out = int(sys.argv[1]), sys.argv[2]
config = train_util.digits_config('smoke')          # DiMSUM, depth 4, hidden 64, 8x8 digits
config.sample.update(rows=3, per_row=3, num_steps=3, seed=seed)  # 9 samples: padded to 16
rng = np.random.default_rng(seed)
b = config.data.global_batch_size
batches = [{'image': rng.uniform(-1, 1, (b, 8, 8, 1)).astype(np.float32),
            'label': rng.integers(0, 10, b).astype(np.int32)} for _ in range(2)]

def run(mesh):
  training = train.build(config, mesh)
  state = training.init(jax.random.PRNGKey(seed))
  losses = []
  for batch in batches:
    state, metrics = training.update(state, sharding.global_batch(batch, mesh))
    losses.append(float(metrics['loss']))
  specs = [tuple(x.sharding.spec) for x in jax.tree.leaves(state.params)]
  sampler = train._make_sampler(config, training.model, mesh,
                                training.state_sharding.ema_params, None)
  images, rows, result = sampler(state.ema_params)
  assert rows == 3 and int(result.status) == 0 and int(result.nfe) == 3
  return jax.device_get(state), losses, specs, images, training.model

one, loss_one, _, images_one, model = run(
    sharding.make_mesh({'data': 1, 'fsdp': 1}, devices=jax.devices()[:1]))
eight, loss_eight, specs, images_eight, _ = run(sharding.make_mesh({'data': 2, 'fsdp': 4}))

# The samples by hand: 3 Euler steps of the guided EMA velocity from normal(PRNGKey(seed)), one
# class per row; guidance v_null + s (v_label - v_null) with the null label 10.
assert config.sample.cfg_scale == 3.0
labels = np.repeat(np.round(np.linspace(0, 9, 3)).astype(np.int32), 3)
x = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (9, 8, 8, 1)), np.float64)
apply = jax.jit(lambda x, t, y: model.apply({'params': one.ema_params}, x, t, y))
for i in range(3):
  t = np.full([9], i / 3, np.float32)
  v_label = np.asarray(apply(x.astype(np.float32), t, labels), np.float64)
  v_null = np.asarray(apply(x.astype(np.float32), t, np.full_like(labels, 10)), np.float64)
  x = x + (v_null + 3.0 * (v_label - v_null)) / 3

arrays = {'images/one': images_one, 'images/eight': images_eight, 'images/euler': x}
for name, tree in (('one', one), ('eight', eight)):
  arrays.update({name + '/' + jax.tree_util.keystr(p): v
                 for p, v in jax.tree_util.tree_leaves_with_path(tree)})
np.savez(out, **arrays)

# A global batch that 8 devices cannot split is refused before anything is written.
config.data.global_batch_size = 12
try:
  train.train_and_evaluate(config, out + '.workdir')
  refusal = 'not refused'
except SystemExit as e:
  refusal = str(e)
print(json.dumps({'loss_one': loss_one, 'loss_eight': loss_eight,
                  'fsdp_leaves': sum('fsdp' in s for s in specs), 'leaves': len(specs),
                  'refusal': refusal, 'workdir_created': os.path.exists(out + '.workdir')}))
'''


def test_sharded_step_equals_one_device_step(tmp_path):
  seed = int(np.random.default_rng().integers(1 << 30))
  out = str(tmp_path / 'states.npz')
  r = train_util.run_python(['-c', SHARDED_STEP, str(seed), out], devices=8, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  report = json.loads(r.stdout.strip().splitlines()[-1])
  # The parameters are really split over the fsdp axis (not all replicated).
  assert report['fsdp_leaves'] > report['leaves'] // 2, report
  np.testing.assert_allclose(report['loss_eight'], report['loss_one'], rtol=2e-6)
  states = np.load(out)
  # EMA samples: the same on 8 devices (noise and ODE split over the batch) as on one, and
  # the same as a plain Euler loop.
  np.testing.assert_allclose(states['images/eight'], states['images/one'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(states['images/one'], states['images/euler'], rtol=1e-5, atol=1e-5)
  names = sorted(k[len('one/'):] for k in states if k.startswith('one/'))
  assert any('.ema_params' in n for n in names) and any('.opt_state' in n for n in names)
  for name in names:  # params, EMA, Adam moments, step and rng after two steps
    np.testing.assert_allclose(states['eight/' + name], states['one/' + name], rtol=1e-5,
                               atol=2e-6, err_msg=f'{name} (seed {seed})')
  # Batch 12 on 8 devices: one sentence naming the key and a fix; no workdir created.
  assert 'global batch size 12 does not divide over 8 devices' in report['refusal']
  assert '--config.data.global_batch_size' in report['refusal']
  assert not report['workdir_created']


# --------------------------------------------------------------------------------------------
# bfloat16 compute vs float32: the same step on the same batch, parameters and keys

BF16_STEP = r'''
import json, sys
import jax, numpy as np
from dimsum_jax import sharding, train
from tests import train_util

seed, out = int(sys.argv[1]), sys.argv[2]
mesh = train_util.one_device_mesh()
batch = sharding.global_batch(
    next(train_util.global_batches(train_util.digits_config('smoke'), 1)), mesh)
rng = np.random.default_rng(seed)
params, arrays, report = None, {}, {}
for dtype in ('float32', 'bfloat16'):
  # DiMSUM (one block: spatial and wavelet Mamba, fusion, then the shared attention). eps = 1:
  # AdamW's first step is then -lr g / (|g| + 1) ~ -lr g, which compares the gradients, instead
  # of -lr sign(g), whose flips in components near zero say nothing about bfloat16.
  config = train_util.digits_config('smoke', model__dtype=dtype, model__depth=1,
                                    model__attn_every=1, optim__eps=1.0)
  training = train.build(config, mesh)
  state = training.init(jax.random.PRNGKey(seed))
  if params is None:  # adaLN-zero and the zero final layer: random there, so every path matters
    params = jax.tree.map(lambda p: np.where(
        np.asarray(p) == 0, 0.05 * rng.standard_normal(p.shape), np.asarray(p)).astype(p.dtype),
        jax.device_get(state.params))
  state = state.replace(params=jax.device_put(params, training.state_sharding.params))
  report[dtype] = {'init_dtypes': sorted({str(x.dtype) for x in jax.tree.leaves(
      (state.params, state.ema_params, state.opt_state))})}
  new, metrics = training.update(state, batch)
  new = jax.device_get(new)
  report[dtype].update(
      loss=float(metrics['loss']), grad_norm=float(metrics['grad_norm']),
      dtypes=sorted({str(x.dtype) for x in jax.tree.leaves((new.params, new.ema_params))}),
      opt_dtypes=sorted({str(x.dtype) for x in jax.tree.leaves(new.opt_state)}))
  arrays.update({f'{dtype}/{jax.tree_util.keystr(p)}': v
                 for p, v in jax.tree_util.tree_leaves_with_path(new.params)})
arrays.update({f'before/{jax.tree_util.keystr(p)}': v
               for p, v in jax.tree_util.tree_leaves_with_path(params)})
np.savez(out, **arrays)
print(json.dumps(report))
'''


def test_bfloat16_step_keeps_float32_state_and_follows_the_float32_step(tmp_path):
  seed = int(np.random.default_rng().integers(1 << 30))
  out = str(tmp_path / 'params.npz')
  r = train_util.run_python(['-c', BF16_STEP, str(seed), out])
  assert r.returncode == 0, r.stderr[-4000:]
  report = json.loads(r.stdout.strip().splitlines()[-1])
  f32, bf16 = report['float32'], report['bfloat16']
  # Parameters, EMA and Adam moments stay float32 (the count is int32) with bfloat16 compute.
  for run in (f32, bf16):
    assert run['dtypes'] == ['float32'], run
    assert run['init_dtypes'] == run['opt_dtypes'] == ['float32', 'int32'], run
  assert np.isfinite(bf16['loss']) and np.isfinite(bf16['grad_norm'])
  np.testing.assert_allclose(bf16['loss'], f32['loss'], rtol=1e-2, err_msg=f'seed {seed}')
  np.testing.assert_allclose(bf16['grad_norm'], f32['grad_norm'], rtol=2e-2, err_msg=f'seed {seed}')
  # The update new - old of every parameter, bfloat16 vs float32: close overall (measured
  # ~5e-3 relative), and not equal, or the model would not have computed in bfloat16 at all.
  arrays = np.load(out)
  names = sorted(k[len('before/'):] for k in arrays if k.startswith('before/'))
  before = np.concatenate([arrays['before/' + n].ravel() for n in names]).astype(np.float64)
  update = {d: np.concatenate([arrays[f'{d}/{n}'].ravel() for n in names]) - before
            for d in ('float32', 'bfloat16')}
  error = np.linalg.norm(update['bfloat16'] - update['float32']) / np.linalg.norm(update['float32'])
  assert 1e-4 < error < 5e-2, f'relative update error {error} (seed {seed})'
  np.testing.assert_allclose(update['bfloat16'], update['float32'], rtol=0,
                             atol=0.1 * np.abs(update['float32']).max(), err_msg=f'seed {seed}')


# --------------------------------------------------------------------------------------------
# The step against an independent computation of the flow-matching loss, AdamW and the EMA


class TinyVelocity(nn.Module):
  """A stand-in network with the model interface: (x, t, y, train) -> velocity."""

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    b = x.shape[0]
    h = jnp.concatenate([x.reshape(b, -1), t[:, None], nn.Embed(11, 4)(y)], axis=-1)
    return nn.Dense(x[0].size)(nn.gelu(nn.Dense(16)(h))).reshape(x.shape)


def test_train_step_matches_closed_form():
  rng = np.random.default_rng()
  config = train_util.digits_config(optim__learning_rate=3e-3, optim__weight_decay=0.01,
                                    optim__grad_clip=0.05, optim__ema_decay=0.9)
  model = TinyVelocity()
  schedule = train.learning_rate_schedule(config.optim, config.num_train_steps)
  tx = train.make_optimizer(config.optim, schedule)
  state = train.init_state(jax.random.PRNGKey(int(rng.integers(1 << 30))), model=model, tx=tx,
                           image_shape=(4, 4, 1), conditional=True)
  batch = {'image': rng.uniform(-1, 1, (8, 4, 4, 1)).astype(np.float32),
           'label': rng.integers(0, 10, 8).astype(np.int32)}
  step = jax.jit(functools.partial(
      train.train_step, model=model, tx=tx, schedule=schedule, transport_config=config.transport,
      ema_decay=config.optim.ema_decay, conditional=True))
  new, metrics = step(state, batch)

  # The same randomness as the step: fold in the step, split off the loss key, then (t, x0).
  loss_rng, _ = jax.random.split(jax.random.fold_in(state.rng, 0))
  t_rng, x_rng = jax.random.split(loss_rng)
  t = np.asarray(jax.random.uniform(t_rng, (8,)), np.float64)
  x0 = np.asarray(jax.random.normal(x_rng, (8, 4, 4, 1)), np.float64)
  x1 = batch['image'].astype(np.float64)
  a, s = np.sin(np.pi * t / 2)[:, None, None, None], np.cos(np.pi * t / 2)[:, None, None, None]
  x_t = a * x1 + s * x0                                   # GVP path
  u_t = np.pi / 2 * (s * x1 - a * x0)                     # its time derivative
  apply = lambda p: model.apply({'params': p}, jnp.asarray(x_t, jnp.float32),
                                jnp.asarray(t, jnp.float32), batch['label'])
  v = np.asarray(apply(state.params), np.float64)
  np.testing.assert_allclose(float(metrics['loss']), np.mean((v - u_t) ** 2), rtol=1e-5)

  # Gradient of that loss, clipped to norm 0.05, then one AdamW step (float64 by hand).
  grads = jax.grad(lambda p: jnp.mean((apply(p) - jnp.asarray(u_t, jnp.float32)) ** 2))(
      state.params)
  g_norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2))
                         for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(float(metrics['grad_norm']), g_norm, rtol=1e-4)
  assert g_norm > 0.05  # the clip is active
  lr, wd, eps = 3e-3, 0.01, 1e-8
  for (path, p0), g, p1, e1 in zip(jax.tree_util.tree_leaves_with_path(state.params),
                                   jax.tree.leaves(grads), jax.tree.leaves(new.params),
                                   jax.tree.leaves(new.ema_params)):
    p0, g = np.asarray(p0, np.float64), np.asarray(g, np.float64) * 0.05 / g_norm
    m_hat, v_hat = g, g * g                   # bias-corrected first moments after one step
    expected = p0 - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p0)
    np.testing.assert_allclose(np.asarray(p1), expected, rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
    # EMA started as a copy of the initial parameters: ema = d p0 + (1 - d) p1.
    np.testing.assert_allclose(np.asarray(e1), 0.9 * p0 + 0.1 * np.asarray(p1, np.float64),
                               rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  assert int(new.step) == 1
  np.testing.assert_allclose(float(metrics['learning_rate']), lr, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['param_norm']), math.sqrt(sum(
      float(np.sum(np.asarray(p, np.float64) ** 2)) for p in jax.tree.leaves(new.params))),
                             rtol=1e-5)


def test_clipped_adamw_matches_numpy_over_several_steps():
  """Three steps with gradients above the clip, weight decay on: optax chain vs float64 loop."""
  rng = np.random.default_rng()
  config = train_util.digits_config(optim__learning_rate=1e-2, optim__weight_decay=0.1,
                                    optim__grad_clip=1.5, optim__b1=0.8, optim__b2=0.95,
                                    optim__schedule='constant')
  tx = train.make_optimizer(config.optim, train.learning_rate_schedule(config.optim, 100))
  params = {'w': rng.normal(size=(5, 3)).astype(np.float32), 'b': rng.normal(size=3).astype(np.float32)}
  state = tx.init(params)
  ref = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in ref.items()}
  v2 = {k: np.zeros_like(v) for k, v in ref.items()}
  scales = [0.5, 3.0, 10.0]                   # the first step is under the clip, the others over
  for step, scale in enumerate(scales, start=1):
    grads = {k: (scale * rng.normal(size=v.shape) / math.sqrt(18)).astype(np.float32)
             for k, v in params.items()}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    norm = math.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))
    factor = min(1.0, 1.5 / norm)
    for k in ref:
      g = grads[k].astype(np.float64) * factor
      m[k] = 0.8 * m[k] + 0.2 * g
      v2[k] = 0.95 * v2[k] + 0.05 * g * g
      m_hat, v_hat = m[k] / (1 - 0.8 ** step), v2[k] / (1 - 0.95 ** step)
      ref[k] = ref[k] - 1e-2 * (m_hat / (np.sqrt(v_hat) + 1e-8) + 0.1 * ref[k])
    for k in ref:
      np.testing.assert_allclose(np.asarray(params[k]), ref[k], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize('kind', ['constant', 'cosine', 'linear'])
def test_learning_rate_schedule_warmup_and_decay(kind):
  lr, end, warmup, total = 2e-3, 1e-5, 10, 50
  config = train_util.digits_config(optim__learning_rate=lr, optim__end_learning_rate=end,
                                    optim__warmup_steps=warmup, optim__schedule=kind)
  schedule = train.learning_rate_schedule(config.optim, total)

  def expected(s):
    if s < warmup:
      return lr * s / warmup
    frac = (s - warmup) / (total - warmup)
    if kind == 'constant':
      return lr
    if kind == 'cosine':
      return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))
    return lr + (end - lr) * frac

  for s in [0, 1, 5, 9, 10, 11, 30, 49, 50]:
    np.testing.assert_allclose(float(schedule(s)), expected(s), rtol=1e-5, atol=1e-12,
                               err_msg=f'{kind} at step {s}')


def test_unknown_schedule_is_refused():
  config = train_util.digits_config(optim__schedule='cosin')
  with pytest.raises(train.SetupError, match="config.optim.schedule is 'cosin'"):
    train.learning_rate_schedule(config.optim, 10)


# --------------------------------------------------------------------------------------------
# Setup mistakes: one sentence, nothing written


@pytest.mark.parametrize('name', ['image_folder', 'latents'])
def test_missing_data_dir_is_one_clear_sentence(tmp_path, name):
  config = train_util.digits_config(data__name=name, data__data_dir=str(tmp_path / 'nowhere'))
  with pytest.raises(SystemExit) as e:
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  message = str(e.value)
  assert message.startswith('error: ') and str(tmp_path / 'nowhere') in message
  assert '\n' not in message and 'Traceback' not in message
  assert not (tmp_path / 'workdir').exists()


def test_data_that_does_not_fit_the_model_is_refused(tmp_path):
  config = train_util.digits_config(data__image_size=16)
  with pytest.raises(SystemExit, match='set --config.model.input_size=16'):
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert not (tmp_path / 'workdir').exists()


def _choice_error(flag, choices):
  return f'error: --config.{flag} is not a valid choice: use one of {choices}.'


# (flag, the whole last line of stderr, run into an existing workdir). The enum fields are read
# only when the step or the sampler is traced (or, loss_weight with velocity, never), so before
# the checks these failed with a traceback after writing the workdir, or not at all.
BAD_VALUES = [
    ('transport.path_type=GVPP', _choice_error('transport.path_type=GVPP', 'GVP, Linear, VP'),
     False),
    ('transport.path_type=GVPP', _choice_error('transport.path_type=GVPP', 'GVP, Linear, VP'),
     True),
    ('sample.solver=eulr', _choice_error('sample.solver=eulr', 'dopri5, euler, heun'), True),
    ('transport.t_sampling=lognormal',
     _choice_error('transport.t_sampling=lognormal', 'uniform, logit_normal'), False),
    ('transport.loss_weight=velocty',
     _choice_error('transport.loss_weight=velocty', 'none, velocity, likelihood'), True),
    ('model.scan_type=swep_4',
     _choice_error('model.scan_type=swep_4', 'none, v2, sweep_8, sweep_4, zigma_8, jpeg_8, jpeg_2'),
     False),
    ('model.dtype=bf16', _choice_error('model.dtype=bf16', 'float32, bfloat16, float64'), False),
    ('model.depth=3', 'error: config.model cannot be built: depth 3 must be a multiple of '
     'attn_every 4.', True),
]


@pytest.mark.parametrize('flag, last_line, existing', BAD_VALUES,
                         ids=[f'{f}-{"existing" if e else "fresh"}' for f, _, e in BAD_VALUES])
def test_bad_value_is_one_sentence_and_the_workdir_is_untouched(tmp_path, flag, last_line,
                                                                existing):
  workdir = tmp_path / 'workdir'
  if existing:  # a run to resume: its config.json (which export reads) must stay as it was
    (workdir / 'checkpoints' / '2').mkdir(parents=True)
    checkpoint.save_config(str(workdir), train_util.digits_config('smoke'))
    (workdir / 'checkpoints' / '2' / 'marker').write_text('step 2')
    before = train_util.fingerprint(workdir)
    assert 'config.json' in before
  r = train_util.run_python(['-m', 'dimsum_jax.main', *train_util.flags('smoke'),
                             f'--config.{flag}', f'--workdir={workdir}'])
  assert r.returncode == 1, r.stderr[-4000:]
  assert r.stderr.strip().splitlines()[-1] == last_line, r.stderr[-4000:]
  assert 'Traceback' not in r.stderr
  if existing:
    assert train_util.fingerprint(workdir) == before
  else:
    assert not workdir.exists()


def test_other_spellings_that_the_step_reads_are_accepted():
  """The checks follow the readers: case, '-' for '_' and upstream's 'logitnormal' pass."""
  config = train_util.digits_config(
      'smoke', transport__path_type='gvp', transport__prediction='Noise',
      transport__loss_weight='Likelihood', transport__t_sampling='logitnormal',
      sample__solver='Heun')
  train.check_choices(config)
  t = transport.sample_time(jax.random.PRNGKey(0), 4, config.transport)  # the readers agree
  assert np.all(np.isfinite(np.asarray(transport.loss_weight(config.transport, t))))
  # Heun on dx/dt = -x: each step of h = 1/2 multiplies x by 1 - h + h^2 / 2 = 0.625.
  x1 = sampling.solve_ode(lambda x, t: -x, jnp.ones([1]), solver=config.sample.solver,
                          num_steps=2).x1
  np.testing.assert_allclose(np.asarray(x1), [0.625 ** 2], rtol=1e-6)


def test_mesh_that_does_not_fit_the_devices_is_refused(tmp_path):
  config = train_util.digits_config(mesh__data=2, mesh__fsdp=1)
  with pytest.raises(SystemExit, match='needs 2 devices but there are 1'):
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))


def test_batch_split_over_devices():
  """The mesh helper itself: -1 fills in, and the batch check names the key."""
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1})
  assert dict(mesh.shape) == {'data': jax.device_count(), 'fsdp': 1}
  sharding.check_batch_size(16 * jax.device_count(), mesh)
  with pytest.raises(ValueError, match='at most one axis may be -1'):
    sharding.make_mesh({'data': -1, 'fsdp': -1})
