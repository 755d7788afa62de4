"""The training step, optimiser and setup checks of dimsum_jax.train.

The sharded step runs in a subprocess with 8 fake CPU devices and is compared with the same
step on one device; the optimiser pieces are compared with float64 NumPy loops and closed forms.
Random inputs come from stated seeds (tests/seeds.py): one by default, 51 under -m slow.
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
from dimsum_jax import optim
from dimsum_jax import sampling
from dimsum_jax import sharding
from dimsum_jax import train
from dimsum_jax import transport
from tests import seeds
from tests import train_util

# --------------------------------------------------------------------------------------------
# 8 devices (data 2 x fsdp 4) vs 1 device

SHARDED_STEP = r'''
import json, os, sys
import jax, numpy as np
from dimsum_jax import sharding, train, training_grids
from tests import train_util

seeds, out = [int(s) for s in sys.argv[1].split(',')], sys.argv[2]
config = train_util.digits_config('smoke')          # DiMSUM, depth 4, hidden 64, 8x8 digits
# 9 samples (padded to 16) from the noise of the first seed: one sampler compiled per mesh.
config.sample.update(rows=3, per_row=3, num_steps=3, seed=seeds[0])
b = config.data.global_batch_size


def batches(seed):
  rng = np.random.default_rng(seed)
  return [{'image': rng.uniform(-1, 1, (b, 8, 8, 1)).astype(np.float32),
           'label': rng.integers(0, 10, b).astype(np.int32)} for _ in range(2)]


def trainer(mesh):
  """seed -> (state, losses, parameter shardings, images): 2 steps from init(PRNGKey(seed)) on
  `mesh`, then EMA samples; the step and the sampler are compiled once for all seeds."""
  training = train.build(config, mesh)
  sampler = training_grids.make_sampler(config, training.model, mesh,
                                        training.state_sharding.ema_params, None)

  def run(seed):
    state = training.init(jax.random.PRNGKey(seed))
    losses = []
    for batch in batches(seed):
      state, metrics = training.update(state, sharding.global_batch(batch, mesh))
      losses.append(float(metrics['loss']))
    specs = [tuple(x.sharding.spec) for x in jax.tree.leaves(state.params)]
    images, rows, result = sampler(state.ema_params)
    assert rows == 3 and int(result.status) == 0 and int(result.nfe) == 3
    return jax.device_get(state), losses, specs, images
  return run, training.model


run_one, model = trainer(sharding.make_mesh({'data': 1, 'fsdp': 1}, devices=jax.devices()[:1]))
run_eight, _ = trainer(sharding.make_mesh({'data': 2, 'fsdp': 4}))
apply = jax.jit(lambda p, x, t, y: model.apply({'params': p}, x, t, y))
assert config.sample.cfg_scale == 3.0
labels = np.repeat(np.round(np.linspace(0, 9, 3)).astype(np.int32), 3)
noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seeds[0]), (9, 8, 8, 1)), np.float64)

for seed in seeds:
  one, loss_one, _, images_one = run_one(seed)
  eight, loss_eight, specs, images_eight = run_eight(seed)
  # The samples by hand: 3 Euler steps of the guided EMA velocity from the noise, one class per
  # row; guidance v_null + s (v_label - v_null) with the null label 10.
  x = noise
  for i in range(3):
    t = np.full([9], i / 3, np.float32)
    v_label = np.asarray(apply(one.ema_params, x.astype(np.float32), t, labels), np.float64)
    v_null = np.asarray(apply(one.ema_params, x.astype(np.float32), t, np.full_like(labels, 10)),
                        np.float64)
    x = x + (v_null + 3.0 * (v_label - v_null)) / 3
  np.testing.assert_allclose(loss_eight, loss_one, rtol=2e-6, err_msg=f'seed {seed}')
  # EMA samples: the same on 8 devices (noise and ODE split over the batch) as on one, and the
  # same as a plain Euler loop.
  np.testing.assert_allclose(images_eight, images_one, rtol=1e-5, atol=1e-5,
                             err_msg=f'seed {seed}')
  np.testing.assert_allclose(images_one, x, rtol=1e-5, atol=1e-5, err_msg=f'seed {seed}')
  names = []
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(eight)):
    names.append(jax.tree_util.keystr(path))  # params, EMA, Adam moments, step and rng
    np.testing.assert_allclose(e, a, rtol=1e-5, atol=2e-6, err_msg=f'{names[-1]} (seed {seed})')
report = {'fsdp_leaves': sum('fsdp' in s for s in specs), 'leaves': len(specs), 'seeds': len(seeds),
          'ema': any('.ema_params' in n for n in names),
          'opt_state': any('.opt_state' in n for n in names)}

# A global batch that 8 devices cannot split is refused before anything is written.
config.data.global_batch_size = 12
try:
  train.train_and_evaluate(config, out + '.workdir')
  refusal = 'not refused'
except SystemExit as e:
  refusal = str(e)
print(json.dumps(dict(report, refusal=refusal, workdir_created=os.path.exists(out + '.workdir'))))
'''


@pytest.mark.parametrize(
  'seed_list',
  [
    # The default suite checks 8 devices against one in test_grad_accum (eight_k4 vs one_k1).
    pytest.param([0], id='seed0', marks=pytest.mark.slow),
    pytest.param(seeds.seed_list()[1:], id='seeds1-50', marks=pytest.mark.slow),
  ],
)
def test_sharded_step_equals_one_device_step(tmp_path, seed_list):
  """Each seed: its init key, batches; the EMA samples start from the first seed's noise."""
  out = str(tmp_path / 'out')
  r = train_util.run_python(
    ['-c', SHARDED_STEP, ','.join(map(str, seed_list)), out],
    devices=8,
    timeout=600 if len(seed_list) == 1 else 3600,
  )
  assert r.returncode == 0, r.stderr[-4000:]  # the numerical checks ran there, per seed
  report = json.loads(r.stdout.strip().splitlines()[-1])
  assert report['seeds'] == len(seed_list)
  # The parameters are really split over the fsdp axis (not all replicated).
  assert report['fsdp_leaves'] > report['leaves'] // 2, report
  assert report['ema'] and report['opt_state'], report
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

