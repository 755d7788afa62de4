"""Training-step throughput of DiMSUM-L/2 and the DiT-L/2 control: images/s, MFU, memory, compile.

The step is `dimsum_jax.train.train_step` (flow-matching loss, AdamW after gradient clipping, EMA
update) on synthetic latents, jitted with the state donated, the way train.py runs it. The configs
are configs/imagenet256.py (DiMSUM) and configs/imagenet256_dit.py (DiT) with the model name,
compute dtype and selective-scan implementation overridden; parameters stay float32.

Micro-batching: with micro-batch m < global batch B, one jitted program runs `train_step` over the
B/m micro-batches in a lax.scan with the optimiser wrapped in optax.MultiSteps(B/m), so gradients
are averaged over the global batch and AdamW steps once per global batch (the EMA blend runs once
per micro-batch: an elementwise pass over the parameters). m is the first of --micro-batch (default
B), its half, its quarter, ... whose compiled memory plan (XLA's memory analysis) fits the device.

Reported per setting (one JSON line): compile time (lower + compile wall time), median step time
over --repeats steps after --warmup, images/s, model FLOP/s and MFU (6 x forward multiply-
accumulates of dimsum_jax.tools.flops per image, 578 G for DiMSUM-L/2 at 256 px, over the dense
bf16 datasheet rate; also over a measured bf16 matmul rate with --measure-peak), peak device
memory (device.memory_stats) and XLA's memory plan.

  python benchmarks/train_step.py                      # both models, 256 px, batch 256, bf16
  python benchmarks/train_step.py --models DiMSUM-L/2 --scan-impls reference --micro-batch 32
  python benchmarks/train_step.py --smoke              # tiny models on the CPU (about a minute)
  python benchmarks/train_step.py --models DiMSUM-L/2 --wavelet-impl direct   # butterfly Haar
  python benchmarks/train_step.py --models DiMSUM-L/2 --remat dots --micro-batch 256
  python benchmarks/train_step.py --models DiT-L/2 --attention-impl cudnn
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import traceback
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import profile_step  # noqa: E402
from dimsum_jax import models  # noqa: E402
from dimsum_jax import train  # noqa: E402

CONFIGS = {"DiMSUM": "imagenet256", "DiT": "imagenet256_dit"}


@dataclasses.dataclass
class Setup:
  """A compiled training step with its inputs, ready to run."""
  name: str
  model: Any
  model_config: Any
  micro_batch: int
  compiled: Callable
  compile_s: float
  plan: dict | None
  make_state: Callable[[], Any]
  batch: dict
  tried: list


def experiment_config(name: str, latent_size: int, *, dtype: str, scan_impl: str, smoke: bool,
                      wavelet_impl: str = "jaxwt", remat: str = "none",
                      attention_impl: str = "xla"):
  """The published run's config (imagenet256[_dit]) with this model, size, dtype, scan, Haar and
  backward recomputation."""
  config = common.load_config(CONFIGS["DiMSUM" if common.is_dimsum(name) else "DiT"])
  config.model = common.model_config(name, latent_size, dtype=dtype, scan_impl=scan_impl,
                                     smoke=smoke, base=config.model)
  config.model.wavelet_impl = wavelet_impl
  config.model.remat = remat
  config.model.attention_impl = attention_impl
  return config


def step_fn(config, model, tx, micro_batches: int):
  """train.train_step, or a scan of it over micro-batches (tx must then be MultiSteps)."""
  step = functools.partial(
      train.train_step, model=model, tx=tx,
      schedule=train.learning_rate_schedule(config.optim, config.num_train_steps),
      transport_config=config.transport, ema_decay=config.optim.ema_decay,
      conditional=config.model.num_classes > 0)
  if micro_batches == 1:
    return step

  def accumulated(state, batch):
    split = jax.tree.map(
        lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch)
    state, metrics = jax.lax.scan(step, state, split)
    return state, jax.tree.map(lambda m: m[-1] if m.ndim else m, metrics)
  return accumulated


def synthetic_batch(rng, batch: int, latent_size: int, channels: int, num_classes: int):
  """Standard-normal latents (the scale of SD-VAE latents x 0.18215) and uniform labels."""
  kx, ky = jax.random.split(rng)
  return {"image": jax.random.normal(kx, (batch, latent_size, latent_size, channels), jnp.float32),
          "label": jax.random.randint(ky, (batch,), 0, max(num_classes, 1), jnp.int32)}


def micro_batch_candidates(global_batch: int, micro_batch: int) -> list[int]:
  """micro_batch (or the global batch), then halves of it while they divide the global batch."""
  m = micro_batch or global_batch
  if m < 1 or global_batch % m:
    raise ValueError(f"--micro-batch {micro_batch} does not divide the global batch "
                     f"{global_batch}: pick a divisor.")
  out = [m]
  while m % 2 == 0:
    m //= 2
    out.append(m)
  return out


def build(name: str, image_size: int, global_batch: int, *, micro_batch: int = 0,
          shrink: bool = True, dtype: str = "bfloat16", scan_impl: str = "auto",
          smoke: bool = False, seed: int = 0, headroom: float = 0.94,
          wavelet_impl: str = "jaxwt", remat: str = "none",
          attention_impl: str = "xla") -> Setup:
  """Compile the training step of `name` at `image_size` px (latents image_size / 8).

  micro_batch: the largest micro-batch tried (0: the global batch); with `shrink` it is halved
  until XLA's memory plan of the compiled step fits the device.
  """
  if image_size % 8:
    raise ValueError(f"--image-size {image_size} is not a multiple of 8 (the VAE's factor).")
  latent = image_size // 8
  config = experiment_config(name, latent, dtype=dtype, scan_impl=scan_impl, smoke=smoke,
                             wavelet_impl=wavelet_impl, remat=remat,
                             attention_impl=attention_impl)
  model = models.create_model(config.model)
  image_shape = (latent, latent, config.model.in_channels)
  conditional = config.model.num_classes > 0
  schedule = train.learning_rate_schedule(config.optim, config.num_train_steps)
  base_tx = train.make_optimizer(config.optim, schedule)
  rng = jax.random.PRNGKey(seed)
  batch = synthetic_batch(jax.random.fold_in(rng, 1), global_batch, latent,
                          config.model.in_channels, config.model.num_classes)
  abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  tried = []
  for m in micro_batch_candidates(global_batch, micro_batch):
    k = global_batch // m
    tx = (base_tx if k == 1 else
          optax.MultiSteps(base_tx, every_k_schedule=k).gradient_transformation())
    init = functools.partial(train.init_state, model=model, tx=tx, image_shape=image_shape,
                             conditional=conditional)
    abstract_state = jax.eval_shape(init, rng)
    jitted = jax.jit(step_fn(config, model, tx, k), donate_argnums=0)
    compiled, seconds = common.timed_compile(
        jitted, abstract_state, abstract_batch,
        compiler_options=common.SMOKE_COMPILER_OPTIONS if smoke else None)
    plan = common.compiled_memory(compiled)
    tried.append({"micro_batch": m, "compile_s": seconds,
                  "plan_gib": None if plan is None else plan["total_gib"]})
    if common.fits(plan, headroom) or m == 1 or not shrink:
      return Setup(name, model, config.model, m, compiled, seconds, plan,
                   lambda init=init: jax.jit(init)(rng), batch, tried)
  raise AssertionError("unreachable")


def run_setting(args, name: str, scan_impl: str, peak_measured: float | None) -> dict:
  record = {"benchmark": "train_step", "model": name, "image_size": args.image_size,
            "latent_size": args.image_size // 8, "global_batch": args.batch,
            "dtype": args.dtype, **common.environment()}
  micro = args.micro_batch
  if common.is_dimsum(name) and scan_impl == "reference" and not args.smoke:
    micro = min(micro or args.batch, args.reference_micro_batch)
  setup = build(name, args.image_size, args.batch, micro_batch=micro, dtype=args.dtype,
                scan_impl=scan_impl, smoke=args.smoke, headroom=args.headroom,
                wavelet_impl=args.wavelet_impl, remat=args.remat,
                attention_impl=args.attention_impl)
  record["scan_impl"] = common.resolved_scan_impl(setup.model_config)
  record["wavelet_impl"] = setup.model_config.wavelet_impl
  record["remat"] = setup.model_config.remat
  record["attention_impl"] = setup.model_config.attention_impl
  record["model_config"] = {k: setup.model_config[k] for k in ("depth", "hidden_size",
                                                              "drop_path", "label_dropout")}
  state = setup.make_state()
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = setup.compiled(holder["state"], setup.batch)
    return metrics["loss"]

  samples = common.time_calls(one_step, warmup=args.warmup, repeats=args.repeats)
  loss = float(one_step())
  timing = common.summary(samples)
  if args.profile and common.is_dimsum(name):
    record["profile"] = profile_step.profile(setup.compiled, one_step, args.trace_dir,
                                             steps=3, step_ms=timing["median_ms"])
    print(profile_step.format_table(record["profile"]), file=sys.stderr)
    with open(args.profile, "w") as fh:
      json.dump({**record, "micro_batch": setup.micro_batch}, fh, indent=1, default=str)
  images_per_s = args.batch / (timing["median_ms"] / 1e3)
  flop_per_image = common.train_flops_per_image(setup.model)
  record.update(
      micro_batch=setup.micro_batch, micro_batches=args.batch // setup.micro_batch,
      compile_s=setup.compile_s, compile_tried=setup.tried, step=timing,
      images_per_s=images_per_s, gflop_per_image=flop_per_image / 1e9,
      model_tflops_per_s=images_per_s * flop_per_image / 1e12,
      mfu=common.mfu(images_per_s * flop_per_image),
      peak_tflops=common.peak_flops() and common.peak_flops() / 1e12,
      mfu_vs_measured_matmul=(images_per_s * flop_per_image / peak_measured
                              if peak_measured else None),
      measured_matmul_tflops=peak_measured / 1e12 if peak_measured else None,
      memory=common.memory_stats(), memory_plan=setup.plan, loss=loss,
      loss_finite=bool(np.isfinite(loss)),
      params_m=sum(x.size for x in jax.tree.leaves(holder["state"].params)) / 1e6)
  del holder, state
  return record


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", nargs="+", default=["DiMSUM-L/2", "DiT-L/2"])
  p.add_argument("--image-size", type=int, default=256, help="pixels; latents are size / 8")
  p.add_argument("--batch", type=int, default=256, help="global batch")
  p.add_argument("--micro-batch", type=int, default=0,
                 help="largest micro-batch to try (0: the global batch); halved until the "
                      "compiled step's memory plan fits the device")
  p.add_argument("--reference-micro-batch", type=int, default=32,
                 help="the same for DiMSUM with scan_impl=reference, which holds [b, l, d, n] "
                      "float32 scan states for the backward")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--scan-impls", nargs="+", default=["auto"],
                 choices=["auto", "pallas", "reference"],
                 help="selective-scan implementations to run (DiMSUM only)")
  p.add_argument("--wavelet-impl", default="jaxwt", choices=["jaxwt", "direct"],
                 help="Haar packet transform of the DiMSUM wavelet branch (model wavelet_impl)")
  p.add_argument("--remat", default="none", choices=["none", "dots", "full"],
                 help="backward recomputation per block group (model remat): smaller memory plans "
                      "allow larger micro-batches")
  p.add_argument("--attention-impl", default="xla", choices=["xla", "cudnn"],
                 help="attention of both models (model attention_impl): XLA, or cuDNN's fused "
                      "flash attention (NVIDIA GPU, bf16)")
  p.add_argument("--no-fallback", action="store_true",
                 help="do not rerun with scan_impl=reference when the Pallas kernel fails")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--measure-peak", action="store_true",
                 help="also time an 8192^3 bf16 matmul and report MFU against it")
  p.add_argument("--profile", default=None,
                 help="after timing DiMSUM, trace 3 steps and write the kernel-time breakdown "
                      "(benchmarks/profile_step.py) to this JSON file; exact only with "
                      "XLA_FLAGS=--xla_gpu_enable_command_buffer= (see profile_step.py)")
  p.add_argument("--headroom", type=float, default=0.94,
                 help="a micro-batch fits when XLA's memory plan is below this share of the "
                      "device memory limit")
  p.add_argument("--trace-dir", default="/tmp/dimsum_profile", help="raw trace for --profile")
  p.add_argument("--smoke", action="store_true", help="tiny models, batch 4, on any device")
  p.add_argument("--out", default=None, help="append the JSON lines to this file")
  args = p.parse_args(argv)
  if args.smoke:
    args.image_size, args.batch = 64, 4
    args.micro_batch = 2
    args.repeats, args.warmup = 5, 1
  if args.repeats < 5:
    raise SystemExit("--repeats must be at least 5 (the median of fewer is noise).")
  peak = common.matmul_peak(512 if args.smoke else 8192) if args.measure_peak else None

  records = []
  for name in args.models:
    impls = args.scan_impls if common.is_dimsum(name) else ["auto"]
    for impl in impls:
      record = attempt(args, name, impl, peak)
      records.append(record)
      if ("error" in record and common.is_dimsum(name) and not args.no_fallback
          and "reference" not in impls and record.get("scan_impl") == "pallas"):
        records.append(attempt(args, name, "reference", peak))
  ok = [r for r in records if r.get("loss_finite")]
  return 0 if ok else 1


def attempt(args, name, impl, peak):
  """run_setting, or an error record (traceback to stderr); printed either way."""
  try:
    record = run_setting(args, name, impl, peak)
  except Exception as e:  # noqa: BLE001 - report and go on to the next setting
    traceback.print_exc()
    resolved = impl
    try:
      resolved = common.resolved_scan_impl(common.model_config(name, 32, scan_impl=impl))
    except Exception:  # noqa: BLE001
      pass
    record = {"benchmark": "train_step", "model": name, "scan_impl": resolved,
              "image_size": args.image_size, "global_batch": args.batch,
              **common.error_record(e), **common.environment()}
  common.emit(record, args.out)
  return record


if __name__ == "__main__":
  sys.exit(main())
