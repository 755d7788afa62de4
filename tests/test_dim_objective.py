"""DiM's objective and samplers: the discrete scaled-linear schedule (transport path
'ScaledLinear'), LSimple through `draw_noise_and_time` / `loss_at` as train.py calls them, the
probability-flow ODE of the discrete model (diffrax), DPM-Solver (against a NumPy transliteration
of upstream's dpm_solver_pp.py, a Gaussian closed form and a tight diffrax solve), and U-ViT
guidance. Float64 references; random inputs from stated seeds (named on failure).
"""

import diffrax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dimsum_jax import dpm_solver, optim, sampling, train, transport
from dimsum_jax.models import create_model, default_model_config, dim_convert
from tests import seeds
from tests.golden import golden_file
from tests.models import common

N = transport.DISCRETE_STEPS


def _cfg(**kw):
  c = transport.default_transport_config()
  c.path_type, c.prediction = "ScaledLinear", "noise"
  c.update(kw)
  return c


def _alphabar():
  """Independent of transport: Stable Diffusion's betas written out, float64."""
  n = np.arange(1, N + 1)
  betas = (0.00085**0.5 + (n - 1) / (N - 1) * (0.012**0.5 - 0.00085**0.5)) ** 2
  return np.cumprod(1.0 - betas)


# ---------------------------------------------------------------- schedule


def test_schedule_is_stable_diffusions_scaled_linear():
  """alphabar against the betas written out and against upstream's float32 table values (the
  Upsample Guidance call table: cum_alpha, cum_beta, snr at trunc(1000 t))."""
  np.testing.assert_allclose(transport.scaled_linear_alphas_cumprod(), _alphabar(), rtol=1e-14)
  calls = np.load(golden_file("dim/upsample_guidance.npz"))["dpm_calls_m2"]
  ab = _alphabar()[calls[:, 3].astype(int) - 1]
  np.testing.assert_allclose(ab, calls[:, 4], rtol=1e-6)
  np.testing.assert_allclose(1 - ab, calls[:, 5], rtol=1e-6)
  np.testing.assert_allclose(ab / (1 - ab), calls[:, 6], rtol=1e-6)


@seeds.each(0)
def test_continuous_schedule_is_dpm_solvers_discrete_one(seed):
  """log alpha: 0.5 log alphabar_n at t_cont = n/1000, linear between; its slope, lambda's
  inverse, and the path coefficients (alpha^2 + sigma^2 = 1, derivatives = central
  differences inside a segment), NumPy and JAX alike."""
  rng = np.random.default_rng(seed)
  knots = np.arange(1, N + 1) / N
  np.testing.assert_allclose(
    transport.discrete_log_alpha(knots)[0],
    0.5 * np.log(_alphabar()),
    rtol=1e-12,
    err_msg=f"seed {seed}",
  )
  n = rng.integers(1, N, size=64)
  frac = rng.uniform(0.05, 0.95, size=64)
  tc = (n + frac) / N
  la = 0.5 * np.log(_alphabar())
  want = la[n - 1] + frac * (la[n] - la[n - 1])
  got, slope = transport.discrete_log_alpha(tc)
  np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=f"seed {seed}")
  np.testing.assert_allclose(slope, (la[n] - la[n - 1]) * N, rtol=1e-12)
  lam = got - 0.5 * np.log(-np.expm1(2 * got))
  np.testing.assert_allclose(transport.discrete_inverse_lambda(lam), tc, rtol=1e-10)
  with jax.enable_x64(True):
    t = 1.0 - tc
    a, s, da, ds = (np.asarray(v) for v in transport.path_coefficients("ScaledLinear", t))
    np.testing.assert_allclose(a, np.exp(want), rtol=1e-12)
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-12)
    h = 1e-7
    plus = transport.path_coefficients("ScaledLinear", t + h)
    minus = transport.path_coefficients("ScaledLinear", t - h)
    np.testing.assert_allclose(da, (plus[0] - minus[0]) / (2 * h), rtol=1e-6)
    np.testing.assert_allclose(ds, (plus[1] - minus[1]) / (2 * h), rtol=1e-6)


# ---------------------------------------------------------------- training objective


