"""Where the time of a training step goes: device kernel time by category, from a profiler trace.

A few steps of the compiled step are traced with jax.profiler; the trace is read back on the same
machine (jax.profiler.ProfileData) and each kernel is charged to the HLO instruction that launched
it (the trace's `hlo_op`), whose metadata in the compiled module's text (source file, op name,
opcode, called computations) gives its category:

  scan       dimsum_jax/ops/selective_scan*.py (reference ops or the Pallas kernel)
  attention  the softmax attention of models/layers.py (scores, softmax, values)
  wavelet    the Haar packet transform (ops/haar.py, jaxwt)
  matmuls    every other dot / convolution / GEMM kernel (projections, MLPs, embeddings)
  other      the rest, split into optimizer (optax, EMA), permutes (scan-order gathers),
             norms (RMSNorm, LayerNorm) and elementwise/copies

The summary (per-step ms and share of each category, the top kernels) is printed and written as
JSON. Categories follow the instruction that XLA fused each kernel around, so a fusion that folds
a norm into a matmul epilogue counts as matmul.

  python benchmarks/profile_step.py --summary profile.json      # DiMSUM-L/2, 256 px, batch 256
  XLA_FLAGS=--xla_gpu_enable_command_buffer= python benchmarks/profile_step.py ...
(XLA replays most kernels as CUDA graphs, whose trace events name the graph, not the instruction;
with command buffers off every kernel names its instruction and the categories are exact.)
  python benchmarks/profile_step.py --smoke
train_step.py --profile FILE runs the same after its timing, on the program it timed.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from dimsum_jax.models import layers  # noqa: E402

CATEGORIES = ("collectives", "scan", "attention", "matmuls", "wavelet", "other")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
OTHER_PARTS = ("optimizer", "permutes", "norms", "elementwise")

_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def _opcode(rest: str) -> str:
  """The opcode of an HLO instruction from the text after ' = ' (shape, then opcode '(')."""
  i = 0
  if rest.startswith("("):  # tuple shape: skip to its matching parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        break
    i += 1
  else:
    i = rest.find(" ")
  m = re.match(r"\s*([\w\-]+)\(", rest[i:])
  return m.group(1) if m else "?"


def _stack_tables(lines):
  """stack(frame id) -> [(file, function, line), ...] innermost first, from the module's
  FileNames / FunctionNames / FileLocations / StackFrames tables."""
  tables = {t: {} for t in _TABLES}
  section = None
  for raw in lines:
    text = raw.strip()
    if text in _TABLES:
      section = text
      continue
    if section is None:
      continue
    m = re.match(r"^(\d+) (.*)$", text)
    if not m:
      if text:
        section = None
      continue
    key, value = int(m.group(1)), m.group(2)
    if section in ("FileNames", "FunctionNames"):
      tables[section][key] = value.strip('"')
    else:
      tables[section][key] = {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", value)}
  files, funcs = tables["FileNames"], tables["FunctionNames"]
  locs, frames = tables["FileLocations"], tables["StackFrames"]
  # XLA prints parent_frame_id one above the parent's printed id (0: no parent); a frame that
  # would be its own parent tells that printing apart from a plain one.
  shift = int(any(f.get("parent_frame_id") == k for k, f in frames.items()))
  cache = {}

  def stack(frame_id):
    if frame_id in cache:
      return cache[frame_id]
    out, seen, f = [], set(), frame_id
    while f in frames and f not in seen:
      seen.add(f)
      loc = locs.get(frames[f].get("file_location_id"), {})
      out.append(
        (
          files.get(loc.get("file_name_id"), ""),
          funcs.get(loc.get("function_name_id"), ""),
          loc.get("line", 0),
        )
      )
      f = frames[f].get("parent_frame_id", 0) - shift
    cache[frame_id] = out
    return out

  return stack


def hlo_index(hlo_text: str) -> dict[str, dict]:
  """{instruction name: {opcode, op_name, stack, target, calls}} over all computations of an HLO
  module's text (stack: its Python frames, innermost first), plus '__computations__':
  {computation name: [instruction names]}."""
  lines = hlo_text.splitlines()
  stack = _stack_tables(lines)
  index, computations, current = {}, {}, None
  for raw in lines:
    m = _COMPUTATION.match(raw)
    if m and " = " not in raw.split("(")[0]:
      current = m.group(1)
      computations[current] = []
      continue
    m = _INSTRUCTION.match(raw)
    if not m:
      continue
    name, rest = m.group(1), m.group(2)
    op_name = _OP_NAME.search(rest)
    frame = _FRAME.search(rest)
    calls = []
    for group in _CALLS.findall(rest):
      calls += [c.strip().lstrip("%") for c in group.strip("{}").split(",") if c.strip()]
    target = _TARGET.search(rest)
    index[name] = {
      "opcode": _opcode(rest),
      "op_name": op_name.group(1) if op_name else "",
      "stack": stack(int(frame.group(1))) if frame else [],
      "target": target.group(1) if target else "",
      "calls": calls,
    }
    if current is not None:
      computations[current].append(name)
  index["__computations__"] = computations
  return index


def frame_category(info) -> str | None:
  """scan / attention / wavelet / optimizer / permutes / norms from an instruction's Python stack
  (and a custom call's target); None when none applies."""
  target = info["target"].lower()
  if "mosaic" in target:
    return "scan"
  if "fmha" in target:
    return "attention"
  found = None
  for file, func, _ in info["stack"]:
    if re.search(r"ops/selective_scan(_pallas)?\.py$", file):
      return "scan"
    if file.endswith("models/layers.py") and func == "attention":
      return "attention"
    if file.endswith("ops/haar.py") or "/jaxwt/" in file:
      return "wavelet"
    if found is None:
      if "/optax/" in file:
        found = "optimizer"
      elif func == "permute_tokens":
        found = "permutes"
      elif func.startswith("RMSNorm.") or file.endswith("flax/linen/normalization.py"):
        found = "norms"
  return found


def _is_matmul(info) -> bool:
  target = info["target"].lower()
  return info["opcode"] in ("dot", "convolution", "ragged-dot") or any(
    s in target for s in ("gemm", "cublas", "matmul")
  )


def _contents(name, index, seen=None):
  """Instructions of the computations that `name` calls, recursively."""
  seen = set() if seen is None else seen
  out = []
  for comp in index.get(name, {}).get("calls", []):
    if comp in seen:
      continue
    seen.add(comp)
    for inner in index["__computations__"].get(comp, []):
      out.append(index[inner])
      out += _contents(inner, index, seen)
  return out


def classify(name: str, index: dict) -> tuple[str, str | None]:
  """(category, part of 'other' or None) of the kernel launched for HLO instruction `name`.

  A kernel holding any scan code is scan, then any attention code is attention; else one holding
  a dot/convolution (outside the wavelet transform) is matmuls; else wavelet; else other, split by
  the first of optimizer / permutes / norms found, or elementwise.
  """
  info = index.get(name)
  if info is None:
    return classify_kernel_name(name), None
  members = [info] + _contents(name, index)
  if any(i["opcode"].replace("-start", "").replace("-done", "") in COLLECTIVES for i in members):
    return "collectives", None
  cats = [frame_category(i) for i in members]
  for c in ("scan", "attention"):
    if c in cats:
      return c, None
  if any(_is_matmul(i) and c != "wavelet" for i, c in zip(members, cats)):
    return "matmuls", None
  if "wavelet" in cats:
    return "wavelet", None
  for part in ("optimizer", "permutes", "norms"):
    if part in cats:
      return "other", part
  return "other", "elementwise"


def classify_kernel_name(kernel: str) -> str:
  """Fallback for kernels the trace does not tie to an HLO instruction."""
  k = kernel.lower()
  if "nccl" in k:
    return "collectives"
  if any(s in k for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "gmma")):
    return "matmuls"
  if "fmha" in k or "flash" in k:
    return "attention"
  if "mosaic" in k or "scan" in k:
    return "scan"
  return "other"


