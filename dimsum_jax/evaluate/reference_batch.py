"""Reference batches: ADM's format, read, written, and made from images in memory.

The format is that of ADM's reference batches (VIRTUAL_imagenet256_labeled.npz, ...), an .npz:
  mu [D], sigma [D, D]         float64 statistics of the pool features (FID)
  mu_s [S], sigma_s [S, S]     the same of the spatial features (sFID; absent for nets without)
  arr_0 uint8 [M, H, W, 3]     images whose features define the manifold of precision/recall
and, in files written here, also (ADM's evaluator ignores them)
  feature_net                  the name of the net the statistics come from
  num_images                   how many images the statistics cover
  source                       e.g. "image_folder:/data/train" or "latents:/data/in256 (decoded)"
ADM's files carry no feature_net: their statistics come from the TF graph itself, so evaluating
against them with this port's default "pytorch_fid" input differs from ADM's numbers as the two
resizes differ (use preprocess="tf" for the TF graph's input path). Loading never unpickles.

`Reference` holds one in memory (arr_0 stays on disk until its features are needed) and checks
that a feature net and samples fit it; `load_reference(path)` and `save_reference(path, ref)` read
and write the file (arr_0 streamed in row blocks), `reference_from_images` makes one from uint8
images [N, H, W, C] in memory and `reference_for(config, net, image_shape)` is the reference of
an evaluation config. Writing one from a whole dataset, chunked and resumable, is
`python -m dimsum_jax.evaluate.reference` (dimsum_jax.evaluate.reference).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from dimsum_jax.evaluate import metrics as metrics_lib
from dimsum_jax.evaluate import npz
from dimsum_jax.evaluate.features import Extractor, FeatureNet
from dimsum_jax.evaluate.metrics import EvaluationError, Moments


@dataclasses.dataclass(eq=False)
class Reference:
  mu: np.ndarray
  sigma: np.ndarray
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  images: np.ndarray | npz.NpzArray | None = None  # arr_0 (read lazily from a file)
  feature_net: str | None = None  # None: unknown (ADM's files)
  num_stat_images: int | None = None
  source: str = ""
  path: str | None = None
  _pool: dict = dataclasses.field(default_factory=dict, repr=False)
  _roots: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def num_images(self) -> int | None:
    return None if self.images is None else int(self.images.shape[0])

  @property
  def image_shape(self) -> tuple | None:
    return None if self.images is None else tuple(self.images.shape[1:])

  @property
  def name(self) -> str:
    return self.path or self.source or "the reference"

  def check_compatible(self, net: FeatureNet, sample_shape, metrics) -> None:
    """EvaluationError, one sentence, when `net`'s features or the samples do not fit."""
    if self.feature_net is not None and self.feature_net != net.name:
      raise EvaluationError(
        f"{self.name} holds statistics of {self.feature_net} features, not "
        f"of {net.name}: evaluate with the same features or write a reference "
        "with these (python -m dimsum_jax.evaluate.reference)."
      )
    for kind, mu in (("pool", self.mu), ("spatial", self.mu_s)):
      if mu is not None and kind in net.dims and mu.shape[0] != net.dims[kind]:
        raise EvaluationError(
          f"{self.name} holds {mu.shape[0]}-dimensional {kind} statistics but "
          f"{net.name} gives {net.dims[kind]}: it was made with another "
          "feature network; use a reference of these features."
        )
    if "sfid" in metrics and self.mu_s is None:
      raise EvaluationError(
        f"{self.name} has no spatial statistics (mu_s, sigma_s): leave sfid "
        "out of the metrics or use a reference that has them."
      )
    if ("precision" in metrics or "recall" in metrics) and self.images is None:
      raise EvaluationError(
        f"{self.name} has no images (arr_0) for precision and recall: leave "
        "them out of the metrics or use a reference batch with arr_0."
      )
    if self.image_shape is not None and tuple(self.image_shape[:2]) != tuple(sample_shape[:2]):
      h, w = self.image_shape[:2]
      raise EvaluationError(
        f"{self.name} holds {h}x{w} images but the samples are "
        f"{sample_shape[0]}x{sample_shape[1]}: use the reference batch of "
        "the samples' resolution."
      )

  def sigma_root(self, kind: str = "pool") -> np.ndarray | None:
    """sqrt(sigma) (or of sigma_s for kind 'spatial'), computed once; None if not PSD."""
    if kind not in self._roots:
      sigma = self.sigma if kind == "pool" else self.sigma_s
      self._roots[kind] = metrics_lib.psd_root(sigma)
    return self._roots[kind]

  def pool_features(self, extractor: Extractor) -> np.ndarray:
    """Pool features of arr_0, computed once per feature net."""
    name = extractor.net.name
    if name not in self._pool:
      if "pool" not in extractor.kinds:
        extractor = Extractor(extractor.net, list(extractor.mesh.devices.flat), kinds=("pool",))
      images = self.images
      if isinstance(images, npz.NpzArray):
        images = images.batches(extractor.global_batch)
      self._pool[name] = extractor(images, total=self.num_images, what="reference images")["pool"]
    return self._pool[name]


# ------------------------------------------------------------------------------------------------
# Reading and writing files


