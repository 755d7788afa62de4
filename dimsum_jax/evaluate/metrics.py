"""FID, sFID, Inception Score, precision and recall, as OpenAI's ADM evaluator computes them.

Conventions of guided-diffusion/evaluations/evaluator.py, reproduced here:
  statistics     mu = mean, sigma = np.cov(features, rowvar=False) (ddof 1), float64.
  FID            |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)) on the pool
                 features; sFID the same on the spatial ones. ADM takes scipy.linalg.sqrtm
                 (disp=False), adds eps = 1e-6 to both diagonals when that is not finite, and
                 refuses an imaginary part over 1e-3 on the diagonal. Here the trace of the square
                 root comes from the symmetric problem: tr sqrtm(s1 s2) = sum_i sqrt(lambda_i),
                 lambda_i the eigenvalues of sqrt(s1) s2 sqrt(s1) (similar to s1 s2, symmetric
                 PSD), in float64 NumPy. The value is the same (tests/evaluate check it against
                 scipy's sqrtm); it needs no eps for a singular product (fewer samples than
                 dimensions), and a negative eigenvalue whose root would exceed ADM's 1e-3 is
                 refused as ADM refuses the imaginary part.
  IS             softmax of `is_logits` (Inception: pool_3 @ W without the bias), then
                 exp(mean_i KL(p_i || mean p)) per split of `split_size` = 5000 samples in order
                 (10 splits of 50 000), averaged over splits. Computed with log-softmax in float64.
  precision,     ADM's ManifoldEstimator with k = 3: the radius of a point is its squared
  recall         Euclidean distance to the 4th nearest point of its own set, itself included (the
                 3rd neighbour); precision is the fraction of samples inside some reference ball,
                 recall the fraction of reference points inside some sample ball (d <= r). The
                 distances are computed by jitted JAX blocks of `block` x `block` pairs (default
                 4096; the k nearest are merged block by block), in float32 at Precision.HIGHEST,
                 after subtracting the reference mean from both sets (distances do not change;
                 rounding falls). ADM computes them in float16 when finite, so a point right at a
                 radius may be decided differently there.
  accuracy       (nets whose logits are the data's classes: the digits net) the fraction of
                 samples whose argmax is their label.

`evaluate_images(images, labels, reference, feature_net)` runs a feature net over uint8 samples
and returns every metric the net and the reference allow; `evaluate_features` does the same from
features already computed. Metrics need a minimum of samples (MIN_SAMPLES): a covariance needs 2,
and precision/recall are refused below 100 samples or 100 reference images, where one image
moves them by more than a point and a 3-NN manifold of so few points means little.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

METRICS = ("fid", "sfid", "is", "precision", "recall", "accuracy")
OUTPUT_KEY = {"is": "inception_score"}
MIN_SAMPLES = {"fid": 2, "sfid": 2, "is": 1, "precision": 100, "recall": 100, "accuracy": 1}
IMAGINARY_ATOL = 1e-3  # ADM: np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
NEEDS = {
  "fid": "pool",
  "sfid": "spatial",
  "is": "is_logits",
  "precision": "pool",
  "recall": "pool",
  "accuracy": "logits",
}


class EvaluationError(ValueError):
  """Inputs that cannot be evaluated together; the message says what to change."""


# ------------------------------------------------------------------------------------------------
# Statistics


@dataclasses.dataclass
class Moments:
  """Count, mean and centred sum of outer products of feature rows (float64), mergeable (Chan et
  al.'s pairwise update), so that statistics can be accumulated chunk by chunk."""

  n: int
  mean: np.ndarray  # [D]
  m2: np.ndarray  # [D, D]

  @classmethod
  def of(cls, features) -> "Moments":
    x = np.asarray(features, np.float64)
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    c = x - mean
    return cls(len(x), mean, c.T @ c)

  def merge(self, other: "Moments") -> "Moments":
    n = self.n + other.n
    if not other.n or not self.n:
      return other if not self.n else self
    delta = other.mean - self.mean
    mean = self.mean + delta * (other.n / n)
    m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
    return Moments(n, mean, m2)

  @property
  def sigma(self) -> np.ndarray:
    return self.m2 / (self.n - 1)


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) in float64: np.mean and np.cov(rowvar=False), as ADM."""
  m = Moments.of(features)
  return m.mean, m.sigma


def psd_root(sigma) -> np.ndarray | None:
  """The symmetric square root of a covariance, or None if it is not PSD (beyond rounding)."""
  w, v = np.linalg.eigh((sigma + sigma.T) / 2)
  if w.min() < -1e-8 * max(abs(w).max(), 1e-300):
    return None
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _sqrt_product_eigenvalues(sigma1, sigma2, root2, features1) -> np.ndarray:
  """Principal square roots of the eigenvalues of sigma1 sigma2 (complex).

  Through the symmetric root2 sigma1 root2 (root2 = sqrt(sigma2), which a Reference caches); with
  fewer feature rows than dimensions, through the singular values of (X1 - mean) root2 /
  sqrt(n - 1) instead, whose squares are those eigenvalues (an n x D SVD, no D x D one). The
  general eigensolver of sigma1 sigma2 only when neither covariance is PSD.
  """
  if root2 is None:
    root2 = psd_root(sigma2)
  if root2 is None:
    root1 = psd_root(sigma1)
    if root1 is None:
      return np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(complex))
    root2, sigma1 = root1, sigma2
  elif features1 is not None and len(features1) <= sigma1.shape[0]:
    x = np.asarray(features1, np.float64)
    centred = (x - x.mean(axis=0)) @ root2 / np.sqrt(len(x) - 1)
    return np.linalg.svd(centred, compute_uv=False).astype(complex)
  inner = root2 @ sigma1 @ root2
  return np.sqrt(np.linalg.eigvalsh((inner + inner.T) / 2).astype(complex))


def frechet_distance(mu1, sigma1, mu2, sigma2, *, root2=None, features1=None) -> float:
  """ADM's Fréchet distance between two Gaussians (see the module docstring), float64.

  root2: sqrt(sigma2) if known (psd_root); features1: the rows sigma1 came from (faster when
  there are fewer rows than dimensions). Neither changes the value beyond rounding.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise EvaluationError(
      f"Statistics of {mu1.shape[0]} and {mu2.shape[0]} features cannot be "
      "compared: compute both with the same feature network."
    )
  if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
    raise EvaluationError(
      "The feature statistics hold NaN or inf: check the images (or the "
      "reference file) for NaN, and the weights of the feature network."
    )
  roots = _sqrt_product_eigenvalues(sigma1, sigma2, root2, features1)
  imaginary = np.abs(roots.imag).max()
  if imaginary > IMAGINARY_ATOL:
    raise EvaluationError(
      f"sqrtm(sigma1 sigma2) has an imaginary component of {imaginary:.3g} "
      f"(ADM's limit is {IMAGINARY_ATOL}): a covariance is not positive "
      "semi-definite; recompute the statistics."
    )
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * roots.real.sum())


