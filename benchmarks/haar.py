"""The 2-level Haar packet of the wavelet branch: jaxwt (convolutions) vs direct (butterflies).

At DiMSUM-L/2's wavelet-branch shape (by default batch 8, the 32x32 tokens of 256 px images with
patch 2, 512 channels = half the hidden width, float32), for each implementation of
`dimsum_jax.ops.haar` and each direction (`forward` = wavelet_tokens, `inverse` =
inverse_wavelet_tokens, as a DiMSUM block calls them around the wavelet Mamba), one JSON line with:

  fwd_ms, fwd_bwd_ms    median of --repeats timed calls (after --warmup) of the jitted transform,
                        and of the transform with its VJP (output and input cotangent);
  max_abs_diff          |direct - jaxwt| of the outputs and of the input cotangents;
  ops                   the compiled fwd+bwd HLO module: instructions of the entry computation that
                        do work (not parameter, constant, tuple, get-tuple-element, bitcast), of all
                        computations (fused bodies included), fusions, convolutions, and XLA's cost
                        analysis (flops, bytes accessed).

  python benchmarks/haar.py                                  # both implementations, L/2 shape
  python benchmarks/haar.py --batch 32 --dtype bfloat16 --out haar.jsonl
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from dimsum_jax.ops import haar  # noqa: E402

TRANSFORMS = {"forward": haar.wavelet_tokens, "inverse": haar.inverse_wavelet_tokens}
_BOOKKEEPING = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def _opcode(line: str) -> str | None:
  """The opcode of one HLO instruction line ('%x = f32[2]{0} add(%a, %b), ...'), else None."""
  if " = " not in line or line.lstrip().startswith(("//", "HloModule")):
    return None
  rhs = line.split(" = ", 1)[1].lstrip()
  if rhs.startswith("("):  # tuple-shaped result: skip to the matching parenthesis
    depth = 0
    for i, ch in enumerate(rhs):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        rhs = rhs[i + 1 :]
        break
  else:
    rhs = rhs.split(" ", 1)[1] if " " in rhs else ""
  op = rhs.strip().split("(", 1)[0].strip()
  return op or None


def hlo_counts(text: str) -> dict:
  """Instruction counts of a compiled HLO module's text (see the module docstring)."""
  entry, total = collections.Counter(), collections.Counter()
  in_entry = False
  for line in text.splitlines():
    if line.startswith("ENTRY "):
      in_entry = True
      continue
    if in_entry and line.startswith("}"):
      in_entry = False
    op = _opcode(line)
    if op is None:
      continue
    total[op] += 1
    if in_entry:
      entry[op] += 1
  work = {k: v for k, v in entry.items() if k not in _BOOKKEEPING}
  return {
    "entry_ops": sum(work.values()),
    "entry_by_op": dict(sorted(work.items())),
    "all_instructions": sum(total.values()),
    "fusions": total["fusion"],
    "convolutions": total["convolution"],
  }


def _cost(compiled) -> dict:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}


def measure(transform: str, impl: str, x, ct, grid, levels, *, warmup: int, repeats: int):
  """(record, (y, dx)) for one direction and implementation."""
  f = lambda v: TRANSFORMS[transform](v, grid, levels, impl)

  def fwd_bwd(v, c):
    y, vjp = jax.vjp(f, v)
    return y, vjp(c)[0]

  fwd_c, fwd_s = common.timed_compile(jax.jit(f), x)
  both_c, both_s = common.timed_compile(jax.jit(fwd_bwd), x, ct)
  fwd_t = common.summary(common.time_calls(lambda: fwd_c(x), warmup=warmup, repeats=repeats))
  both_t = common.summary(common.time_calls(lambda: both_c(x, ct), warmup=warmup, repeats=repeats))
  record = {
    "benchmark": "haar",
    "transform": transform,
    "impl": impl,
    "fwd_ms": fwd_t["median_ms"],
    "fwd_bwd_ms": both_t["median_ms"],
    "fwd_timing": fwd_t,
    "fwd_bwd_timing": both_t,
    "compile_s": {"fwd": fwd_s, "fwd_bwd": both_s},
    "ops": {**hlo_counts(both_c.as_text()), **_cost(both_c)},
    "ops_fwd": hlo_counts(fwd_c.as_text()),
  }
  return record, both_c(x, ct)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, default=8, help="batch of the wavelet branch")
  p.add_argument("--grid", type=int, default=32, help="token grid side (256 px, patch 2: 32)")
  p.add_argument("--channels", type=int, default=512, help="branch width (hidden 1024 / 2)")
  p.add_argument("--levels", type=int, default=2, choices=haar.LEVELS)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--impls", nargs="+", default=list(haar.IMPLS), choices=haar.IMPLS)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default=None, help="append the JSON lines to this file")
  args = p.parse_args(argv)
  if args.repeats < 5:
    raise SystemExit("--repeats must be at least 5 (the median of fewer is noise).")

  grid = (args.grid, args.grid)
  shape = (args.batch, args.grid * args.grid, args.channels)
  kx, kc = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape, jnp.float32).astype(args.dtype)
  ct = jax.random.normal(kc, shape, jnp.float32).astype(args.dtype)
  base = {
    "batch": args.batch,
    "grid": args.grid,
    "channels": args.channels,
    "levels": args.levels,
    "dtype": args.dtype,
    **common.environment(),
  }
  for transform in TRANSFORMS:
    outputs = {}
    for impl in args.impls:
      record, outputs[impl] = measure(
        transform, impl, x, ct, grid, args.levels, warmup=args.warmup, repeats=args.repeats
      )
      if impl != args.impls[0]:
        first = outputs[args.impls[0]]
        record["max_abs_diff"] = {
          f"vs_{args.impls[0]}": [
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
            for a, b in zip(outputs[impl], first)
          ]
        }
      common.emit({**base, **record}, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
