"""Flow matching with stochastic interpolants (SiT's `transport`, as DiMSUM uses it).

Convention: x0 ~ N(0, I) is noise, x1 is data, t in [0, 1] per sample, t = 0 noise, t = 1 data.

  x_t = alpha_t x1 + sigma_t x0            u_t = d/dt x_t = alpha'_t x1 + sigma'_t x0

Paths (`path_type`):
  "GVP"     alpha = sin(pi t / 2), sigma = cos(pi t / 2)          (DiMSUM's published choice)
  "Linear"  alpha = t,             sigma = 1 - t
  "VP"      alpha = exp(m(t)), sigma = sqrt(1 - alpha^2),
            m(t) = -(1 - t)^2 (s_max - s_min) / 4 - (1 - t) s_min / 2,  s_min 0.1, s_max 20
  "ScaledLinear"  DiM's discrete diffusion (upstream DiM train_ldm_discrete.py): Stable
            Diffusion's 1000 "scaled linear" betas,
            beta_n = linspace(sqrt(0.00085), sqrt(0.012), 1000)_n^2,
            alphabar_n = prod_{i<=n} (1 - beta_i), noise prediction only (`LSimple`). The network
            takes DiM's time, `network_time(t) = 1000 (1 - t)`: training draws n ~ U{1..1000}
            (t = 1 - n/1000; `loss_at` snaps t to that grid, so the network sees n exactly and
            x_t = sqrt(alphabar_n) x1 + sqrt(1 - alphabar_n) x0). Between the grid times (the
            samplers) log alpha is DPM-Solver's 'discrete' schedule: piecewise linear in
            t_cont = 1 - t through 0.5 log alphabar_n at t_cont = n/1000 (linear beyond the ends),
            sigma = sqrt(1 - alpha^2), so the probability-flow ODE below is the one DPM-Solver
            integrates. Labels are dropped for guidance in the model (`model.label_dropout`).
            Not reproduced: upstream's bfloat16 rounding of n under mixed precision.

Predictions (`prediction`): what the network outputs at (x_t, t).
  "velocity"  v(x, t) = E[u_t | x_t = x]                 (default; the PF-ODE drift itself)
  "noise"     eps(x, t) = E[x0 | x_t = x]
  "score"     s(x, t) = grad log p_t(x) = -eps(x, t) / sigma_t

All three are affine in each other given (x, t); with D = alpha sigma' - sigma alpha' (D = -pi/2 for GVP,
-1 for Linear, -alpha'/sigma for VP), solving x = alpha x1^ + sigma eps, v = alpha' x1^ + sigma' eps:

  eps = (alpha v - alpha' x) / D       x1^ = (sigma' x - sigma v) / D       v = (alpha' x + D eps) / alpha

These are upstream's `get_score_from_velocity` / `get_noise_from_velocity` / `compute_drift` formulas
multiplied through by alpha' (no division by alpha' or alpha except where it is intrinsic).

Loss (upstream `training_losses`, per sample, mean over all non-batch axes):
  velocity  |v - u_t|^2                       (loss_weight ignored, as upstream)
  noise     w |eps - x0|^2
  score     w |s sigma_t + x0|^2
  w = 1 ("none"), (g_t / sigma_t)^2 ("velocity"), g_t / sigma_t^2 ("likelihood"), where
  g_t = (alpha'/alpha) sigma^2 - sigma sigma' is upstream's `compute_drift` "diffusion" (`drift_var`).

Time intervals follow upstream's `check_interval` (see `time_interval`), with its eps defaults:
VP: train_eps 1e-5, sample_eps 1e-3; GVP/Linear with noise or score: both 1e-3; velocity with
GVP/Linear: both 0; ScaledLinear: both 1e-3 (DiM samples down to t_cont = 1/1000). Two deliberate differences, both to upstream bugs or dead ends:
  - upstream's `create_transport` leaves sample_eps = None (and VP sampling then fails) when it is not
    given, because it tests the already-defaulted train_eps; here None means the 1e-3 default.
  - upstream forces train_eps = sample_eps = 0 for velocity with GVP/Linear even when given; here an
    explicitly set value is used (needed e.g. for the SBDM diffusion, which is infinite at t = 0).

Configuration: `default_transport_config()` is the ConfigDict section `config.transport`. Its values are
read at trace time (Python constants); do not pass a ConfigDict through a jit boundary.
Not ported: upstream's DCT blurring (`use_blurring`, unused in every script) and the likelihood ODE.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from dimsum_jax import choices

PATH_TYPES = ("GVP", "Linear", "VP", "ScaledLinear")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = ("none", "velocity", "likelihood")
T_SAMPLINGS = ("uniform", "logit_normal")
DIFFUSION_FORMS = (
  "none",
  "constant",
  "SBDM",
  "sigma",
  "linear",
  "decreasing",
  "increasing-decreasing",
  "log",
)

VP_SIGMA_MIN = 0.1
VP_SIGMA_MAX = 20.0

# DiM's discrete schedule ("ScaledLinear"): Stable Diffusion's betas over 1000 steps.
DISCRETE_STEPS = 1000
SD_BETA_START = 0.00085
SD_BETA_END = 0.012


def default_transport_config() -> ml_collections.ConfigDict:
  """The `transport` section: DiMSUM's published setting (GVP, velocity, no weight, uniform t)."""
  c = ml_collections.ConfigDict()
  c.path_type = "GVP"  # GVP | Linear | VP
  c.prediction = "velocity"  # velocity | noise | score
  c.loss_weight = "none"  # none | velocity | likelihood (noise/score predictions only)
  c.t_sampling = "uniform"  # uniform | logit_normal (upstream spells it "logitnormal")
  c.logit_normal_mean = -0.5  # t = sigmoid(mean + std * n), n ~ N(0, 1)
  c.logit_normal_std = 1.0
  c.train_eps = config_dict.placeholder(float)  # None -> upstream default for path/prediction
  c.sample_eps = config_dict.placeholder(float)
  return c