seeds = [int(s) for s in sys.argv[1].split(',')]
mesh = train_util.one_device_mesh()
batch = sharding.global_batch(
    next(train_util.global_batches(train_util.digits_config('smoke'), 1)), mesh)
trainings = {}
for dtype in ('float32', 'bfloat16'):
  # DiMSUM (one block: spatial and wavelet Mamba, fusion, then the shared attention). eps = 1:
  # AdamW's first step is then -lr g / (|g| + 1) ~ -lr g, which compares the gradients, instead
  # of -lr sign(g), whose flips in components near zero say nothing about bfloat16.
  trainings[dtype] = train.build(train_util.digits_config(
      'smoke', model__dtype=dtype, model__depth=1, model__attn_every=1, optim__eps=1.0), mesh)

reports = []
for seed in seeds:
  rng = np.random.default_rng(seed)
  params, report = None, {'seed': seed}
  for dtype, training in trainings.items():
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
    # The update new - old of every parameter.
    report[dtype]['update'] = np.concatenate([
        (np.asarray(n, np.float64) - np.asarray(p, np.float64)).ravel()
        for n, p in zip(jax.tree.leaves(new.params), jax.tree.leaves(params))])
  u32, u16 = report['float32'].pop('update'), report['bfloat16'].pop('update')
  report['update_error'] = float(np.linalg.norm(u16 - u32) / np.linalg.norm(u32))
  report['max_error_over_max_update'] = float(np.abs(u16 - u32).max() / np.abs(u32).max())
  reports.append(report)
