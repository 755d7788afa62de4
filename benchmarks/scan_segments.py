"""The batch-1 selective scan of a DiMSUM block: whole rows against time segments (S6).

In sampling, DiMSUM's two branches run as one Pallas call (`selective_scan_many`), which at batch 1
has one program per 128 channels of each row: 16 programs for DiMSUM-L/2 on 132 multiprocessors.
With `selective_scan.MAX_TIME_SEGMENTS` = S each row runs as S segments in two calls. This times
the forward of that call as the model makes it (two scans of [batch, length, dim] with z, D, the
dt bias and softplus, bf16 inputs), jitted, for each S in --segments (the segments actually used
are `time_segments`'s choice, recorded), and checks every S against whole rows (relative max
error of the outputs, float32 state either way). One JSON line per (batch, S).

  PYTHONPATH=$PWD python benchmarks/scan_segments.py                    # batch 1 and 2, S 1 2 4 8
  PYTHONPATH=$PWD python benchmarks/scan_segments.py --smoke            # CPU, interpreted kernel
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from dimsum_jax.ops import selective_scan as ss  # noqa: E402
from dimsum_jax.ops import selective_scan_pallas  # noqa: E402


def branch_scans(key, batch: int, length: int, dim: int, state: int, dtype=jnp.bfloat16):
  """Two scans shaped like DiMSUM's spatial and wavelet branches (random values)."""

  def one(key):
    k = jax.random.split(key, 8)
    rows = lambda i, shape, scale=1.0: (scale * jax.random.normal(k[i], shape)).astype(dtype)
    return ss.ScanInputs(
      u=rows(0, (batch, length, dim)),
      delta=rows(1, (batch, length, dim), 0.5),
      A=-jnp.exp(0.5 * jax.random.normal(k[2], (dim, state))),
      B=rows(3, (batch, length, state)),
      C=rows(4, (batch, length, state)),
      D=jax.random.normal(k[5], (dim,)),
      z=rows(6, (batch, length, dim)),
      delta_bias=0.3 * jax.random.normal(k[7], (dim,)) - 2.0,
    )

  return [one(k) for k in jax.random.split(key, 2)]


def measure(args, batch: int, segments: int, whole) -> tuple[dict, list]:
  ss.MAX_TIME_SEGMENTS = segments
  scans = branch_scans(jax.random.key(args.seed), batch, args.length, args.dim, args.state)
  fn = jax.jit(lambda s: ss.selective_scan_many(s, True, impl="pallas"))
  compiled, compile_s = common.timed_compile(fn, scans)
  outs = compiled(scans)
  timing = common.summary(
    common.time_calls(lambda: compiled(scans), warmup=args.warmup, repeats=args.repeats)
  )
  programs = 2 * batch * -(-args.dim // selective_scan_pallas.BLOCK_D)
  used = ss.time_segments(programs, args.length, selective_scan_pallas.DEFAULT.chunk)
  ref = whole if whole is not None else outs
  err = max(
    float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max() / jnp.abs(b).max())
    for a, b in zip(outs, ref)
  )
  return {
    "benchmark": "scan_segments",
    "batch": batch,
    "length": args.length,
    "dim": args.dim,
    "state": args.state,
    "scans": 2,
    "max_time_segments": segments,
    "segments_used": used,
    "programs_per_call": programs * used,
    "forward": timing,
    "compile_s": compile_s,
    "max_rel_err_vs_whole_rows": err,
  }, outs


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="2: guided batch 1")
  p.add_argument("--segments", type=int, nargs="+", default=[1, 2, 4, 8])
  p.add_argument("--length", type=int, default=256, help="tokens (DiMSUM-L/2 at 256 px)")
  p.add_argument("--dim", type=int, default=1024, help="channels of each branch's scan")
  p.add_argument("--state", type=int, default=16)
  p.add_argument("--repeats", type=int, default=50)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke", action="store_true", help="small shapes, interpreted kernel (CPU)")
  p.add_argument("--out", default=None, help="append the JSON lines to this file")
  args = p.parse_args(argv)
  if args.smoke:
    args.length, args.dim, args.state, args.repeats, args.warmup = 64, 128, 4, 5, 1
    ss.MIN_SEGMENT = 8
  if args.segments[0] != 1:
    args.segments = [1, *args.segments]  # whole rows first: the reference of the others
  env = common.environment()
  for batch in args.batches:
    whole = None
    for segments in args.segments:
      record, outs = measure(args, batch, segments, whole)
      whole = outs if segments == 1 else whole
      common.emit({**record, **env}, args.out)


if __name__ == "__main__":
  main()
