"""Every config file loads, holds upstream's numbers, and refuses unknown keys and wrong types."""

import glob
import importlib.util
import os
import subprocess
import sys

import ml_collections
import pytest

from dimsum_jax import config_utils
from dimsum_jax import models
from dimsum_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, (module.get_config(arg) if arg is not None else module.get_config())


def variants():
  """(path, variant) of every config file and each variant it declares."""
  out = []
  for path in CONFIG_FILES:
    module, _ = load(path)
    out += [(path, v) for v in module.VARIANTS]
  return out


VARIANTS = variants()


def flat(config, prefix=''):
  out = {}
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(flat(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


def test_there_are_configs_for_every_dataset():
  names = {(os.path.basename(p)[:-3], v) for p, v in VARIANTS}
  for base in ('imagenet256', 'imagenet512', 'celebahq256', 'celebahq512', 'church256'):
    assert (base, '') in names and (base, 'dit') in names
  for base in ('imagenet256', 'imagenet512', 'digits'):
    assert (base, 'dim') in names
  assert ('digits', '') in names


@pytest.mark.parametrize(
  'path,variant', VARIANTS, ids=[f'{os.path.basename(p)}:{v}' for p, v in VARIANTS]
)
def test_config_is_complete_and_documented(path, variant):
  module, config = load(path, variant)
  assert isinstance(config, ml_collections.ConfigDict)
  name = os.path.basename(path) + (f':{variant}' if variant else '')
  assert f'python -m dimsum_jax.main --config=configs/{name} ' in module.__doc__
  models.create_model(config.model)  # builds: every field it sets is one the model reads
  # Same fields as the base config (an experiment sets values, never adds keys).
  assert set(flat(config)) == set(flat(config_utils.base_config()))
  assert config.model.name in models.MODEL_NAMES
  train.check_choices(config)  # every enum field (transport, solver, model) is a valid choice
  assert (
    config.model.input_size
    * (8 if config.model.in_channels == 4 and config.data.channels == 3 else 1)
    == config.data.image_size
  )
  if variant.startswith('smoke') or (name.startswith('digits') and variant == 'dim'):
    return  # test and tutorial variants: their own optimiser settings
  if config.model.name.startswith('DiM-'):  # DiM's own AdamW (dim-reference, training)
    assert (config.optim.b1, config.optim.b2, config.optim.eps) == (0.99, 0.99, 1e-15)
    assert config.transport.path_type == 'ScaledLinear'
    assert config.transport.prediction == 'noise'
  else:  # upstream DiMSUM's AdamW: torch defaults, no weight decay
    assert config.optim.b1 == 0.9 and config.optim.b2 == 0.999 and config.optim.eps == 1e-8
    assert config.optim.weight_decay == 0.0
  assert 0.99 <= config.optim.ema_decay < 1


UPSTREAM = {  # DiMSUM's scripts/train.sh and train.py: (model, global batch, lr, grad clip, label dropout, classes)
  'imagenet256': ('DiMSUM-L/2', 704, 1e-4, 1.0, 0.15, 1000),
  'celebahq256': ('DiMSUM-L/2', 16, 1e-4, 2.0, 0.0, 0),
  'celebahq512': ('DiMSUM-L/2', 32, 1e-4, 2.0, 0.0, 0),
  'church256': ('DiMSUM-XL/2', 128, 5e-5, 2.0, 0.0, 0),
}


@pytest.mark.parametrize('name', sorted(UPSTREAM))
def test_upstream_hyperparameters(name):
  _, c = load(os.path.join(ROOT, 'configs', f'{name}.py'))
  model, batch, lr, clip, label_dropout, classes = UPSTREAM[name]
  assert (
    c.model.name,
    c.data.global_batch_size,
    c.optim.learning_rate,
    c.optim.grad_clip,
    c.model.label_dropout,
    c.model.num_classes,
  ) == (model, batch, lr, clip, label_dropout, classes)
  assert c.optim.schedule == 'constant' and c.optim.warmup_steps == 0
  assert c.optim.ema_decay == 0.9999 and c.model.drop_path == 0.1
  assert c.model.dtype == 'bfloat16' and c.model.cond_mamba == 'none'
  assert c.transport.path_type == 'GVP' and c.transport.prediction == 'velocity'


@pytest.mark.parametrize(
  'name', ['imagenet256', 'imagenet512', 'celebahq256', 'celebahq512', 'church256']
)
def test_dit_baseline_differs_only_in_the_model(name):
  _, dimsum = load(os.path.join(ROOT, 'configs', f'{name}.py'))
  _, dit = load(os.path.join(ROOT, 'configs', f'{name}.py'), 'dit')
  a, b = flat(dimsum), flat(dit)
  # The name, and drop path: DiT has none (create_model refuses a field the model ignores).
  assert {k for k in a if a[k] != b[k]} == {'model.name', 'model.drop_path'}
  assert b['model.name'] == 'DiT-XL/2' and b['model.drop_path'] == 0.0


def test_digits_variants():
  path = os.path.join(ROOT, 'configs', 'digits.py')
  for arg, name in (('smoke', 'DiMSUM-L/2'), ('smoke_dit', 'DiT-S/2')):
    _, c = load(path, arg)
    assert c.model.name == name and c.model.depth == 4 and c.model.input_size == 8
  with pytest.raises(
    ValueError,
    match=r"Unknown variant 'nope' of configs/digits.py: use one "
    r"of '', smoke, smoke_dit, dim, finetune32\.",
  ):
    load(path, 'nope')


def run_main(*flags, workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'dimsum_jax.main',
      '--config=configs/digits.py',
      f'--workdir={workdir}',
      *flags,
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_unknown_key_is_refused_with_its_name(tmp_path):
  r = run_main('--config.optim.learnin_rate=0.1', workdir=tmp_path / 'w')
  assert r.returncode != 0
  assert (
    '--config.optim.learnin_rate=0.1: config key "learnin_rate" does not exist: did you '
    'mean "learning_rate"?'
  ) in r.stderr
  assert 'Traceback' not in r.stderr
  assert not (tmp_path / 'w').exists()


def test_wrong_type_is_refused_with_its_name(tmp_path):
  r = run_main('--config.model.depth=two', workdir=tmp_path / 'w')
  assert r.returncode != 0
  assert '--config.model.depth=two' in r.stderr
  assert 'Traceback' not in r.stderr
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize(
  'name,arg,source,source_arg',
  [
    ('imagenet512', 'finetune', 'imagenet256', None),
    ('imagenet512', 'dim_finetune', 'imagenet256', 'dim_h'),
    ('digits', 'finetune32', 'digits', ''),
  ],
)
def test_finetune_variants_warm_start_the_same_model_at_twice_the_size(
  name, arg, source, source_arg
):
  """The weak-to-strong configs: another model input size than their source's, the same
  network otherwise (dimsum_jax.warm_start carries the weights across), and a source named."""
  _, c = load(os.path.join(ROOT, 'configs', f'{name}.py'), arg)
  _, base = load(os.path.join(ROOT, 'configs', f'{source}.py'), source_arg)
  assert c.init_from.path and c.init_from.interpolation == 'auto'
  assert c.model.input_size == 2 * base.model.input_size
  same = ('name', 'in_channels', 'num_classes', 'depth', 'hidden_size', 'attn_every')
  assert all(c.model[k] == base.model[k] for k in same)
  train.check_choices(c)
  with pytest.raises(ValueError, match='Unknown variant'):
    load(os.path.join(ROOT, 'configs', f'{name}.py'), 'nope')
