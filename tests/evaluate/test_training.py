"""config.eval during training, its best checkpoint, and `python -m dimsum_jax.sample --evaluate`.

One real run of configs/digits.py:smoke (DiMSUM on 8x8 digits) in this process evaluates 100
EMA samples (Euler, 2 steps, guidance 3) with the digits features every 2 steps and at the end:
3 steps (evaluations at 2 and 3), then resumed to 6 (at 4 and 6). Its scalars are checked against
the metrics recomputed here from the checkpoint's EMA weights with float64 NumPy / SciPy (FID by
scipy.linalg.sqrtm, precision/recall by brute-force 3-NN), its best step against the logged FIDs
across the resume, and `sample --evaluate` on an export of step 6 against the run's own scores.
Under -m slow, a run SIGKILLed at random moments (seed KILL_SEED) ends with the same checkpoints,
scores and state as one never killed. config.eval's own checks are in test_config.py, the Orbax
side of the best checkpoint in tests/test_checkpoint.py.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import scipy.linalg

from dimsum_jax import checkpoint
from dimsum_jax import export
from dimsum_jax import models
from dimsum_jax import sample
from dimsum_jax import sampler
from dimsum_jax import train
from dimsum_jax.evaluate import command
from dimsum_jax.evaluate import config as eval_config
from dimsum_jax.evaluate import digits_features
from dimsum_jax.evaluate import reference_batch as reference_lib
from tests import test_kills
from tests import train_util

SEED = 3  # the evaluation's sample noise (sample i: fold_in(split(PRNGKey(SEED))[0], i))
METRICS = 'fid,precision,recall,accuracy'
EVAL = dict(
  eval__every_steps=2,
  eval__features='digits',
  eval__num_samples=100,
  eval__sample_batch_size=50,
  eval__solver='euler',
  eval__num_steps=2,
  eval__cfg_scale=3.0,
  eval__seed=SEED,
  eval__metrics=METRICS,
)


def smoke_config(cache, xla, **overrides):
  base = dict(
    num_train_steps=3,
    checkpoint_every_steps=100,
    log_every_steps=1,
    keep_checkpoints=1,
    sample__every_steps=-1,
    compilation_cache_dir=xla,
    eval__cache_dir=cache,
    **EVAL,
  )
  base.update(overrides)
  return train_util.digits_config('smoke', **base)


@pytest.fixture(scope='module')
def run(tmp_path_factory, digits_cache):
  """The workdir of 3 steps resumed to 6, its eval rows {step: row} and the config."""
  xla = train_util.xla_cache(tmp_path_factory)
  workdir = str(tmp_path_factory.mktemp('eval_run') / 'workdir')
  train.train_and_evaluate(smoke_config(digits_cache, xla), workdir)
  config = smoke_config(digits_cache, xla, num_train_steps=6)
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if 'eval/fid' in r]
  return workdir, evals, config


def test_scalars_at_every_evaluation_and_the_best_survives_the_resume(run):
  workdir, evals, _ = run
  assert [r['step'] for r in evals] == [2, 3, 4, 6]  # every 2 steps and at each run's end
  for i, r in enumerate(evals):
    assert {
      'eval/fid',
      'eval/precision',
      'eval/recall',
      'eval/accuracy',
      'eval/nfe',
      'eval/seconds',
      'eval/best_step',
    } <= set(r), r
    assert r['eval/nfe'] == 2 and 0 <= r['eval/accuracy'] <= 1 and r['eval/fid'] > 0
    # The best so far, across the resume: the run at steps 4 and 6 ranks against 2 and 3.
    fids = {e['step']: e['eval/fid'] for e in evals[: i + 1]}
    assert r['eval/best_step'] == min(fids, key=lambda s: (fids[s], -s)), (r, fids)
  best = int(evals[-1]['eval/best_step'])
  # keep_checkpoints=1: the last one and the best one (the same step when the last is best).
  assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir)), key=int) == sorted(
    {str(best), '6'}, key=int
  )
  manager = checkpoint.create_manager(workdir, keep=1, best=('fid', 'min'))
  try:
    step, metrics = manager.best()
  finally:
    manager.close()
  assert step == best
  assert metrics == {
    k[5:]: evals[[e['step'] for e in evals].index(best)][k]
    for k in ('eval/fid', 'eval/precision', 'eval/recall', 'eval/accuracy')
  }


def _fid(a, b):
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root.real))


def _radii(x):
  d = np.sum((x[:, None] - x[None]) ** 2, -1)
  return np.sort(d, axis=1)[:, 3]  # the 3rd neighbour, itself not counted


def _covered(points, centres, radii):
  d = np.sum((points[:, None] - centres[None]) ** 2, -1)
  return float(np.mean(np.any(d <= radii[None], axis=1)))


# The digits net's pool features are ReLU outputs: units that no sample activates have zero
# variance, so scipy's sqrtm of the singular product warns (and is still accurate enough here).
@pytest.mark.filterwarnings('ignore:Matrix is singular:scipy.linalg.LinAlgWarning')
def test_scores_are_those_of_the_checkpoint_recomputed_in_float64(run, digits_net):
  """The EMA weights of step 6, sampled as `python -m dimsum_jax.sample` draws (seed SEED,
  labels i % 10, batches of 50), scored here with NumPy/SciPy: the run's step-6 scalars."""
  workdir, evals, config = run
  logged = evals[-1]
  assert logged['step'] == 6
  state, _ = train_util.restore(workdir, config, step=6)
  model = models.create_model(config.model)
  opts = sample.sampling_options(solver='euler', num_steps=2, cfg_scale=3.0, seed=SEED)
  fn = jax.jit(
    lambda p, i, y: sampler.sample_batch(
      p, None, i, y, model=model, config=config, opts=opts, image_shape=(8, 8, 1)
    )[0]
  )
  indices = np.arange(100, dtype=np.int32)
  labels = indices % 10
  images = np.concatenate(
    [np.asarray(fn(state.ema_params, indices[s : s + 50], labels[s : s + 50])) for s in (0, 50)]
  )
  ref_images, _ = digits_features.digits_images(8, 1)
  feats = lambda x: {
    k: np.asarray(v, np.float64) for k, v in digits_net.apply(digits_net.variables, x).items()
  }
  smp, ref = feats(images), feats(ref_images)
  seed = f'seed {SEED}'
  assert logged['eval/fid'] == pytest.approx(_fid(smp['pool'], ref['pool']), rel=1e-5), seed
  assert logged['eval/accuracy'] == np.mean(np.argmax(smp['logits'], 1) == labels), seed
  precision = _covered(smp['pool'], ref['pool'], _radii(ref['pool']))
  recall = _covered(ref['pool'], smp['pool'], _radii(smp['pool']))
  # float32 distances there, float64 here: a point exactly on a radius may fall either way.
  assert logged['eval/precision'] == pytest.approx(precision, abs=0.011), seed
  assert logged['eval/recall'] == pytest.approx(recall, abs=2.5 / len(ref_images)), seed