def device_events(xspace_path: str, module: str | None):
  """(kernel name, hlo_op or None, duration ms) of every device kernel in a trace file."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top

  data = ProfileData.from_file(xspace_path)
  gpu = [p for p in data.planes if p.name.startswith("/device:GPU")]
  planes = gpu or [p for p in data.planes if p.name.startswith("/host:CPU")]
  out, lines_seen = [], set()
  device_events.devices = max(len(gpu), 1)
  for plane in planes:
    for line in plane.lines:
      if gpu and not (line.name.startswith("Stream") or line.name.isdigit()):
        lines_seen.add(line.name)
        continue
      lines_seen.add(line.name)
      for ev in line.events:
        stats = dict(ev.stats)
        hlo_op = stats.get("hlo_op")
        if not gpu and hlo_op is None:
          continue  # host threads: only XLA's own op events
        if module and stats.get("hlo_module") and not str(stats["hlo_module"]).startswith(module):
          continue
        out.append((ev.name, hlo_op, ev.duration_ns / 1e6))
  return out, sorted(lines_seen)


def instruction_of(kernel: str, hlo_op: str | None, index: dict) -> str | None:
  """The HLO instruction behind a kernel event: the trace's hlo_op when it names one (it names
  the command buffer when XLA replays kernels as CUDA graphs), else the kernel's own name, which
  XLA derives from its fusion's name ('loop_add_fusion_14' for 'loop_add_fusion.14'; identical
  fusions may share one kernel, so this is then approximate)."""
  for cand in (hlo_op, kernel, re.sub(r"_(\d+)$", r".\1", kernel)):
    if cand and cand in index and cand != "__computations__":
      return cand
  return None


def summarize(events, index, steps: int, step_ms: float | None = None, top: int = 25) -> dict:
  totals = collections.Counter()
  parts = collections.Counter()
  per_op = collections.defaultdict(lambda: [0.0, 0, "", "", ""])
  unmapped = 0.0
  for kernel, hlo_op, ms in events:
    name = instruction_of(kernel, hlo_op, index)
    if name is None:
      unmapped += ms
    key = name or kernel
    cat, part = classify(key, index)
    totals[cat] += ms
    if part:
      parts[part] += ms
    rec = per_op[key]
    rec[0] += ms
    rec[1] += 1
    rec[2] = cat if not part else f"other/{part}"
    rec[3] = index.get(key, {}).get("op_name", "")[-160:]
    rec[4] = kernel[:120]
  busy = sum(totals.values())
  summary = {
    "steps_traced": steps,
    "kernel_ms_per_step": busy / steps,
    "categories_ms_per_step": {c: totals[c] / steps for c in CATEGORIES},
    "categories_share": {c: (totals[c] / busy if busy else 0.0) for c in CATEGORIES},
    "other_parts_ms_per_step": {p: parts[p] / steps for p in OTHER_PARTS},
    "unmapped_ms_per_step": unmapped / steps,
    "kernels_per_step": len(events) / steps,
    "top_ops": [
      {
        "hlo_op": k,
        "kernel": v[4],
        "ms_per_step": v[0] / steps,
        "calls_per_step": v[1] / steps,
        "category": v[2],
        "op_name": v[3],
      }
      for k, v in sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]
    ],
  }
  if step_ms:
    summary["step_ms"] = step_ms
    summary["idle_ms_per_step"] = step_ms - busy / steps
  return summary


def profile(
  compiled,
  run_step,
  trace_dir: str,
  *,
  steps: int = 3,
  step_ms: float | None = None,
  hlo_out: str | None = None,
  top: int = 25,
):
  """Trace `steps` calls of run_step() (each blocked) into trace_dir and summarize the kernels
  of `compiled` by category; hlo_out: also write the compiled module's text there (gzip)."""
  os.makedirs(trace_dir, exist_ok=True)
  hlo = compiled.as_text() or ""
  if hlo_out:
    with gzip.open(hlo_out, "wt") as fh:
      fh.write(hlo)
  m = re.search(r"HloModule\s+([\w.\-]+)", hlo)
  module = m.group(1) if m else None
  index = hlo_index(hlo)
  jax.block_until_ready(run_step())
  t0 = time.perf_counter()
  jax.profiler.start_trace(trace_dir)
  for _ in range(steps):
    jax.block_until_ready(run_step())
  jax.profiler.stop_trace()
  traced_ms = (time.perf_counter() - t0) * 1e3 / steps
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not files:
    raise FileNotFoundError(f"jax.profiler wrote no .xplane.pb under {trace_dir}.")
  t0 = time.perf_counter()
  events, lines = device_events(files[-1], module)
  # Kernel time per step and device: every GPU's kernels are in the trace.
  devices = device_events.devices
  summary = summarize(events, index, steps * devices, step_ms, top=top)
  summary.update(
    module=module,
    steps_traced=steps,
    devices_traced=devices,
    trace_lines=lines[:20],
    traced_wall_ms_per_step=traced_ms,
    parse_s=time.perf_counter() - t0,
    trace_file=files[-1],
  )
  return summary