@seeds.each(0)
def test_draw_noise_and_time_draws_every_step_uniformly(seed):
  """t = 1 - n/1000 with n ~ U{1..1000} as upstream's `Schedule.sample` (chi-square of 200 000
  draws below its 99.99 % point), and x0 ~ N(0, I) of x1's shape."""
  x1 = jnp.zeros((200_000, 1))
  x0, t = jax.jit(lambda r: transport.draw_noise_and_time(r, x1, _cfg()))(jax.random.key(seed))
  n = np.asarray(transport.discrete_index(t))
  np.testing.assert_allclose(np.asarray(t), 1 - n / N, atol=1e-7, err_msg=f"seed {seed}")
  counts = np.bincount(n, minlength=N + 1)
  assert counts[0] == 0 and counts[1:].min() > 0, seed
  expected = len(n) / N
  chi2 = ((counts[1:] - expected) ** 2 / expected).sum()
  assert chi2 < 1000 + 4.3 * np.sqrt(2 * 1000), (seed, chi2)
  assert abs(float(np.std(x0)) - 1) < 0.01 and x0.shape == x1.shape


@seeds.each(0)
def test_loss_at_is_lsimple(seed):
  """loss_at as train.py calls it: the network gets DiM's integer step n (exactly, from t = 1 -
  n/1000), x_t = sqrt(alphabar_n) x1 + sqrt(1 - alphabar_n) x0 (float64 reference), and the loss
  is the per-sample mean of (eps_pred - x0)^2."""
  rng = np.random.default_rng(seed)
  x1 = rng.standard_normal((8, 4, 4, 3)).astype(np.float32)
  x0 = rng.standard_normal(x1.shape).astype(np.float32)
  n = rng.integers(1, N + 1, size=8)
  t = (1.0 - n / N).astype(np.float32)
  seen = {}

  def model_fn(x_t, t_net, y):
    seen["x_t"], seen["t_net"], seen["y"] = x_t, t_net, y
    return jnp.tanh(x_t) * 0.5

  loss = np.asarray(transport.loss_at(model_fn, x0, x1, t, np.arange(8), _cfg()))
  np.testing.assert_array_equal(np.asarray(seen["t_net"]), n.astype(np.float32))
  ab = _alphabar()[n - 1][:, None, None, None]
  x_t = np.sqrt(ab) * x1 + np.sqrt(1 - ab) * x0
  np.testing.assert_allclose(seen["x_t"], x_t, rtol=1e-6, atol=1e-6, err_msg=f"seed {seed}")
  want = ((np.tanh(np.asarray(seen["x_t"], np.float64)) * 0.5 - x0) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(loss, want, rtol=1e-5, err_msg=f"seed {seed}")


def test_objective_choices_are_validated():
  assert transport.canonical_path("scaled_linear") == "ScaledLinear"  # diffusers' spelling
  with pytest.raises(ValueError, match="set transport.prediction='noise'") as e:
    transport.loss_at(
      lambda *a: a[0],
      jnp.zeros((1, 2)),
      jnp.zeros((1, 2)),
      jnp.zeros(1),
      None,
      _cfg(prediction="velocity"),
    )
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="prediction='noise'"):
    sampling.make_sampling_velocity_fn(lambda *a: a[0], path_type="ScaledLinear")
  config = ml_collections.ConfigDict(
    {
      "transport": _cfg(),
      "sample": {"solver": "heun"},
      "model": default_model_config(),
      "optim": optim.default_optim_config(),
    }
  )
  config.model.name = "DiM-L/2"
  train.check_choices(config)
  assert transport.time_interval(_cfg(), eval=True) == (0.0, 1.0 - 1e-3)


@seeds.each(0)
def test_train_batch_loss_on_a_dim(seed):
  """train.batch_loss (the loop's own loss) on a tiny DiM with the discrete objective equals
  LSimple computed by hand from the same draws."""
  rng = np.random.default_rng(seed)
  mc = default_model_config()
  mc.update(
    name="DiM-L/2",
    hidden_size=32,
    depth=3,
    input_size=8,
    num_classes=10,
    label_dropout=0.0,
    scan_impl="reference",
    remat="none",
  )
  model = create_model(mc)
  params = jax.tree.map(
    lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
    dim_convert.abstract_params(model),
  )
  x1 = jnp.asarray(rng.standard_normal((4, 8, 8, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=4), jnp.int32)
  x0, t = transport.draw_noise_and_time(jax.random.key(seed), x1, _cfg())
  micro = {"x0": x0, "x1": x1, "t": t, "y": y}

  def both(params):
    loss = train.batch_loss(params, micro, jax.random.key(1), model=model, transport_config=_cfg())
    n = transport.discrete_index(t)
    ab = jnp.asarray(_alphabar(), jnp.float32)[n - 1][:, None, None, None]
    eps = model.apply(
      {"params": params}, jnp.sqrt(ab) * x1 + jnp.sqrt(1 - ab) * x0, n.astype(jnp.float32), y
    )
    return loss, jnp.mean((eps - x0) ** 2)

  loss, manual = jax.jit(both, compiler_options=common.FAST)(params)
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss, manual, rtol=1e-5, err_msg=f"seed {seed}")


