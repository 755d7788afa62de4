"""Upsample Guidance (arXiv 2404.01709): sampling at m times the size the model was trained at.

The network samples x [B, H, W, C] (NHWC; H and W whole multiples of the integer factor m) at the
new size; the same network at its trained size (`low_fn`) sees the block means AvgPool_m(x),
rescaled, [B, H/m, W/m, C] at the time whose signal-to-noise ratio is m^2 that of x, and over the
first `eta` of the way from noise its prediction replaces the block means of the full-size one
(NearestUp_m back to [B, H, W, C]), weighted by theta. Two forms:
  - DiM's discrete noise prediction, upstream's (`make_ufg_nnet`): `make_upsample_guided_noise_fn`
    is a `noise_fn(x, t_cont [B], labels)` in DiM's time t_cont = 1 - t, for
    `dpm_solver.sample_dpm_solver(..., predict_x0=False)`; its times come from upstream's tables
    (`upsample_tables`, `upsample_guidance_times`).
  - flow-matching velocity networks on the GVP and Linear paths (UPSAMPLE_PATHS):
    `make_upsample_guided_velocity_fn`, derived below, at package time t [B] for the ODE/SDE
    solvers of `sampling`.
`make_upsample_guided_model_fn` picks the form from the objective (the sampling option
`upsample_guidance` is its theta, `ug_eta` its eta). Both forms are affine in the network outputs,
so classifier-free guidance may wrap them. The trained-size call runs only when some weight is
above 0 (lax.cond); everything here is pure and jit-able.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dimsum_jax import transport

# ------------------------------------------------------------------------------------------------
# Upsample Guidance for DiM (upstream's noise form)


def upsample_tables():
  """(alphabar [1001], snr [1001] with index 0 the clean end, preset SNRs [1000] float32) of
  upstream's `Schedule` (`eval_ldm_discrete.py`) and its Upsample Guidance preset table
  (`upsample_guidance.py`)."""
  alphabar = np.concatenate([[1.0], transport.scaled_linear_alphas_cumprod()])
  with np.errstate(divide="ignore"):
    snr = alphabar / (1.0 - alphabar)
  taus = np.arange(transport.DISCRETE_STEPS, dtype=np.float32)[::-1] / np.float32(
    transport.DISCRETE_STEPS
  )
  taus[-1] = 1e-5
  index = (taus * np.float32(transport.DISCRETE_STEPS)).astype(np.int64)
  return alphabar, snr, snr[index].astype(np.float32)


def upsample_guidance_times(t_cont, m: int):
  """(index, tau) of upstream's Upsample Guidance at DiM times t_cont [B]: the table index
  trunc(1000 t) and the low-resolution time tau = min(1 - j*/999, t[0]), j* the first preset
  SNR closest to m^2 snr(t) (`get_tau`)."""
  _, snr, preset = upsample_tables()
  dtype = jnp.result_type(t_cont, jnp.float32)
  t_cont = jnp.asarray(t_cont, dtype)
  index = jnp.floor(t_cont * transport.DISCRETE_STEPS).astype(jnp.int32)
  scaled = jnp.asarray(snr, dtype)[index] * m**2
  j = jnp.argmin(jnp.abs(scaled[:, None] - jnp.asarray(preset, dtype)[None]), axis=-1)
  tau = jnp.minimum(1.0 - j.astype(dtype) / (len(preset) - 1), t_cont[0])
  return index, tau


def _avg_pool(a, m: int):
  """[B, H, W, C] -> [B, H/m, W/m, C]: the mean of every m x m block."""
  b, h, w, c = a.shape
  return a.reshape(b, h // m, m, w // m, m, c).mean(axis=(2, 4))


def _nearest_up(a, m: int):
  return jnp.repeat(jnp.repeat(a, m, axis=1), m, axis=2)


def make_upsample_guided_noise_fn(
  guided_fn, m: int = 2, *, theta: float = 1.0, eta: float = 0.3, T: float = 1.0, low_fn=None
):
  """Upstream's Upsample Guidance (arXiv 2404.01709; `make_ufg_nnet`, section 12) for sampling
  an m-times larger latent than the model was trained at, as `noise_fn(x, t_cont, labels)`.

  guided_fn(x, network_time [B], labels) is the guided noise prediction (e.g. U-ViT guidance of
  a DiM, whose position table is resized for the grid of x). With w = theta [t >= (1 - eta) T]:
    pred = guided_fn(x, 1000 t);  x_low = AvgPool_m(x) / sqrt(alphabar + (1 - alphabar) / m^2)
    out = pred + w NearestUp_m(low_fn(x_low, 1000 tau) / m - AvgPool_m(pred))
  with low_fn = guided_fn unless given (the same network at the trained size). The
  low-resolution call runs only when some w > 0 (lax.cond). Use it with
  `dpm_solver.sample_dpm_solver(..., predict_x0=False)`, as upstream does.
  """
  alphabar, _, _ = upsample_tables()
  low_fn = guided_fn if low_fn is None else low_fn

  def noise_fn(x, t_cont, labels=None):
    dtype = x.dtype
    t_cont = jnp.asarray(t_cont, jnp.result_type(t_cont, jnp.float32))
    index, tau = upsample_guidance_times(t_cont, m)
    pred = guided_fn(x, transport.DISCRETE_STEPS * t_cont, labels)
    w = (theta * (t_cont - (1.0 - eta) * T >= 0)).astype(dtype)[:, None, None, None]

    def guided(pred):
      ab = jnp.asarray(alphabar, dtype)[index][:, None, None, None]
      x_low = _avg_pool(x, m) / jnp.sqrt(ab + (1.0 - ab) / m**2)
      low = low_fn(x_low, transport.DISCRETE_STEPS * tau, labels)
      return pred + w * _nearest_up(low / m - _avg_pool(pred, m), m)

    return jax.lax.cond(jnp.any(w > 0), guided, lambda p: p, pred)

  return noise_fn


# ------------------------------------------------------------------------------------------------
# Upsample Guidance for the flow-matching models
#
# The same idea for x_t = alpha_t x1 + sigma_t x0 (x0 noise, t = 0 noise, t = 1 data) and a
# velocity network. Write P = AvgPool_m. P(x0) = x0' / m with x0' ~ N(0, I), so
#   P(x_t) = alpha_t P(x1) + (sigma_t / m) x0' = c (alpha_tau x1' + sigma_tau x0'),  x1' = P(x1):
# a sample of the trained-size problem at the time tau whose signal-to-noise ratio is m^2 that of
# t, alpha_tau / sigma_tau = m alpha_t / sigma_t, scaled by c = sqrt(alpha_t^2 + sigma_t^2 / m^2)
# / sqrt(alpha_tau^2 + sigma_tau^2). For GVP (alpha = sin(pi t/2), sigma = cos(pi t/2))
# tau = (2/pi) atan(m tan(pi t / 2)) and c = sqrt(alpha_t^2 + sigma_t^2 / m^2); for Linear
# (alpha = t, sigma = 1 - t) tau = m t / (1 - t + m t) and c = t / tau. The trained-size network
# at (x_low = P(x_t) / c, tau) estimates x1' and x0' (its data and noise predictions, affine in
# its velocity: transport.data_from_velocity / noise_from_velocity), hence the velocity of the
# pooled path, d/dt P(x_t) = alpha'_t P(x1) + sigma'_t P(x0):
#   v_low = alpha'_t x1'^ + (sigma'_t / m) x0'^.
# P(v) is the block mean of the full-size velocity; the guidance moves w of it onto v_low and
# keeps the detail within the blocks:
#   v_g = v + w NearestUp_m(v_low - P(v)),   w = theta [t <= 1 - (1 - eta) T]
# (DiM's schedule w = theta [t_cont >= (1 - eta) T] with t_cont = 1 - t: the first eta of the
# way from noise). With w = 1 the block means of v_g are v_low exactly. The noise form above is
# the same statement for x0: P(eps_g) = eps_low / m. Both are affine in the network outputs
# with weights summing to one, so they commute with classifier-free guidance.

UPSAMPLE_PATHS = ("GVP", "Linear")


def upsample_guidance_time(path_type: str, t, m: int):
  """(tau, c) of the flow-matching Upsample Guidance at package times t (see above)."""
  path_type = transport.canonical_path(path_type)
  t = jnp.asarray(t, jnp.result_type(t, jnp.float32))
  if path_type == "GVP":
    half_pi = 0.5 * np.pi
    tau = jnp.arctan2(m * jnp.sin(half_pi * t), jnp.cos(half_pi * t)) / half_pi
  elif path_type == "Linear":
    tau = m * t / (1.0 - t + m * t)
  else:
    raise ValueError(
      f"Upsample Guidance is derived for the {' and '.join(UPSAMPLE_PATHS)} paths "
      f"(and DiM's discrete one), not {path_type}."
    )
  alpha, sigma, _, _ = transport.path_coefficients(path_type, t)
  alpha_tau, sigma_tau, _, _ = transport.path_coefficients(path_type, tau)
  c = jnp.sqrt((alpha**2 + sigma**2 / m**2) / (alpha_tau**2 + sigma_tau**2))
  return tau, c


def make_upsample_guided_velocity_fn(
  model_fn,
  low_fn,
  m: int = 2,
  *,
  path_type: str = "GVP",
  theta: float = 1.0,
  eta: float = 0.3,
  T: float = 1.0,
):
  """`fn(x, t, y)`: the velocity of `model_fn(x, t, y)` (a velocity network at the sampled size,
  package time t [B]) with Upsample Guidance from `low_fn(x_low, tau, y)` (the same network at
  the trained size), as derived above. The trained-size call runs only when some w > 0."""

  def fn(x, t, y):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.result_type(t, jnp.float32)), x.shape[:1])
    v = model_fn(x, t, y)
    w = (theta * (t <= 1.0 - (1.0 - eta) * T)).astype(v.dtype)[:, None, None, None]

    def guided(v):
      tau, c = upsample_guidance_time(path_type, t, m)
      x_low = _avg_pool(x, m) / transport.expand_t(c, x).astype(x.dtype)
      v_low = low_fn(x_low, tau, y)
      x1 = transport.data_from_velocity(v_low, x_low, tau, path_type)
      x0 = transport.noise_from_velocity(v_low, x_low, tau, path_type)
      _, _, d_alpha, d_sigma = (
        transport.expand_t(a, x) for a in transport.path_coefficients(path_type, t)
      )
      pooled = (d_alpha * x1 + d_sigma / m * x0).astype(v.dtype)
      return v + w * _nearest_up(pooled - _avg_pool(v, m), m)

    return jax.lax.cond(jnp.any(w > 0), guided, lambda v: v, v)

  return fn


def make_upsample_guided_model_fn(
  model_fn,
  low_fn,
  m: int,
  *,
  path_type: str,
  prediction: str,
  theta: float,
  eta: float = 0.3,
  T: float = 1.0,
):
  """`model_fn(x, network_time, y)` with Upsample Guidance for an m-times larger sample:
  the velocity form above for flow-matching velocity networks (GVP, Linear), upstream's noise
  form for DiM's discrete noise prediction (network time 1000 t_cont). `low_fn` is the same
  network at the trained size. Guidance is affine in the outputs, so CFG may wrap this."""
  path_type, prediction = transport.canonical_objective(path_type, prediction)
  if path_type == "ScaledLinear":
    noise_fn = make_upsample_guided_noise_fn(model_fn, m, theta=theta, eta=eta, T=T, low_fn=low_fn)
    return lambda x, t_net, y: noise_fn(x, t_net / transport.DISCRETE_STEPS, y)
  if prediction != "velocity" or path_type not in UPSAMPLE_PATHS:
    raise ValueError(
      f"Upsample Guidance is derived for velocity prediction on the "
      f"{' or '.join(UPSAMPLE_PATHS)} path and for DiM's noise prediction, not "
      f"{prediction} on {path_type}."
    )
  return make_upsample_guided_velocity_fn(
    model_fn, low_fn, m, path_type=path_type, theta=theta, eta=eta, T=T
  )
