"""Inference: forward throughput at a large batch, and batch-1 dopri5 sampling latency with its NFE.

forward: `model.apply` (bf16 compute, no guidance) jitted on a batch of --forward-batch latents,
  the weights cast once before the timed calls (--no-precast: in every call); images/s = batch /
  median call time, and model FLOP/s from dimsum_jax.tools.flops.
dopri5: one probability-flow ODE solve of batch 1 from noise (t = 0) to data (t = 1) with
  `dimsum_jax.sampling.solve_ode` (diffrax Dopri5, atol 1e-6, rtol 1e-3 as upstream), the velocity
  from `sampling.make_sampling_velocity_fn`, the whole solve one jitted program, the weights cast
  once per solve to the dtype the model reads them in as `dimsum_jax.sampler` does
  (`dimsum_jax.precast`; --no-precast: cast in every evaluation). Reported: median latency of a
  solve, its model evaluations (NFE, counted exactly by solve_ode) and ms per NFE.
dpm (--solvers dpm): DiM's DPM-Solver (`dpm_solver.sample_dpm_solver`, --dpm-steps evaluations, the
  network read as noise prediction on the discrete schedule, U-ViT guidance at --cfg-scale - 1).
--profile DIR: also the kernel time by category (benchmarks/profile_step.py) of 5 forward calls
  and of 1 solve, with kernels and kernel time per NFE.
--upsample-guidance THETA: at sample sizes m >= 2 times --trained-size, every evaluation also runs
  the network at the trained size (`upsample_guidance.make_upsample_guided_model_fn`), as
  `dimsum_jax.sample --upsample_guidance` does; NFE counts the sampled-size evaluations.

Weights: random (no trained checkpoint is needed or read). A freshly initialised DiMSUM or DiT
outputs exactly zero (zero-initialised final and adaLN-Zero layers), which an adaptive solver
crosses in one step; --perturb (default 0.02) replaces every all-zero parameter by N(0, perturb^2)
so that the velocity field is a non-trivial function of x and t. The NFE of a trained model differs;
latency = NFE x (ms per NFE) transfers.

  python benchmarks/sample.py                           # DiMSUM-L/2: forward 256, dopri5 256/512 px
  python benchmarks/sample.py --models DiT-L/2 --cfg-scale 1.4
  python benchmarks/sample.py --models DiM-L/2 --sample-sizes 512 --solvers dopri5 dpm
  python benchmarks/sample.py --skip-forward --sample-sizes 512 1024 --upsample-guidance 1.0
  python benchmarks/sample.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from dimsum_jax import dpm_solver  # noqa: E402
from dimsum_jax import models  # noqa: E402
from dimsum_jax import precast  # noqa: E402
from dimsum_jax import sampling  # noqa: E402
from dimsum_jax import transport  # noqa: E402
from dimsum_jax import upsample_guidance  # noqa: E402
from dimsum_jax.ops import selective_scan  # noqa: E402


def init_params(model, cfg, seed: int, perturb: float):
  """Random parameters; all-zero leaves (zero-init layers) replaced by N(0, perturb^2)."""
  s = cfg.input_size
  x = jnp.zeros((1, s, s, cfg.in_channels), jnp.float32)
  params = jax.jit(lambda k: model.init(k, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))(
    jax.random.PRNGKey(seed)
  )["params"]
  if perturb <= 0:
    return params

  @jax.jit
  def fill(params, key):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [
      jnp.where(jnp.any(l != 0), l, perturb * jax.random.normal(k, l.shape, l.dtype))
      for k, l in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, leaves)

  return fill(params, jax.random.PRNGKey(seed + 1))


def precast_once(args, model_fn, params, *example):
  """--precast: params cast once (outside the timed calls) to the dtype model_fn reads them in."""
  if not args.precast:
    return params
  return jax.jit(lambda p, *e: precast.precast_params(model_fn, p, *e))(params, *example)


def profile_call(args, compiled, call, median_ms: float, calls: int) -> dict | None:
  """--profile: kernel time by category over `calls` traced calls (benchmarks/profile_step.py)."""
  if not args.profile:
    return None
  from benchmarks import profile_step  # pylint: disable=g-import-not-at-top

  summary = profile_step.profile(
    compiled, call, os.path.join(args.profile, "trace"), steps=calls, step_ms=median_ms, top=40
  )
  summary.pop("trace_file", None)
  print(profile_step.format_table(summary), file=sys.stderr, flush=True)
  return summary


def inputs(cfg, batch: int, seed: int):
  kx, kt, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
  s = cfg.input_size
  return (
    jax.random.normal(kx, (batch, s, s, cfg.in_channels), jnp.float32),
    jax.random.uniform(kt, (batch,), jnp.float32),
    jax.random.randint(ky, (batch,), 0, max(cfg.num_classes, 1), jnp.int32),
  )


def model_config(args, name: str, image_size: int):
  """The model section of `name` at image_size pixels with the command's settings."""
  cfg = common.model_config(
    name, image_size // 8, dtype=args.dtype, scan_impl=args.scan_impl, smoke=args.smoke
  )
  if args.inference_scan_unroll is not None and "inference_scan_unroll" in models.fields_read(name):
    cfg.inference_scan_unroll = args.inference_scan_unroll
  if args.inference_hoist_adaln and "inference_hoist_adaln" in models.fields_read(name):
    cfg.inference_hoist_adaln = True
  return cfg


