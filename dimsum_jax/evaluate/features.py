"""Feature networks and their extraction: jitted, batched, split over every device.

A `FeatureNet` is a pure function of uint8 images and its variables:

  net.apply(net.variables, images)   images uint8 [B, H, W, C] -> {kind: float32 [B, dims[kind]]}

with the kinds
  pool       the features of FID and precision/recall (Inception: pool_3, 2048)
  spatial    the features of sFID (Inception: mixed_6/conv[..., :7], 2023)
  is_logits  the logits the Inception Score softmaxes (Inception: fc without its bias, 1008)
  logits     class logits (used for the sample accuracy when `classifies_labels`)

Two nets exist: `inception` (dimsum_jax.evaluate.inception, weights from pytorch-fid's file) and
`digits` (dimsum_jax.evaluate.digits_features, fitted on first use, no download). Build either
from a small config with `build_feature_net(config)` (the fields of dimsum_jax.evaluate.config).

`Extractor(net, devices)` runs a net over any number of images: global batches of
`net.batch_size * len(devices)` images, split over the devices of a ('data', 'fsdp') mesh
(dimsum_jax.sharding), the variables replicated once, the last batch padded with zeros and the
padding dropped. Images flow in as numpy arrays or as an iterable of batches of any length (a
streamed samples.npz), features come back as float32 numpy arrays. Features do not depend on the
device count beyond float rounding (tests/evaluate check 8 devices against 1).
Devices default to jax.devices() in one process; with several processes each uses its own
jax.local_devices() (evaluate on one process, or split the images yourself).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterable

from absl import logging
import jax
import numpy as np

from dimsum_jax import sharding
from dimsum_jax.evaluate.config import FEATURES

KINDS = ("pool", "spatial", "is_logits", "logits")


@dataclasses.dataclass(eq=False)
class FeatureNet:
  name: str  # names the features (written into reference files)
  apply: Callable  # (variables, uint8 [B, H, W, C]) -> {kind: float32 [B, D]}
  variables: Any
  dims: dict  # {kind: D} of every kind `apply` returns
  batch_size: int = 50  # images per device per step
  classifies_labels: bool = False  # logits index the data's own classes (sample accuracy)
  info: dict = dataclasses.field(default_factory=dict)


def build_feature_net(config) -> FeatureNet:
  """The `inception` or `digits` net of `config` (fields of config.default_eval_config())."""
  features = str(config.features)
  if features == "inception":
    from dimsum_jax.evaluate import inception  # pylint: disable=g-import-not-at-top

    if not config.inception_weights:
      raise inception.WeightsError(
        f"The Inception features need weights: pass the path of {inception.WEIGHTS_HINT} "
        "(downloaded once; nothing is fetched at run time), or use the digits features."
      )
    variables = inception.load_variables(os.path.expanduser(config.inception_weights))
    module = inception.InceptionV3(preprocess=str(config.get("preprocess", "pytorch_fid")))
    name = inception.NAME if module.preprocess == "pytorch_fid" else f"{inception.NAME}, tf input"
    return FeatureNet(
      name=name,
      apply=module.apply,
      variables=variables,
      dims=dict(inception.DIMS),
      batch_size=int(config.batch_size),
    )
  if features == "digits":
    from dimsum_jax.evaluate import digits_features  # pylint: disable=g-import-not-at-top

    net = digits_features.digits_feature_net(config.get("cache_dir") or None)
    net.batch_size = int(config.batch_size) if config.batch_size else net.batch_size
    return net
  raise ValueError(f"Unknown features {features!r}: choose one of {FEATURES}.")


def extraction_mesh(devices=None):
  if devices is None:
    devices = jax.devices() if jax.process_count() == 1 else jax.local_devices()
  return sharding.make_mesh({"data": -1, "fsdp": 1}, devices=list(devices))


def _batches_of(images, size: int) -> Iterable[np.ndarray]:
  """Re-cut an array or an iterable of arrays into arrays of `size` rows (the last shorter)."""
  if isinstance(images, (np.ndarray, jax.Array)):
    images = np.asarray(images)
    for start in range(0, images.shape[0], size):
      yield images[start : start + size]
    return
  pending, have = [], 0
  for part in images:
    part = np.asarray(part)
    pending.append(part)
    have += part.shape[0]
    while have >= size:
      joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
      yield joined[:size]
      pending, have = [joined[size:]], have - size
  if have:
    yield np.concatenate(pending) if len(pending) > 1 else pending[0]


class Extractor:
  """`net` over every device of `devices`: extractor(images) -> {kind: float32 [N, D]}."""

  def __init__(self, net: FeatureNet, devices=None, kinds: Iterable[str] | None = None):
    self.net = net
    self.mesh = extraction_mesh(devices)
    self.kinds = tuple(kinds) if kinds is not None else tuple(net.dims)
    unknown = set(self.kinds) - set(net.dims)
    if unknown:
      raise ValueError(f"{net.name} has no {sorted(unknown)} features; it has {sorted(net.dims)}.")
    self.global_batch = int(net.batch_size) * self.mesh.devices.size
    self._batch = sharding.batch_sharding(self.mesh)
    replicated = sharding.replicated(self.mesh)
    self._variables = jax.device_put(net.variables, replicated)
    kinds_ = self.kinds

    def run(variables, images):
      out = net.apply(variables, images)
      return {k: out[k].astype(np.float32) for k in kinds_}

    self._fn = jax.jit(run, in_shardings=(replicated, self._batch), out_shardings=self._batch)

  def __call__(
    self, images, *, total: int | None = None, what: str = "images", log_every_s: float = 30.0
  ) -> dict[str, np.ndarray]:
    """Features of `images` (uint8 [N, H, W, C], or an iterable of such batches)."""
    if total is None and isinstance(images, (np.ndarray, jax.Array)):
      total = int(images.shape[0])
    parts = {k: [] for k in self.kinds}
    done, start, last_log = 0, time.monotonic(), time.monotonic()
    for batch in _batches_of(images, self.global_batch):
      n = batch.shape[0]
      if n < self.global_batch:
        pad = np.zeros((self.global_batch - n, *batch.shape[1:]), batch.dtype)
        batch = np.concatenate([batch, pad])
      out = jax.device_get(self._fn(self._variables, jax.device_put(batch, self._batch)))
      for k in self.kinds:
        parts[k].append(np.asarray(out[k][:n]))
      done += n
      now = time.monotonic()
      if now - last_log > log_every_s:
        rate = done / (now - start)
        eta = f", ETA {(total - done) / rate:.0f} s" if total else ""
        logging.info(
          "%s features of %d%s %s (%.1f images/s%s).",
          self.net.name,
          done,
          f"/{total}" if total else "",
          what,
          rate,
          eta,
        )
        last_log = now
    if not done:
      return {k: np.zeros((0, self.net.dims[k]), np.float32) for k in self.kinds}
    return {k: np.concatenate(v) for k, v in parts.items()}
