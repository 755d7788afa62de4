"""The `config.eval` block: its defaults and its validation, in one place.

The first fields say what is scored and against what (read by features.build_feature_net,
reference.reference_for, the evaluation commands); the last ones when and how a training run
samples for it (read by dimsum_jax.evaluate.training). `validate(c, model_config, num_devices)`
refuses every mistake that needs no file in one sentence naming the field and the fix
(EvalConfigError); `check_metrics` does the same for the metrics that the feature net and the
reference resolve to. The training loop calls both before its workdir is touched.
"""

from __future__ import annotations

import math

import ml_collections

from dimsum_jax import sampling
from dimsum_jax.evaluate import metrics as metrics_lib

FEATURES = ("inception", "digits")
PREPROCESS = ("pytorch_fid", "tf")
LOWER_IS_BETTER = ("fid", "sfid")


class EvalConfigError(ValueError):
  """A config.eval mistake; the message names the field and the fix."""


def default_eval_config() -> ml_collections.ConfigDict:
  """Defaults: Inception features (weights and reference to be set), evaluation off."""
  c = ml_collections.ConfigDict()
  c.features = "inception"  # one of FEATURES
  c.inception_weights = ""  # pytorch-fid's pt_inception-2015-12-05-*.pth (or its .npz)
  c.preprocess = "pytorch_fid"  # Inception input: pytorch_fid | tf (the TF graph's resize)
  c.reference = ""  # ADM-style reference batch .npz ('' with digits: the digits set)
  c.metrics = ""  # e.g. "fid,sfid,is,precision,recall" ('' = all possible)
  c.batch_size = 50  # images per device per extraction step
  c.cache_dir = "~/.cache/dimsum_jax"  # the fitted digits net
  # During training (dimsum_jax.evaluate.training): every `every_steps` steps and at the last
  # one (0 = never), `num_samples` EMA samples in global batches of `sample_batch_size` (split
  # over every device), by the ODE `solver` (euler | heun: `num_steps`; dopri5: adaptive) with
  # guidance `cfg_scale`; sample i starts from the noise of (seed, i).
  c.every_steps = 0
  c.num_samples = 10_000
  c.sample_batch_size = 256
  c.solver = "euler"
  c.num_steps = 50
  c.cfg_scale = 1.0
  c.seed = 0
  # The checkpoint of the best value of this metric is kept besides the last keep_checkpoints
  # ('' = none; fid and sfid: lowest, the others: highest).
  c.best_metric = "fid"
  return c


def _flag(key, value):
  return f"--config.eval.{key}={value}"