# ------------------------------------------------------------------------------------------------
# Names


def _canon(value, choices, what):
  if value is None and what in ("loss_weight", "diffusion_form"):
    value = "none"
  key = str(value).lower().replace("_", "-")
  aliases = {
    "logitnormal": "logit_normal",
    "logit-normal": "logit_normal",
    "scaled-linear": "ScaledLinear",
  }
  key = aliases.get(key, key)
  for choice in choices:
    if key == choice.lower().replace("_", "-") or key == choice:
      return choice
  raise ValueError(f"unknown {what} {value!r}; expected one of {choices}")


def validate(c) -> None:
  """One sentence (ValueError) for a transport section field that is not one of its choices
  (any spelling the canonical_* readers take passes)."""
  choices.check("transport.path_type", c.path_type, PATH_TYPES, canonical_path)
  choices.check("transport.prediction", c.prediction, PREDICTIONS, canonical_prediction)
  choices.check("transport.loss_weight", c.loss_weight, LOSS_WEIGHTS, canonical_loss_weight)
  choices.check("transport.t_sampling", c.t_sampling, T_SAMPLINGS, canonical_t_sampling)


def canonical_path(path_type: str) -> str:
  return _canon(path_type, PATH_TYPES, "path_type")


def canonical_prediction(prediction: str) -> str:
  return _canon(prediction, PREDICTIONS, "prediction")


def canonical_diffusion_form(form: str | None) -> str:
  return _canon(form, DIFFUSION_FORMS, "diffusion_form")


def canonical_t_sampling(mode: str) -> str:
  return _canon(mode, T_SAMPLINGS, "t_sampling")


def canonical_loss_weight(weight: str | None) -> str:
  return _canon(weight, LOSS_WEIGHTS, "loss_weight")


def canonical_objective(path_type: str, prediction: str) -> tuple[str, str]:
  """(path_type, prediction), refusing the discrete path with anything but noise prediction."""
  path_type, prediction = canonical_path(path_type), canonical_prediction(prediction)
  if path_type == "ScaledLinear" and prediction != "noise":
    raise ValueError(
      f"transport.path_type='ScaledLinear' is DiM's discrete noise-prediction "
      f"objective: set transport.prediction='noise' (not {prediction!r})."
    )
  return path_type, prediction


# ------------------------------------------------------------------------------------------------
# DiM's discrete schedule (path "ScaledLinear")