def format_table(summary: dict) -> str:
  rows = ["| category | ms / step | share of kernel time |", "|---|---|---|"]
  for c in CATEGORIES:
    rows.append(
      f"| {c} | {summary['categories_ms_per_step'][c]:.1f} | "
      f"{100 * summary['categories_share'][c]:.1f}% |"
    )
  parts = ", ".join(f"{p} {v:.1f}" for p, v in summary["other_parts_ms_per_step"].items())
  rows.append(
    f"\nother: {parts} ms; kernel time {summary['kernel_ms_per_step']:.1f} ms/step; "
    f"unmapped {summary['unmapped_ms_per_step']:.1f} ms/step"
  )
  return "\n".join(rows)


def main(argv=None):
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="DiMSUM-L/2")
  p.add_argument("--image-size", type=int, default=256)
  p.add_argument(
    "--batch", type=int, default=None, help="global batch (default 256; 4 with --smoke)"
  )
  p.add_argument(
    "--grad-accum-steps", type=int, default=0, help="passes per step; 0: fewest that fit"
  )
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--scan-impl", default="auto", choices=["auto", "pallas", "reference"])
  p.add_argument("--wavelet-impl", default=None, choices=["jaxwt", "direct"])
  p.add_argument("--remat", default=None, choices=list(layers.REMAT_POLICIES))
  p.add_argument("--attention-impl", default=None, choices=["auto", "xla", "cudnn"])
  p.add_argument(
    "--scan-unroll",
    type=int,
    default=None,
    help="DiMSUM block groups (DiT blocks) per scan iteration (0: all)",
  )
  p.add_argument("--top", type=int, default=60, help="heaviest instructions listed")
  p.add_argument("--steps", type=int, default=3, help="steps traced")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--trace-dir", default="/tmp/dimsum_profile", help="the raw trace goes here")
  p.add_argument("--summary", default=None, help="also write the summary JSON to this file")
  p.add_argument("--hlo-out", default=None, help="write the compiled step's HLO text (gzip) here")
  args = p.parse_args(argv)
  if args.smoke:
    args.image_size = 64
    args.batch = args.batch or 4
  args.batch = args.batch or 256
  setup = train_step.build(
    args.model,
    args.image_size,
    args.batch,
    grad_accum_steps=args.grad_accum_steps,
    dtype=args.dtype,
    scan_impl=args.scan_impl,
    smoke=args.smoke,
    wavelet_impl=args.wavelet_impl,
    remat=args.remat,
    attention_impl=args.attention_impl,
    scan_unroll=args.scan_unroll,
  )
  holder = {"state": setup.make_state()}

  def run_step():
    holder["state"], metrics = setup.compiled(holder["state"], setup.batch)
    return metrics["loss"]

  step_ms = common.summary(common.time_calls(run_step, warmup=1, repeats=5))["median_ms"]
  print(
    f"compiled in {setup.compile_s:.1f} s (micro-batch {setup.micro_batch}); step {step_ms:.1f} ms",
    file=sys.stderr,
    flush=True,
  )
  summary = profile(
    setup.compiled,
    run_step,
    args.trace_dir,
    steps=args.steps,
    step_ms=step_ms,
    hlo_out=args.hlo_out,
    top=args.top,
  )
  record = {
    "benchmark": "profile",
    "model": args.model,
    "image_size": args.image_size,
    "global_batch": args.batch,
    "micro_batch": setup.micro_batch,
    "dtype": args.dtype,
    "scan_impl": common.resolved_scan_impl(setup.model_config),
    **summary,
    **common.environment(),
  }
  if args.summary:
    with open(args.summary, "w") as fh:
      json.dump(record, fh, indent=1, default=str)
  print(format_table(summary))
  common.emit(record)
  return 0


if __name__ == "__main__":
  sys.exit(main())
