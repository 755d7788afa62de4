"""What the GPU benchmarks share: configs, timing, memory, FLOP counts, the JSON lines they print.

Every benchmark prints one JSON object per setting on its own line (and appends it to --out when
given), with the environment (device, versions, date, command) in it, so BENCHMARKS.md rows can be
rebuilt from the logs.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dimsum_jax import models
from dimsum_jax.models.dimsum import DiMSUM
from dimsum_jax.models.dit import DiT
from dimsum_jax.ops import selective_scan
from dimsum_jax.tools import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 matrix rate by the vendor's datasheets (FLOP/s), the denominator of MFU.
PEAK_BF16 = {
  "NVIDIA H200": 989.4e12,
  "NVIDIA H100 80GB HBM3": 989.4e12,
  "NVIDIA H100": 989.4e12,
  "NVIDIA A100-SXM4-80GB": 312e12,
  "NVIDIA A100-SXM4-40GB": 312e12,
}

# --smoke: models small enough to compile and run on a CPU in seconds.
SMOKE_MODEL = {"depth": 4, "hidden_size": 64}
SMOKE_DIT_MODEL = {"depth": 2, "hidden_size": 64}
SMOKE_DIM_MODEL = {"depth": 3, "hidden_size": 64}  # DiM: an odd depth


def environment() -> dict[str, Any]:
  """Device, software versions, date and command line: the header of every record."""
  dev = jax.devices()[0]
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "diffrax"):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  for name in ("jax-cuda13-plugin", "jax-cuda12-plugin"):
    try:
      versions[name] = importlib.metadata.version(name)
      break
    except importlib.metadata.PackageNotFoundError:
      pass
  return {
    "device": dev.device_kind,
    "platform": dev.platform,
    "devices": jax.device_count(),
    "python": platform.python_version(),
    **versions,
    "compilation_cache": jax.config.jax_compilation_cache_dir or None,
    "xla_flags": os.environ.get("XLA_FLAGS") or None,
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "command": " ".join(["python"] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
  }


def emit(record: dict[str, Any], out: str | None = None) -> None:
  """Print one JSON line (and append it to `out`)."""
  line = json.dumps(record, default=_jsonable)
  print(line, flush=True)
  if out:
    with open(out, "a") as fh:
      fh.write(line + "\n")


def _jsonable(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def load_config(name: str):
  """configs/<file>.py's get_config(variant) for name 'file' or 'file:variant' (the experiment
  configs are files, not a package)."""
  file, _, variant = name.partition(":")
  path = os.path.join(ROOT, "configs", f"{file}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No config {path}: pick a file name (without .py) from configs/.")
  spec = importlib.util.spec_from_file_location(f"configs_{file}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def model_config(
  name: str,
  input_size: int,
  *,
  dtype: str = "bfloat16",
  scan_impl: str = "auto",
  smoke: bool = False,
  base=None,
):
  """A model section: `base` (a config's model section) or the defaults, then these fields."""
  cfg = models.default_model_config()
  if base is not None:
    cfg.update(dict(base))
  cfg.name = name
  cfg.input_size = input_size
  cfg.dtype = dtype
  if "scan_impl" in models.fields_read(name):
    cfg.scan_impl = scan_impl
  if smoke:
    cfg.update(
      {"DiMSUM": SMOKE_MODEL, "DiT": SMOKE_DIT_MODEL, "DiM": SMOKE_DIM_MODEL}[models.family(name)]
    )
  return cfg


def is_dimsum(name: str) -> bool:
  return name.startswith("DiMSUM")


def resolved_scan_impl(cfg) -> str | None:
  if "scan_impl" not in models.fields_read(cfg.name):
    return None
  return selective_scan.resolve_impl(cfg.scan_impl)


def forward_macs(model) -> float:
  """Multiply-accumulates of one forward per image (dimsum_jax.tools.flops' analytic count)."""
  if isinstance(model, DiMSUM):
    comps = flops.dimsum_components(model)
  elif isinstance(model, DiT):
    comps = flops.dit_components(model)
  else:
    comps = flops.dim_components(model)
  return flops.port_macs(comps)


def train_flops_per_image(model) -> float:
  """Forward MACs x 2 FLOPs x 3 (forward + backward): 578 G for DiMSUM-L/2 at 256 px."""
  return 6.0 * forward_macs(model)


def peak_flops() -> float | None:
  return PEAK_BF16.get(jax.devices()[0].device_kind)


def mfu(flops_per_s: float) -> float | None:
  peak = peak_flops()
  return None if peak is None else flops_per_s / peak


def sync(x):
  return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], *, warmup: int, repeats: int) -> list[float]:
  """Seconds per call of fn() (blocked until ready), after `warmup` untimed calls."""
  for _ in range(warmup):
    sync(fn())
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(fn())
    samples.append(time.perf_counter() - t0)
  return samples