def scaled_linear_alphas_cumprod() -> np.ndarray:
  """alphabar_n, n = 1..1000, float64 (upstream's `stable_diffusion_beta_schedule`)."""
  betas = np.linspace(SD_BETA_START**0.5, SD_BETA_END**0.5, DISCRETE_STEPS, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas)


_ALPHAS_CUMPROD = scaled_linear_alphas_cumprod()
_LOG_ALPHA_KNOTS = 0.5 * np.log(_ALPHAS_CUMPROD)  # log alpha at t_cont = n / 1000


def discrete_log_alpha(t_cont):
  """(log alpha, d log alpha / d t_cont) of DPM-Solver's 'discrete' schedule at t_cont (DiM's
  continuous time, 1 = noise): piecewise linear through the knots, extended linearly beyond
  them. NumPy in, NumPy (float64) out; JAX in, JAX out in t_cont's float dtype."""
  n = DISCRETE_STEPS
  if isinstance(t_cont, (np.ndarray, float, int, np.floating)):
    xp, knots = np, _LOG_ALPHA_KNOTS
    t_cont = np.asarray(t_cont, np.float64)
  else:
    xp = jnp
    t_cont = jnp.asarray(t_cont, jnp.result_type(t_cont, jnp.float32))
    knots = jnp.asarray(_LOG_ALPHA_KNOTS, t_cont.dtype)
  u = t_cont * n - 1.0
  i = xp.clip(xp.floor(u), 0, n - 2).astype(np.int32)
  step = knots[i + 1] - knots[i]
  return knots[i] + (u - i) * step, step * n


def discrete_inverse_lambda(lam):
  """t_cont with half-log-SNR lambda(t_cont) = lam (NumPy, float64; DPM-Solver's
  `inverse_lambda` of the 'discrete' schedule, extended linearly beyond the knots)."""
  lam = np.asarray(lam, np.float64)
  log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lam)
  knots = _LOG_ALPHA_KNOTS  # decreasing in n
  i = np.clip(np.searchsorted(-knots, -log_alpha) - 1, 0, DISCRETE_STEPS - 2)
  frac = (log_alpha - knots[i]) / (knots[i + 1] - knots[i])
  return (i + 1 + frac) / DISCRETE_STEPS


def discrete_index(t):
  """DiM's step n in 1..1000 of package times t on the training grid t = 1 - n/1000 (int32)."""
  n = jnp.round(DISCRETE_STEPS * (1.0 - jnp.asarray(t, jnp.float32)))
  return jnp.clip(n, 1, DISCRETE_STEPS).astype(jnp.int32)


def network_time(path_type: str, t):
  """The time the network is given at package time t: t itself, or DiM's 1000 (1 - t) for the
  discrete path (its samplers' 1000 t_cont)."""
  if canonical_path(path_type) == "ScaledLinear":
    return DISCRETE_STEPS * (1.0 - t)
  return t


# ------------------------------------------------------------------------------------------------
# Paths


def expand_t(t, x):
  """Reshape per-sample t [B] to broadcast against x [B, ...]; scalars pass through."""
  t = jnp.asarray(t)
  if t.ndim == 0:
    return t
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def _vp_log_mean(t):
  d = VP_SIGMA_MAX - VP_SIGMA_MIN
  return -0.25 * (1.0 - t) ** 2 * d - 0.5 * (1.0 - t) * VP_SIGMA_MIN


def _vp_d_log_mean(t):
  return 0.5 * (1.0 - t) * (VP_SIGMA_MAX - VP_SIGMA_MIN) + 0.5 * VP_SIGMA_MIN


def path_coefficients(path_type: str, t):
  """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt), elementwise in t (any shape)."""
  path_type = canonical_path(path_type)
  t = jnp.asarray(t, dtype=jnp.result_type(t, jnp.float32))
  if path_type == "GVP":
    half_pi = 0.5 * math.pi
    s, c = jnp.sin(half_pi * t), jnp.cos(half_pi * t)
    return s, c, half_pi * c, -half_pi * s
  if path_type == "Linear":
    return t, 1.0 - t, jnp.ones_like(t), -jnp.ones_like(t)
  if path_type == "ScaledLinear":
    log_alpha, slope = discrete_log_alpha(1.0 - t)  # d/dt = -d/dt_cont
    alpha = jnp.exp(log_alpha)
    sigma = jnp.sqrt(-jnp.expm1(2.0 * log_alpha))
    return alpha, sigma, -alpha * slope, alpha**2 * slope / sigma
  # VP
  m, dm = _vp_log_mean(t), _vp_d_log_mean(t)
  alpha = jnp.exp(m)
  sigma = jnp.sqrt(-jnp.expm1(2.0 * m))
  return alpha, sigma, alpha * dm, -(alpha**2) * dm / sigma


