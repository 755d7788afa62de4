"""Tests for dimsum_jax.transport against closed forms and NumPy references (random inputs from
each test's seed, tests/seeds.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax import transport
from tests import seeds

PATHS = ("GVP", "Linear", "VP")


def _cfg(**kw):
  cfg = transport.default_transport_config()
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def _np_coeffs(path, t):
  """Independent float64 NumPy closed forms (alpha, sigma, alpha', sigma')."""
  t = np.asarray(t, np.float64)
  if path == "GVP":
    return (
      np.sin(np.pi * t / 2),
      np.cos(np.pi * t / 2),
      np.pi / 2 * np.cos(np.pi * t / 2),
      -np.pi / 2 * np.sin(np.pi * t / 2),
    )
  if path == "Linear":
    return t, 1 - t, np.ones_like(t), -np.ones_like(t)
  smin, smax = 0.1, 20.0
  lm = -0.25 * (1 - t) ** 2 * (smax - smin) - 0.5 * (1 - t) * smin
  dlm = 0.5 * (1 - t) * (smax - smin) + 0.5 * smin
  alpha = np.exp(lm)
  sigma = np.sqrt(1 - np.exp(2 * lm))
  return alpha, sigma, alpha * dlm, np.exp(2 * lm) * 2 * dlm / (-2 * sigma)


def _np_drift_var(path, t):
  """Upstream compute_drift(...)[1], written per path from the upstream formulas."""
  t = np.asarray(t, np.float64)
  _, sigma, _, d_sigma = _np_coeffs(path, t)
  if path == "VP":
    return (0.1 + (1 - t) * (20.0 - 0.1)) / 2
  ratio = 1 / t if path == "Linear" else np.pi / (2 * np.tan(t * np.pi / 2))
  return ratio * sigma**2 - sigma * d_sigma


@seeds.each()
@pytest.mark.parametrize("path", PATHS)
def test_coefficients_match_closed_form_and_derivative(path, seed):
  rng = np.random.default_rng(seed)
  t = rng.uniform(0.02, 0.98, size=64)
  got = [np.asarray(c, np.float64) for c in transport.path_coefficients(path, jnp.asarray(t))]
  for g, r in zip(got, _np_coeffs(path, t)):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6, err_msg=f"seed {seed}")
  # d alpha / dt and d sigma / dt against autodiff of the coefficients themselves.
  tj = jnp.asarray(t, jnp.float32)
  for i in (0, 1):
    _, tangent = jax.jvp(
      lambda s: transport.path_coefficients(path, s)[i], (tj,), (jnp.ones_like(tj),)
    )
    np.testing.assert_allclose(tangent, got[i + 2], rtol=1e-4, atol=1e-5, err_msg=f"seed {seed}")
  # Variance preservation for GVP and VP.
  if path != "Linear":
    np.testing.assert_allclose(got[0] ** 2 + got[1] ** 2, 1.0, atol=1e-6, err_msg=f"seed {seed}")
  # Endpoints: GVP and Linear reach pure noise at 0 and pure data at 1.
  if path != "VP":
    a, s, _, _ = transport.path_coefficients(path, jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(a, [0, 1], atol=1e-7)
    np.testing.assert_allclose(s, [1, 0], atol=1e-7)


@seeds.each()
@pytest.mark.parametrize("path", PATHS)
def test_target_is_time_derivative_of_path(path, seed):
  key = jax.random.key(seed)
  k0, k1, kt = jax.random.split(key, 3)
  x0 = jax.random.normal(k0, (5, 4, 4, 3))
  x1 = jax.random.normal(k1, (5, 4, 4, 3))
  t = jax.random.uniform(kt, (5,), minval=0.05, maxval=0.95)
  (x_t, u_t), (dx_t, _) = jax.jvp(
    lambda s: transport.interpolate(path, s, x0, x1), (t,), (jnp.ones_like(t),)
  )
  np.testing.assert_allclose(u_t, dx_t, rtol=1e-4, atol=1e-4, err_msg=f"seed {seed}")
  # Central finite differences in float64 with the NumPy closed form.
  tn, x0n, x1n = (np.asarray(v, np.float64) for v in (t, x0, x1))
  h = 1e-6
  xp = lambda s: (
    _np_coeffs(path, s)[0][:, None, None, None] * x1n
    + _np_coeffs(path, s)[1][:, None, None, None] * x0n
  )
  np.testing.assert_allclose(
    u_t, (xp(tn + h) - xp(tn - h)) / (2 * h), rtol=1e-4, atol=1e-4, err_msg=f"seed {seed}"
  )
  np.testing.assert_allclose(x_t, xp(tn), rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")


@seeds.each()
@pytest.mark.parametrize("path", PATHS)
def test_conversions_roundtrip(path, seed):
  key = jax.random.key(seed)
  kx, kv, kt = jax.random.split(key, 3)
  x = jax.random.normal(kx, (6, 2, 2, 4))
  v = jax.random.normal(kv, (6, 2, 2, 4))
  t = jax.random.uniform(kt, (6,), minval=0.1, maxval=0.9)
  eps = transport.noise_from_velocity(v, x, t, path)
  score = transport.score_from_velocity(v, x, t, path)
  tol = dict(rtol=2e-4, atol=2e-4, err_msg=f"seed {seed}")
  np.testing.assert_allclose(transport.velocity_from_noise(eps, x, t, path), v, **tol)
  np.testing.assert_allclose(transport.velocity_from_score(score, x, t, path), v, **tol)
  np.testing.assert_allclose(transport.score_from_noise(eps, x, t, path), score, **tol)
  np.testing.assert_allclose(transport.noise_from_score(score, x, t, path), eps, **tol)
  for pred, kind in ((v, "velocity"), (eps, "noise"), (score, "score")):
    np.testing.assert_allclose(
      transport.velocity_from_prediction(pred, x, t, path_type=path, prediction=kind), v, **tol
    )
  # Upstream's drift form: v = (alpha'/alpha) x + drift_var * score (compute_drift, get_drift).
  tn = np.asarray(t, np.float64)
  ratio = _np_coeffs(path, tn)[2] / _np_coeffs(path, tn)[0]
  ref = ratio[:, None, None, None] * np.asarray(x, np.float64) + _np_drift_var(path, tn)[
    :, None, None, None
  ] * np.asarray(score, np.float64)
  np.testing.assert_allclose(v, ref, **tol)


@seeds.each()
@pytest.mark.parametrize("path", PATHS)
def test_conversions_on_exact_gaussian_posterior(path, seed):
  """Data x1 ~ N(mu, s^2), noise x0 ~ N(0, 1): x_t ~ N(a mu, V), V = a^2 s^2 + sigma^2, and
  E[x0|x] = sigma (x - a mu) / V, E[x1|x] = mu + a s^2 (x - a mu) / V, score = -(x - a mu) / V,
  v = a' E[x1|x] + sigma' E[x0|x]. The conversions must map these exact quantities to each other."""
  rng = np.random.default_rng(seed)
  mu, s = rng.normal(size=3), rng.uniform(0.3, 2.0, size=3)
  t = rng.uniform(0.1, 0.9, size=5)
  x = rng.normal(size=(5, 2, 2, 3)) * 2
  a, sg, da, ds = (c[:, None, None, None] for c in _np_coeffs(path, t))
  var = a**2 * s**2 + sg**2
  e0 = sg * (x - a * mu) / var
  e1 = mu + a * s**2 * (x - a * mu) / var
  score = -(x - a * mu) / var
  v = da * e1 + ds * e0
  j = lambda z: jnp.asarray(z, jnp.float32)
  tol = dict(rtol=1e-4, atol=1e-4, err_msg=f"seed {seed}")
  np.testing.assert_allclose(transport.noise_from_velocity(j(v), j(x), j(t), path), e0, **tol)
  np.testing.assert_allclose(transport.data_from_velocity(j(v), j(x), j(t), path), e1, **tol)
  np.testing.assert_allclose(transport.score_from_velocity(j(v), j(x), j(t), path), score, **tol)
  np.testing.assert_allclose(transport.velocity_from_noise(j(e0), j(x), j(t), path), v, **tol)
  np.testing.assert_allclose(transport.velocity_from_score(j(score), j(x), j(t), path), v, **tol)


def _linear_model(w, b):
  """A fixed linear network: channel mixing plus a t-dependent bias."""

  def model_fn(x, t, y):
    del y
    return jnp.einsum("bhwc,cd->bhwd", x, w) + b * t[:, None, None, None]

  return model_fn


@seeds.each()
@pytest.mark.parametrize(
  "path,prediction,weight",
  [
    ("GVP", "velocity", "none"),
    ("VP", "velocity", "likelihood"),
    ("Linear", "noise", "velocity"),
    ("VP", "noise", "likelihood"),
    ("GVP", "score", "likelihood"),
    ("Linear", "score", "none"),
  ],
)
def test_loss_matches_numpy(path, prediction, weight, seed):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(3, 3)) * 0.5
  b = rng.normal(size=(3,))
  x1 = jnp.asarray(rng.normal(size=(6, 4, 4, 3)), jnp.float32)
  cfg = _cfg(path_type=path, prediction=prediction, loss_weight=weight)
  model_fn = _linear_model(jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32))
  key = jax.random.key(rng.integers(1 << 30))
  loss, aux = transport.training_loss(model_fn, x1, key, None, cfg, return_aux=True)
  t, x0 = np.asarray(aux["t"], np.float64), np.asarray(aux["x0"], np.float64)
  t0, t1 = transport.time_interval(cfg)
  assert np.all((t >= t0) & (t <= t1))
  x1n = np.asarray(x1, np.float64)
  a, sg, da, ds = (c[:, None, None, None] for c in _np_coeffs(path, t))
  xt = a * x1n + sg * x0
  pred = np.einsum("bhwc,cd->bhwd", xt, w) + b * t[:, None, None, None]
  g = _np_drift_var(path, t)
  wt = {
    "none": np.ones_like(t),
    "velocity": (g / sg[:, 0, 0, 0]) ** 2,
    "likelihood": g / sg[:, 0, 0, 0] ** 2,
  }[weight]
  if prediction == "velocity":
    ref = ((pred - (da * x1n + ds * x0)) ** 2).mean(axis=(1, 2, 3))
  elif prediction == "noise":
    ref = wt * ((pred - x0) ** 2).mean(axis=(1, 2, 3))
  else:
    ref = wt * ((pred * sg + x0) ** 2).mean(axis=(1, 2, 3))
  assert loss.shape == (6,)
  np.testing.assert_allclose(loss, ref, rtol=5e-4, atol=1e-6, err_msg=f"seed {seed}")


@seeds.each()
def test_loss_is_differentiable_and_zero_for_exact_velocity_at_one_point(seed):
  """A model returning the true target gives zero loss; gradients flow through params."""
  cfg = _cfg()
  k1, k0 = jax.random.split(jax.random.key(seed))
  x1 = jax.random.normal(k1, (4, 2, 2, 3))
  x0 = jax.random.normal(k0, x1.shape)
  t = jnp.array([0.1, 0.4, 0.7, 1.0])
  _, u = transport.interpolate("GVP", t, x0, x1)
  exact = transport.loss_at(lambda x, tt, y: u, x0, x1, t, None, cfg)
  np.testing.assert_allclose(exact, 0.0, atol=1e-10)
  grad = jax.grad(
    lambda w: transport.loss_at(_linear_model(w, jnp.zeros(3)), x0, x1, t, None, cfg).mean()
  )(jnp.eye(3))
  assert grad.shape == (3, 3) and np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0


@seeds.each()
def test_t_sampling_statistics(seed):
  n = 200_000
  key = jax.random.key(seed)
  # Uniform on [0, 1] (velocity, GVP).
  t = np.asarray(transport.sample_time(key, n, _cfg()), np.float64)
  assert t.min() >= 0 and t.max() <= 1, f"seed {seed}"
  assert abs(t.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n), f"seed {seed}"
  assert abs(t.var() - 1 / 12) < 0.003, f"seed {seed}"
  # Logit-normal: logit(t) ~ N(mean, std^2), defaults and configured values.
  for mean, std in ((-0.5, 1.0), (0.3, 0.6)):
    cfg = _cfg(t_sampling="logit_normal", logit_normal_mean=mean, logit_normal_std=std)
    t = np.asarray(transport.sample_time(key, n, cfg), np.float64)
    z = np.log(t) - np.log1p(-t)
    assert abs(z.mean() - mean) < 5 * std / math.sqrt(n), f"seed {seed}"
    assert abs(z.std() - std) < 0.01 * std, f"seed {seed}"
    # Kolmogorov-Smirnov distance to the normal CDF.
    zs = np.sort(z)
    cdf = 0.5 * (1 + np.vectorize(math.erf)((zs - mean) / (std * math.sqrt(2))))
    ks = np.max(np.abs(cdf - np.arange(1, n + 1) / n))
    assert ks < 1.63 / math.sqrt(n) * 1.5, f"KS distance {ks} (seed {seed})"
  # Upstream spelling, and rescaling into [eps, 1 - eps] for noise prediction.
  cfg = _cfg(t_sampling="logitnormal", prediction="noise")
  t = np.asarray(transport.sample_time(key, n, cfg), np.float64)
  assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3, f"seed {seed}"


@pytest.mark.parametrize(
  "path,prediction,kw,expected",
  [
    # (kw for time_interval) -> upstream check_interval values
    ("GVP", "velocity", dict(), (0.0, 1.0)),
    ("GVP", "velocity", dict(eval=True), (0.0, 1.0)),
    ("Linear", "noise", dict(), (1e-3, 1 - 1e-3)),
    ("GVP", "score", dict(eval=True), (1e-3, 1 - 1e-3)),
    ("VP", "velocity", dict(), (0.0, 1 - 1e-5)),
    ("VP", "velocity", dict(eval=True), (0.0, 1 - 1e-3)),
    ("VP", "noise", dict(eval=True, sde=True, last_step_size=0.04), (0.0, 0.96)),
    (
      "GVP",
      "velocity",
      dict(eval=True, sde=True, diffusion_form="sigma", last_step_size=0.04),
      (0.0, 0.96),
    ),
    (
      "GVP",
      "velocity",
      dict(eval=True, sde=True, diffusion_form="SBDM", last_step_size=0.04),
      (0.0, 0.96),
    ),
    (
      "Linear",
      "noise",
      dict(eval=True, sde=True, diffusion_form="sigma", last_step_size=0.0),
      (1e-3, 1 - 1e-3),
    ),
  ],
)
def test_time_interval_matches_upstream(path, prediction, kw, expected):
  cfg = _cfg(path_type=path, prediction=prediction)
  np.testing.assert_allclose(transport.time_interval(cfg, **kw), expected, atol=1e-12)


def test_explicit_eps_is_used():
  cfg = _cfg(sample_eps=1e-3, train_eps=1e-4)
  assert transport.resolve_eps(cfg) == (1e-4, 1e-3)
  assert transport.time_interval(
    cfg, eval=True, sde=True, diffusion_form="SBDM", last_step_size=0.04
  ) == (1e-3, 0.96)


@seeds.each()
def test_diffusion_forms_match_upstream_formulas(seed):
  t = np.random.default_rng(seed).uniform(0.05, 0.95, size=16)
  n = 1.7
  ref = {
    "none": 0 * t,
    "constant": n + 0 * t,
    "SBDM": n * 2 * _np_drift_var("GVP", t),
    "sigma": n * np.cos(np.pi * t / 2),
    "linear": n * (1 - t),
    "decreasing": 0.25 * (n * np.cos(np.pi * t) + 1) ** 2,
    "increasing-decreasing": n * np.sin(np.pi * t) ** 2,
    "log": n * np.log(t - t**2 + 1),
  }
  for form, r in ref.items():
    got = transport.diffusion_coefficient(form, jnp.asarray(t), path_type="GVP", norm=n)
    np.testing.assert_allclose(got, r, rtol=1e-5, atol=1e-6, err_msg=f"{form} (seed {seed})")


def test_default_config_and_names():
  cfg = transport.default_transport_config()
  assert (cfg.path_type, cfg.prediction, cfg.loss_weight, cfg.t_sampling) == (
    "GVP",
    "velocity",
    "none",
    "uniform",
  )
  assert (cfg.logit_normal_mean, cfg.logit_normal_std) == (-0.5, 1.0)
  assert cfg.train_eps is None and cfg.sample_eps is None
  assert transport.canonical_path("linear") == "Linear"
  with pytest.raises(ValueError):
    transport.canonical_path("cosine")
