"""config.eval's validation: one sentence per mistake, naming the field and the fix."""

import ml_collections
import pytest

from dimsum_jax import config_utils
from dimsum_jax.evaluate import config as eval_config


def model(num_classes=10, label_dropout=0.1, in_channels=1):
  return ml_collections.ConfigDict(
    dict(num_classes=num_classes, label_dropout=label_dropout, in_channels=in_channels)
  )


def digits_eval(**overrides):
  c = eval_config.default_eval_config()
  c.update(
    dict(
      every_steps=100,
      features='digits',
      num_samples=200,
      sample_batch_size=8,
      cfg_scale=2.0,
      metrics='fid,precision,accuracy',
    )
  )
  c.update(overrides)
  return c


def test_the_training_config_carries_the_section_with_its_defaults():
  assert config_utils.base_config().eval.to_dict() == eval_config.default_eval_config().to_dict()
  eval_config.validate(eval_config.default_eval_config())  # off: Inception needs nothing yet
  eval_config.validate(digits_eval(), model(), num_devices=8)
  eval_config.validate(digits_eval(), model(in_channels=4), vae_dir='vae')


BAD = [  # (case, overrides, model, devices, message)
  (
    'features',
    dict(features='inceptoin', every_steps=0),
    model(),
    1,
    '--config.eval.features=inceptoin is not a valid choice: use one of inception, digits.',
  ),
  (
    'preprocess',
    dict(preprocess='torch', every_steps=0),
    model(),
    1,
    '--config.eval.preprocess=torch is not a valid choice: use one of pytorch_fid, tf.',
  ),
  (
    'solver',
    dict(solver='rk4', every_steps=0),
    model(),
    1,
    '--config.eval.solver=rk4 is not a valid choice: use one of dopri5, euler, heun.',
  ),
  (
    'best_metric',
    dict(best_metric='FID', every_steps=0),
    model(),
    1,
    "--config.eval.best_metric=FID is not a metric: use one of fid, sfid, is, precision, "
    "recall, accuracy, or '' to keep no best checkpoint.",
  ),
  (
    'metrics',
    dict(metrics='fid,kid', every_steps=0),
    model(),
    1,
    "--config.eval.metrics=fid,kid names an unknown metric: use a comma-separated subset of "
    "fid,sfid,is,precision,recall,accuracy, or '' for all that apply.",
  ),
  (
    'every_steps',
    dict(every_steps=-5),
    model(),
    1,
    '--config.eval.every_steps=-5 must be 0 (off) or positive.',
  ),
  (
    'num_samples',
    dict(num_samples=0, every_steps=0),
    model(),
    1,
    '--config.eval.num_samples=0 must be positive.',
  ),
  (
    'cfg_nan',
    dict(cfg_scale=float('nan')),
    model(),
    1,
    '--config.eval.cfg_scale=nan must be a finite number.',
  ),
  (
    'weights',
    dict(features='inception', reference='ref.npz'),
    model(),
    1,
    "The Inception features need weights: set --config.eval.inception_weights to pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth (downloaded once), or use "
    "--config.eval.features=digits.",
  ),
  (
    'reference',
    dict(features='inception', inception_weights='w.pth'),
    model(),
    1,
    'The Inception features need a reference batch: set --config.eval.reference to an '
    'ADM-style .npz (e.g. VIRTUAL_imagenet256_labeled.npz, or one written by `python -m '
    'dimsum_jax.evaluate.reference`).',
  ),
  (
    'latents',
    dict(),
    model(in_channels=4),
    1,
    "Evaluation scores images, and this model's samples are 4-channel latents: set "
    "--config.vae.dir to the VAE that decodes them, or --config.eval.every_steps=0.",
  ),
  (
    'devices',
    dict(sample_batch_size=12),
    model(),
    8,
    '--config.eval.sample_batch_size=12 does not divide over 8 devices: use a multiple of 8.',
  ),
  (
    'cfg_unconditional',
    dict(metrics='fid'),
    model(num_classes=0),
    1,
    '--config.eval.cfg_scale=2.0 needs a class-conditional model; this one is unconditional: '
    'use --config.eval.cfg_scale=1.',
  ),
  (
    'cfg_no_dropout',
    dict(),
    model(label_dropout=0.0),
    1,
    '--config.eval.cfg_scale=2.0 needs a model trained with label dropout (its null class is '
    'never trained otherwise): use --config.eval.cfg_scale=1.',
  ),
  (
    'accuracy_unconditional',
    dict(cfg_scale=1.0),
    model(num_classes=0),
    1,
    'The sample accuracy needs a class-conditional model: leave accuracy out of '
    '--config.eval.metrics.',
  ),
  (
    'few_samples',
    dict(num_samples=99),
    model(),
    1,
    '--config.eval.num_samples=99 is too few for precision, which needs at least 100: raise '
    'it, or leave precision out of --config.eval.metrics.',
  ),
  (
    'best_not_evaluated',
    dict(best_metric='recall'),
    model(),
    1,
    '--config.eval.best_metric=recall is not among the metrics evaluated (fid, precision, '
    'accuracy): add it to --config.eval.metrics, choose one of those, or set '
    '--config.eval.best_metric= to keep no best checkpoint.',
  ),
]


@pytest.mark.parametrize(
  'case, overrides, model_config, devices, message', BAD, ids=[b[0] for b in BAD]
)
def test_each_mistake_is_one_sentence(case, overrides, model_config, devices, message):
  del case
  with pytest.raises(eval_config.EvalConfigError) as e:
    eval_config.validate(digits_eval(**overrides), model_config, num_devices=devices)
  assert str(e.value) == message


def test_settings_read_only_when_evaluating_are_not_checked_when_off():
  off = dict(every_steps=0)
  for overrides in (
    dict(sample_batch_size=12),
    dict(num_samples=50),
    dict(best_metric='recall'),
    dict(features='inception'),
  ):
    eval_config.validate(digits_eval(**overrides, **off), model(label_dropout=0.0), 8)


def test_best_names_the_score_and_its_direction():
  c = eval_config.default_eval_config()
  assert eval_config.best(c) == ('fid', 'min')
  for name, want in (
    ('sfid', ('sfid', 'min')),
    ('is', ('inception_score', 'max')),
    ('precision', ('precision', 'max')),
    ('accuracy', ('accuracy', 'max')),
    ('', None),
  ):
    c.best_metric = name
    assert eval_config.best(c) == want, name