def d_log_alpha(path_type: str, t):
  """alpha'_t / alpha_t in upstream's stable form (`compute_d_alpha_alpha_ratio_t`)."""
  path_type = canonical_path(path_type)
  t = jnp.asarray(t, dtype=jnp.result_type(t, jnp.float32))
  if path_type == "GVP":
    return 0.5 * math.pi / jnp.tan(0.5 * math.pi * t)
  if path_type == "Linear":
    return 1.0 / t
  if path_type == "ScaledLinear":
    return -discrete_log_alpha(1.0 - t)[1]
  return _vp_d_log_mean(t)


def drift_var(path_type: str, t):
  """Upstream's `compute_drift(...)[1]`: g_t = (alpha'/alpha) sigma^2 - sigma sigma'.

  The PF-ODE velocity is v = (alpha'/alpha) x + g_t * score, so g_t multiplies the score; the SDE
  "SBDM" diffusion is 2 g_t and the loss weights are built from g_t / sigma_t.
  """
  _, sigma, _, d_sigma = path_coefficients(path_type, t)
  return d_log_alpha(path_type, t) * sigma**2 - sigma * d_sigma


def interpolate(path_type: str, t, x0, x1):
  """(x_t, u_t) for per-sample t [B]: the interpolant and its time derivative (the target)."""
  alpha, sigma, d_alpha, d_sigma = (expand_t(c, x1) for c in path_coefficients(path_type, t))
  return alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0


# ------------------------------------------------------------------------------------------------
# Conversions between predictions (all take per-sample t [B] or a scalar t)


def _coeffs(path_type, x, t):
  return tuple(expand_t(c, x) for c in path_coefficients(path_type, t))


def noise_from_velocity(v, x, t, path_type: str):
  alpha, sigma, d_alpha, d_sigma = _coeffs(path_type, x, t)
  return (alpha * v - d_alpha * x) / (alpha * d_sigma - sigma * d_alpha)


def data_from_velocity(v, x, t, path_type: str):
  """E[x1 | x_t = x] (the Tweedie / x1-prediction) from the velocity."""
  alpha, sigma, d_alpha, d_sigma = _coeffs(path_type, x, t)
  return (d_sigma * x - sigma * v) / (alpha * d_sigma - sigma * d_alpha)


def score_from_velocity(v, x, t, path_type: str):
  sigma = _coeffs(path_type, x, t)[1]
  return -noise_from_velocity(v, x, t, path_type) / sigma


def velocity_from_noise(eps, x, t, path_type: str):
  alpha, sigma, d_alpha, d_sigma = _coeffs(path_type, x, t)
  return (d_alpha * x + (alpha * d_sigma - sigma * d_alpha) * eps) / alpha


def velocity_from_score(score, x, t, path_type: str):
  return velocity_from_noise(noise_from_score(score, x, t, path_type), x, t, path_type)


def noise_from_score(score, x, t, path_type: str):
  return -_coeffs(path_type, x, t)[1] * score


def score_from_noise(eps, x, t, path_type: str):
  return -eps / _coeffs(path_type, x, t)[1]


def velocity_from_prediction(pred, x, t, *, path_type: str, prediction: str = "velocity"):
  """The probability-flow ODE drift dx/dt for a network output of any prediction type."""
  prediction = canonical_prediction(prediction)
  if prediction == "velocity":
    return pred
  if prediction == "noise":
    return velocity_from_noise(pred, x, t, path_type)
  return velocity_from_score(pred, x, t, path_type)