# ---------------------------------------------------------------- Gaussian data: exact answers

MU, S2 = 0.7, 0.5**2  # data ~ N(MU, S2 I)


def _exact_eps(x, t_cont):
  """The exact noise predictor of N(MU, S2 I) data: sigma (x - alpha MU) / (alpha^2 S2 +
  sigma^2)."""
  la, _ = transport.discrete_log_alpha(t_cont)
  a, s2 = jnp.exp(la), -jnp.expm1(2 * la)
  a, s2 = (v.reshape(v.shape + (1,) * (x.ndim - 1)) for v in (a, s2))
  return jnp.sqrt(s2) * (x - a * MU) / (a * a * S2 + s2)


def _exact_flow(x_T, t_from, t_to):
  """The probability-flow map of Gaussian data: affine, matching the marginals' moments."""
  a0, a1 = (np.exp(transport.discrete_log_alpha(t)[0]) for t in (t_from, t_to))
  v0, v1 = (a * a * S2 + 1 - a * a for a in (a0, a1))
  return a1 * MU + np.sqrt(v1 / v0) * (x_T - a0 * MU)


def _diffrax_solve(eps_fn, x_T, tol):
  """The package's PF-ODE velocity of the discrete model (make_sampling_velocity_fn), solved by
  diffrax in float64 with the schedule's 1000 kinks as jump times."""
  vf = sampling.make_sampling_velocity_fn(
    lambda x, t_net, y: eps_fn(x, t_net / N), path_type="ScaledLinear", prediction="noise"
  )
  term = diffrax.ODETerm(lambda t, x, _: vf(x, jnp.broadcast_to(t, (x.shape[0],))))
  t1 = 1.0 - 1e-3
  jumps = np.sort(1.0 - np.arange(2, N) / N)
  controller = diffrax.PIDController(rtol=tol, atol=tol, jump_ts=jumps[jumps < t1])
  sol = diffrax.diffeqsolve(
    term, diffrax.Dopri8(), 0.0, t1, 1e-3, x_T, stepsize_controller=controller, max_steps=100_000
  )
  return sol.ys[0]


@seeds.each(0)
def test_probability_flow_ode_of_the_discrete_model(seed):
  """Gaussian data: diffrax on the package's velocity (float64, tolerance 1e-12) reaches the
  exact flow map to 1e-8; the package's own fixed-step solver (solve_ode, heun) to 1e-3."""
  x_T = np.random.default_rng(seed).standard_normal((2, 8))
  exact = _exact_flow(x_T, 1.0, 1e-3)
  with jax.enable_x64(True):
    x = jax.jit(lambda x: _diffrax_solve(_exact_eps, x, 1e-12))(x_T)
  assert np.abs(np.asarray(x) - exact).max() < 1e-8, seed
  vf = sampling.make_sampling_velocity_fn(
    lambda x, t_net, y: _exact_eps(x, t_net / N), path_type="ScaledLinear", prediction="noise"
  )
  t0, t1 = transport.time_interval(_cfg(), eval=True)
  res = jax.jit(lambda x: sampling.solve_ode(vf, x, solver="heun", num_steps=200, t0=t0, t1=t1))(
    x_T.astype(np.float32)
  )
  assert np.abs(np.asarray(res.x1) - exact).max() < 1e-3, seed


# ---------------------------------------------------------------- DPM-Solver