def summary(samples: list[float]) -> dict[str, Any]:
  """Median (and spread) of timings in ms."""
  ms = [1e3 * s for s in samples]
  return {
    "median_ms": statistics.median(ms),
    "min_ms": min(ms),
    "max_ms": max(ms),
    "repeats": len(ms),
    "all_ms": [round(m, 3) for m in ms],
  }


# --smoke on a CPU: LLVM optimisation off (compiles several times faster; numbers meaningless).
SMOKE_COMPILER_OPTIONS = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
}


def timed_compile(jitted, *args, compiler_options=None):
  """(compiled, seconds) for lower + compile (cold unless a persistent compilation cache is set:
  see the record's `compilation_cache`)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile(compiler_options)
  return compiled, time.perf_counter() - t0


def compiled_memory(compiled) -> dict[str, float] | None:
  """XLA's static memory plan of a compiled program, GiB: arguments, outputs, temporaries."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None
  if ma is None:
    return None
  gib = 2.0**30
  args, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
  alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
  return {
    "arguments_gib": args / gib,
    "outputs_gib": out / gib,
    "aliased_gib": alias / gib,
    "temp_gib": temp / gib,
    "total_gib": (args + out - alias + temp) / gib,
  }


def memory_stats() -> dict[str, float] | None:
  """Peak bytes in use so far in this process and the allocator's limit, GiB, of the first device
  (None on CPU); with several local devices also the peak of each."""
  devices = jax.local_devices()
  stats = devices[0].memory_stats()
  if not stats:
    return None
  gib = 2.0**30
  out = {
    "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / gib,
    "limit_gib": stats.get("bytes_limit", float("nan")) / gib,
  }
  if len(devices) > 1:
    out["peak_gib_per_device"] = [
      (d.memory_stats() or {}).get("peak_bytes_in_use", float("nan")) / gib for d in devices
    ]
  return out


def fits(plan: dict[str, float] | None, headroom: float = 0.94) -> bool:
  """Whether a compiled program's memory plan fits the device (always True where unknown)."""
  stats = memory_stats()
  if plan is None or stats is None or not math.isfinite(stats["limit_gib"]):
    return True
  return plan["total_gib"] <= headroom * stats["limit_gib"]


def matmul_peak(n: int = 8192, repeats: int = 10) -> float:
  """Measured bf16 matrix rate (FLOP/s) of an n x n x n product on random data."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.bfloat16)
  b = jax.random.normal(kb, (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  inner = 20

  def burst():  # back-to-back products: no host round trip between them
    out = None
    for _ in range(inner):
      out = f(a, b)
    return out

  samples = time_calls(burst, warmup=2, repeats=repeats)
  return 2.0 * n**3 * inner / statistics.median(samples)


def is_oom(err: BaseException) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def error_record(err: BaseException) -> dict[str, str]:
  text = str(err).strip().splitlines()
  return {
    "error": type(err).__name__,
    "message": (text[0] if text else "")[:400],
    "oom": is_oom(err),
  }