def make_velocity_fn(model_fn, *, path_type: str, prediction: str = "velocity"):
  """Wrap `model_fn(x, t, *args)` (any prediction) into the ODE drift `fn(x, t, *args)`."""

  def velocity_fn(x, t, *args, **kwargs):
    pred = model_fn(x, t, *args, **kwargs)
    return velocity_from_prediction(pred, x, t, path_type=path_type, prediction=prediction)

  return velocity_fn


# ------------------------------------------------------------------------------------------------
# SDE diffusion coefficients (upstream `compute_diffusion`)


def diffusion_coefficient(form: str, t, *, path_type: str, norm: float = 1.0):
  """D(t) of dx = [v + D(t) score] dt + sqrt(2 D(t)) dW, elementwise in t (upstream's forms)."""
  form = canonical_diffusion_form(form)
  t = jnp.asarray(t, dtype=jnp.result_type(t, jnp.float32))
  if form == "none":
    return jnp.zeros_like(t)
  if form == "constant":
    return jnp.full_like(t, norm)
  if form == "SBDM":
    return norm * 2.0 * drift_var(path_type, t)
  if form == "sigma":
    return norm * path_coefficients(path_type, t)[1]
  if form == "linear":
    return norm * (1.0 - t)
  if form == "decreasing":
    return 0.25 * (norm * jnp.cos(math.pi * t) + 1.0) ** 2
  if form == "increasing-decreasing":
    return norm * jnp.sin(math.pi * t) ** 2
  return norm * jnp.log(t - t**2 + 1.0)  # "log"


# ------------------------------------------------------------------------------------------------
# Time intervals and sampling of t


def resolve_eps(cfg) -> tuple[float, float]:
  """(train_eps, sample_eps) with upstream's defaults for unset (None) values."""
  path_type, prediction = canonical_objective(cfg.path_type, cfg.prediction)
  if path_type == "VP":
    default_train, default_sample = 1e-5, 1e-3
  elif path_type == "ScaledLinear":  # t_cont >= 1/1000, the first step (DiM samples to 1e-3)
    default_train, default_sample = 1e-3, 1e-3
  elif prediction != "velocity":
    default_train, default_sample = 1e-3, 1e-3
  else:
    default_train, default_sample = 0.0, 0.0
  train_eps = default_train if cfg.get("train_eps") is None else float(cfg.train_eps)
  sample_eps = default_sample if cfg.get("sample_eps") is None else float(cfg.sample_eps)
  return train_eps, sample_eps


def time_interval(
  cfg,
  *,
  eval: bool = False,
  sde: bool = False,
  diffusion_form: str = "SBDM",
  last_step_size: float = 0.0,
) -> tuple[float, float]:
  """(t0, t1) as upstream `check_interval` (forward time; t0 < t1). Python floats.

  Training: eval=False. ODE sampling: eval=True. SDE sampling: eval=True, sde=True, with the SDE's
  diffusion form and last step size (the last step then covers [t1, 1]).
  """
  path_type = canonical_path(cfg.path_type)
  prediction = canonical_prediction(cfg.prediction)
  train_eps, sample_eps = resolve_eps(cfg)
  eps = sample_eps if eval else train_eps
  t0, t1 = 0.0, 1.0
  end = 1.0 - eps if (not sde or last_step_size == 0) else 1.0 - last_step_size
  if path_type in ("VP", "ScaledLinear"):
    t1 = end
  elif prediction != "velocity" or sde:
    sbdm = canonical_diffusion_form(diffusion_form) == "SBDM"
    t0 = eps if (sbdm and sde) or prediction != "velocity" else 0.0
    t1 = end
  return t0, t1


def sample_time(rng, batch: int, cfg, *, dtype=jnp.float32):
  """Per-sample training times [batch] in [t0, t1] (uniform or logit-normal)."""
  t0, t1 = time_interval(cfg, eval=False)
  mode = canonical_t_sampling(cfg.t_sampling)
  if mode == "logit_normal":
    n = jax.random.normal(rng, (batch,), dtype)
    u = jax.nn.sigmoid(cfg.logit_normal_mean + cfg.logit_normal_std * n)
  else:
    u = jax.random.uniform(rng, (batch,), dtype)
  return u * (t1 - t0) + t0


# ------------------------------------------------------------------------------------------------
# Loss


