"""Throughput of the evaluation's Inception features: images/s at 256 px over all devices.

Times `dimsum_jax.evaluate.features.Extractor`, the exact object that `python -m
dimsum_jax.evaluate`, `sample --evaluate` and evaluation during training run: uint8 images
[N, 256, 256, 3] on the host -> resize to 299 and pytorch-fid's normalisation -> Inception-v3 ->
pool (2048), spatial (sFID) and logit features back on the host. The weights are random with the
released file's shapes (speed does not depend on their values); the images are random uint8.
Two rates per batch size: `end_to_end` (host arrays in, features out, as the command runs) and
`device_only` (the jitted network alone on images already on the device). Prints one JSON line per
setting (benchmarks/common.py header; appended to --out when given). No TensorFlow.

  python benchmarks/evaluate_features.py                     # 256 px, 200 and 500 per device
  python benchmarks/evaluate_features.py --batch_sizes 250 --images 10000 --out results.jsonl
  python benchmarks/evaluate_features.py --smoke             # 2 x 4 images at 32 px, any device
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from dimsum_jax.evaluate import features  # noqa: E402
from dimsum_jax.evaluate import inception  # noqa: E402


def random_net(batch_size: int, seed: int = 0) -> features.FeatureNet:
  """The pytorch-fid Inception with random weights of the released shapes."""
  module = inception.InceptionV3()
  images = jnp.zeros((1, inception.SIZE, inception.SIZE, 3), jnp.uint8)
  variables = jax.jit(module.init)(jax.random.key(seed), images)
  return features.FeatureNet(
    name=inception.NAME,
    apply=module.apply,
    variables=variables,
    dims=dict(inception.DIMS),
    batch_size=batch_size,
  )


def run_setting(
  batch_size: int, image_size: int, num_images: int, repeats: int, out: str | None
) -> dict:
  extractor = features.Extractor(random_net(batch_size), kinds=("pool", "spatial", "is_logits"))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_images, image_size, image_size, 3), dtype=np.uint8)
  t0 = time.perf_counter()
  extractor(images[: extractor.global_batch])  # compile + first call
  compile_s = time.perf_counter() - t0
  end_to_end = common.summary(
    common.time_calls(lambda: extractor(images), warmup=0, repeats=repeats)
  )
  on_device = jax.device_put(images[: extractor.global_batch], extractor._batch)  # pylint: disable=protected-access
  variables = extractor._variables  # pylint: disable=protected-access
  device = common.summary(
    common.time_calls(
      lambda: extractor._fn(variables, on_device),  # pylint: disable=protected-access
      warmup=1,
      repeats=repeats,
    )
  )
  record = {
    "benchmark": "evaluate_features",
    "image_size": image_size,
    "num_images": num_images,
    "batch_per_device": batch_size,
    "global_batch": extractor.global_batch,
    "compile_s": compile_s,
    "end_to_end": end_to_end,
    "end_to_end_images_per_s": num_images / (end_to_end["median_ms"] / 1e3),
    "device_only": device,
    "device_only_images_per_s": extractor.global_batch / (device["median_ms"] / 1e3),
    "memory": common.memory_stats(),
    **common.environment(),
  }
  common.emit(record, out)
  return record


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument(
    "--batch_sizes", type=int, nargs="+", default=[200, 500], help="images per device per step"
  )
  p.add_argument("--images", type=int, default=5000, help="images per timed end-to-end call")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--smoke", action="store_true", help="32 px, batch 4, 8 images, 1 repeat")
  p.add_argument("--out", default=None, help="append the JSON lines to this file too")
  args = p.parse_args(argv)
  if args.smoke:
    args.image_size, args.batch_sizes, args.images, args.repeats = 32, [4], 8, 1
  for batch_size in args.batch_sizes:
    run_setting(batch_size, args.image_size, args.images, args.repeats, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
