"""Compile time of a DiMSUM training step does not grow with depth.

The stack is an `nn.scan` over groups of `attn_every` blocks closed by the shared transformer, so
XLA compiles one group whatever the depth. This measures, for each depth, the wall time of
tracing + lowering and of XLA compilation of a jitted forward + backward (value_and_grad of the
flow-matching MSE, train mode: drop path and label dropout on) of DiMSUM-L/2 at 256 px
(32x32x4 latents), batch 2, float32, on abstract inputs (jax.ShapeDtypeStruct: nothing is
allocated, not even the parameters). Each repeat starts from cleared JAX caches; the table gives
the median over repeats of the wall times, with the range of the total, the process CPU time
(steadier than wall time on a shared machine) and the size of the lowered program.

  PYTHONPATH=$PWD python benchmarks/compile_time.py                        # CPU, depths 16 and 32
  PYTHONPATH=$PWD python benchmarks/compile_time.py --depths 8,16,32 --repeats 5 --out t.md

The Mamba selective scan is the associative-scan reference here (`scan_impl=reference`); on a GPU
pass --scan_impl=auto to compile the Pallas kernel instead.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from dimsum_jax.models import abstract_params, create_model, default_model_config


def step_fn(model):
  """Loss and gradients of one training step, as train.py computes them."""

  def loss(params, x, t, y, target, rng):
    out = model.apply({"params": params}, x, t, y, train=True, rngs={"dropout": rng})
    return jnp.mean((out - target) ** 2)

  return jax.value_and_grad(loss)


def measure(config, batch: int) -> dict:
  """Wall seconds of trace+lower and of compile for one fresh jit of the training step."""
  jax.clear_caches()
  model = create_model(config)
  size, chans = config.input_size, config.in_channels
  x = jax.ShapeDtypeStruct((batch, size, size, chans), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  start, cpu = time.perf_counter(), time.process_time()
  params = abstract_params(model, config)
  lowered = jax.jit(step_fn(model)).lower(params, x, t, y, x, rng)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered.compile()
  compile_s = time.perf_counter() - start
  cpu_s = time.process_time() - cpu
  n_params = sum(int(a.size) for a in jax.tree_util.tree_leaves(params))
  return dict(
    lower=lower_s,
    compile=compile_s,
    total=lower_s + compile_s,
    cpu=cpu_s,
    hlo_kb=len(lowered.as_text()) / 1024,
    params=n_params,
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="DiMSUM-L/2")
  parser.add_argument("--depths", default="16,32", help="comma-separated depths (same width)")
  parser.add_argument("--input_size", type=int, default=32, help="latent side (image px / 8)")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--scan_impl", default="reference")
  parser.add_argument("--out", default=None, help="also write the markdown table here")
  args = parser.parse_args(argv)

  rows = []
  for depth in (int(d) for d in args.depths.split(",")):
    config = default_model_config()
    config.update(
      name=args.model,
      depth=depth,
      input_size=args.input_size,
      num_classes=1000,
      label_dropout=0.1,
      drop_path=0.1,
      scan_impl=args.scan_impl,
    )
    runs = [measure(config, args.batch) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in ("lower", "compile", "total", "cpu")}
    totals = [r["total"] for r in runs]
    row = (
      f"| {args.model} depth {depth} | {runs[0]['params'] / 1e6:.1f} M | "
      f"{med['lower']:.1f} | {med['compile']:.1f} | {med['total']:.1f} "
      f"({min(totals):.1f}-{max(totals):.1f}) | {med['cpu']:.1f} | {runs[0]['hlo_kb']:.0f} |"
    )
    print(row, flush=True)
    rows.append(row)

  device = jax.devices()[0]
  where = (
    f"{device.platform.upper()} ({platform.processor() or platform.machine()}), "
    f"jax {jax.__version__}"
  )
  table = [
    f"Compile time of value_and_grad of the training loss, {args.input_size * 8} px, "
    f"batch {args.batch}, float32, {where}; median of {args.repeats} (range).",
    "",
    "| model | parameters | trace + lower (s) | XLA compile (s) | total (s) | "
    "CPU time (s) | lowered program (KiB) |",
    "|---|---|---|---|---|---|---|",
    *rows,
  ]
  print("\n".join(table))
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(table) + "\n")


if __name__ == "__main__":
  main()