def test_sample_evaluate_on_an_export_gives_the_runs_scores(run, digits_cache, tmp_path):
  workdir, evals, _ = run
  export.export(workdir, str(tmp_path / 'export'), step=6)
  out = tmp_path / 'samples'
  summary = sample.run(
    checkpoint=str(tmp_path / 'export'),
    out=str(out),
    num_samples=100,
    batch_size=50,
    solver='euler',
    num_steps=2,
    cfg_scale=3.0,
    seed=SEED,
    pngs=False,
    evaluate='digits',
    eval_options={'cache_dir': digits_cache, 'metrics': METRICS},
  )
  with open(out / 'evaluation-digits.json', encoding='utf-8') as f:
    written = json.load(f)
  assert written['samples'] == str(out / 'samples.npz') and written['num_samples'] == 100
  assert written['metrics'] == METRICS.split(',')
  with open(out / 'summary.json', encoding='utf-8') as f:
    assert (
      json.load(f)['evaluation']
      == summary['evaluation']
      == {**written, 'written_to': str(out / 'evaluation-digits.json')}
    )
  logged = evals[-1]
  assert written['fid'] == pytest.approx(logged['eval/fid'], rel=1e-5), f'seed {SEED}'
  for key in ('precision', 'recall', 'accuracy'):
    assert written[key] == pytest.approx(logged[f'eval/{key}'], abs=1e-12), (key, f'seed {SEED}')