def fid_of_features(features, mu2, sigma2, root2=None) -> float:
  """frechet_distance of the statistics of `features` [N, D] and (mu2, sigma2)."""
  mu1, sigma1 = statistics(features)
  return frechet_distance(mu1, sigma1, mu2, sigma2, root2=root2, features1=features)


def inception_score(logits, split_size: int = 5000) -> float:
  """ADM's Inception Score of logits [N, K]: splits of `split_size` rows in order."""
  x = np.asarray(logits, np.float64)
  top = x.max(axis=1, keepdims=True)
  logp = x - top - np.log(np.exp(x - top).sum(axis=1, keepdims=True))
  scores = []
  for start in range(0, len(x), split_size):
    part = logp[start : start + split_size]
    p = np.exp(part)
    log_marginal = np.log(p.mean(axis=0))
    scores.append(np.exp(np.mean(np.sum(p * (part - log_marginal), axis=1))))
  return float(np.mean(scores))


def accuracy(logits, labels) -> float:
  return float(np.mean(np.argmax(np.asarray(logits), axis=1) == np.asarray(labels)))


# ------------------------------------------------------------------------------------------------
# Precision and recall (k-NN manifolds), in jitted blocks

_HI = jax.lax.Precision.HIGHEST


def _sq_dists(u, v):
  nu = jnp.sum(u * u, axis=1)[:, None]
  nv = jnp.sum(v * v, axis=1)[None, :]
  return jnp.maximum(nu - 2.0 * jnp.dot(u, v.T, precision=_HI) + nv, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _knn_update(best, u, v, v_valid, k):
  d = jnp.where(v_valid[None, :], _sq_dists(u, v), jnp.inf)
  neg, _ = jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k + 1)
  return -neg