class UpstreamDPMSolver:
  """upstream dpm_solver_pp.py's DPM_Solver ('fast' and 'multistep', solver_type 'dpm_solver'),
  transliterated to NumPy float64 formula by formula, recording its model calls."""

  def __init__(self, eps_fn, predict_x0):
    self.eps_fn, self.x0, self.calls = eps_fn, predict_x0, []

  @staticmethod
  def la(t):
    return transport.discrete_log_alpha(np.float64(t))[0]

  def sig(self, t):
    return np.sqrt(1 - np.exp(2 * self.la(t)))

  def lam(self, t):
    return self.la(t) - np.log(self.sig(t))

  def model(self, x, t):
    self.calls.append(float(t))
    eps = np.asarray(self.eps_fn(x, np.full(x.shape[0], t)))
    return (x - self.sig(t) * eps) / np.exp(self.la(t)) if self.x0 else eps

  def first(self, x, s, t, m=None):
    h = self.lam(t) - self.lam(s)
    m = self.model(x, s) if m is None else m
    if self.x0:
      return self.sig(t) / self.sig(s) * x + np.exp(self.la(t)) * (1 - np.exp(-h)) * m
    return np.exp(self.la(t) - self.la(s)) * x - self.sig(t) * np.expm1(h) * m

  def second(self, x, s, t, r1):
    la, sig, inv = self.la, self.sig, transport.discrete_inverse_lambda
    h = self.lam(t) - self.lam(s)
    s1 = inv(self.lam(s) + r1 * h)
    m = self.model(x, s)
    if self.x0:
      p11, p1 = np.expm1(-r1 * h), np.expm1(-h)
      m1 = self.model(sig(s1) / sig(s) * x - np.exp(la(s1)) * p11 * m, s1)
      return sig(t) / sig(s) * x - np.exp(la(t)) * p1 * m - 0.5 / r1 * np.exp(la(t)) * p1 * (m1 - m)
    p11, p1 = np.expm1(r1 * h), np.expm1(h)
    m1 = self.model(np.exp(la(s1) - la(s)) * x - sig(s1) * p11 * m, s1)
    return np.exp(la(t) - la(s)) * x - sig(t) * p1 * m - 0.5 / r1 * sig(t) * p1 * (m1 - m)

  def third(self, x, s, t, r1, r2):
    la, sig, inv = self.la, self.sig, transport.discrete_inverse_lambda
    h = self.lam(t) - self.lam(s)
    s1, s2 = inv(self.lam(s) + r1 * h), inv(self.lam(s) + r2 * h)
    m = self.model(x, s)
    if self.x0:
      p11, p12, p1 = np.expm1(-r1 * h), np.expm1(-r2 * h), np.expm1(-h)
      p22, p2 = np.expm1(-r2 * h) / (r2 * h) + 1, p1 / h + 1
      m1 = self.model(sig(s1) / sig(s) * x - np.exp(la(s1)) * p11 * m, s1)
      m2 = self.model(
        sig(s2) / sig(s) * x - np.exp(la(s2)) * p12 * m + r2 / r1 * np.exp(la(s2)) * p22 * (m1 - m),
        s2,
      )
      return sig(t) / sig(s) * x - np.exp(la(t)) * p1 * m + 1 / r2 * np.exp(la(t)) * p2 * (m2 - m)
    p11, p12, p1 = np.expm1(r1 * h), np.expm1(r2 * h), np.expm1(h)
    p22, p2 = np.expm1(r2 * h) / (r2 * h) - 1, p1 / h - 1
    m1 = self.model(np.exp(la(s1) - la(s)) * x - sig(s1) * p11 * m, s1)
    m2 = self.model(
      np.exp(la(s2) - la(s)) * x - sig(s2) * p12 * m - r2 / r1 * sig(s2) * p22 * (m1 - m), s2
    )
    return np.exp(la(t) - la(s)) * x - sig(t) * p1 * m - 1 / r2 * sig(t) * p2 * (m2 - m)

  def multistep(self, x, ms, ts, t):
    la, sig, lam = self.la, self.sig, self.lam
    if len(ms) == 1:
      return self.first(x, ts[-1], t, ms[-1])
    h = lam(t) - lam(ts[-1])
    r0 = (lam(ts[-1]) - lam(ts[-2])) / h
    d10 = (ms[-1] - ms[-2]) / r0
    a, e = np.exp(la(t)), (np.exp(-h) if self.x0 else np.exp(h))
    if len(ms) == 2:
      if self.x0:
        return sig(t) / sig(ts[-1]) * x - a * (e - 1) * ms[-1] - 0.5 * a * (e - 1) * d10
      return (
        np.exp(la(t) - la(ts[-1])) * x - sig(t) * (e - 1) * ms[-1] - 0.5 * sig(t) * (e - 1) * d10
      )
    r1 = (lam(ts[-2]) - lam(ts[-3])) / h
    d11 = (ms[-2] - ms[-3]) / r1
    d1, d2 = d10 + r0 / (r0 + r1) * (d10 - d11), (d10 - d11) / (r0 + r1)
    if self.x0:
      return (
        sig(t) / sig(ts[-1]) * x
        - a * (e - 1) * ms[-1]
        + a * ((e - 1) / h + 1) * d1
        - a * ((e - 1 + h) / h**2 - 0.5) * d2
      )
    return (
      np.exp(la(t) - la(ts[-1])) * x
      - sig(t) * (e - 1) * ms[-1]
      - sig(t) * ((e - 1) / h - 1) * d1
      - sig(t) * ((e - 1 - h) / h**2 - 0.5) * d2
    )

  def sample(self, x, steps, method, order=3, t_T=1.0, t_0=1e-3):
    ts = np.linspace(t_T, t_0, steps + 1)
    if method == "fast":
      k = steps // 3 + 1
      orders = (
        [3] * (k - 2) + [2, 1]
        if steps % 3 == 0
        else [3] * (k - 1) + [1]
        if steps % 3 == 1
        else [3] * (k - 1) + [2]
      )
      i = 0
      for o in orders:
        s, t = ts[i], ts[i + o]
        h = self.lam(t) - self.lam(s)
        r = [(self.lam(ts[i + j]) - self.lam(s)) / h for j in (1, 2) if j < o]
        x = [None, self.first, self.second, self.third][o](x, s, t, *r)
        i += o
      return x
    ms, tl = [self.model(x, ts[0])], [ts[0]]
    for step in range(1, steps + 1):
      x = self.multistep(x, ms[-order:], tl[-order:], ts[step])
      if step < steps:
        ms.append(self.model(x, ts[step]))
        tl.append(ts[step])
    return x


