"""Samplers for the flow-matching model: probability-flow ODE (diffrax), Euler-Maruyama SDE, CFG.

Time runs from t0 (noise, t = 0) to t1 (data, t = 1). A sampler takes `velocity_fn(x, t) -> dx/dt` with
x [B, ...] and t [B] (one time per sample, all equal); build it from a network with
`make_sampling_velocity_fn` (classifier-free guidance, then conversion of a noise/score output to the
ODE drift, see `transport.velocity_from_prediction`). Per-sample conditioning (labels) can instead
travel as `args` (arrays with a leading batch axis): the samplers then call `velocity_fn(x, t, args)`,
and the per-sample ODE mode hands each sample its own slice.

ODE (upstream `Sampler.sample_ode`, torchdiffeq `odeint`):
  - "dopri5": adaptive, PIDController(rtol, atol) (upstream defaults atol 1e-6, rtol 1e-3). The state
    is the whole batch, so the error norm (RMS over every element of the batch) and therefore the step
    sizes are shared by all samples, as with torchdiffeq upstream: a sample's trajectory depends on its
    batch mates through the step sizes (within the tolerances). `per_sample=True` instead vmaps the
    solve over samples: each sample gets its own steps; the model is still called on the whole batch,
    max-over-samples times (finished samples ride along masked).
  - "euler", "heun": `num_steps` equal steps (upstream's fixed-grid solvers would take num_steps - 1:
    they get the grid linspace(t0, t1, num_steps)). For dopri5 `num_steps` is unused (upstream uses it
    only for the output time grid).

Model evaluations (NFE) per batch. diffrax's `sol.stats` counts steps (num_steps = num_accepted_steps +
num_rejected_steps), not evaluations, and its FSAL Dopri5 re-evaluates the first stage on every retry
of a rejected first step, which the stats cannot show. So `solve_ode` evaluates f(t0, x0) itself, picks
the initial step size itself (diffrax's / Hairer's rule: one more evaluation) and hands diffrax a warm
FSAL state. Then exactly:
  dopri5: NFE = 1 + 1 (initial step; 0 if dt0 is given) + 6 * (accepted + rejected steps)
  euler:  NFE = num_steps            heun: NFE = 2 * num_steps
These counts are verified in tests/test_sampling.py by counting real calls.

Running out of `max_steps` does not throw inside the solve (throw=False); the status comes back in
`ODEResult.status`. `check_ode_result` raises `ODESolveError` on the host. `sample_ode` does that for
you when called outside jit; under jit call `solve_ode` and `check_ode_result` after the jit boundary.

SDE (upstream `Sampler.sample_sde`): dx = [v + D(t) score] dt + sqrt(2 D(t)) dW, same marginals as the
ODE for any diffusion form D (`transport.diffusion_coefficient`), on the grid linspace(t0, t1, n)
(n - 1 steps) and then a last step over [t1, 1]: "Mean" (drift only, default), "Tweedie" (E[x1|x]),
"Euler" (ODE drift only) or None. The score comes from the same model output as the velocity, so one
evaluation per Euler-Maruyama step (upstream calls the model twice: once for the drift, once for the
score). Heun: 2 per step on n // 2 grid points, as upstream.

DiM (transport path "ScaledLinear", noise prediction): the same ODE solvers integrate its
probability-flow ODE (`make_sampling_velocity_fn` gives the network DiM's time 1000 (1 - t)); DiM's
own sampler, DPM-Solver, is `dpm_solver.sample_dpm_solver`; Upsample Guidance (sampling at m times
the trained size) is `upsample_guidance.make_upsample_guided_model_fn`.

Everything here is pure and jit-able; on sharded global arrays nothing leaves the device (CFG doubles
the batch by interleaving, so each device's shard is doubled locally), and a jitted sampler may be
traced and run inside jax.transfer_guard("disallow") (tested). Call the samplers under jax.jit: eager
calls recompile diffrax's internal jit whenever velocity_fn is a new closure.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dimsum_jax import choices
from dimsum_jax import transport

ODE_SOLVERS = ("dopri5", "euler", "heun")
SDE_METHODS = ("euler", "heun")
LAST_STEPS = ("Mean", "Tweedie", "Euler")

# ODEResult.status codes
STATUS_OK = 0
STATUS_MAX_STEPS = 1
STATUS_OTHER = 2

DPM_STEPS = 50  # DiM's evaluation: 50 model calls

# Every sampling option: (default, help). `default_sampling_config()` and the flags of
# `python -m dimsum_jax.sample` (one per option, of its default's type) are both made from this
# table, so a new option is added here once. Defaults: upstream sample.py / SiT parse_ode_args and
# parse_sde_args.
SAMPLING_OPTIONS = {
  "mode": (
    "ode",
    "ode (probability flow), sde (Euler-Maruyama / Heun) or dpm (DPM-Solver, "
    "DiM's sampler for its discrete noise-prediction models).",
  ),
  "solver": ("dopri5", "ODE solver: dopri5 (adaptive), euler or heun."),
  "num_steps": (250, "euler/heun steps; SDE grid points; unused by dopri5."),
  "atol": (1e-6, "dopri5 absolute tolerance."),
  "rtol": (1e-3, "dopri5 relative tolerance."),
  "max_steps": (4096, "dopri5 step budget per batch (accepted + rejected)."),
  "per_sample": (False, "dopri5: step sizes per sample instead of per batch."),
  "cfg_scale": (1.0, "Classifier-free guidance scale (1 = none: no unconditional evaluation)."),
  "upsample_guidance": (
    0.0,
    "With --image_size m times the trained size: Upsample Guidance "
    "scale (0 = off; make_upsample_guided_model_fn).",
  ),
  "ug_eta": (0.3, "Upsample Guidance acts over the first ug_eta of the way from noise."),
  "sde_method": ("euler", "SDE: euler (Euler-Maruyama) or heun."),
  "diffusion_form": ("sigma", "SDE diffusion form (transport.DIFFUSION_FORMS)."),
  "diffusion_norm": (1.0, "SDE diffusion scale."),
  "last_step": ("Mean", "SDE last step: Mean, Tweedie, Euler or None."),
  "last_step_size": (0.04, "SDE last step size."),
  "dpm_steps": (
    DPM_STEPS,
    "--mode=dpm: model evaluations (order 3, 'fast', time-uniform, as DiM).",
  ),
  "seed": (0, "Sample i starts from the noise of fold_in(key(seed), i)."),
}


def default_sampling_config() -> ml_collections.ConfigDict:
  """The sampling options at their defaults (SAMPLING_OPTIONS), the seed among them."""
  return ml_collections.ConfigDict(
    {name: default for name, (default, _) in SAMPLING_OPTIONS.items()}
  )


def default_grid_config() -> ml_collections.ConfigDict:
  """`config.sample`: the EMA sample grids that training writes to WORKDIR/samples/ every
  `every_steps` steps and at the end (0 = only at the end, -1 = never)."""
  c = ml_collections.ConfigDict()
  c.every_steps = 10_000
  c.rows = 10  # one class per row (conditional data)
  c.per_row = 8
  c.classes = ()  # row classes; () = spread evenly over all classes
  c.solver = "euler"  # ODE solver: euler | heun | dopri5
  c.num_steps = 50  # euler / heun steps from noise (t = 0) to data (t = 1)
  c.cfg_scale = 1.0  # classifier-free guidance scale (1 = none)
  c.seed = 0
  c.png_scale = 0  # integer upscaling of the PNG (0 = to at least 64 px tiles)
  return c


def validate_grid_config(c) -> None:
  """One sentence (ValueError) for a `config.sample` the grid sampler cannot take."""
  choices.check("sample.solver", c.solver, ODE_SOLVERS, canonical_solver)


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance


def _is_static_one(scale) -> bool:
  return isinstance(scale, (int, float, np.integer, np.floating)) and float(scale) == 1.0


def cond_and_uncond(model_fn, x, t, y, null_label: int):
  """(conditional, null-label) outputs of `model_fn(x, t, y)` as ONE call on the doubled batch,
  interleaved [x_0, x_0, x_1, x_1, ...] with labels [y_0, null, y_1, null, ...] so that a
  batch-sharded x stays local to its device. x [b, ...], t scalar or [b], y [b]."""
  b = x.shape[0]
  x2 = jnp.stack([x, x], axis=1).reshape((2 * b,) + x.shape[1:])
  t = jnp.broadcast_to(jnp.asarray(t), (b,))
  t2 = jnp.stack([t, t], axis=1).reshape(2 * b)
  y2 = jnp.stack([y, jnp.full_like(y, null_label)], axis=1).reshape(2 * b)
  out = model_fn(x2, t2, y2)
  out = out.reshape((b, 2) + out.shape[1:])
  return out[:, 0], out[:, 1]


def guided_velocity(model_fn, x, t, y, scale, null_label: int):
  """uncond + scale * (cond - uncond) on all channels (upstream `forward_with_cfg`).

  The conditional and unconditional halves are ONE `model_fn(x, t, y)` call on the doubled batch,
  interleaved [x_0, x_0, x_1, x_1, ...] with labels [y_0, null, y_1, null, ...] so that a batch-sharded
  x stays local to its device. A Python scale of 1 calls the model once on the plain batch (no
  unconditional evaluation). A traced scale uses lax.cond (both branches compiled, one run).
  Works for any prediction type: the conversions to velocity are affine in the output.
  """

  def cond_only(x, t, y):
    return model_fn(x, t, y)

  def guided(x, t, y):
    cond, uncond = cond_and_uncond(model_fn, x, t, y, null_label)
    return uncond + jnp.asarray(scale, cond.dtype) * (cond - uncond)

  if _is_static_one(scale):
    return cond_only(x, t, y)
  if isinstance(scale, (int, float, np.integer, np.floating)):
    return guided(x, t, y)
  return jax.lax.cond(jnp.asarray(scale) == 1, cond_only, guided, x, t, y)


def make_sampling_velocity_fn(
  model_fn,
  y=None,
  *,
  path_type: str = "GVP",
  prediction: str = "velocity",
  cfg_scale=1.0,
  null_label: int | None = None,
):
  """`velocity_fn(x, t, labels=None)` for the samplers from `model_fn(x, t, y)`: guidance, then the
  ODE drift. Labels given at call time (the samplers' `args`) replace `y`."""
  if not _is_static_one(cfg_scale) and null_label is None:
    raise ValueError("classifier-free guidance needs the null label (num_classes)")

  path_type, prediction = transport.canonical_objective(path_type, prediction)

  def velocity_fn(x, t, labels=None):
    labels = y if labels is None else labels
    t_net = transport.network_time(path_type, t)  # t itself, or DiM's 1000 (1 - t)
    if _is_static_one(cfg_scale):
      pred = model_fn(x, t_net, labels)
    else:
      if labels is None:
        raise ValueError(
          "classifier-free guidance needs labels: pass y, or labels as the samplers' args"
        )
      pred = guided_velocity(model_fn, x, t_net, labels, cfg_scale, null_label)
    return transport.velocity_from_prediction(
      pred, x, t, path_type=path_type, prediction=prediction
    )

  return velocity_fn


# ------------------------------------------------------------------------------------------------
# Probability-flow ODE


class ODEResult(NamedTuple):
  """Output of `solve_ode`. Arrays (jit-friendly); in per-sample mode the step fields are [B]."""

  x1: Any
  nfe: Any  # model evaluations on the batch (per-sample mode: the max over samples)
  num_steps: Any  # attempted steps (accepted + rejected)
  num_accepted_steps: Any
  num_rejected_steps: Any
  status: Any  # STATUS_OK | STATUS_MAX_STEPS | STATUS_OTHER (int32)


class ODESolveError(RuntimeError):
  pass


def canonical_solver(solver: str) -> str:
  s = solver.lower()
  if s not in ODE_SOLVERS:
    raise ValueError(f"unknown ODE solver {solver!r}; expected one of {ODE_SOLVERS}")
  return s


def call_with_args(velocity_fn, x, t, args):
  """velocity_fn(x, t), or velocity_fn(x, t, args) with per-sample args (the samplers' `args`)."""
  return velocity_fn(x, t) if args is None else velocity_fn(x, t, args)


def _vector_field(velocity_fn, args):
  def vf(t, x, unused_args):
    del unused_args
    tb = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
    return call_with_args(velocity_fn, x, tb, args).astype(x.dtype)

  return vf


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def _initial_step(vf, t0, t1, x0, f0, error_order, rtol, atol):
  """Hairer's starting step (as diffrax's PIDController), reusing f0: one evaluation."""
  direction = jnp.sign(t1 - t0)
  scale = atol + jnp.abs(x0) * rtol
  d0 = _rms(x0 / scale)
  d1 = _rms(f0 / scale)
  small = (d0 < 1e-5) | (d1 < 1e-5)
  h0 = jnp.where(small, 1e-6, 0.01 * d0 / jnp.where(small, 1.0, d1))
  f1 = vf(t0 + direction * h0, x0 + direction * h0 * f0, None)
  d2 = _rms((f1 - f0) / scale) / h0
  max_d = jnp.maximum(d1, d2)
  h1 = jnp.where(
    max_d <= 1e-15,
    jnp.maximum(1e-6, h0 * 1e-3),
    (0.01 / jnp.maximum(max_d, 1e-15)) ** (1.0 / error_order),
  )
  return direction * jnp.minimum(100.0 * h0, h1)


def _diffrax_constants():
  """diffrax puts a few host constants on the device while it is traced (e.g. its RESULTS codes),
  which a surrounding jax.transfer_guard('disallow') rejects. Allow them for the trace only: under
  jit nothing inside runs again at execution time, so no runtime transfer is hidden."""
  return jax.transfer_guard("allow")


def _status(result):
  with _diffrax_constants():
    return _status_codes(result)


def _status_codes(result):
  return jnp.where(
    result == diffrax.RESULTS.successful,
    STATUS_OK,
    jnp.where(result == diffrax.RESULTS.max_steps_reached, STATUS_MAX_STEPS, STATUS_OTHER),
  ).astype(jnp.int32)


def _solve_batch(velocity_fn, x0, args, *, solver, num_steps, atol, rtol, t0, t1, max_steps, dt0):
  vf = _vector_field(velocity_fn, args)
  term = diffrax.ODETerm(vf)
  saveat = diffrax.SaveAt(t1=True)
  t0 = jnp.asarray(t0, jnp.float32)
  t1 = jnp.asarray(t1, jnp.float32)
  if solver in ("euler", "heun"):
    ts = jnp.linspace(t0, t1, num_steps + 1)
    method = diffrax.Euler() if solver == "euler" else diffrax.Heun()
    with _diffrax_constants():
      sol = diffrax.diffeqsolve(
        term,
        method,
        t0,
        t1,
        None,
        x0,
        saveat=saveat,
        stepsize_controller=diffrax.StepTo(ts=ts),
        max_steps=num_steps,
        throw=False,
      )
    per_step = 1 if solver == "euler" else 2
    nfe = per_step * sol.stats["num_steps"]
  else:
    method = diffrax.Dopri5()
    f0 = vf(t0, x0, None)
    extra = 1
    if dt0 is None:
      dt0 = _initial_step(vf, t0, t1, x0, f0, method.error_order(term), rtol, atol)
      extra = 2
    # Warm FSAL state (first_step=False, f0): every step then costs exactly 6 evaluations.
    first_step, f_init = method.init(term, t0, t1, x0, None)
    assert jax.tree.structure(f_init) == jax.tree.structure(f0), "unexpected diffrax FSAL state"
    solver_state = (jnp.zeros_like(first_step), f0)
    with _diffrax_constants():
      sol = diffrax.diffeqsolve(
        term,
        method,
        t0,
        t1,
        dt0,
        x0,
        saveat=saveat,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
        throw=False,
        solver_state=solver_state,
      )
    nfe = extra + 6 * sol.stats["num_steps"]
  return ODEResult(
    x1=sol.ys[0],
    nfe=jnp.asarray(nfe, jnp.int32),
    num_steps=jnp.asarray(sol.stats["num_steps"], jnp.int32),
    num_accepted_steps=jnp.asarray(sol.stats["num_accepted_steps"], jnp.int32),
    num_rejected_steps=jnp.asarray(sol.stats["num_rejected_steps"], jnp.int32),
    status=_status(sol.result),
  )


def solve_ode(
  velocity_fn: Callable,
  x0,
  *,
  solver: str = "dopri5",
  num_steps: int = 50,
  atol: float = 1e-6,
  rtol: float = 1e-3,
  t0: float = 0.0,
  t1: float = 1.0,
  max_steps: int = 4096,
  dt0: float | None = None,
  per_sample: bool = False,
  args=None,
) -> ODEResult:
  """Integrate dx/dt = velocity_fn(x, t) from t0 to t1 (jit-able; never raises on failure).

  solver "dopri5" (adaptive; atol, rtol, max_steps, dt0 = None for the automatic first step,
  per_sample) or "euler" / "heun" (num_steps equal steps). Check `status` with `check_ode_result`.
  args: None, or a pytree of per-sample arrays [B, ...] (e.g. labels): velocity_fn(x, t, args).
  """
  solver = canonical_solver(solver)
  kw = dict(
    solver=solver,
    num_steps=int(num_steps),
    atol=atol,
    rtol=rtol,
    t0=t0,
    t1=t1,
    max_steps=int(max_steps),
    dt0=dt0,
  )
  if not per_sample or solver != "dopri5":
    return _solve_batch(velocity_fn, x0, args, **kw)

  def one(xi, ai):  # velocity_fn sees x [1, ...], t [1] (and args [1, ...]) in each vmapped lane
    return _solve_batch(velocity_fn, xi[None], jax.tree.map(lambda a: a[None], ai), **kw)

  res = jax.vmap(one)(x0, args)
  return res._replace(x1=res.x1[:, 0], nfe=jnp.max(res.nfe))


def check_ode_result(result: ODEResult, *, max_steps: int | None = None) -> None:
  """Raise ODESolveError on the host if any solve did not finish (call outside jit)."""
  status = np.asarray(jax.device_get(result.status))
  if np.all(status == STATUS_OK):
    return
  steps = np.asarray(jax.device_get(result.num_steps))
  budget = f"max_steps={max_steps}" if max_steps is not None else "max_steps"
  if np.any(status == STATUS_MAX_STEPS):
    raise ODESolveError(
      f"ODE solve stopped at {budget} ({int(steps.max())} steps taken) before reaching t1. "
      "Raise max_steps, or loosen the tolerances (atol/rtol), or use a fixed-step solver."
    )
  raise ODESolveError(
    "ODE solve failed (diffrax result other than success / max_steps_reached); "
    "the step size may have underflowed: check the model output for NaN/inf."
  )


def _is_concrete(x) -> bool:
  try:
    np.asarray(x)
    return True
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return False


def sample_ode(
  velocity_fn: Callable,
  x0,
  *,
  solver: str = "dopri5",
  num_steps: int = 50,
  atol: float = 1e-6,
  rtol: float = 1e-3,
  t0: float = 0.0,
  t1: float = 1.0,
  max_steps: int = 4096,
  dt0: float | None = None,
  per_sample: bool = False,
  args=None,
):
  """(x1, nfe): `solve_ode`, raising ODESolveError when it ran out of steps (outside jit only)."""
  res = solve_ode(
    velocity_fn,
    x0,
    solver=solver,
    num_steps=num_steps,
    atol=atol,
    rtol=rtol,
    t0=t0,
    t1=t1,
    max_steps=max_steps,
    dt0=dt0,
    per_sample=per_sample,
    args=args,
  )
  if _is_concrete(res.status):
    check_ode_result(res, max_steps=max_steps)
  return res.x1, res.nfe


# ------------------------------------------------------------------------------------------------
# SDE


def canonical_last_step(last_step):
  if last_step is None or str(last_step).lower() == "none":
    return None
  for choice in LAST_STEPS:
    if str(last_step).lower() == choice.lower():
      return choice
  raise ValueError(f"unknown last_step {last_step!r}; expected one of {LAST_STEPS} or None")


def sample_sde(
  velocity_fn: Callable,
  x0,
  rng,
  *,
  path_type: str = "GVP",
  num_steps: int = 250,
  method: str = "euler",
  diffusion_form: str = "sigma",
  diffusion_norm: float = 1.0,
  last_step: str | None = "Mean",
  last_step_size: float = 0.04,
  t0: float = 0.0,
  t1: float | None = None,
  args=None,
):
  """(x1, nfe): stochastic sampler from noise x0 (upstream `sample_sde`, defaults of SiT's CLI).

  Grid linspace(t0, t1, n) with n = num_steps (euler) or num_steps // 2 (heun), n - 1 steps, then
  the last step from t1 to 1. t1 defaults to 1 - last_step_size (1 without a last step). For the
  transport's own interval use `transport.time_interval(cfg, eval=True, sde=True, ...)`.
  NFE: euler n - 1, heun 2 (n - 1), plus 1 for a last step. args: as for `solve_ode`.
  """
  method = method.lower()
  if method not in SDE_METHODS:
    raise ValueError(f"unknown SDE method {method!r}; expected one of {SDE_METHODS}")
  last_step = canonical_last_step(last_step)
  if last_step is None:
    last_step_size = 0.0
  elif last_step_size == -1:
    last_step_size = 1.0 / num_steps
  if t1 is None:
    t1 = 1.0 - last_step_size
  n = num_steps if method == "euler" else num_steps // 2
  if n < 2:
    raise ValueError("the SDE grid needs at least 2 points")
  path_type = transport.canonical_path(path_type)
  form = transport.canonical_diffusion_form(diffusion_form)
  if form == "SBDM" and path_type != "VP" and float(t0) <= 0.0:
    raise ValueError(
      "the SBDM diffusion is infinite at t = 0 for GVP/Linear paths: start at "
      "t0 > 0 (set transport.sample_eps, e.g. 1e-3) or pick another diffusion form"
    )

  dtype = x0.dtype
  b = x0.shape[0]
  ts = jnp.linspace(t0, t1, n, dtype=jnp.float32)
  dt = (ts[1] - ts[0]).astype(dtype)
  bt = lambda t: jnp.broadcast_to(jnp.asarray(t, dtype), (b,))

  def diffusion(t):
    return transport.diffusion_coefficient(
      form, t, path_type=path_type, norm=diffusion_norm
    ).astype(dtype)

  def drifts(x, t):
    """(ODE drift v, SDE drift v + D score) from one model evaluation."""
    v = call_with_args(velocity_fn, x, bt(t), args).astype(dtype)
    score = transport.score_from_velocity(v, x, bt(t), path_type)
    return v, v + diffusion(t) * score

  def em_step(x, inp):
    t, key = inp
    _, f = drifts(x, t)
    z = jax.random.normal(key, x.shape, dtype)
    return x + f * dt + jnp.sqrt(2.0 * diffusion(t)) * jnp.sqrt(dt) * z, None

  def heun_step(x, inp):
    t, key = inp
    z = jax.random.normal(key, x.shape, dtype)
    x_hat = x + jnp.sqrt(2.0 * diffusion(t)) * jnp.sqrt(dt) * z
    _, k1 = drifts(x_hat, t)
    _, k2 = drifts(x_hat + dt * k1, t + dt)
    return x_hat + 0.5 * dt * (k1 + k2), None

  keys = jax.random.split(rng, n - 1)
  step = em_step if method == "euler" else heun_step
  x, _ = jax.lax.scan(step, x0, (ts[:-1], keys))
  nfe = (n - 1) * (1 if method == "euler" else 2)

  if last_step is not None:
    t_last = ts[-1]
    if last_step == "Tweedie":
      v = call_with_args(velocity_fn, x, bt(t_last), args).astype(dtype)
      x = transport.data_from_velocity(v, x, bt(t_last), path_type)
    else:
      v, f = drifts(x, t_last)
      x = x + (f if last_step == "Mean" else v) * jnp.asarray(last_step_size, dtype)
    nfe += 1
  return x, nfe