def test_sample_evaluate_refusals_come_before_sampling(run, digits_cache, digits_net, tmp_path):
  workdir, _, _ = run
  ref16 = tmp_path / 'digits16.npz'
  reference_lib.save_reference(str(ref16), digits_features.digits_reference(digits_net, 16, 1))
  out = tmp_path / 'out'
  common = dict(
    workdir=workdir,
    out=str(out),
    num_samples=100,
    batch_size=50,
    solver='euler',
    num_steps=2,
    seed=SEED,
  )
  with pytest.raises(
    sample.SampleError,
    match=r'^.* holds 16x16 images but the samples are '
    r'8x8: use the reference batch of the samples\' resolution\.$',
  ):
    sample.run(
      evaluate=str(ref16), eval_options={'features': 'digits', 'cache_dir': digits_cache}, **common
    )
  with pytest.raises(sample.SampleError, match=r'^--metrics applies only with --evaluate'):
    sample.run(eval_options={'metrics': 'fid'}, **common)
  with pytest.raises(
    sample.SampleError,
    match=r'^--evaluate=digits scores with the digits '
    r'features, not --features=inception: leave --features out',
  ):
    sample.run(evaluate='digits', eval_options={'features': 'inception'}, **common)
  with pytest.raises(
    sample.SampleError, match='precision needs at least 100 samples and there are 40'
  ):
    sample.run(
      evaluate='digits',
      eval_options={'cache_dir': digits_cache, 'metrics': METRICS},
      **{**common, 'num_samples': 40},
    )
  assert not out.exists()


def test_sample_command_line_refuses_before_sampling(run, tmp_path):
  """`python -m dimsum_jax.sample --evaluate=...` as a user runs it, with a reference that does
  not exist: exit status 1, one line, nothing written."""
  workdir, _, _ = run
  out, absent = tmp_path / 'out', tmp_path / 'absent.npz'
  r = train_util.run_python(
    [
      '-m',
      'dimsum_jax.sample',
      f'--workdir={workdir}',
      f'--out={out}',
      '--num_samples=100',
      f'--evaluate={absent}',
      '--features=digits',
    ],
    timeout=300,
  )
  assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
    f'error: The reference {absent} does not exist: pass an ADM reference batch (e.g. '
    'VIRTUAL_imagenet256_labeled.npz) or write one with `python -m '
    'dimsum_jax.evaluate.reference`.'
  )
  assert not out.exists()


BAD = [
  (
    'features',
    dict(eval__features='inceptoin'),
    'error: --config.eval.features=inceptoin is not a valid choice: use one of inception, digits.',
  ),
  (
    'few_samples',
    dict(eval__num_samples=50),
    'error: --config.eval.num_samples=50 is too few for precision, which needs at least 100: '
    'raise it, or leave precision out of --config.eval.metrics.',
  ),
  (
    'best_metric',
    dict(eval__metrics='fid,accuracy', eval__best_metric='recall'),
    'error: --config.eval.best_metric=recall is not among the metrics evaluated (fid, '
    'accuracy): add it to --config.eval.metrics, choose one of those, or set '
    '--config.eval.best_metric= to keep no best checkpoint.',
  ),
  (
    'no_sfid_in_digits',
    dict(eval__metrics='', eval__best_metric='sfid'),
    'error: --config.eval.best_metric=sfid is not among the metrics evaluated (fid, is, '
    'precision, recall, accuracy): add it to --config.eval.metrics, choose one of those, or set '
    '--config.eval.best_metric= to keep no best checkpoint.',
  ),
  (
    'no_weights',
    dict(eval__features='inception', eval__reference='ref.npz'),
    "error: The Inception features need weights: set --config.eval.inception_weights to "
    "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (downloaded once), or use "
    "--config.eval.features=digits.",
  ),
]


@pytest.mark.parametrize('case, overrides, message', BAD, ids=[c[0] for c in BAD])
def test_bad_eval_setting_is_one_sentence_before_the_workdir(
  tmp_path, digits_cache, case, overrides, message
):
  del case
  config = smoke_config(digits_cache, '', **overrides)
  with pytest.raises(SystemExit) as e:
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert str(e.value) == message
  assert not (tmp_path / 'workdir').exists()


def test_reference_of_another_resolution_leaves_a_workdir_as_it_was(
  run, tmp_path, digits_cache, digits_net
):
  ref16 = tmp_path / 'digits16.npz'
  reference_lib.save_reference(str(ref16), digits_features.digits_reference(digits_net, 16, 1))
  workdir = str(tmp_path / 'workdir')
  shutil.copytree(run[0], workdir)
  before = train_util.fingerprint(workdir)
  config = smoke_config(digits_cache, '', num_train_steps=8, eval__reference=str(ref16))
  with pytest.raises(SystemExit) as e:
    train.train_and_evaluate(config, workdir)
  assert str(e.value) == (
    f"error: config.eval: {ref16} holds 16x16 images but the samples are "
    "8x8: use the reference batch of the samples' resolution."
  )
  assert train_util.fingerprint(workdir) == before