def validate(c, model_config=None, num_devices: int = 1, vae_dir: str = "") -> None:
  """EvalConfigError for a mistake in config.eval `c`. The choices and counts are checked
  whether or not evaluation is on (a typo is refused either way); with every_steps > 0 also what
  the run needs: weights and a reference for Inception, images to score (a latent model needs
  config.vae.dir), guidance the model can give (model_config), a sample batch that splits over
  `num_devices`, enough samples."""
  for key, choices in (
    ("features", FEATURES),
    ("preprocess", PREPROCESS),
    ("solver", sampling.ODE_SOLVERS),
  ):
    if str(c[key]) not in choices:
      raise EvalConfigError(
        f"{_flag(key, c[key])} is not a valid choice: use one of {', '.join(choices)}."
      )
  if c.best_metric and c.best_metric not in metrics_lib.METRICS:
    raise EvalConfigError(
      f"{_flag('best_metric', c.best_metric)} is not a metric: use one of "
      f"{', '.join(metrics_lib.METRICS)}, or '' to keep no best checkpoint."
    )
  requested = _requested(c)
  if c.every_steps < 0:
    raise EvalConfigError(f"{_flag('every_steps', c.every_steps)} must be 0 (off) or positive.")
  for key in ("num_samples", "sample_batch_size", "num_steps", "batch_size"):
    if c[key] < 1:
      raise EvalConfigError(f"{_flag(key, c[key])} must be positive.")
  if not math.isfinite(c.cfg_scale):
    raise EvalConfigError(f"{_flag('cfg_scale', c.cfg_scale)} must be a finite number.")
  if not c.every_steps:
    return
  if c.features == "inception" and not c.inception_weights:
    raise EvalConfigError(
      "The Inception features need weights: set "
      "--config.eval.inception_weights to pytorch-fid's "
      "pt_inception-2015-12-05-6726825d.pth (downloaded once), or use "
      "--config.eval.features=digits."
    )
  if c.features == "inception" and not c.reference:
    raise EvalConfigError(
      "The Inception features need a reference batch: set "
      "--config.eval.reference to an ADM-style .npz (e.g. "
      "VIRTUAL_imagenet256_labeled.npz, or one written by `python -m "
      "dimsum_jax.evaluate.reference`)."
    )
  if model_config is not None and model_config.in_channels not in (1, 3) and not vae_dir:
    raise EvalConfigError(
      "Evaluation scores images, and this model's samples are "
      f"{model_config.in_channels}-channel latents: set --config.vae.dir to "
      "the VAE that decodes them, or --config.eval.every_steps=0."
    )
  if c.sample_batch_size % num_devices:
    raise EvalConfigError(
      f"{_flag('sample_batch_size', c.sample_batch_size)} does not divide "
      f"over {num_devices} devices: use a multiple of {num_devices}."
    )
  if model_config is not None and c.cfg_scale != 1.0:
    if model_config.num_classes == 0:
      raise EvalConfigError(
        f"{_flag('cfg_scale', c.cfg_scale)} needs a class-conditional "
        "model; this one is unconditional: use --config.eval.cfg_scale=1."
      )
    if model_config.label_dropout <= 0:
      raise EvalConfigError(
        f"{_flag('cfg_scale', c.cfg_scale)} needs a model trained with "
        "label dropout (its null class is never trained otherwise): use "
        "--config.eval.cfg_scale=1."
      )
  if requested:
    check_metrics(c, requested, conditional=model_config is None or model_config.num_classes > 0)


def _requested(c) -> tuple[str, ...]:
  """The metrics named by c.metrics (() for '': all that the features and reference allow)."""
  if not str(c.metrics).strip():
    return ()
  try:
    return metrics_lib.parse_metrics(str(c.metrics))
  except metrics_lib.EvaluationError:
    raise EvalConfigError(
      f"{_flag('metrics', c.metrics)} names an unknown metric: use a "
      f"comma-separated subset of {','.join(metrics_lib.METRICS)}, or '' for "
      "all that apply."
    ) from None


def check_metrics(c, metrics, conditional: bool = True) -> None:
  """EvalConfigError when the metrics evaluated (c.metrics, or all that the net and reference
  allow) do not fit c.num_samples, the labels, or c.best_metric."""
  for m in metrics:
    need = metrics_lib.MIN_SAMPLES[m]
    if c.num_samples < need:
      raise EvalConfigError(
        f"{_flag('num_samples', c.num_samples)} is too few for {m}, which "
        f"needs at least {need}: raise it, or leave {m} out of "
        "--config.eval.metrics."
      )
  if "accuracy" in metrics and not conditional:
    raise EvalConfigError(
      "The sample accuracy needs a class-conditional model: leave accuracy "
      "out of --config.eval.metrics."
    )
  if c.best_metric and c.best_metric not in metrics:
    raise EvalConfigError(
      f"{_flag('best_metric', c.best_metric)} is not among the metrics "
      f"evaluated ({', '.join(metrics)}): add it to --config.eval.metrics, "
      "choose one of those, or set --config.eval.best_metric= to keep no "
      "best checkpoint."
    )


def best(c) -> tuple[str, str] | None:
  """(the best metric's key in the scores, 'min' | 'max'), or None when c.best_metric is ''."""
  if not c.best_metric:
    return None
  name = str(c.best_metric)
  return metrics_lib.OUTPUT_KEY.get(name, name), "min" if name in LOWER_IS_BETTER else "max"
