"""DiM's sampler: DPM-Solver on the discrete 'ScaledLinear' schedule, with U-ViT guidance.

DiM (transport path "ScaledLinear", noise prediction): the ODE solvers of `sampling` integrate its
probability-flow ODE (`sampling.make_sampling_velocity_fn(..., path_type='ScaledLinear',
prediction='noise')` gives the network DiM's time 1000 (1 - t)); DiM's own sampler, DPM-Solver
(`sample_dpm_solver`: 50 steps, order 3, 'fast', time-uniform, data prediction, as upstream's
dpm_solver_pp.py), runs on `make_noise_fn` (U-ViT guidance eps_c + s (eps_c - eps_u), i.e.
cfg_scale = 1 + s in `sampling`) or on Upsample Guidance
(`upsample_guidance.make_upsample_guided_noise_fn`, the noise form, with predict_x0=False) in DiM's
time t_cont = 1 - t.

These samplers work in DiM's continuous time t_cont in (0, 1] (1 = noise; package time
t = 1 - t_cont) with a noise predictor `noise_fn(x, t_cont [B]) -> eps` on x [B, ...] (or
`noise_fn(x, t_cont, args)`, args arrays with a leading batch axis, as the samplers of `sampling`
take them), built from a network by `make_noise_fn` (network time 1000 t_cont). The schedule is
`transport`'s 'ScaledLinear' (DPM-Solver's NoiseScheduleVP('discrete')).

`dpm_solver_plan` turns a run into fixed linear algebra on the host (NumPy float64, one row per
model evaluation: `DPMPlan`); `sample_dpm_solver` runs it from x_T [B, ...] as one lax.scan, pure
and jit-able. The sampling option `dpm_steps` (default `sampling.DPM_STEPS`) sets the steps.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dimsum_jax import sampling
from dimsum_jax import transport

DPM_METHODS = ("fast", "multistep")
DPM_SKIP_TYPES = ("time_uniform", "logSNR")


def uvit_guided_noise(model_fn, x, t, y, scale, null_label: int):
  """U-ViT's guidance `eps_c + scale (eps_c - eps_u)` (= sampling.guided_velocity with scale + 1),
  with the conditional and null-label halves as ONE call on the interleaved doubled batch."""
  cond, uncond = sampling.cond_and_uncond(model_fn, x, t, y, null_label)
  return cond + jnp.asarray(scale, cond.dtype) * (cond - uncond)


def make_noise_fn(model_fn, y=None, *, cfg_scale: float = 0.0, null_label: int | None = None):
  """`noise_fn(x, t_cont, labels=None)` for the DiM samplers from `model_fn(x, t, y)` (a DiM:
  noise prediction at network time 1000 t_cont), with U-ViT guidance of `cfg_scale` (DiM's
  `sample.scale`: 0.4 at 256 px, 0.7 at 512 px; 0 = none). Labels given at call time (the
  samplers' args) replace `y`."""
  if cfg_scale and null_label is None:
    raise ValueError("classifier-free guidance needs the null label (num_classes)")

  def noise_fn(x, t_cont, labels=None):
    labels = y if labels is None else labels
    t_net = transport.DISCRETE_STEPS * t_cont
    if not cfg_scale:
      return model_fn(x, t_net, labels)
    if labels is None:
      raise ValueError("classifier-free guidance needs labels: pass y, or labels as args")
    return uvit_guided_noise(model_fn, x, t_net, labels, cfg_scale, null_label)

  return noise_fn


class DPMPlan(NamedTuple):
  """A DPM-Solver run as fixed linear algebra (NumPy float64), one row per model evaluation j:
  x_j = base[j] x_b + sum_k buffer[j, k] m_k with m_0 the newest of the last three model
  outputs; x_b := x_j where `reset[j]`; then m = noise (or, with predict_x0, data) prediction
  at (x_j, t[j]), converted with alpha[j], sigma[j]. The result is final_base x_b +
  final_buffer . m."""

  t: np.ndarray
  base: np.ndarray
  buffer: np.ndarray
  reset: np.ndarray
  alpha: np.ndarray
  sigma: np.ndarray
  final_base: float
  final_buffer: np.ndarray
  predict_x0: bool


def _schedule(t_cont):
  """(log alpha, sigma, lambda) of the discrete schedule, NumPy float64."""
  log_alpha, _ = transport.discrete_log_alpha(np.asarray(t_cont, np.float64))
  sigma = np.sqrt(-np.expm1(2.0 * log_alpha))
  return log_alpha, sigma, log_alpha - np.log(sigma)


def dpm_time_steps(skip_type: str, t_start: float, t_end: float, n: int) -> np.ndarray:
  """n + 1 times from t_start down to t_end, uniform in time or in lambda."""
  if skip_type == "time_uniform":
    return np.linspace(t_start, t_end, n + 1)
  if skip_type == "logSNR":
    lam = np.linspace(_schedule(t_start)[2], _schedule(t_end)[2], n + 1)
    return transport.discrete_inverse_lambda(lam)
  raise ValueError(f"unknown skip_type {skip_type!r}; expected one of {DPM_SKIP_TYPES}")


def _combo(base, terms):
  return (float(base), {k: float(v) for k, v in terms.items() if v != 0.0})


def _first_order(s, t, predict_x0):
  """(factor of x_s, factor of the model output at s) of the first-order update s -> t."""
  ls, ss, lams = _schedule(s)
  lt, st, lamt = _schedule(t)
  h = lamt - lams
  if predict_x0:
    return st / ss, -np.exp(lt) * np.expm1(-h)
  return np.exp(lt - ls), -st * np.expm1(h)


def _singlestep(s, t, order, r1, r2, m0, first_call, predict_x0):
  """DPM-Solver(++)-`order` from s to t (upstream `dpm_solver_{first,second,third}_update`,
  solver_type 'dpm_solver') given the output m0 at s: the intermediate calls [(time, combo)]
  (call indices first_call, first_call + 1) and the end combination."""
  if order == 1:
    base, c0 = _first_order(s, t, predict_x0)
    return [], _combo(base, {m0: c0})
  ls, ss, lams = _schedule(s)
  lt, st, lamt = _schedule(t)
  h = lamt - lams
  sign = -1.0 if predict_x0 else 1.0
  # x_u = x_base(u) x_s + scale(u) * (combination of outputs), per the data / noise form.
  x_base = (lambda l, sg: sg / ss) if predict_x0 else (lambda l, sg: np.exp(l - ls))
  scale = (lambda l, sg: np.exp(l)) if predict_x0 else (lambda l, sg: sg)
  s1 = float(transport.discrete_inverse_lambda(lams + r1 * h))
  l1, sg1, _ = _schedule(s1)
  calls = [(s1, _combo(x_base(l1, sg1), {m0: -scale(l1, sg1) * np.expm1(sign * r1 * h)}))]
  m1 = first_call
  phi1 = np.expm1(sign * h)
  end = scale(lt, st)
  if order == 2:
    d = -(0.5 / r1) * end * phi1
    return calls, _combo(x_base(lt, st), {m0: -end * phi1 - d, m1: d})
  s2 = float(transport.discrete_inverse_lambda(lams + r2 * h))
  l2, sg2, _ = _schedule(s2)
  phi12 = np.expm1(sign * r2 * h)
  c = -sign * (r2 / r1) * scale(l2, sg2) * (phi12 / (r2 * h) - sign)
  calls.append((s2, _combo(x_base(l2, sg2), {m0: -scale(l2, sg2) * phi12 - c, m1: c})))
  m2 = first_call + 1
  c = -sign * (1.0 / r2) * end * (phi1 / h - sign)
  return calls, _combo(x_base(lt, st), {m0: -end * phi1 - c, m2: c})


def _multistep(ms, ts, t, predict_x0):
  """Upstream's multistep update of order len(ms) (1: first order, 2: 'dpm_solver' type, 3)
  from ts[-1] to t, with outputs (call indices) ms at times ts, oldest first."""
  order = len(ms)
  if order == 1:
    base, c0 = _first_order(ts[-1], t, predict_x0)
    return _combo(base, {ms[-1]: c0})
  lam = [_schedule(u)[2] for u in ts]
  lp, sp, _ = _schedule(ts[-1])
  lt, st, lamt = _schedule(t)
  h = lamt - lam[-1]
  if predict_x0:
    base, e, a = st / sp, np.expm1(-h), np.exp(lt)
    c_m, c_d1, c_d2 = -a * e, -0.5 * a * e, 0.0
    if order == 3:
      c_d1, c_d2 = a * (e / h + 1.0), -a * ((e + h) / h**2 - 0.5)
  else:
    base, e = np.exp(lt - lp), np.expm1(h)
    c_m, c_d1, c_d2 = -st * e, -0.5 * st * e, 0.0
    if order == 3:
      c_d1, c_d2 = -st * (e / h - 1.0), -st * ((e - h) / h**2 - 0.5)
  r0 = (lam[-1] - lam[-2]) / h
  d1_0 = {ms[-1]: 1.0 / r0, ms[-2]: -1.0 / r0}  # D1_0 = (m_-1 - m_-2) / r0
  d1, d2 = dict(d1_0), {}
  if order == 3:
    r1 = (lam[-2] - lam[-3]) / h
    d1_1 = {ms[-2]: 1.0 / r1, ms[-3]: -1.0 / r1}
    diff = {k: d1_0.get(k, 0.0) - d1_1.get(k, 0.0) for k in set(d1_0) | set(d1_1)}
    d1 = {k: d1_0.get(k, 0.0) + r0 / (r0 + r1) * v for k, v in diff.items()}
    d2 = {k: v / (r0 + r1) for k, v in diff.items()}
  terms = {ms[-1]: c_m}
  for coef, vec in ((c_d1, d1), (c_d2, d2)):
    for k, v in vec.items():
      terms[k] = terms.get(k, 0.0) + coef * v
  return _combo(base, terms)


def dpm_solver_plan(
  steps: int = sampling.DPM_STEPS,
  order: int = 3,
  method: str = "fast",
  skip_type: str = "time_uniform",
  t_start: float = 1.0,
  t_end: float = 1e-3,
  predict_x0: bool = True,
) -> DPMPlan:
  """The model calls and update coefficients of upstream's `DPM_Solver.sample` (U-ViT's
  dpm_solver_pp.py, as DiM samples): `steps` model evaluations from t_start to t_end.

  method "fast" (DiM's): singlestep DPM-Solver steps of order 3 over three intervals of the grid
  of steps + 1 times, the intermediate times at the grid points between (through lambda), and
  last steps of order 2 and/or 1 (steps % 3 = 0: 3, ..., 3, 2, 1; 1: 3, ..., 1; 2: 3, ..., 2);
  order 2: steps of order 2 (and a last of order 1 for odd steps). method "multistep":
  multistep DPM-Solver of `order` (1 to 3) on the grid, its first steps at orders 1, 2
  (upstream's code path; its undefined-`timesteps` bug fixed). predict_x0 True is DPM-Solver++
  (data prediction; DiM's 256/512 evaluation), False the noise form (DiM's Upsample Guidance).
  """
  if method not in DPM_METHODS:
    raise ValueError(f"unknown DPM-Solver method {method!r}; expected one of {DPM_METHODS}")
  if order not in (1, 2, 3) or (method == "fast" and order == 1) or steps < order:
    raise ValueError(
      f"DPM-Solver order {order} with {steps} steps: use order 2 or 3 ('fast') "
      f"or 1 to 3 ('multistep'), with at least `order` steps."
    )
  grid = dpm_time_steps(skip_type, t_start, t_end, steps)
  stages = [(grid[0], _combo(1.0, {}), True)]  # (time, combination, starts a step)
  if method == "fast":
    k = steps // 3 + 1 if order == 3 else steps // 2
    if order == 3:
      orders = (
        [3] * (k - 2) + [2, 1]
        if steps % 3 == 0
        else [3] * (k - 1) + ([1] if steps % 3 == 1 else [2])
      )
    else:
      orders = [2] * k + ([1] if steps % 2 else [])
    i, end = 0, None
    for o in orders:
      if end is not None:  # the step's first call, at the last step's end
        stages.append((grid[i], end, True))
      lam = [_schedule(g)[2] for g in grid[i : i + o + 1]]
      h = lam[-1] - lam[0]
      r1 = (lam[1] - lam[0]) / h if o > 1 else None
      r2 = (lam[2] - lam[0]) / h if o > 2 else None
      calls, end = _singlestep(
        grid[i], grid[i + o], o, r1, r2, len(stages) - 1, len(stages), predict_x0
      )
      stages += [(u, combo, False) for u, combo in calls]
      i += o
  else:
    for step in range(1, steps + 1):
      first = max(0, step - order)
      end = _multistep(list(range(first, step)), list(grid[first:step]), grid[step], predict_x0)
      if step < steps:
        stages.append((grid[step], end, True))
  if len(stages) != steps:
    raise AssertionError(f"DPM-Solver plan has {len(stages)} calls for {steps} steps")

  def slots(j, terms):
    row = np.zeros(3)
    for m, c in terms.items():
      slot = (j - 1) - m  # calls 0 .. j-1 are done; slot 0 holds call j-1
      if not 0 <= slot < 3:
        raise AssertionError("DPM-Solver plan reaches back more than three calls")
      row[slot] += c
    return row

  t = np.array([u for u, _, _ in stages], np.float64)
  log_alpha, sigma, _ = _schedule(t)
  return DPMPlan(
    t=t,
    base=np.array([c[0] for _, c, _ in stages]),
    buffer=np.stack([slots(j, c[1]) for j, (_, c, _) in enumerate(stages)]),
    reset=np.array([r for _, _, r in stages]),
    alpha=np.exp(log_alpha),
    sigma=sigma,
    final_base=end[0],
    final_buffer=slots(len(stages), end[1]),
    predict_x0=predict_x0,
  )


def sample_dpm_solver(noise_fn: Callable, x_T, *, args=None, **plan_options):
  """(x at t_end, nfe): DPM-Solver from x_T ~ N(0, I) at t_start, as `dpm_solver_plan(**
  plan_options)` lays it out (steps, order, method, skip_type, t_start, t_end, predict_x0; its
  defaults are DiM's: 50 steps, order 3, 'fast', time-uniform, t_end 1e-3, data prediction).
  `noise_fn(x, t_cont)` (or `noise_fn(x, t_cont, args)`) predicts the noise; it is traced once (a
  lax.scan over the evaluations), so compile time does not grow with the steps. NFE = steps."""
  plan = dpm_solver_plan(**plan_options)
  dtype = x_T.dtype
  b = x_T.shape[0]
  cast = lambda a: jnp.asarray(a, dtype)
  rows = (
    cast(plan.t),
    cast(plan.base),
    cast(plan.buffer),
    jnp.asarray(plan.reset),
    cast(plan.alpha),
    cast(plan.sigma),
  )

  def stage(carry, row):
    x_base, buf = carry
    t, base, weights, reset, alpha, sigma = row
    x = base * x_base + jnp.tensordot(weights, buf, axes=1)
    x_base = jnp.where(reset, x, x_base)
    eps = sampling.call_with_args(noise_fn, x, jnp.broadcast_to(t, (b,)), args).astype(dtype)
    out = (x - sigma * eps) / alpha if plan.predict_x0 else eps
    return (x_base, jnp.concatenate([out[None], buf[:2]])), None

  buf = jnp.zeros((3,) + x_T.shape, dtype)
  (x_base, buf), _ = jax.lax.scan(stage, (x_T, buf), rows)
  x = cast(plan.final_base) * x_base + jnp.tensordot(cast(plan.final_buffer), buf, axes=1)
  return x, len(plan.t)