def test_offline_default_evaluates_and_the_smoke_variants_do_not(digits_cache):
  base = train_util.digits_config('')
  assert base.eval.every_steps > 0 and base.eval.features == 'digits'
  assert base.eval.cfg_scale == 1.0  # the FID-like distance of unguided samples
  assert set(base.eval.metrics.split(',')) == {'fid', 'precision', 'recall', 'accuracy'}
  eval_config.validate(base.eval, base.model)
  for variant in ('smoke', 'smoke_dit', 'dim'):
    assert train_util.digits_config(variant).eval.every_steps == 0
  # Samples without labels (an unconditional model): accuracy leaves the default metrics.
  args = command.eval_args(features='digits', cache_dir=digits_cache)
  assert command.prepare(args, (8, 8, 1), 100, has_labels=False)[2] == (
    'fid',
    'is',
    'precision',
    'recall',
  )


KILL_SEED, KILLS, KILL_STEPS = 5, 3, 18  # seed of the kill moments, kills, steps of the run


@pytest.mark.slow
def test_killed_at_random_moments_keeps_the_best_checkpoint(
  tmp_path, tmp_path_factory, digits_cache
):
  """`python -m dimsum_jax.main` evaluating every 2 of KILL_STEPS steps (keep_checkpoints=1),
  SIGKILLed KILLS times and rerun each time: the final state, the checkpoints kept (the last and
  the best) and their scores equal those of a run never killed, and so does the last logged row
  of every evaluated step. The run climbs its loss (a negative learning rate, the EMA equal to
  the parameters), so that an early evaluation stays the best and its checkpoint must survive
  every rotation and restart. Each kill comes a random moment (seed KILL_SEED) of up to 0.3 s
  after an evaluation logs its scores, while its checkpoint is written or the next steps run."""
  rng = np.random.default_rng(KILL_SEED)
  xla = train_util.xla_cache(tmp_path_factory)

  def args(workdir):
    return [
      '-m',
      'dimsum_jax.main',
      f'--workdir={workdir}',
      *train_util.flags(
        'smoke_dit',
        num_train_steps=KILL_STEPS,
        checkpoint_every_steps=100,
        log_every_steps=2,
        keep_checkpoints=1,
        sample__every_steps=-1,
        compilation_cache_dir=xla,
        optim__learning_rate=-0.01,
        optim__ema_decay=0.0,
        eval__cache_dir=digits_cache,
        **{**EVAL, 'eval__metrics': 'fid,accuracy'},
      ),
    ]

  def evals(workdir):
    rows = {}
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
      for row in map(json.loads, f):
        if 'eval/fid' in row:  # a step evaluated again after a kill: its last row
          rows[row['step']] = {k: v for k, v in row.items() if k not in ('time', 'eval/seconds')}
    return rows

  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  test_kills.run_to_the_end(args(straight), str(tmp_path / 'straight.log'), KILL_SEED)
  moments = []
  for i, step in enumerate(sorted(rng.choice(np.arange(2, KILL_STEPS, 2), KILLS, replace=False))):
    log = str(tmp_path / f'run_{i}.log')
    proc = test_kills.launch(args(killed), log)
    try:
      delay = rng.uniform(0, 0.3)
      if test_kills.kill_at(proc, log, f'Evaluation at step {step} ', delay):
        moments.append(
          f'{delay:.2f} s after step {step} (kept {test_kills.checkpoint_steps(killed)})'
        )
    finally:
      if proc.poll() is None:
        proc.kill()
  test_kills.run_to_the_end(args(killed), str(tmp_path / 'last.log'), KILL_SEED)
  what = f'seed {KILL_SEED}, kills at {moments}'
  print(what)
  assert len(moments) == KILLS, f'{what}: a run ended before its kill'
  rows = evals(straight)
  assert evals(killed) == rows, what
  for step, row in rows.items():  # the best so far, ties to the newer step
    fids = {s: r['eval/fid'] for s, r in rows.items() if s <= step}
    assert row['eval/best_step'] == min(fids, key=lambda s: (fids[s], -s)), (what, rows)
  best_step = int(rows[KILL_STEPS]['eval/best_step'])
  assert best_step < KILL_STEPS - 2, f'{what}: the best is not an early step ({best_step})'
  assert (
    test_kills.checkpoint_steps(killed)
    == test_kills.checkpoint_steps(straight)
    == [best_step, KILL_STEPS]
  ), what
  config = train_util.digits_config('smoke_dit')
  train_util.assert_trees_equal(
    train_util.restore(killed, config)[0], train_util.restore(straight, config)[0], what=what
  )
  bests = []
  for workdir in (killed, straight):
    manager = checkpoint.create_manager(workdir, keep=1, best=('fid', 'min'))
    try:
      bests.append(manager.best())
    finally:
      manager.close()
  assert bests[0] == bests[1] and bests[0][0] == best_step, what