def load_reference(path: str) -> Reference:
  """A reference .npz (ADM's or ours); arr_0 stays on disk until its features are needed."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise EvaluationError(
      f"The reference {path} does not exist: pass an ADM reference batch "
      "(e.g. VIRTUAL_imagenet256_labeled.npz) or write one with `python -m "
      "dimsum_jax.evaluate.reference`."
    )
  try:
    with np.load(path, allow_pickle=False) as z:
      files = set(z.files)
      small = {
        k: z[k]
        for k in ("mu", "sigma", "mu_s", "sigma_s", "feature_net", "num_images", "source")
        if k in files
      }
  except Exception as e:  # a damaged zip, a pickled member: numpy raises many kinds
    raise EvaluationError(
      f"The reference {path} is not a readable .npz ({type(e).__name__}): "
      "download or write it again."
    ) from e
  for key in ("mu", "sigma"):
    if key not in small:
      raise EvaluationError(
        f"The reference {path} has no `{key}`: a reference batch holds mu, "
        "sigma (and mu_s, sigma_s, arr_0) as ADM's evaluator reads them."
      )
  for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
    if (mu_key in small) != (sigma_key in small):
      raise EvaluationError(
        f"The reference {path} has only one of {mu_key} and {sigma_key}: write it again."
      )
    if mu_key in small:
      mu, sigma = small[mu_key], small[sigma_key]
      if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or mu.dtype.kind != "f":
        raise EvaluationError(
          f"The reference {path} has {mu_key} {list(mu.shape)} and "
          f"{sigma_key} {list(sigma.shape)}, not a float mean [D] and "
          "covariance [D, D]: write it again."
        )
  images = None
  if "arr_0" in files:
    try:
      images = npz.NpzArray(path, "arr_0")
    except npz.NpzError as e:
      raise EvaluationError(str(e)) from e
    if images.dtype != np.uint8 or len(images.shape) != 4 or images.shape[-1] not in (1, 3):
      raise EvaluationError(
        f"The reference {path} holds arr_0 {images.dtype} "
        f"{list(images.shape)}, not uint8 images [N, H, W, C]: write it "
        "again."
      )
  return Reference(
    mu=small["mu"].astype(np.float64),
    sigma=small["sigma"].astype(np.float64),
    mu_s=small["mu_s"].astype(np.float64) if "mu_s" in small else None,
    sigma_s=small["sigma_s"].astype(np.float64) if "sigma_s" in small else None,
    images=images,
    feature_net=str(small["feature_net"]) if "feature_net" in small else None,
    num_stat_images=int(small["num_images"]) if "num_images" in small else None,
    source=str(small["source"]) if "source" in small else "",
    path=path,
  )


def save_reference(path: str, ref: Reference, arr_0=None) -> None:
  """Write `ref` in ADM's format (+ our keys). arr_0: ref.images, or (shape, row blocks)."""
  arrays = {"mu": ref.mu, "sigma": ref.sigma}
  if ref.mu_s is not None:
    arrays.update(mu_s=ref.mu_s, sigma_s=ref.sigma_s)
  if ref.feature_net is not None:
    arrays["feature_net"] = np.asarray(ref.feature_net)
  if ref.num_stat_images is not None:
    arrays["num_images"] = np.int64(ref.num_stat_images)
  arrays["source"] = np.asarray(ref.source)
  if arr_0 is None and ref.images is not None:
    images = ref.images
    arr_0 = (
      images.shape,
      images.batches(1024) if isinstance(images, npz.NpzArray) else [np.asarray(images)],
    )
  streamed = None if arr_0 is None else {"arr_0": (arr_0[0], np.uint8, arr_0[1])}
  npz.write_npz(path, arrays, streamed)


def reference_from_images(
  images, net: FeatureNet, *, extractor=None, source: str = "", pr_images: int | None = None
) -> Reference:
  """A Reference of in-memory uint8 images [N, H, W, C] (all of them in arr_0 by default)."""
  metrics_lib.check_images(images, what="The reference images")
  kinds = [k for k in ("pool", "spatial") if k in net.dims]
  extractor = extractor or Extractor(net, kinds=kinds)
  feats = extractor(images, what="reference images")
  if len(images) < 2:
    raise EvaluationError("A reference needs at least 2 images for its covariances.")
  pool = Moments.of(feats["pool"])
  spatial = Moments.of(feats["spatial"]) if "spatial" in feats else None
  keep = images if pr_images is None else images[:pr_images]
  ref = Reference(
    mu=pool.mean,
    sigma=pool.sigma,
    mu_s=spatial.mean if spatial else None,
    sigma_s=spatial.sigma if spatial else None,
    images=np.asarray(keep),
    feature_net=net.name,
    num_stat_images=len(images),
    source=source,
  )
  if pr_images is None:
    ref._pool[net.name] = feats["pool"]  # pylint: disable=protected-access
  return ref


def reference_for(config, net: FeatureNet, image_shape) -> Reference:
  """The reference of an evaluation config (config.default_eval_config): config.reference, or
  with the digits features and no file, every digit at the samples' (H, W, C)."""
  if config.reference:
    return load_reference(os.path.expanduser(config.reference))
  if config.features == "digits":
    from dimsum_jax.evaluate import digits_features  # pylint: disable=g-import-not-at-top

    return digits_features.digits_reference(net, image_shape[0], image_shape[-1])
  raise EvaluationError(
    "Set the evaluation's reference to an ADM-style reference batch (e.g. "
    "VIRTUAL_imagenet256_labeled.npz, or one written by `python -m "
    "dimsum_jax.evaluate.reference`)."
  )
