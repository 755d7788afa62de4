"""The Python half of compiling a training step: memory plan, trace and lowering, on any machine.

`train.compile_update` spends, before XLA starts, the memory plan (two abstract traces of the
loss's backward, which pick the micro-batch), the trace of the step and its lowering to StableHLO.
This times those three for the step `python -m dimsum_jax.main` would compile, lowered for
--platform (default cuda: the Pallas Mosaic GPU kernel, not its CPU interpreter, so the GPU
program's lowering is measured on a CPU too), and reports the size of the lowered program. XLA's
compile, which needs the device, is not run. One JSON line per model: medians over --repeats
fresh processes' worth of caches (jax.clear_caches between repeats).

  python benchmarks/lowering.py                                  # DiMSUM-L/2, batch 256 in 2 passes
  python benchmarks/lowering.py --models DiMSUM-L/2 DiT-L/2 --repeats 5
  python benchmarks/lowering.py --smoke                          # tiny model (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import train_step  # noqa: E402
from dimsum_jax import sharding  # noqa: E402
from dimsum_jax import train  # noqa: E402
from dimsum_jax.ops import selective_scan_pallas  # noqa: E402


def measure(name: str, args) -> dict:
  config = train_step.experiment_config(
    name,
    args.image_size // 8,
    dtype="bfloat16",
    scan_impl="pallas" if args.platform == "cuda" else "auto",
    smoke=args.smoke,
    global_batch=args.batch,
    grad_accum_steps=args.grad_accum_steps,
  )
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  times = {"plan": [], "trace": [], "lower": []}
  for _ in range(args.repeats):
    jax.clear_caches()
    with jax.set_mesh(mesh):
      training = train.build(config, mesh)
      batch = train.abstract_batch(config, mesh)
      t0 = time.perf_counter()
      train.memory_plan(config, mesh, training.model, training.abstract_state)
      t1 = time.perf_counter()
      traced = training.update.trace(training.abstract_state, batch)
      t2 = time.perf_counter()
      text = traced.lower(lowering_platforms=(args.platform,)).as_text()
      t3 = time.perf_counter()
    for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
      times[key].append(seconds)
  median = {f"{k}_s": statistics.median(v) for k, v in times.items()}
  return {
    "benchmark": "lowering",
    "model": name,
    "image_size": args.image_size,
    "batch": args.batch,
    "grad_accum_steps": args.grad_accum_steps,
    "lowered_for": args.platform,
    **median,
    "total_s": sum(median.values()),
    "all_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
    "stablehlo_mb": len(text) / 1e6,
    "repeats": args.repeats,
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", nargs="+", default=["DiMSUM-L/2"])
  p.add_argument("--image-size", type=int, default=256)
  p.add_argument("--batch", type=int, default=256, help="global batch")
  p.add_argument("--grad-accum-steps", type=int, default=2, help="passes (the H100's choice: 2)")
  p.add_argument("--platform", default="cuda", choices=["cuda", "cpu"])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--smoke", action="store_true", help="a tiny model, batch 8")
  p.add_argument("--out", default=None, help="append the JSON lines to this file")
  args = p.parse_args(argv)
  if args.smoke:
    args.batch, args.grad_accum_steps, args.image_size, args.repeats = 8, 2, 64, 1
  if args.platform == "cuda" and jax.default_backend() != "gpu":
    # Lower the compiled kernel, not the interpreter the CPU would otherwise run.
    fast = selective_scan_pallas.PRESETS["fast"]
    selective_scan_pallas.PRESETS["fast"] = dataclasses.replace(fast, interpret=False)
  env = common.environment()
  for name in args.models:
    common.emit({**measure(name, args), **env}, args.out)


if __name__ == "__main__":
  main()