def _net(x, t_cont):
  """A nonlinear smooth noise predictor (float64 NumPy or JAX)."""
  xp = jnp if isinstance(x, jax.Array) else np
  t = t_cont.reshape(t_cont.shape + (1,) * (x.ndim - 1))
  return xp.tanh(0.8 * x + 0.3 * xp.sin(3 * t)) + 0.2 * x * t


@pytest.mark.parametrize("method", ["fast", "multistep"])
@pytest.mark.parametrize("predict_x0", [True, False], ids=["data", "noise"])
@pytest.mark.parametrize("steps", [50, 10])
def test_dpm_solver_is_upstreams_algorithm(method, predict_x0, steps):
  """Every model call (time) and the result against the transliteration of upstream's code, on
  a nonlinear predictor, float64: the same to 1e-12 (seed 0 inputs)."""
  x_T = np.random.default_rng(0).standard_normal((3, 5))
  ref = UpstreamDPMSolver(_net, predict_x0)
  want = ref.sample(x_T, steps, method)
  plan = dpm_solver.dpm_solver_plan(steps, 3, method, predict_x0=predict_x0)
  np.testing.assert_allclose(plan.t, ref.calls, rtol=0, atol=1e-13)
  with jax.enable_x64(True):
    x = jax.jit(
      lambda x: dpm_solver.sample_dpm_solver(
        _net, x, steps=steps, method=method, predict_x0=predict_x0
      )[0]
    )(x_T)
  assert len(plan.t) == steps == len(ref.calls)
  assert np.abs(np.asarray(x) - want).max() < 1e-12 * np.abs(want).max()


def test_dpm_solver_calls_are_upstreams():
  """DiM's setting (50 steps, order 3, 'fast', time-uniform, 1 -> 1e-3): the model-call times
  of upstream's float32 run (golden upsample_guidance.npz) and its step orders 3 x 16, 2."""
  calls = np.load(golden_file("dim/upsample_guidance.npz"))["dpm_calls_m2"][:, 0]
  plan = dpm_solver.dpm_solver_plan()
  np.testing.assert_allclose(plan.t, calls, rtol=0, atol=1e-6)
  assert plan.reset.sum() == 17 and list(np.flatnonzero(plan.reset)) == list(range(0, 50, 3))
  with pytest.raises(ValueError, match="order"):
    dpm_solver.dpm_solver_plan(50, order=1, method="fast")


