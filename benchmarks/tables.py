"""Markdown tables for BENCHMARKS.md from the JSON lines of the benchmarks (run_all.sh's results).

python benchmarks/tables.py results.jsonl [profile.json]
"""

from __future__ import annotations

import json
import sys


def _f(x, spec=".1f"):
  return "-" if x is None else format(x, spec)


def _gib(rec):
  mem = rec.get("memory") or {}
  return _f(mem.get("peak_gib"), ".1f")


def train_table(rows):
  out = [
    "| model | scan | global batch (micro) | step ms (median) | images/s | TFLOP/s | MFU "
    "| peak memory GiB | compile s |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "error" in r:
      out.append(
        f"| {r['model']} | {r.get('scan_impl') or '-'} | {r.get('global_batch')} | "
        f"failed: {r['error']} {r['message'][:80]} | | | | | |"
      )
      continue
    out.append(
      f"| {r['model']} | {r.get('scan_impl') or '-'} | {r['global_batch']} ({r['micro_batch']}) "
      f"| {r['step']['median_ms']:.1f} | {r['images_per_s']:.0f} | {r['model_tflops_per_s']:.0f} "
      f"| {_f(r['mfu'] and 100 * r['mfu'])}% | {_gib(r)} | {r['compile_s']:.1f} |"
    )
  return "\n".join(out)


def forward_table(rows):
  out = [
    "| model | scan | batch | call ms (median) | images/s | TFLOP/s | MFU | compile s |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "error" in r:
      out.append(f"| {r['model']} | | | failed: {r['error']} {r['message'][:80]} | | | | |")
      continue
    out.append(
      f"| {r['model']} | {r.get('scan_impl') or '-'} | {r['batch']} | "
      f"{r['call']['median_ms']:.1f} | {r['images_per_s']:.0f} | "
      f"{r['model_tflops_per_s']:.0f} | {_f(r['mfu'] and 100 * r['mfu'])}% | "
      f"{r['compile_s']:.1f} |"
    )
  return "\n".join(out)


def dopri5_table(rows):
  out = [
    "| model | image px | latency s (median) | NFE (accepted + rejected steps) | ms / NFE "
    "| compile s |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "error" in r:
      out.append(f"| {r['model']} | | failed: {r['error']} {r['message'][:80]} | | | |")
      continue
    s = r["steps"]
    out.append(
      f"| {r['model']} | {r['image_size']} | {r['latency_s']:.3f} | {r['nfe']} "
      f"({s['accepted']} + {s['rejected']}) | {r['ms_per_nfe']:.2f} | "
      f"{r['compile_s']:.1f} |"
    )
  return "\n".join(out)


def scaling_table(rows, summaries):
  out = [
    "| model | mode | image px | tokens / image | batch | step ms | ms / image | growth "
    "| TFLOP/s | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  growth = {}
  for s in summaries:
    for key, g in s["growth_per_4x_tokens"].items():
      growth[(s["model"], int(key.split("->")[1]))] = g
  for r in rows:
    if "error" in r:
      out.append(
        f"| {r['model']} | {r['mode']} | {r['image_size']} | {r['tokens_per_image']} | "
        f"{r['batch']} | failed: {r['error']} | | | | |"
      )
      continue
    g = growth.get((r["model"], r["image_size"]))
    out.append(
      f"| {r['model']} | {r['mode']} | {r['image_size']} | {r['tokens_per_image']} | "
      f"{r['batch']} | {r['step']['median_ms']:.1f} | {r['ms_per_image']:.2f} | "
      f"{_f(g, '.2f')}{'x' if g else ''} | {r['model_tflops_per_s']:.0f} | "
      f"{r['compile_s']:.1f} |"
    )
  return "\n".join(out)


def encode_table(rows):
  out = ["| dtype | batch | images/s | call ms (median) | compile s |", "|---|---|---|---|---|"]
  for r in rows:
    median_ms = r["median_ms"] if "median_ms" in r else 1e3 * r["median_s"]
    out.append(
      f"| {r['dtype']} | {r['batch_size']} | {r['images_per_s']:.0f} | "
      f"{median_ms:.1f} | {r['compile_s']:.1f} |"
    )
  return "\n".join(out)


def profile_table(p):
  prof = p.get("profile", p)
  out = ["| category | ms / step | share of kernel time |", "|---|---|---|"]
  for c, ms in prof["categories_ms_per_step"].items():
    out.append(f"| {c} | {ms:.1f} | {100 * prof['categories_share'][c]:.1f}% |")
  parts = ", ".join(f"{k} {v:.1f} ms" for k, v in prof["other_parts_ms_per_step"].items())
  out.append(
    f"\nother = {parts}. Kernel time {prof['kernel_ms_per_step']:.1f} ms per step of "
    f"{_f(prof.get('step_ms'))} ms; unmapped {prof['unmapped_ms_per_step']:.1f} ms."
  )
  return "\n".join(out)


def main(argv):
  rows = [json.loads(l) for l in open(argv[1]) if l.startswith("{")]
  by = lambda b: [r for r in rows if r.get("benchmark") == b]
  sections = [
    ("train_step", train_table(by("train_step"))),
    ("forward", forward_table(by("forward"))),
    ("dopri5", dopri5_table(by("dopri5"))),
    ("scaling", scaling_table(by("scaling"), by("scaling_summary"))),
    ("vae_encode", encode_table(by("vae_encode"))),
  ]
  for name, table in sections:
    if table.count("\n") > 1:
      print(f"### {name}\n\n{table}\n")
  if len(argv) > 2:
    print(f"### profile\n\n{profile_table(json.load(open(argv[2])))}\n")


if __name__ == "__main__":
  main(sys.argv)