def _mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def loss_weight(cfg, t):
  """Per-sample weight [B] for noise/score predictions (1 for "none")."""
  weight = canonical_loss_weight(cfg.loss_weight)
  if weight == "none":
    return jnp.ones_like(jnp.asarray(t, jnp.float32))
  g = drift_var(cfg.path_type, t)
  sigma = path_coefficients(cfg.path_type, t)[1]
  if weight == "velocity":
    return (g / sigma) ** 2
  return g / sigma**2


def prediction_loss(pred, x0, x1, t, cfg):
  """Per-sample loss [B] of a network output `pred` at x_t, for noise x0, data x1, times t [B]."""
  prediction = canonical_prediction(cfg.prediction)
  f32 = jnp.float32
  pred, x0, x1, t = pred.astype(f32), x0.astype(f32), x1.astype(f32), jnp.asarray(t, f32)
  if prediction == "velocity":
    _, u_t = interpolate(cfg.path_type, t, x0, x1)
    return _mean_flat((pred - u_t) ** 2)
  w = loss_weight(cfg, t)
  if prediction == "noise":
    return w * _mean_flat((pred - x0) ** 2)
  sigma = expand_t(path_coefficients(cfg.path_type, t)[1], x1)
  return w * _mean_flat((pred * sigma + x0) ** 2)


def loss_at(model_fn, x0, x1, t, y, cfg, *, return_aux: bool = False):
  """Per-sample loss at given noise x0, data x1 and times t: calls `model_fn(x_t, t, y)` once
  (with DiM's step n instead of t for the discrete path)."""
  path_type, _ = canonical_objective(cfg.path_type, cfg.prediction)
  if path_type == "ScaledLinear":
    n = discrete_index(t)
    alpha = jnp.asarray(np.sqrt(_ALPHAS_CUMPROD), jnp.float32)[n - 1]
    sigma = jnp.asarray(np.sqrt(1.0 - _ALPHAS_CUMPROD), jnp.float32)[n - 1]
    x_t = (expand_t(alpha, x1) * x1 + expand_t(sigma, x1) * x0.astype(x1.dtype)).astype(x1.dtype)
    pred = model_fn(x_t, n.astype(jnp.float32), y)
  else:
    x_t, _ = interpolate(cfg.path_type, t, x0.astype(x1.dtype), x1)
    pred = model_fn(x_t, t, y)
  loss = prediction_loss(pred, x0, x1, t, cfg)
  if return_aux:
    return loss, {"t": t, "x0": x0, "x_t": x_t, "pred": pred}
  return loss


def training_loss(model_fn, x1, rng, y=None, cfg=None, *, return_aux: bool = False):
  """Per-sample flow-matching loss [B] (upstream `training_losses`); average it for the batch loss.

  `model_fn(x_t, t, y)` returns the network output; close over the parameters, e.g.
  `jax.grad(lambda p: training_loss(lambda x, t, y: model.apply(p, x, t, y), x1, rng, y, cfg).mean())`.
  Draws t per sample (cfg.t_sampling) and x0 ~ N(0, I) of x1's shape from `rng`.
  """
  cfg = default_transport_config() if cfg is None else cfg
  x0, t = draw_noise_and_time(rng, x1, cfg)
  return loss_at(model_fn, x0, x1, t, y, cfg, return_aux=return_aux)


def draw_noise_and_time(rng, x1, cfg):
  """The random part of `training_loss`: noise x0 ~ N(0, I) of x1's shape and times t [B]
  (for the discrete path with uniform t: t = 1 - n/1000, n ~ U{1..1000} as upstream)."""
  rng_t, rng_x = jax.random.split(rng)
  path_type, _ = canonical_objective(cfg.path_type, cfg.prediction)
  if path_type == "ScaledLinear" and canonical_t_sampling(cfg.t_sampling) == "uniform":
    n = jax.random.randint(rng_t, (x1.shape[0],), 1, DISCRETE_STEPS + 1)
    t = 1.0 - n.astype(jnp.float32) / DISCRETE_STEPS
  else:
    t = sample_time(rng_t, x1.shape[0], cfg)
  x0 = jax.random.normal(rng_x, x1.shape, x1.dtype)
  return x0, t
