"""The full training ConfigDict with every field and its default; configs/*.py start from it.

Sections: model (dimsum_jax.models), transport (dimsum_jax.transport), data (dimsum_jax.data),
init_from (dimsum_jax.warm_start), optim, mesh + sharding_rules, sample, eval
(dimsum_jax.evaluate.config), vae, and the loop's own fields below. Every field exists here, so
`--config.x.y=v` overrides are type-checked and unknown keys are refused.
"""

import importlib.machinery
import importlib.util
import os
import traceback

import ml_collections

from dimsum_jax import models
from dimsum_jax import optim
from dimsum_jax import sampling
from dimsum_jax import transport
from dimsum_jax import warm_start
from dimsum_jax.data import config as data_config
from dimsum_jax.evaluate import config as eval_config


def image_shape(config):
  """(H, W, C) of one model input: the image or latent the network sees."""
  return (config.model.input_size, config.model.input_size, config.model.in_channels)


def base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = models.default_model_config()
  c.transport = transport.default_transport_config()
  c.data = data_config.default_data_config()
  c.init_from = warm_start.default_config()  # start from another run's weights ('' = none)

  c.num_train_steps = 100_000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5_000
  c.keep_checkpoints = 3  # the last k checkpoints are kept
  # Persistent XLA compilation cache: a second run of the same step loads it instead of
  # compiling ('' = off; ~ is the user's home).
  c.compilation_cache_dir = '~/.cache/dimsum_jax/xla'

  # Upstream: AdamW (torch defaults, no weight decay), constant lr, grad-norm clip, EMA 0.9999.
  c.optim = optim.default_optim_config()

  # Devices: a mesh of (data, fsdp); -1 takes the remaining devices. Parameters, EMA and
  # optimiser state are placed by (regex on the leaf path, 'fsdp' | 'replicate') rules.
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1})
  c.sharding_rules = (('(params|ema_params|opt_state)/.*', 'fsdp'), ('.*', 'replicate'))

  # EMA sample grids written to WORKDIR/samples/ (sampling.default_grid_config).
  c.sample = sampling.default_grid_config()

  # Evaluation during training (off by default): every `every_steps` steps and at the end,
  # `num_samples` EMA samples scored with `features` (digits | inception + a reference batch);
  # eval/<metric> scalars, and the checkpoint of the best `best_metric` is kept.
  c.eval = eval_config.default_eval_config()

  # SD VAE converted by `python -m dimsum_jax.vae.convert` ('' = none). With pixel data and a
  # latent model, each batch is encoded (a fresh posterior sample every step, as upstream);
  # sample grids of latent models are decoded with it.
  c.vae = ml_collections.ConfigDict({'dir': ''})
  return c


def validate(config) -> None:
  """Each section's own validation (ValueError, one sentence), before anything is written:
  model (models.validate), transport, optim and sample (the training grids). The data section is
  validated where the pipeline opens it (data.config.validate), also before anything is written:
  its paths are often given only on the command line."""
  models.validate(config.model)
  transport.validate(config.transport)
  optim.validate(config.optim)
  sampling.validate_grid_config(config.sample)


def check_variant(arg, variants, path):
  """Refuses, in one sentence, a `--config=path:arg` variant that the file does not define."""
  if arg not in variants:
    names = ', '.join(repr(v) if v == '' else v for v in variants)
    raise ValueError(f'Unknown variant {arg!r} of {path}: use one of {names}.')


def as_dit(c, name='DiT-XL/2'):
  """The DiT baseline of a DiMSUM config, in place: the same data, objective, optimiser and
  schedule; the model becomes `name` and the fields it does not read go back to their defaults
  (create_model refuses them otherwise)."""
  defaults = models.default_model_config()
  c.model.name = name
  for key in defaults:
    if key not in models.fields_read(name):
      c.model[key] = defaults[key]
  return c


def as_dim(c, name='DiM-L/2'):
  """A DiM run on the data of a DiMSUM config, in place: the model becomes `name` (fields DiM does
  not read back at their defaults) with DiM's own objective (the discrete scaled-linear schedule,
  noise prediction) and AdamW (betas 0.99/0.99, eps 1e-15, constant lr, clip 1.0, EMA 0.9999);
  the EMA grids integrate the probability-flow ODE (heun, 25 steps). Learning rate, weight decay,
  warm-up, batch and length stay the caller's."""
  as_dit(c, name)  # the same reset: every field the model does not read
  c.transport.path_type = 'ScaledLinear'
  c.transport.prediction = 'noise'
  c.optim.b1 = 0.99
  c.optim.b2 = 0.99
  c.optim.eps = 1e-15
  c.optim.schedule = 'constant'
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999
  c.sample.solver = 'heun'
  c.sample.num_steps = 25
  return c


class ConfigFileError(ValueError):
  """A config file that does not exist or cannot be run; the message names it and the fix."""


def _error_where(e: BaseException, path: str) -> str:
  """'SyntaxError at line 3: ...': the error and the line of the config file it comes from."""
  if isinstance(e, SyntaxError) and e.lineno:
    return f"SyntaxError at line {e.lineno}: {e.msg}"
  lines = [
    f.lineno
    for f in traceback.extract_tb(e.__traceback__)
    if os.path.abspath(f.filename) == os.path.abspath(path)
  ]
  text = str(e).strip().splitlines()
  where = f" at line {lines[-1]}" if lines else ""
  return f"{type(e).__name__}{where}" + (f": {text[0][:200]}" if text else "")


def load_config_file(spec: str, flag: str = "--config") -> ml_collections.ConfigDict:
  """The ConfigDict of a config file given as `path.py` or `path.py:arg` (the argument of its
  get_config; split at the first ':' as ml_collections' config flags split it).

  A missing file, one that does not run, defines no get_config() or whose get_config fails or
  returns something else raise ConfigFileError, one sentence naming `flag`, the file and the fix.
  """
  path, has_arg, arg = spec.partition(":")
  if not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "does not exist"
    raise ConfigFileError(
      f"{flag}={spec}: {path} {what}; pass a config file such as configs/digits.py."
    )
  loader = importlib.machinery.SourceFileLoader("dimsum_jax_config_file", path)
  try:
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  (whatever the file raises)
    raise ConfigFileError(
      f"{flag}={spec}: {path} cannot be run ({_error_where(e, path)}"
      "); fix the file or pass another config file."
    ) from e
  if not callable(getattr(module, "get_config", None)):
    raise ConfigFileError(
      f"{flag}={spec}: {path} defines no get_config(); a config file returns "
      "its ConfigDict from get_config(), as configs/digits.py does."
    )
  try:
    config = module.get_config(arg) if has_arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    call = f"get_config({arg!r})" if has_arg else "get_config()"
    raise ConfigFileError(
      f"{flag}={spec}: {call} of {path} failed "
      f"({_error_where(e, path)}); fix the file"
      + (" or the argument after ':'." if has_arg else ".")
    ) from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigFileError(
      f"{flag}={spec}: get_config() of {path} returned a "
      f"{type(config).__name__}, not an ml_collections.ConfigDict; return "
      "the config, as configs/digits.py does."
    )
  return config