@jax.jit
def _covered(u, ru, v, rv):
  """(u inside a ball of v [R], v inside a ball of u [C]); -inf radii mark padding."""
  d = _sq_dists(u, v)
  return jnp.any(d <= rv[None, :], axis=1), jnp.any(d <= ru[:, None], axis=0)


def _blocks(x, block):
  """[(start, padded float32 block [block, D], valid rows)] of x."""
  out = []
  for start in range(0, len(x), block):
    part = x[start : start + block]
    pad = np.zeros((block - len(part), x.shape[1]), np.float32)
    out.append((start, jnp.asarray(np.concatenate([part, pad])), len(part)))
  return out


def _prepare(features, shift, block):
  x = np.asarray(features, np.float64) - shift
  return x.astype(np.float32), min(block, max(len(x), 1))


def manifold_radii(features, k: int = 3, block: int = 4096, shift=None) -> np.ndarray:
  """float32 [N]: squared distance of each row to its (k+1)-th nearest row, itself included."""
  shift = np.zeros(np.shape(features)[1]) if shift is None else shift
  x, block = _prepare(features, shift, block)
  blocks = _blocks(x, block)
  radii = np.empty(len(x), np.float32)
  for start, u, n in blocks:
    best = jnp.full((block, k + 1), jnp.inf, jnp.float32)
    for _, v, m in blocks:
      best = _knn_update(best, u, v, jnp.arange(block) < m, k)
    radii[start : start + n] = np.asarray(best[:n, k])
  return radii


def precision_recall(
  ref_features, sample_features, k: int = 3, block: int = 4096
) -> tuple[float, float]:
  """ADM's (precision, recall) of samples against reference features (module docstring)."""
  shift = np.asarray(ref_features, np.float64).mean(axis=0)
  ref_radii = manifold_radii(ref_features, k, block, shift)
  sample_radii = manifold_radii(sample_features, k, block, shift)
  ref, block_r = _prepare(ref_features, shift, block)
  smp, block_s = _prepare(sample_features, shift, block)
  block = max(block_r, block_s)
  ref_in = np.zeros(len(ref), bool)  # reference point inside a sample ball -> recall
  smp_in = np.zeros(len(smp), bool)  # sample inside a reference ball -> precision

  def radii_block(r, start, n):
    out = np.full(block, -np.inf, np.float32)
    out[:n] = r[start : start + n]
    return jnp.asarray(out)

  ref_blocks = [(s, u, n, radii_block(ref_radii, s, n)) for s, u, n in _blocks(ref, block)]
  smp_blocks = [(s, v, m, radii_block(sample_radii, s, m)) for s, v, m in _blocks(smp, block)]
  for s1, u, n, ru in ref_blocks:
    for s2, v, m, rv in smp_blocks:
      a, b = _covered(u, ru, v, rv)
      ref_in[s1 : s1 + n] |= np.asarray(a[:n])
      smp_in[s2 : s2 + m] |= np.asarray(b[:m])
  return float(smp_in.mean()), float(ref_in.mean())


# ------------------------------------------------------------------------------------------------
# Everything at once


def parse_metrics(metrics) -> tuple[str, ...]:
  """'fid,is' or an iterable -> a tuple of known metric names (EvaluationError otherwise)."""
  if isinstance(metrics, str):
    metrics = [m.strip() for m in metrics.split(",") if m.strip()]
  metrics = tuple(metrics)
  unknown = [m for m in metrics if m not in METRICS]
  if unknown or not metrics:
    raise EvaluationError(
      f"Unknown metric(s) {unknown or '(none given)'}: choose among {', '.join(METRICS)}."
    )
  return metrics


def available_metrics(net, reference) -> tuple[str, ...]:
  """The metrics that `net` (a FeatureNet) and `reference` (a Reference) can give."""
  out = []
  for m in METRICS:
    if NEEDS[m] not in net.dims:
      continue
    if m == "accuracy" and not net.classifies_labels:
      continue
    if m == "sfid" and reference.mu_s is None:
      continue
    if m in ("precision", "recall") and reference.images is None:
      continue
    out.append(m)
  return tuple(out)