def field_read(cfg, field: str):
  """The model's setting of `field`, None for a model that does not read it."""
  return cfg[field] if field in models.fields_read(cfg.name) else None


def bench_forward(args, name: str, image_size: int, batch: int) -> dict:
  cfg = model_config(args, name, image_size)
  model = models.create_model(cfg)
  params = init_params(model, cfg, args.seed, args.perturb)
  x, t, y = inputs(cfg, batch, args.seed + 2)
  apply = lambda p, x, t, y: model.apply({"params": p}, x, t, y)
  params = precast_once(args, apply, params, x, t, y)
  fwd = jax.jit(apply)
  compiled, compile_s = common.timed_compile(fwd, params, x, t, y, compiler_options=_options(args))
  out = compiled(params, x, t, y)
  finite = bool(jnp.all(jnp.isfinite(out)))
  samples = common.time_calls(
    lambda: compiled(params, x, t, y), warmup=args.warmup, repeats=args.repeats
  )
  timing = common.summary(samples)
  profile = profile_call(args, compiled, lambda: compiled(params, x, t, y), timing["median_ms"], 5)
  images_per_s = batch / (timing["median_ms"] / 1e3)
  flop = 2.0 * common.forward_macs(model)
  return {
    "benchmark": "forward",
    "model": name,
    "image_size": image_size,
    "batch": batch,
    "dtype": args.dtype,
    "scan_impl": common.resolved_scan_impl(cfg),
    "compile_s": compile_s,
    "call": timing,
    "images_per_s": images_per_s,
    "gflop_per_image": flop / 1e9,
    "model_tflops_per_s": images_per_s * flop / 1e12,
    "mfu": common.mfu(images_per_s * flop),
    "output_finite": finite,
    "precast": args.precast,
    "fuse_scans": args.fuse_scans,
    "time_segments": selective_scan.MAX_TIME_SEGMENTS if args.fuse_scans else 1,
    "inference_scan_unroll": field_read(cfg, "inference_scan_unroll"),
    "inference_hoist_adaln": field_read(cfg, "inference_hoist_adaln"),
    **({"profile": profile} if profile else {}),
    "memory": common.memory_stats(),
    "memory_plan": common.compiled_memory(compiled),
  }


def model_fn_for(args, name: str, image_size: int, objective):
  """(model_fn(params, x, t, y), params, cfg) at image_size; with --upsample-guidance and an
  image_size above --trained-size, params is (params, trained-size params) and model_fn the
  guided network (upsample_guidance.make_upsample_guided_model_fn), as `dimsum_jax.sample` builds
  it."""
  cfg = model_config(args, name, image_size)
  model = models.create_model(cfg)
  params = init_params(model, cfg, args.seed, args.perturb)
  m = image_size // args.trained_size
  if not (args.upsample_guidance and m >= 2):
    return (lambda p, x, t, y: model.apply({"params": p}, x, t, y)), params, cfg
  base_cfg = model_config(args, name, args.trained_size)
  base = models.create_model(base_cfg)
  base_params = init_params(base, base_cfg, args.seed, args.perturb)

  def guided(p, x, t, y):
    return upsample_guidance.make_upsample_guided_model_fn(
      lambda x, t, y: model.apply({"params": p[0]}, x, t, y),
      lambda x, t, y: base.apply({"params": p[1]}, x, t, y),
      m,
      path_type=objective[0],
      prediction=objective[1],
      theta=args.upsample_guidance,
      eta=args.ug_eta,
    )(x, t, y)

  return guided, (params, base_params), cfg