@seeds.each(0)
def test_dpm_solver_on_gaussian_data(seed):
  """Closed form: 'fast' DPM-Solver++ on logSNR steps reaches the exact flow map to 5e-6 at 200
  steps; multistep converges at second order (its first-order first step dominates: doubling
  the steps quarters the error); DiM's own setting (time-uniform, 50 steps) lands within 2 %
  (its last interval spans a large step in lambda, which bounds its accuracy)."""
  x_T = np.random.default_rng(seed).standard_normal((4, 8))
  exact = _exact_flow(x_T, 1.0, 1e-3)
  err = lambda x: np.abs(np.asarray(x) - exact).max() / np.abs(exact).max()
  with jax.enable_x64(True):
    fast = err(dpm_solver.sample_dpm_solver(_exact_eps, x_T, steps=200, skip_type="logSNR")[0])
    multi = [
      err(
        dpm_solver.sample_dpm_solver(
          _exact_eps, x_T, steps=n, skip_type="logSNR", method="multistep"
        )[0]
      )
      for n in (150, 300)
    ]
    dim_default = err(dpm_solver.sample_dpm_solver(_exact_eps, x_T)[0])
  assert fast < 5e-6 and multi[1] < 1e-5 and 0.2 < multi[1] / multi[0] < 0.3, (seed, fast, multi)
  assert dim_default < 2e-2, (seed, dim_default)


@seeds.each(0)
def test_dpm_solver_against_diffrax(seed):
  """A nonlinear predictor: the tight diffrax solve of the PF-ODE (tolerance 1e-12, itself
  good to ~5e-7) and DPM-Solver agree, to 2e-6 with 500 logSNR steps and to 5e-3 in DiM's
  setting."""
  x_T = np.random.default_rng(seed).standard_normal((2, 6))
  with jax.enable_x64(True):
    ode = np.asarray(jax.jit(lambda x: _diffrax_solve(_net, x, 1e-12))(x_T))
    fine, _ = dpm_solver.sample_dpm_solver(_net, x_T, steps=500, skip_type="logSNR")
    dim_default, _ = dpm_solver.sample_dpm_solver(_net, x_T)
  err = lambda x: np.abs(np.asarray(x) - ode).max() / np.abs(ode).max()
  assert err(fine) < 2e-6 and err(dim_default) < 5e-3, (seed, err(fine), err(dim_default))


# ---------------------------------------------------------------- guidance and a real DiM


@seeds.each(0)
def test_uvit_guidance_and_dpm_solver_on_a_dim(seed):
  """U-ViT guidance is cond + s (cond - uncond) of two separate calls (= guided_velocity with
  scale 1 + s); DPM-Solver samples a tiny class-conditional DiM through make_noise_fn with the
  network traced once (one scan body) and called at 1000 t_cont."""
  rng = np.random.default_rng(seed)
  mc = default_model_config()
  mc.update(
    name="DiM-L/2",
    hidden_size=32,
    depth=3,
    input_size=8,
    num_classes=10,
    scan_impl="reference",
    remat="none",
  )
  model = create_model(mc)
  params = jax.tree.map(
    lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
    dim_convert.abstract_params(model),
  )
  traces, times = [], []

  def net(x, t, y):
    traces.append(1)
    times.append(t)
    return model.apply({"params": params}, x, t, y)

  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  y = jnp.asarray([3, 7], jnp.int32)
  t = jnp.asarray([250.0, 250.0])
  guided, cond, uncond, velocity_form = jax.jit(
    lambda x: (
      dpm_solver.uvit_guided_noise(net, x, t, y, 0.4, 10),
      net(x, t, y),
      net(x, t, jnp.full_like(y, 10)),
      sampling.guided_velocity(net, x, t, y, 1.4, 10),
    ),
    compiler_options=common.FAST,
  )(x)
  np.testing.assert_allclose(guided, cond + 0.4 * (cond - uncond), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(guided, velocity_form, rtol=1e-5, atol=1e-5)
  traces.clear()
  noise_fn = dpm_solver.make_noise_fn(net, y, cfg_scale=0.4, null_label=10)
  out, nfe = jax.jit(
    lambda x: dpm_solver.sample_dpm_solver(noise_fn, x), compiler_options=common.FAST
  )(x)
  assert nfe == 50 and len(traces) == 1 and np.isfinite(np.asarray(out)).all(), seed