def check_counts(
  metrics: Iterable[str], num_samples: int, num_reference: int | None, split_size: int = 5000
) -> None:
  for m in metrics:
    need = MIN_SAMPLES[m]
    if num_samples < need:
      raise EvaluationError(
        f"{m} needs at least {need} samples and there are {num_samples}: "
        "evaluate more samples, or leave it out of the metrics."
      )
    if m in ("precision", "recall") and num_reference is not None and num_reference < need:
      raise EvaluationError(
        f"{m} needs at least {need} reference images and the reference "
        f"holds {num_reference}: use a reference batch with more images, or "
        "leave it out of the metrics."
      )
  if "is" in metrics and split_size < 1:
    raise EvaluationError("The Inception Score's split size must be positive.")


def evaluate_features(
  features: dict,
  labels,
  reference,
  metrics: Iterable[str],
  *,
  ref_pool=None,
  split_size: int = 5000,
  k: int = 3,
  block: int = 4096,
) -> dict:
  """Metrics from features {kind: [N, D]} against `reference` (mu, sigma, mu_s, sigma_s)."""
  out = {}
  for m in metrics:
    if m == "fid":
      out["fid"] = fid_of_features(
        features["pool"], reference.mu, reference.sigma, reference.sigma_root("pool")
      )
    elif m == "sfid":
      out["sfid"] = fid_of_features(
        features["spatial"], reference.mu_s, reference.sigma_s, reference.sigma_root("spatial")
      )
    elif m == "is":
      out["inception_score"] = inception_score(features["is_logits"], split_size)
    elif m == "accuracy":
      if labels is None:
        raise EvaluationError(
          "The sample accuracy needs the samples' labels: write them as "
          "`labels` in samples.npz, or leave accuracy out of the metrics."
        )
      out["accuracy"] = accuracy(features["logits"], labels)
  if "precision" in metrics or "recall" in metrics:
    precision, recall = precision_recall(ref_pool, features["pool"], k=k, block=block)
    if "precision" in metrics:
      out["precision"] = precision
    if "recall" in metrics:
      out["recall"] = recall
  return out


def check_images(images, labels=None, what: str = "The samples") -> None:
  shape = np.shape(images)
  dtype = getattr(images, "dtype", None)
  if len(shape) != 4 or shape[-1] not in (1, 3):
    raise EvaluationError(
      f"{what} have shape {list(shape)}; evaluation takes uint8 images "
      "[N, H, W, C] with C = 1 or 3 (the layout of samples.npz's arr_0)."
    )
  if dtype != np.uint8:
    raise EvaluationError(
      f"{what} are {dtype}, not uint8: pass images in [0, 255] as uint8, as "
      "`python -m dimsum_jax.sample` writes them."
    )
  if labels is not None and np.shape(labels) != (shape[0],):
    raise EvaluationError(
      f"{what} have {shape[0]} images but labels of shape "
      f"{list(np.shape(labels))}: give one label per image."
    )


def evaluate_images(
  images, labels, reference, feature_net, *, metrics=None, extractor=None, split_size: int = 5000
) -> dict:
  """Metrics of uint8 samples [N, H, W, C] (labels [N] or None) against a Reference.

  metrics: names or 'fid,sfid,...' (None or '': every metric the net and the reference allow).
  extractor: a features.Extractor of `feature_net` to reuse (its compiled step and the reference
  features it has seen); one over every device is built otherwise. Returns {metric: float, ...,
  'num_samples', 'feature_net'}.
  """
  with jax.transfer_guard("allow"):  # a host-side step: callable inside a training loop's guard
    return _evaluate_images(images, labels, reference, feature_net, metrics, extractor, split_size)


def _evaluate_images(images, labels, reference, feature_net, metrics, extractor, split_size):
  from dimsum_jax.evaluate.features import Extractor  # pylint: disable=g-import-not-at-top

  check_images(images, labels)
  metrics = parse_metrics(metrics) if metrics else available_metrics(feature_net, reference)
  reference.check_compatible(feature_net, np.shape(images)[1:], metrics)
  check_counts(metrics, np.shape(images)[0], reference.num_images, split_size)
  kinds = sorted({NEEDS[m] for m in metrics})
  if extractor is None or not set(kinds) <= set(extractor.kinds):
    extractor = Extractor(feature_net, kinds=kinds)
  features = extractor(images, what="samples")
  ref_pool = None
  if "precision" in metrics or "recall" in metrics:
    ref_pool = reference.pool_features(extractor)
  out = evaluate_features(
    features, labels, reference, metrics, ref_pool=ref_pool, split_size=split_size
  )
  out.update(num_samples=int(np.shape(images)[0]), feature_net=feature_net.name)
  return out