print(json.dumps(reports))
'''


@pytest.mark.parametrize(
  'seed_list',
  [
    pytest.param([0], id='seed0'),
    pytest.param(seeds.seed_list()[1:], id='seeds1-50', marks=pytest.mark.slow),
  ],
)
def test_bfloat16_step_keeps_float32_state_and_follows_the_float32_step(seed_list):
  r = train_util.run_python(
    ['-c', BF16_STEP, ','.join(map(str, seed_list))], timeout=300 if len(seed_list) == 1 else 3600
  )
  assert r.returncode == 0, r.stderr[-4000:]
  reports = json.loads(r.stdout.strip().splitlines()[-1])
  assert [report['seed'] for report in reports] == seed_list
  for report in reports:
    seed, f32, bf16 = report['seed'], report['float32'], report['bfloat16']
    # Parameters, EMA and Adam moments stay float32 (the count is int32) with bfloat16 compute.
    for run in (f32, bf16):
      assert run['dtypes'] == ['float32'], run
      assert run['init_dtypes'] == run['opt_dtypes'] == ['float32', 'int32'], run
    assert np.isfinite(bf16['loss']) and np.isfinite(bf16['grad_norm'])
    np.testing.assert_allclose(bf16['loss'], f32['loss'], rtol=1e-2, err_msg=f'seed {seed}')
    np.testing.assert_allclose(
      bf16['grad_norm'], f32['grad_norm'], rtol=2e-2, err_msg=f'seed {seed}'
    )
    # The update of every parameter, bfloat16 vs float32: close overall (measured ~5e-3
    # relative), and not equal, or the model would not have computed in bfloat16 at all; and
    # no element off by more than a tenth of the largest update.
    error = report['update_error']
    assert 1e-4 < error < 5e-2, f'relative update error {error} (seed {seed})'
    assert report['max_error_over_max_update'] <= 0.1, (report, f'seed {seed}')


# --------------------------------------------------------------------------------------------
# The step against an independent computation of the flow-matching loss, AdamW and the EMA


class TinyVelocity(nn.Module):
  """A stand-in network with the model interface: (x, t, y, train) -> velocity."""

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    b = x.shape[0]
    h = jnp.concatenate([x.reshape(b, -1), t[:, None], nn.Embed(11, 4)(y)], axis=-1)
    return nn.Dense(x[0].size)(nn.gelu(nn.Dense(16)(h))).reshape(x.shape)


def adamw_first_update(g, eps):
  """AdamW's first bias-corrected step direction m / (sqrt(v) + eps) = g / (|g| + eps), without
  the learning rate and weight decay. It increases monotonically with g."""
  return g / (np.abs(g) + eps)


@seeds.each()
def test_train_step_matches_closed_form(seed):
  rng = np.random.default_rng(seed)
  model, tx, step_fn = _closed_form_setup()
  state = train.init_state(
    jax.random.PRNGKey(seed), model=model, tx=tx, image_shape=(4, 4, 1), conditional=True
  )
  batch = {
    'image': rng.uniform(-1, 1, (8, 4, 4, 1)).astype(np.float32),
    'label': rng.integers(0, 10, 8).astype(np.int32),
  }
  new, metrics = step_fn(state, batch)

  # The same randomness as the step: fold in the step, split off the loss key, then (t, x0).
  loss_rng, _ = jax.random.split(jax.random.fold_in(state.rng, 0))
  t_rng, x_rng = jax.random.split(loss_rng)
  t = np.asarray(jax.random.uniform(t_rng, (8,)), np.float64)
  x0 = np.asarray(jax.random.normal(x_rng, (8, 4, 4, 1)), np.float64)
  x1 = batch['image'].astype(np.float64)
  a, s = np.sin(np.pi * t / 2)[:, None, None, None], np.cos(np.pi * t / 2)[:, None, None, None]
  x_t = a * x1 + s * x0  # GVP path
  u_t = np.pi / 2 * (s * x1 - a * x0)  # its time derivative
  apply = lambda p: model.apply(
    {'params': p}, jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.float32), batch['label']
  )
  v = np.asarray(apply(state.params), np.float64)
  np.testing.assert_allclose(
    float(metrics['loss']), np.mean((v - u_t) ** 2), rtol=1e-5, err_msg=f'seed {seed}'
  )

  # Gradient of that loss, clipped to norm 0.05, then one AdamW step (float64 by hand).
  grads = jax.grad(lambda p: jnp.mean((apply(p) - jnp.asarray(u_t, jnp.float32)) ** 2))(
    state.params
  )
  g_norm = math.sqrt(
    sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in jax.tree.leaves(grads))
  )
  np.testing.assert_allclose(float(metrics['grad_norm']), g_norm, rtol=1e-4, err_msg=f'seed {seed}')
  assert g_norm > 0.05, f'the clip is not active (seed {seed})'
  lr, wd, eps = 3e-3, 0.01, 1e-8
  for (path, p0), g, p1, e1 in zip(
    jax.tree_util.tree_leaves_with_path(state.params),
    jax.tree.leaves(grads),
    jax.tree.leaves(new.params),
    jax.tree.leaves(new.ema_params),
  ):
    where = f'{jax.tree_util.keystr(path)} (seed {seed})'
    p0, g = np.asarray(p0, np.float64), np.asarray(g, np.float64) * 0.05 / g_norm
    # The step's float32 gradient and this one (computed in float32 in another order) differ
    # by rounding: at most ~n u of the sum of the magnitudes of the ~n <= 200 terms that make
    # up a component (the loss's 128 squares, fan-ins of 21 and 16; u = 2^-24), which this
    # leaf's largest component bounds within a factor ~10: dg = 200 * 10 * 2^-24 max|g| ~ 1e-4
    # max|g|. Where |g| >> dg the update barely moves within g +- dg; where |g| ~ dg (a
    # component near zero) g / (|g| + eps) ~ sign(g) may flip, so the update is checked against
    # its range over [g - dg, g + dg] (it is monotonic in g), plus float32 rounding as before.
    dg = 1e-4 * np.abs(g).max()
    step = lambda gg: p0 - lr * (adamw_first_update(gg, eps) + wd * p0)
    low, high = step(g + dg), step(g - dg)
    expected = step(g)
    slack = 1e-6 + 1e-5 * np.abs(expected)  # the former rtol=1e-5, atol=1e-6
    p1 = np.asarray(p1, np.float64)
    outside = (p1 < low - slack) | (p1 > high + slack)
    assert not outside.any(), (where, p1[outside], expected[outside], g[outside], dg)
    # Away from zero the bound is as tight as the former check: the exact step itself.
    firm = np.abs(g) > 100 * dg
    np.testing.assert_allclose(p1[firm], expected[firm], rtol=1e-5, atol=1e-6, err_msg=where)
    # EMA started as a copy of the initial parameters: ema = d p0 + (1 - d) p1.
    np.testing.assert_allclose(
      np.asarray(e1), 0.9 * p0 + 0.1 * p1, rtol=1e-6, atol=1e-7, err_msg=where
    )
  assert int(new.step) == 1
  np.testing.assert_allclose(float(metrics['learning_rate']), lr, rtol=1e-6)
  np.testing.assert_allclose(
    float(metrics['param_norm']),
    math.sqrt(
      sum(float(np.sum(np.asarray(p, np.float64) ** 2)) for p in jax.tree.leaves(new.params))
    ),
    rtol=1e-5,
    err_msg=f'seed {seed}',
  )


@functools.lru_cache(maxsize=None)
def _closed_form_setup():
  """(model, optimiser, jitted step) of test_train_step_matches_closed_form, compiled once for
  all seeds."""
  config = train_util.digits_config(
    optim__learning_rate=3e-3, optim__weight_decay=0.01, optim__grad_clip=0.05, optim__ema_decay=0.9
  )
  model = TinyVelocity()
  schedule = optim.learning_rate_schedule(config.optim, config.num_train_steps)
  tx = optim.make_optimizer(config.optim, schedule)
  return (
    model,
    tx,
    jax.jit(
      functools.partial(
        train.train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        transport_config=config.transport,
        ema_decay=config.optim.ema_decay,
        conditional=True,
      )
    ),
  )


@seeds.each()
def test_clipped_adamw_matches_numpy_over_several_steps(seed):
  """Three steps with gradients above the clip, weight decay on: optax chain vs float64 loop."""
  rng = np.random.default_rng(seed)
  config = train_util.digits_config(
    optim__learning_rate=1e-2,
    optim__weight_decay=0.1,
    optim__grad_clip=1.5,
    optim__b1=0.8,
    optim__b2=0.95,
    optim__schedule='constant',
  )
  tx = optim.make_optimizer(config.optim, optim.learning_rate_schedule(config.optim, 100))
  params = {
    'w': rng.normal(size=(5, 3)).astype(np.float32),
    'b': rng.normal(size=3).astype(np.float32),
  }
  state = tx.init(params)
  ref = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in ref.items()}
  v2 = {k: np.zeros_like(v) for k, v in ref.items()}
  scales = [0.5, 3.0, 10.0]  # the first step is under the clip, the others over
  for step, scale in enumerate(scales, start=1):
    grads = {
      k: (scale * rng.normal(size=v.shape) / math.sqrt(18)).astype(np.float32)
      for k, v in params.items()
    }
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    norm = math.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))
    factor = min(1.0, 1.5 / norm)
    for k in ref:
      g = grads[k].astype(np.float64) * factor
      m[k] = 0.8 * m[k] + 0.2 * g
      v2[k] = 0.95 * v2[k] + 0.05 * g * g
      m_hat, v_hat = m[k] / (1 - 0.8**step), v2[k] / (1 - 0.95**step)
      ref[k] = ref[k] - 1e-2 * (m_hat / (np.sqrt(v_hat) + 1e-8) + 0.1 * ref[k])
    for k in ref:
      np.testing.assert_allclose(
        np.asarray(params[k]),
        ref[k],
        rtol=2e-5,
        atol=1e-6,
        err_msg=f'{k} after step {step} (seed {seed})',
      )


@pytest.mark.parametrize('kind', ['constant', 'cosine', 'linear'])
def test_learning_rate_schedule_warmup_and_decay(kind):
  lr, end, warmup, total = 2e-3, 1e-5, 10, 50
  config = train_util.digits_config(
    optim__learning_rate=lr,
    optim__end_learning_rate=end,
    optim__warmup_steps=warmup,
    optim__schedule=kind,
  )
  schedule = optim.learning_rate_schedule(config.optim, total)

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
    np.testing.assert_allclose(
      float(schedule(s)), expected(s), rtol=1e-5, atol=1e-12, err_msg=f'{kind} at step {s}'
    )


def test_unknown_schedule_is_refused():
  config = train_util.digits_config(optim__schedule='cosin')
  with pytest.raises(
    ValueError,
    match="--config.optim.schedule=cosin is not a valid choice: use "
    "one of constant, cosine, linear.",
  ):
    optim.learning_rate_schedule(config.optim, 10)


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


# Every path the transport implements, in its order (the list grows with new paths).
_PATHS = ', '.join(transport.PATH_TYPES)
assert _PATHS.startswith('GVP, Linear, VP')


def _choice_error(flag, choices):
  return f'error: --config.{flag} is not a valid choice: use one of {choices}.'


# (flag, the whole last line of stderr, run into an existing workdir). The enum fields are read
# only when the step or the sampler is traced (or, loss_weight with velocity, never), so before
# the checks these failed with a traceback after writing the workdir, or not at all.
BAD_VALUES = [
  ('transport.path_type=GVPP', _choice_error('transport.path_type=GVPP', _PATHS), False),
  ('transport.path_type=GVPP', _choice_error('transport.path_type=GVPP', _PATHS), True),
  ('sample.solver=eulr', _choice_error('sample.solver=eulr', 'dopri5, euler, heun'), True),
  (
    'transport.t_sampling=lognormal',
    _choice_error('transport.t_sampling=lognormal', 'uniform, logit_normal'),
    False,
  ),
  (
    'transport.loss_weight=velocty',
    _choice_error('transport.loss_weight=velocty', 'none, velocity, likelihood'),
    True,
  ),
  (
    'model.scan_type=swep_4',
    _choice_error('model.scan_type=swep_4', 'none, v2, sweep_8, sweep_4, zigma_8, jpeg_8, jpeg_2'),
    False,
  ),
  ('model.dtype=bf16', _choice_error('model.dtype=bf16', 'float32, bfloat16, float64'), False),
  (
    'model.depth=3',
    'error: config.model cannot be built: depth 3 must be a multiple of attn_every 4.',
    True,
  ),
]


@pytest.mark.parametrize(
  'flag, last_line, existing',
  BAD_VALUES,
  ids=[f'{f}-{"existing" if e else "fresh"}' for f, _, e in BAD_VALUES],
)
def test_bad_value_is_one_sentence_and_the_workdir_is_untouched(
  tmp_path, flag, last_line, existing
):
  workdir = tmp_path / 'workdir'
  if existing:  # a run to resume: its config.json (which export reads) must stay as it was
    (workdir / 'checkpoints' / '2').mkdir(parents=True)
    checkpoint.save_config(str(workdir), train_util.digits_config('smoke'))
    (workdir / 'checkpoints' / '2' / 'marker').write_text('step 2')
    before = train_util.fingerprint(workdir)
    assert 'config.json' in before
  r = train_util.run_python(
    [
      '-m',
      'dimsum_jax.main',
      *train_util.flags('smoke'),
      f'--config.{flag}',
      f'--workdir={workdir}',
    ]
  )
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
    'smoke',
    transport__path_type='gvp',
    transport__prediction='Noise',
    transport__loss_weight='Likelihood',
    transport__t_sampling='logitnormal',
    sample__solver='Heun',
  )
  train.check_choices(config)
  t = transport.sample_time(jax.random.PRNGKey(0), 4, config.transport)  # the readers agree
  assert np.all(np.isfinite(np.asarray(transport.loss_weight(config.transport, t))))
  # Heun on dx/dt = -x: each step of h = 1/2 multiplies x by 1 - h + h^2 / 2 = 0.625.
  x1 = sampling.solve_ode(
    lambda x, t: -x, jnp.ones([1]), solver=config.sample.solver, num_steps=2
  ).x1
  np.testing.assert_allclose(np.asarray(x1), [0.625**2], rtol=1e-6)


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