def bench_solve(args, solver: str, name: str, image_size: int) -> dict:
  """One batch-1 sample: dopri5 on the probability-flow ODE of the flow-matching defaults, or
  DiM's DPM-Solver (noise prediction on the discrete schedule, U-ViT guidance)."""
  tcfg = transport.default_transport_config()
  objective = (tcfg.path_type, tcfg.prediction) if solver == "dopri5" else ("ScaledLinear", "noise")
  model_fn, params, cfg = model_fn_for(args, name, image_size, objective)
  x0, _, y = inputs(cfg, 1, args.seed + 3)
  num_classes = cfg.num_classes
  guided = args.cfg_scale != 1.0 and num_classes

  def solve(params, x0, y):
    if args.precast:  # as dimsum_jax.sampler: once per solve, outside the solver's loop
      params = precast.precast_params(model_fn, params, x0, jnp.zeros((1,)), y)
    net = lambda x, t, y: model_fn(params, x, t, y)
    if solver == "dpm":
      noise = dpm_solver.make_noise_fn(
        net, cfg_scale=args.cfg_scale - 1.0 if guided else 0.0, null_label=num_classes
      )
      x1, nfe = dpm_solver.sample_dpm_solver(noise, x0, steps=args.dpm_steps, args=y)
      return x1, jnp.asarray(nfe), None
    t0, t1 = transport.time_interval(tcfg, eval=True)
    velocity = sampling.make_sampling_velocity_fn(
      net,
      y if num_classes else None,
      path_type=tcfg.path_type,
      prediction=tcfg.prediction,
      cfg_scale=args.cfg_scale if guided else 1.0,
      null_label=num_classes,
    )
    res = sampling.solve_ode(
      velocity,
      x0,
      solver="dopri5",
      atol=args.atol,
      rtol=args.rtol,
      t0=t0,
      t1=t1,
      max_steps=args.max_steps,
    )
    return res.x1, res.nfe, res

  label = f"{solver} {name} {image_size} px"
  compiled, compile_s = common.timed_compile(
    jax.jit(solve), params, x0, y, compiler_options=_options(args)
  )
  print(f"{label}: compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
  x1, nfe, res = compiled(params, x0, y)
  nfe = int(nfe)
  print(f"{label}: NFE {nfe}", file=sys.stderr, flush=True)
  if res is not None:
    sampling.check_ode_result(res, max_steps=args.max_steps)
  samples = common.time_calls(
    lambda: compiled(params, x0, y)[0], warmup=args.warmup, repeats=args.repeats
  )
  timing = common.summary(samples)
  profile = profile_call(args, compiled, lambda: compiled(params, x0, y)[0], timing["median_ms"], 1)
  if profile:
    profile["kernels_per_nfe"] = profile["kernels_per_step"] / nfe
    profile["kernel_ms_per_nfe"] = profile["kernel_ms_per_step"] / nfe
  return {
    "benchmark": solver,
    "model": name,
    "image_size": image_size,
    "batch": 1,
    "dtype": args.dtype,
    "scan_impl": common.resolved_scan_impl(cfg),
    "cfg_scale": args.cfg_scale,
    "upsample_guidance": args.upsample_guidance if image_size >= 2 * args.trained_size else 0.0,
    "ug_eta": args.ug_eta,
    "trained_size": args.trained_size,
    **(
      {"atol": args.atol, "rtol": args.rtol, "perturb": args.perturb}
      if solver == "dopri5"
      else {"dpm_steps": args.dpm_steps, "perturb": args.perturb}
    ),
    "compile_s": compile_s,
    "solve": timing,
    "latency_s": timing["median_ms"] / 1e3,
    "nfe": nfe,
    **(
      {
        "steps": {
          "accepted": int(res.num_accepted_steps),
          "rejected": int(res.num_rejected_steps),
        }
      }
      if res is not None
      else {}
    ),
    "ms_per_nfe": timing["median_ms"] / nfe,
    "precast": args.precast,
    "fuse_scans": args.fuse_scans,
    "time_segments": selective_scan.MAX_TIME_SEGMENTS if args.fuse_scans else 1,
    "inference_scan_unroll": field_read(cfg, "inference_scan_unroll"),
    "inference_hoist_adaln": field_read(cfg, "inference_hoist_adaln"),
    **({"profile": profile} if profile else {}),
    "output_finite": bool(jnp.all(jnp.isfinite(x1))),
    "memory": common.memory_stats(),
  }


def _options(args):
  return common.SMOKE_COMPILER_OPTIONS if args.smoke else None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", nargs="+", default=["DiMSUM-L/2"])
  p.add_argument("--forward-batch", type=int, default=256)
  p.add_argument("--forward-size", type=int, default=256, help="pixels (latents size / 8)")
  p.add_argument("--sample-sizes", type=int, nargs="*", default=[256, 512])
  p.add_argument("--skip-forward", action="store_true")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--scan-impl", default="auto", choices=["auto", "pallas", "reference"])
  p.add_argument("--cfg-scale", type=float, default=1.0, help="1 = no guidance (batch not doubled)")
  p.add_argument("--atol", type=float, default=1e-6)
  p.add_argument("--rtol", type=float, default=1e-3)
  p.add_argument("--max-steps", type=int, default=4096)
  p.add_argument(
    "--solvers",
    nargs="+",
    default=["dopri5"],
    choices=["dopri5", "dpm"],
    help="dopri5: the flow-matching ODE; dpm: DiM's DPM-Solver (noise prediction)",
  )
  p.add_argument("--dpm-steps", type=int, default=sampling.DPM_STEPS, help="DPM-Solver NFE")
  p.add_argument(
    "--upsample-guidance",
    type=float,
    default=0.0,
    help="Upsample Guidance scale at sample sizes m >= 2 times --trained-size (0 = off)",
  )
  p.add_argument("--ug-eta", type=float, default=0.3)
  p.add_argument("--trained-size", type=int, default=256, help="pixels of the guiding model")
  p.add_argument(
    "--perturb",
    type=float,
    default=0.02,
    help="std of the noise put into all-zero (zero-initialised) parameters",
  )
  p.add_argument(
    "--no-precast",
    dest="precast",
    action="store_false",
    help="cast the weights in every evaluation (the sampler casts them once per batch)",
  )
  p.add_argument(
    "--no-fuse-scans",
    dest="fuse_scans",
    action="store_false",
    help="one kernel call per selective scan at every batch, over whole rows "
    "(selective_scan.FUSE_MAX_PROGRAMS=0, which also stops time segments)",
  )
  p.add_argument(
    "--time-segments",
    type=int,
    default=None,
    help="selective_scan.MAX_TIME_SEGMENTS: a kernel call of few programs runs each row as up to "
    "this many segments in two calls (default: the package's)",
  )
  p.add_argument(
    "--inference-scan-unroll",
    type=int,
    default=None,
    help="model.inference_scan_unroll: block groups (DiT blocks) per iteration of the stack's "
    "scan in the forward and the solve; 0: all (no dynamic slices of the stacked weights); "
    "default: the config's (1, a rolled loop)",
  )
  p.add_argument(
    "--inference-hoist-adaln",
    action="store_true",
    help="model.inference_hoist_adaln (DiMSUM): every block's adaLN Linear for all block groups "
    "in one batched matmul before the stack",
  )
  p.add_argument(
    "--profile",
    default=None,
    help="trace 5 forward calls and 1 solve into this folder: kernel time by category",
  )
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke", action="store_true", help="tiny models, small sizes, on any device")
  p.add_argument("--out", default=None, help="append the JSON lines to this file")
  args = p.parse_args(argv)
  if args.smoke:
    args.forward_batch, args.forward_size, args.sample_sizes = 4, 64, [64]
    if args.upsample_guidance:  # guided at twice the smoke size
      args.sample_sizes, args.trained_size = [128], 64
    args.repeats, args.warmup = 5, 1
  if args.repeats < 5:
    raise SystemExit("--repeats must be at least 5 (the median of fewer is noise).")
  if not args.fuse_scans:
    selective_scan.FUSE_MAX_PROGRAMS = 0
  if args.time_segments is not None:
    if args.time_segments < 1:
      raise SystemExit("--time-segments must be at least 1 (1: whole rows).")
    selective_scan.MAX_TIME_SEGMENTS = args.time_segments

  env = common.environment()
  jobs = []
  for name in args.models:
    if not args.skip_forward:
      jobs.append(
        (
          "forward",
          name,
          lambda n=name: bench_forward(args, n, args.forward_size, args.forward_batch),
        )
      )
    for size in args.sample_sizes:
      for solver in args.solvers:
        jobs.append((solver, name, lambda v=solver, n=name, s=size: bench_solve(args, v, n, s)))
  ok = 0
  for kind, name, job in jobs:
    try:
      record = {**job(), **env}
      ok += 1
    except Exception as e:  # noqa: BLE001 - report and go on
      traceback.print_exc()
      record = {"benchmark": kind, "model": name, **common.error_record(e), **env}
    common.emit(record, args.out)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
