"""Gradient accumulation (config.optim.grad_accum_steps) and the micro-batch planner (memory.py).

k passes of B/k images must be the step on B images: the same parameters, EMA, Adam moments,
step, learning rate and loss, up to the order of float32 sums, on one device and on 8 (data 2 x
fsdp 4). Label dropout and drop path are off (their draws depend on the micro-batch); noise and
times are drawn for the whole batch, so nothing else differs. AdamW runs with eps = 1, which
makes its first update -lr g / (|g| + 1): linear in the gradient, so a component near zero cannot
flip from -lr to +lr on a rounding difference (with eps = 1e-8 the first update is lr sign(g)).
"""

import json

import jax
import numpy as np

from dimsum_jax import memory
from dimsum_jax import train
from tests import train_util

SEED = 20261207

ACCUMULATED = r'''
import json, sys
import jax, numpy as np
from dimsum_jax import sharding, train
from tests import train_util

seed, out = int(sys.argv[1]), sys.argv[2]
config = train_util.digits_config('smoke', model__label_dropout=0.0, model__drop_path=0.0,
                                  optim__eps=1.0, data__global_batch_size=64)
batches = list(train_util.global_batches(config, 2))
one = sharding.make_mesh({'data': 1, 'fsdp': 1}, devices=jax.devices()[:1])
eight = sharding.make_mesh({'data': 2, 'fsdp': 4})
arrays, report = {}, {}
for name, mesh, k in (('one_k1', one, 1), ('one_k4', one, 4), ('eight_k4', eight, 4)):
  config.optim.grad_accum_steps = k
  training = train.build(config, mesh)
  training, _ = train.compile_update(training, config, mesh)
  state = training.init(jax.random.PRNGKey(seed))
  metrics = []
  for batch in batches:
    state, m = training.update(state, sharding.global_batch(batch, mesh))
    metrics.append({key: float(v) for key, v in jax.device_get(m).items()})
  report[name] = {'metrics': metrics, 'passes': training.grad_accum_steps}
  arrays.update({name + '/' + jax.tree_util.keystr(p): v
                 for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state))})
np.savez(out, **arrays)
print(json.dumps(report))
'''


def test_accumulated_step_equals_the_whole_batch_step(tmp_path):
  out = str(tmp_path / 'states.npz')
  r = train_util.run_python(['-c', ACCUMULATED, str(SEED), out], devices=8, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  report = json.loads(r.stdout.strip().splitlines()[-1])
  assert [report[n]['passes'] for n in ('one_k1', 'one_k4', 'eight_k4')] == [1, 4, 4]
  for name in ('one_k4', 'eight_k4'):
    for got, want in zip(report[name]['metrics'], report['one_k1']['metrics']):
      for key in ('loss', 'grad_norm', 'param_norm', 'learning_rate'):
        np.testing.assert_allclose(
          got[key], want[key], rtol=2e-6, err_msg=f'{name} {key} (seed {SEED})'
        )
  states = np.load(out)
  names = sorted(k[len('one_k1/') :] for k in states if k.startswith('one_k1/'))
  assert any('.ema_params' in n for n in names) and any('.opt_state' in n for n in names)
  for name in ('one_k4', 'eight_k4'):
    for leaf in names:  # params, EMA, Adam moments and count, step, rng after two steps
      want = states['one_k1/' + leaf]
      np.testing.assert_allclose(
        states[f'{name}/{leaf}'],
        want,
        rtol=1e-5,
        atol=1e-6 * max(1.0, float(np.abs(want).max())),
        err_msg=f'{name} {leaf} (seed {SEED})',
      )
  assert int(states['one_k4/.step']) == int(states['eight_k4/.step']) == 2


def test_grad_accum_that_does_not_divide_the_device_batch_is_one_sentence(tmp_path):
  workdir = tmp_path / 'run'
  r = train_util.run_python(
    [
      '-m',
      'dimsum_jax.main',
      *train_util.flags('smoke_dit', optim__grad_accum_steps=3),
      f'--workdir={workdir}',
    ]
  )
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(
    'error: --config.optim.grad_accum_steps=3 does not divide the per-device batch of 16'
  ), r.stderr[-2000:]
  assert '[1, 2, 4, 8, 16]' in last and 'Traceback' not in r.stderr
  assert not workdir.exists()


def test_fewest_passes_takes_the_largest_micro_batch_under_the_budget():
  gib = memory.GIB
  # 10 GiB of state, 2 GiB of parameters, residuals 1 GiB + 0.5 GiB per image.
  plan = memory.Plan(10 * gib, 2 * gib, 1 * gib, 0.5 * gib)
  # Hand: one pass of 64 images = 10 + 2 + 1.4 * (1 + 32) = 58.2 GiB; two passes of 32 =
  # 10 + 4 + 1.4 * 17 = 37.8 GiB; four passes of 16 = 10 + 4 + 1.4 * 9 = 26.6 GiB.
  np.testing.assert_allclose(plan.bytes(64, 1) / gib, 10 + 2 + memory.SLACK * 33)
  np.testing.assert_allclose(plan.bytes(32, 2) / gib, 10 + 4 + memory.SLACK * 17)
  assert memory.fewest_passes(64, plan, int(70 * gib)) == 1
  assert memory.fewest_passes(64, plan, int(50 * gib)) == 2  # 58.2 > 46, 37.8 <= 46
  assert memory.fewest_passes(64, plan, int(30 * gib)) == 4  # 37.8 > 27.6, 26.6 <= 27.6
  assert memory.fewest_passes(48, plan, int(1 * gib)) == 48  # nothing fits: one image a pass
  assert memory.divisors(12) == [1, 2, 3, 4, 6, 12]


def test_residual_estimate_grows_with_the_batch_as_the_activations_do():
  """The residuals of a dense layer x @ w over b rows: x itself (b x 3 float32) is all the
  backward needs for the gradient of w."""
  w = jax.ShapeDtypeStruct((3, 5), np.float32)

  def loss_of_batch(b):
    return (lambda w, x: (x @ w).sum()), (w, jax.ShapeDtypeStruct((b, 3), np.float32))

  one, two = memory.residual_bytes(loss_of_batch, 1), memory.residual_bytes(loss_of_batch, 2)
  assert two - one == 3 * 4


def test_memory_plan_of_a_model_is_linear_in_the_batch():
  config = train_util.digits_config('smoke')
  mesh = train_util.one_device_mesh()
  training = train.build(config, mesh)
  plan = train.memory_plan(config, mesh, training.model, training.abstract_state)
  params = sum(x.size * 4 for x in jax.tree.leaves(training.abstract_state.params))
  assert plan.param_bytes == params
  # State: parameters, EMA, two Adam moments (float32), plus the step, Adam's count and the key.
  assert params * 4 <= plan.state_bytes <= params * 4 + 64
  # The input image alone is 8 x 8 x 1 float32 per image; every block keeps far more.
  assert plan.per_image > 100 * 8 * 8 * 4
