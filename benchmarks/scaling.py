"""Cost against resolution: DiMSUM (linear-time scans) vs DiT (quadratic attention).

At 256, 512 and 1024 px (latents 32, 64, 128; with patch 2, 256, 1024 and 4096 tokens per image:
4x tokens at each step) the training step (`dimsum_jax.train.train_step`, as in train_step.py) or
the forward alone (--mode forward) is timed at a batch holding --tokens-per-batch tokens (64, 16
and 4 images by default), so every size fills the GPU alike, and the time per image is compared:
a model whose cost is linear in tokens grows about 4x per size step, one dominated by attention
towards 16x. --batch fixes the batch instead.

One JSON line per (model, size), then one `scaling_summary` line per model with the growth
factors of the time per image.

  python benchmarks/scaling.py                                  # train step, both models
  python benchmarks/scaling.py --mode forward --tokens-per-batch 65536
  python benchmarks/scaling.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import sample  # noqa: E402
from benchmarks import train_step  # noqa: E402
from dimsum_jax import models  # noqa: E402


def tokens_per_image(cfg) -> int:
  patch = (
    models.DIMSUM_SIZES[cfg.name][2] if common.is_dimsum(cfg.name) else int(cfg.name.split("/")[-1])
  )
  return (cfg.input_size // patch) ** 2


def run_train(args, name, size, batch):
  setup = train_step.build(
    name,
    size,
    batch,
    grad_accum_steps=args.grad_accum_steps,
    dtype=args.dtype,
    scan_impl=args.scan_impl,
    smoke=args.smoke,
  )
  holder = {"state": setup.make_state()}

  def one():
    holder["state"], metrics = setup.compiled(holder["state"], setup.batch)
    return metrics["loss"]

  timing = common.summary(common.time_calls(one, warmup=args.warmup, repeats=args.repeats))
  return setup.model, setup.model_config, setup.compile_s, timing, setup.plan


def run_forward(args, name, size, batch):
  cfg = common.model_config(
    name, size // 8, dtype=args.dtype, scan_impl=args.scan_impl, smoke=args.smoke
  )
  model = models.create_model(cfg)
  params = sample.init_params(model, cfg, 0, 0.02)
  x, t, y = sample.inputs(cfg, batch, 1)
  fwd = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  compiled, compile_s = common.timed_compile(
    fwd, params, x, t, y, compiler_options=common.SMOKE_COMPILER_OPTIONS if args.smoke else None
  )
  timing = common.summary(
    common.time_calls(lambda: compiled(params, x, t, y), warmup=args.warmup, repeats=args.repeats)
  )
  return model, cfg, compile_s, timing, common.compiled_memory(compiled)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", nargs="+", default=["DiMSUM-L/2", "DiT-L/2"])
  p.add_argument("--image-sizes", type=int, nargs="+", default=[256, 512, 1024])
  p.add_argument("--mode", choices=["train", "forward"], default="train")
  p.add_argument(
    "--tokens-per-batch",
    type=int,
    default=16384,
    help="batch = this / tokens per image (at least 1)",
  )
  p.add_argument("--batch", type=int, default=0, help="a fixed batch instead (0: by tokens)")
  p.add_argument(
    "--grad-accum-steps",
    type=int,
    default=1,
    help="train mode: passes per step (1: the whole batch at once; 0: fewest that fit)",
  )
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--scan-impl", default="auto", choices=["auto", "pallas", "reference"])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--smoke", action="store_true", help="tiny models at 64/128 px on any device")
  p.add_argument("--out", default=None, help="append the JSON lines to this file")
  args = p.parse_args(argv)
  if args.smoke:
    args.image_sizes, args.tokens_per_batch = [64, 128], 64
  if args.repeats < 5:
    raise SystemExit("--repeats must be at least 5 (the median of fewer is noise).")

  env = common.environment()
  ok = 0
  for name in args.models:
    per_image = {}
    for size in args.image_sizes:
      cfg = common.model_config(name, size // 8, smoke=args.smoke)
      tokens = tokens_per_image(cfg)
      batch = args.batch or max(1, args.tokens_per_batch // tokens)
      record = {
        "benchmark": "scaling",
        "mode": args.mode,
        "model": name,
        "image_size": size,
        "latent_size": size // 8,
        "tokens_per_image": tokens,
        "batch": batch,
        "dtype": args.dtype,
      }
      try:
        run = run_train if args.mode == "train" else run_forward
        model, mcfg, compile_s, timing, plan = run(args, name, size, batch)
        flop = (
          common.train_flops_per_image(model)
          if args.mode == "train"
          else 2.0 * common.forward_macs(model)
        )
        ms_per_image = timing["median_ms"] / batch
        per_image[size] = ms_per_image
        record.update(
          scan_impl=common.resolved_scan_impl(mcfg),
          compile_s=compile_s,
          step=timing,
          ms_per_image=ms_per_image,
          images_per_s=1e3 / ms_per_image,
          gflop_per_image=flop / 1e9,
          model_tflops_per_s=flop / ms_per_image / 1e9,
          mfu=common.mfu(flop / ms_per_image * 1e3),
          memory=common.memory_stats(),
          memory_plan=plan,
        )
        ok += 1
      except Exception as e:  # noqa: BLE001 - report and go on
        traceback.print_exc()
        record.update(common.error_record(e))
      common.emit({**record, **env}, args.out)
    sizes = sorted(per_image)
    growth = {f"{a}->{b}": per_image[b] / per_image[a] for a, b in zip(sizes, sizes[1:])}
    common.emit(
      {
        "benchmark": "scaling_summary",
        "mode": args.mode,
        "model": name,
        "ms_per_image": per_image,
        "growth_per_4x_tokens": growth,
        **env,
      },
      args.out,
    )
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
