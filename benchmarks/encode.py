"""Throughput of the latent-encoding step's VAE encoder: images/s at 256 px, float32 and bfloat16.

Times the exact jitted function of `python -m dimsum_jax.data.encode` (uint8 pixels -> scaled
posterior samples, batch split over the devices of --devices) with random weights of the
sd-vae-ft-ema shape (83.7 M parameters; speed does not depend on the values). Inputs stay on the
device, so the numbers are the encoder's, without JPEG decoding or host transfers. For each setting:
compile, two warm-up calls, then --repeats timed calls (each waited for); the median gives the
rate. Prints one JSON line per setting (benchmarks/common.py: environment header; appended to
--out when given). No TensorFlow.

  python benchmarks/encode.py                       # one GPU, 256 px, batch 64, f32 + bf16
  python benchmarks/encode.py --batch_sizes 32 64 128 --flip --out results.jsonl
  python benchmarks/encode.py --smoke               # a tiny VAE at 32 px, any device, seconds

images_per_s counts VAE encodes; with --flip each source image is encoded twice (itself and its
mirror), so source_images_per_s is half of it. The encoding step needs 2 x 1 281 167 encodes for
ImageNet: hours = 2 * 1281167 / images_per_s / 3600 on one device when decoding keeps up.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from dimsum_jax import sharding  # noqa: E402
from dimsum_jax.data import encoder  # noqa: E402
from dimsum_jax.vae import model  # noqa: E402

# sd-vae-ft-ema = AutoencoderKL's defaults; the smoke variant is a 2-level toy.
FULL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
SMOKE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def random_params(vae, seed=0):
  """Fan-in scaled normal kernels, unit group-norm scales, zero biases (NumPy, float32)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if len(leaf.shape) > 1:
      scale = np.float32(1 / np.sqrt(np.prod(leaf.shape[:-1])))
      return rng.standard_normal(leaf.shape, dtype=np.float32) * scale
    return np.full(leaf.shape, 1.0 if path[-1].key == "scale" else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(draw, model.abstract_params(vae))


def run_setting(
  arch, dtype, image_size, batch_size, mesh, *, flip, mode, repeats, precision, smoke=False
):
  vae = model.AutoencoderKL(**arch, dtype=jnp.dtype(dtype), precision=precision)
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  batch = jax.sharding.NamedSharding(mesh, jax.P("data"))
  params = jax.device_put(random_params(vae), replicated)
  fn = encoder.make_encode_fn(vae, mesh, mode=mode, seed=0, flip=flip)
  rng = np.random.default_rng(0)
  pixels = jax.device_put(
    rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8), batch
  )
  ids = jax.device_put(np.arange(batch_size, dtype=np.int32), batch)
  compiled, compile_s = common.timed_compile(
    fn, params, pixels, ids, compiler_options=common.SMOKE_COMPILER_OPTIONS if smoke else None
  )
  out = common.sync(compiled(params, pixels, ids))
  if not bool(jnp.all(jnp.isfinite(out))):
    raise FloatingPointError(f"non-finite latents with dtype={dtype}")
  times = common.time_calls(lambda: compiled(params, pixels, ids), warmup=2, repeats=repeats)
  timing = common.summary(times)
  median = timing["median_ms"] / 1e3
  encodes = batch_size * (2 if flip else 1)
  return {
    "benchmark": "vae_encode",
    "arch": "smoke" if smoke else "sd-vae-ft-ema",
    "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(model.abstract_params(vae)))),
    "image_size": image_size,
    "latent_shape": list(out.shape[1:]),
    "dtype": dtype,
    "precision": precision or "default",
    "batch_size": batch_size,
    "flip": flip,
    "mode": mode,
    "mesh_devices": int(mesh.devices.size),
    "images_per_s": round(encodes / median, 2),
    "source_images_per_s": round(batch_size / median, 2),
    **timing,
    "compile_s": round(compile_s, 2),
    "memory_gib": common.compiled_memory(compiled),
  }


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
  )
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument("--batch_sizes", type=int, nargs="+", default=[64])
  p.add_argument(
    "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"]
  )
  p.add_argument(
    "--precision",
    choices=["default", "highest"],
    default="default",
    help="XLA precision of f32 convolutions (default may use TF32 on GPUs)",
  )
  p.add_argument("--mode", choices=list(encoder.MODES), default="sample")
  p.add_argument("--flip", action="store_true", help="encode each image and its mirror")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--devices", type=int, default=1, help="local devices to split the batch over")
  p.add_argument("--smoke", action="store_true", help="tiny VAE, 32 px, batch 2, 2 repeats")
  p.add_argument("--out", default=None, help="append the JSON lines to this file too")
  args = p.parse_args(argv)
  arch = FULL
  if args.smoke:
    arch, args.image_size, args.batch_sizes, args.repeats = SMOKE, 32, [2], 2
  devices = jax.local_devices()[: args.devices]
  if len(devices) < args.devices:
    raise SystemExit(f"--devices {args.devices}: only {len(devices)} local devices.")
  # The encoding job's own mesh (data x fsdp, as sharding.make_mesh builds it) on these devices.
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, devices=devices)
  precision = None if args.precision == "default" else args.precision
  env = common.environment()
  for batch_size in args.batch_sizes:
    if batch_size % len(devices):
      raise SystemExit(f"--batch_sizes {batch_size} does not split over {len(devices)} devices.")
    for dtype in args.dtypes:
      try:
        row = run_setting(
          arch,
          dtype,
          args.image_size,
          batch_size,
          mesh,
          flip=args.flip,
          mode=args.mode,
          repeats=args.repeats,
          precision=precision,
          smoke=args.smoke,
        )
      except Exception as e:  # an OOM at one batch size must not lose the other rows
        row = {
          "benchmark": "vae_encode",
          "dtype": dtype,
          "batch_size": batch_size,
          **common.error_record(e),
        }
      common.emit({**env, **row}, args.out)


if __name__ == "__main__":
  main()
