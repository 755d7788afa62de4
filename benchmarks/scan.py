"""Selective scan on one GPU: the associative-scan reference vs the Pallas Mosaic GPU kernel.

For each shape (batch 32, state 16, bf16 inputs, softplus on delta, D and delta_bias given) and with
and without z, it first checks the kernel against the reference (outputs and the gradients of every input, on
the first two batch rows, relative L2 error; it stops above --max-err), then times forward and
forward+backward (median over repeats of back-to-back calls, after warm-up) and reads the compiled
programs' temporary device memory. The reference is not timed where one [b, l, d, n] f32 tensor
exceeds --skip-ref-above-gb. Prints a markdown table (BENCHMARKS.md, "Selective scan") and writes
it to --out. The kernel's tuning constants can be overridden from the command line.

  PYTHONPATH=$PWD python benchmarks/scan.py --out scan_table.md
  PYTHONPATH=$PWD python benchmarks/scan.py --dims 1024 --lengths 256 --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dimsum_jax.ops import selective_scan_pallas
from dimsum_jax.ops.selective_scan import selective_scan_reference

BATCH, STATE = 32, 16
# mamba_ssm's CUDA kernel on an H200 (measured on the same GPU model), ms: (fwd, fwd+bwd) by (d, l).
CUDA_MS = {(1024, 256): (0.144, 0.854), (1024, 4096): (None, 11.25), (2048, 4096): (None, 22.39)}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(key, b, length, d, n, with_z, dtype=jnp.bfloat16):
  ks = jax.random.split(key, 9)
  u = jax.random.normal(ks[0], (b, length, d), dtype)
  delta = (0.5 * jax.random.normal(ks[1], (b, length, d)) - 1.0).astype(dtype)
  a = -jnp.exp(0.5 * jax.random.normal(ks[2], (d, n)))
  bm = jax.random.normal(ks[3], (b, length, n), dtype)
  cm = jax.random.normal(ks[4], (b, length, n), dtype)
  d_skip = jax.random.normal(ks[5], (d,))
  z = jax.random.normal(ks[6], (b, length, d), dtype) if with_z else None
  bias = 0.5 * jax.random.normal(ks[7], (d,))
  return (u, delta, a, bm, cm, d_skip, z, bias)


def scan_fn(impl, **kw):
  def f(u, delta, a, bm, cm, d_skip, z, bias):
    if impl == "reference":
      return selective_scan_reference(u, delta, a, bm, cm, d_skip, z, bias, True)
    return selective_scan_pallas.selective_scan_pallas(
      u, delta, a, bm, cm, d_skip, z, bias, True, interpret=False, **kw
    )

  return f


def fwd_bwd_fn(f):
  def g(args, ct):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(ct)

  return g


def rel_err(x, ref):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def check(args, with_z, kw):
  """Largest relative error of the kernel vs the reference over y and every gradient."""
  sub = tuple(None if a is None else (a[:2] if a.ndim == 3 else a) for a in args)
  ct = jax.random.normal(jax.random.key(7), sub[0].shape, jnp.float32).astype(sub[0].dtype)
  errs = {}
  outs = {}
  for impl in ("reference", "pallas"):
    g = jax.jit(fwd_bwd_fn(scan_fn(impl, **kw)))
    outs[impl] = jax.block_until_ready(g(sub, ct))
  (yk, gk), (yr, gr) = outs["pallas"], outs["reference"]
  if not bool(jnp.all(jnp.isfinite(yk.astype(jnp.float32)))):
    raise RuntimeError("kernel output has non-finite values")
  errs["y"] = rel_err(yk, yr)
  for name, a, r in zip(NAMES, gk, gr):
    if r is not None:
      errs["d" + name] = rel_err(a, r)
  return errs


def time_fn(f, args, repeats, inner):
  out = f(*args)
  jax.block_until_ready(out)
  for _ in range(2):
    jax.block_until_ready(f(*args))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = f(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / inner * 1e3)
  return statistics.median(samples), samples


def temp_mb(f, args):
  try:
    ma = f.lower(*args).compile().memory_analysis()
    return ma.temp_size_in_bytes / 2**20
  except Exception:  # noqa: BLE001 - memory analysis is optional on some backends
    return float("nan")


def run_shape(d, length, with_z, repeats, kw, skip_ref_above, max_err):
  args = make_inputs(jax.random.key(d * 7 + length), BATCH, length, d, STATE, with_z)
  errs = check(args, with_z, kw)
  worst = max(errs.values())
  if not worst <= max_err:
    raise SystemExit(
      f"D={d} L={length} z={with_z}: kernel error {worst:.2e} > {max_err} ({errs}); not timing"
    )
  ct = jnp.ones_like(args[0])
  row = dict(d=d, l=length, z=with_z, err=worst, errs=errs)
  for impl in ("reference", "pallas"):
    if impl == "reference" and BATCH * length * d * STATE * 4 > skip_ref_above:
      row[impl] = None
      continue
    f = jax.jit(scan_fn(impl, **kw))
    g = jax.jit(fwd_bwd_fn(scan_fn(impl, **kw)))
    inner = 20 if length * d <= 1024 * 1024 else 3
    try:
      tf, _ = time_fn(f, args, repeats, inner)
      tb, _ = time_fn(g, (args, ct), repeats, inner)
      row[impl] = dict(
        fwd=tf, fwdbwd=tb, mem_fwd=temp_mb(f, args), mem_fwdbwd=temp_mb(g, (args, ct))
      )
    except Exception as e:  # noqa: BLE001 - e.g. the reference out of memory at large shapes
      row[impl] = dict(error=type(e).__name__)
  return row


def fmt(x, spec=".3f"):
  return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def table(rows):
  head = (
    "| D | L | z | max rel err | ref fwd ms | kernel fwd ms | CUDA fwd ms | ref fwd+bwd ms | "
    "kernel fwd+bwd ms | CUDA fwd+bwd ms | ref temp MB (fwd+bwd) | kernel temp MB (fwd+bwd) |"
  )
  lines = [head, "|" + "---|" * 12]
  for r in rows:
    ref, ker = r["reference"] or {}, r["pallas"] or {}
    cuda = CUDA_MS.get((r["d"], r["l"]), (None, None)) if r["z"] else (None, None)
    lines.append(
      f"| {r['d']} | {r['l']} | {'yes' if r['z'] else 'no'} | {r['err']:.1e} | "
      f"{fmt(ref.get('fwd'))} | {fmt(ker.get('fwd'))} | {fmt(cuda[0])} | "
      f"{fmt(ref.get('fwdbwd'))} | {fmt(ker.get('fwdbwd'))} | {fmt(cuda[1])} | "
      f"{fmt(ref.get('mem_fwdbwd'), '.0f')} | {fmt(ker.get('mem_fwdbwd'), '.0f')} |"
    )
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--dims", type=int, nargs="+", default=[1024, 2048])
  p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
  p.add_argument("--z", choices=["both", "yes", "no"], default="both")
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument(
    "--preset",
    default="fast",
    choices=sorted(selective_scan_pallas.PRESETS),
    help="selective_scan_pallas.PRESETS entry; the flags below replace its fields",
  )
  for field in dataclasses.fields(selective_scan_pallas.KernelOptions):
    if field.name != "interpret":
      p.add_argument(
        "--" + field.name.replace("_", "-"),
        type=int,
        default=None,
        help=f"KernelOptions.{field.name} (0/1 for booleans)",
      )
  p.add_argument(
    "--no-ref-timing",
    action="store_true",
    help="check against the reference but time only the kernel",
  )
  p.add_argument(
    "--max-err",
    type=float,
    default=2e-2,
    help="fail before timing when the kernel's relative error exceeds this",
  )
  p.add_argument(
    "--skip-ref-above-gb",
    type=float,
    default=5.0,
    help="skip timing the reference when one [b, l, d, n] f32 tensor exceeds this",
  )
  p.add_argument("--quick", action="store_true", help="5 repeats")
  p.add_argument("--out", default=None, help="also write the table (markdown) here")
  a = p.parse_args()
  options = selective_scan_pallas.PRESETS[a.preset]
  for field in dataclasses.fields(options):
    value = getattr(a, field.name, None)
    if value is not None:
      options = dataclasses.replace(
        options, **{field.name: type(getattr(options, field.name))(value)}
      )
  kw = {"options": options}
  if a.no_ref_timing:
    a.skip_ref_above_gb = 0.0
  zs = {"both": (True, False), "yes": (True,), "no": (False,)}[a.z]
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {options}")
  rows = []
  for d in a.dims:
    for length in a.lengths:
      for with_z in zs:
        t0 = time.time()
        row = run_shape(
          d, length, with_z, 5 if a.quick else a.repeats, kw, a.skip_ref_above_gb * 2**30, a.max_err
        )
        print(
          f"D={d} L={length} z={with_z}: errors { ({k: f'{v:.1e}' for k, v in row['errs'].items()}) }"
          f" ref={row['reference']} kernel={row['pallas']} ({time.time() - t0:.0f} s)",
          flush=True,
        )
        rows.append(row)
  out = table(rows)
  print(out)
  if a.out:
    with open(a.out, "w") as fh:
      fh.write(out + "\n")


if __name__ == "__main__":
  main()
