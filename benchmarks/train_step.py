"""Training-step throughput of DiMSUM-L/2 and the DiT-L/2 control: images/s, MFU, memory, compile.

What runs is what `python -m dimsum_jax.main` runs: `train.build` and `train.compile_update` on
configs/imagenet256.py (DiMSUM) or its dit variant (DiT), with the model, image size,
global batch and the flags below overriding the config, under the same mesh; the compiled, donated
step is then fed synthetic latents. Gradient accumulation is the config's
(`optim.grad_accum_steps`, 0 = as few passes as fit the device: dimsum_jax/memory.py), so the
reported micro-batch is the one a training run would choose.

Reported per setting (one JSON line): compile time (lower + compile wall time, retries included),
median step time over --repeats steps after --warmup, images/s, model FLOP/s and MFU (6 x forward
multiply-accumulates of dimsum_jax.tools.flops per image, 578 G for DiMSUM-L/2 at 256 px, over the
dense bf16 datasheet rate; also over a measured bf16 matmul rate with --measure-peak), peak device
memory (device.memory_stats), XLA's memory plan and the planner's estimate for it.

  python benchmarks/train_step.py                      # both models, 256 px, batch 256, bf16
  python benchmarks/train_step.py --models DiMSUM-L/2 --grad-accum-steps 4
  python benchmarks/train_step.py --smoke              # tiny models on the CPU (about a minute)
  python benchmarks/train_step.py --models DiMSUM-L/2 --wavelet-impl jaxwt --remat none
  python benchmarks/train_step.py --models DiT-L/2 --attention-impl xla
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from absl import logging  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import profile_step  # noqa: E402
from dimsum_jax import memory  # noqa: E402
from dimsum_jax import models  # noqa: E402
from dimsum_jax import sharding  # noqa: E402
from dimsum_jax import train  # noqa: E402
from dimsum_jax.models import layers  # noqa: E402

CONFIGS = {"DiMSUM": "imagenet256", "DiT": "imagenet256:dit", "DiM": "imagenet256:dim"}
LEVERS = ("wavelet_impl", "remat", "attention_impl", "scan_unroll")


@dataclasses.dataclass
class Setup:
  """A compiled training step with its inputs, ready to run."""

  name: str
  model: Any
  model_config: Any
  micro_batch: int
  grad_accum_steps: int
  compiled: Callable
  compile_s: float
  plan: dict | None
  estimate_gib: float | None
  make_state: Callable[[], Any]
  batch: dict
  mesh: Any


def experiment_config(
  name: str,
  latent_size: int,
  *,
  dtype: str,
  scan_impl: str,
  smoke: bool,
  global_batch: int = 256,
  grad_accum_steps: int = 0,
  **levers,
):
  """The published run's config (imagenet256.py, its dit or dim variant) with this model, size,
  dtype, scan, batch, passes and any of LEVERS the model reads (None keeps the config's value)."""
  config = common.load_config(CONFIGS[models.family(name)])
  config.model = common.model_config(
    name, latent_size, dtype=dtype, scan_impl=scan_impl, smoke=smoke, base=config.model
  )
  for key, value in levers.items():
    if key not in LEVERS:
      raise ValueError(f"Unknown lever {key}; choose from {LEVERS}.")
    if value is not None and key in models.fields_read(name):
      config.model[key] = value
  config.data.image_size = latent_size
  config.data.global_batch_size = global_batch
  config.optim.grad_accum_steps = grad_accum_steps
  return config


def synthetic_batch(rng, batch: int, latent_size: int, channels: int, num_classes: int):
  """Standard-normal latents (the scale of SD-VAE latents x 0.18215) and uniform labels."""
  kx, ky = jax.random.split(rng)
  return {
    "image": jax.random.normal(kx, (batch, latent_size, latent_size, channels), jnp.float32),
    "label": jax.random.randint(ky, (batch,), 0, max(num_classes, 1), jnp.int32),
  }


def build(
  name: str,
  image_size: int,
  global_batch: int,
  *,
  grad_accum_steps: int = 0,
  dtype: str = "bfloat16",
  scan_impl: str = "auto",
  smoke: bool = False,
  seed: int = 0,
  devices: int = 0,
  fsdp: int = 1,
  **levers,
) -> Setup:
  """Compile the training step of `name` at `image_size` px (latents image_size / 8) as
  dimsum_jax.main would: train.build, then train.compile_update, on the first `devices` devices
  (0: all) with a mesh of data x fsdp (fsdp devices share the parameters)."""
  if image_size % 8:
    raise ValueError(f"--image-size {image_size} is not a multiple of 8 (the VAE's factor).")
  latent = image_size // 8
  config = experiment_config(
    name,
    latent,
    dtype=dtype,
    scan_impl=scan_impl,
    smoke=smoke,
    global_batch=global_batch,
    grad_accum_steps=grad_accum_steps,
    **levers,
  )
  config.mesh.fsdp = fsdp
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[: devices or jax.device_count()])
  with jax.set_mesh(mesh):
    training = train.build(config, mesh)
    training, seconds = train.compile_update(training, config, mesh)
  k = training.grad_accum_steps
  per_device = global_batch // mesh.size
  estimate = (
    training.plan.bytes(per_device // k, k) / memory.GIB if training.plan is not None else None
  )
  rng = jax.random.PRNGKey(seed)
  batch = synthetic_batch(
    jax.random.fold_in(rng, 1),
    global_batch,
    latent,
    config.model.in_channels,
    config.model.num_classes,
  )
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  return Setup(
    name,
    training.model,
    config.model,
    per_device // k,
    k,
    training.update,
    seconds,
    common.compiled_memory(training.update),
    estimate,
    lambda: training.init(rng),
    batch,
    mesh,
  )


def run_setting(args, name: str, scan_impl: str, peak_measured: float | None) -> dict:
  record = {
    "benchmark": "train_step",
    "model": name,
    "image_size": args.image_size,
    "latent_size": args.image_size // 8,
    "global_batch": args.batch,
    "dtype": args.dtype,
    **common.environment(),
  }
  setup = build(
    name,
    args.image_size,
    args.batch,
    grad_accum_steps=args.grad_accum_steps,
    dtype=args.dtype,
    scan_impl=scan_impl,
    smoke=args.smoke,
    devices=args.devices,
    fsdp=args.fsdp,
    wavelet_impl=args.wavelet_impl,
    remat=args.remat,
    attention_impl=args.attention_impl,
    scan_unroll=args.scan_unroll,
  )
  record["mesh"] = dict(setup.mesh.shape)
  record["scan_impl"] = common.resolved_scan_impl(setup.model_config)
  for key in LEVERS:
    record[key] = setup.model_config[key]
  record["model_config"] = {
    k: setup.model_config[k] for k in ("depth", "hidden_size", "drop_path", "label_dropout")
  }
  state = setup.make_state()
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = setup.compiled(holder["state"], setup.batch)
    return metrics["loss"]

  samples = common.time_calls(one_step, warmup=args.warmup, repeats=args.repeats)
  loss = float(one_step())
  timing = common.summary(samples)
  if args.profile:
    record["profile"] = profile_step.profile(
      setup.compiled, one_step, args.trace_dir, steps=3, step_ms=timing["median_ms"]
    )
    print(profile_step.format_table(record["profile"]), file=sys.stderr)
    with open(args.profile, "w") as fh:
      json.dump({**record, "micro_batch": setup.micro_batch}, fh, indent=1, default=str)
  images_per_s = args.batch / (timing["median_ms"] / 1e3)
  flop_per_image = common.train_flops_per_image(setup.model)
  record.update(
    micro_batch=setup.micro_batch,
    micro_batches=setup.grad_accum_steps,
    compile_s=setup.compile_s,
    estimate_gib=setup.estimate_gib,
    step=timing,
    images_per_s=images_per_s,
    gflop_per_image=flop_per_image / 1e9,
    model_tflops_per_s=images_per_s * flop_per_image / 1e12,
    mfu=common.mfu(images_per_s * flop_per_image),
    peak_tflops=common.peak_flops() and common.peak_flops() / 1e12,
    mfu_vs_measured_matmul=(
      images_per_s * flop_per_image / peak_measured if peak_measured else None
    ),
    measured_matmul_tflops=peak_measured / 1e12 if peak_measured else None,
    memory=common.memory_stats(),
    memory_plan=setup.plan,
    loss=loss,
    loss_finite=bool(np.isfinite(loss)),
    params_m=sum(x.size for x in jax.tree.leaves(holder["state"].params)) / 1e6,
  )
  holder.clear()  # frees the state before the next setting
  del state
  return record


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", nargs="+", default=["DiMSUM-L/2", "DiT-L/2"])
  p.add_argument("--image-size", type=int, default=256, help="pixels; latents are size / 8")
  p.add_argument(
    "--batch", type=int, default=None, help="global batch (default 256; 4 with --smoke)"
  )
  p.add_argument(
    "--grad-accum-steps",
    type=int,
    default=0,
    help="passes per step (config.optim.grad_accum_steps); 0: as few as fit",
  )
  p.add_argument("--devices", type=int, default=0, help="use the first N devices (0: all)")
  p.add_argument(
    "--fsdp",
    type=int,
    default=1,
    help="mesh fsdp axis: devices that split parameters, EMA and optimiser state",
  )
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument(
    "--scan-impls",
    nargs="+",
    default=["auto"],
    choices=["auto", "pallas", "reference"],
    help="selective-scan implementations to run (DiMSUM only)",
  )
  p.add_argument(
    "--wavelet-impl",
    default=None,
    choices=["jaxwt", "direct"],
    help="Haar packet transform of the DiMSUM wavelet branch (default: the config's)",
  )
  p.add_argument(
    "--remat",
    default=None,
    choices=list(layers.REMAT_POLICIES),
    help="backward recomputation per block group (default: the config's)",
  )
  p.add_argument(
    "--attention-impl",
    default=None,
    choices=["auto", "xla", "cudnn"],
    help="attention of both models (default: the config's)",
  )
  p.add_argument(
    "--scan-unroll",
    type=int,
    default=None,
    help="DiMSUM block groups (DiT blocks) per training scan iteration (0: all; default: config)",
  )
  p.add_argument(
    "--no-fallback",
    action="store_true",
    help="do not rerun with scan_impl=reference when the Pallas kernel fails",
  )
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument(
    "--measure-peak",
    action="store_true",
    help="also time an 8192^3 bf16 matmul and report MFU against it",
  )
  p.add_argument(
    "--profile",
    default=None,
    help="after timing DiMSUM, trace 3 steps and write the kernel-time breakdown "
    "(benchmarks/profile_step.py) to this JSON file; exact only with "
    "XLA_FLAGS=--xla_gpu_enable_command_buffer= (see profile_step.py)",
  )
  p.add_argument("--trace-dir", default="/tmp/dimsum_profile", help="raw trace for --profile")
  p.add_argument("--smoke", action="store_true", help="tiny models, batch 4, on any device")
  p.add_argument("--out", default=None, help="append the JSON lines to this file")
  args = p.parse_args(argv)
  logging.set_verbosity(logging.INFO)  # train.compile_update's plan/lower/compile times
  if args.smoke:
    args.image_size = 64
    args.batch = args.batch or 4
    args.repeats, args.warmup = 5, 1
  args.batch = args.batch or 256
  if args.repeats < 5:
    raise SystemExit("--repeats must be at least 5 (the median of fewer is noise).")
  peak = common.matmul_peak(512 if args.smoke else 8192) if args.measure_peak else None

  records = []
  for name in args.models:
    impls = args.scan_impls if common.is_dimsum(name) else ["auto"]
    for impl in impls:
      record = attempt(args, name, impl, peak)
      records.append(record)
      if (
        "error" in record
        and common.is_dimsum(name)
        and not args.no_fallback
        and "reference" not in impls
        and record.get("scan_impl") == "pallas"
      ):
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
    record = {
      "benchmark": "train_step",
      "model": name,
      "scan_impl": resolved,
      "image_size": args.image_size,
      "global_batch": args.batch,
      **common.error_record(e),
      **common.environment(),
    }
  common.emit(record, args.out)
  return record


if __name__ == "__main__":
  sys.exit(main())
