"""dimsum_jax.evaluate.metrics against independent float64 NumPy/SciPy references.

The references follow ADM's evaluator (guided-diffusion/evaluations/evaluator.py) literally:
np.cov statistics, scipy.linalg.sqrtm with its eps retry, softmax then log for the Inception
Score, the full distance matrix with np.partition for the k-NN radii. Every input comes from the
stated seed (tests/seeds.py: the default seed here, 50 more under -m slow).
"""

import numpy as np
import pytest
import scipy.linalg

from dimsum_jax.evaluate import metrics
from tests import seeds

EPS64 = float(np.finfo(np.float64).eps)


def _features(seed, n1, n2, d):
  """Two correlated Gaussian feature sets [n1, d], [n2, d] that differ in mean and scale."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return rng.normal(size=(n1, d)) @ mix + 0.3, (1.2 * rng.normal(size=(n2, d))) @ mix


def adm_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
    covmean = covmean.real
  diff = mu1 - mu2
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def adm_inception_score(logits, split_size):
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  preds = e / e.sum(axis=1, keepdims=True)
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i : i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


def _distances(u, v):
  return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)


def adm_radii(x, k=3):
  return np.partition(_distances(x, x), np.arange(k + 1), axis=1)[:, k]


def _decisive_margin(rel):
  """rel [balls, points] = (d - r) / r. A point's verdict changes only if its deepest covering
  ball (inside) or its nearest ball edge (outside) moves across: the smallest such gap."""
  inside = rel <= 0
  covered = inside.any(axis=0)
  deepest = np.where(inside, -rel, -np.inf).max(axis=0)
  nearest = np.where(inside, np.inf, rel).min(axis=0)
  return float(np.min(np.where(covered, deepest, nearest)))


def adm_precision_recall(ref, smp, k=3):
  r_ref, r_smp = adm_radii(ref, k), adm_radii(smp, k)
  d = _distances(ref, smp)  # [n_ref, n_smp]
  precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
  recall = np.mean(np.any(d <= r_smp[None, :], axis=1))
  # How far every verdict is from flipping, relative to its radius: the float32 blocks decide as
  # float64 does when this exceeds their rounding.
  margin = min(
    _decisive_margin((d - r_ref[:, None]) / r_ref[:, None]),
    _decisive_margin(((d - r_smp[None, :]) / r_smp[None, :]).T),
  )
  return precision, recall, margin


@seeds.each()
@pytest.mark.parametrize("n1,n2,d", [(300, 200, 64), (500, 500, 256)])
def test_fid_full_rank(n1, n2, d, seed):
  """More samples than dimensions: a square root's rounding error is eps times its condition,
  about sqrt(cond(s1) cond(s2)), relative to tr sqrtm(s1 s2); d times that bounds the difference
  (51 seeds: at most 0.022 of it without the factor d)."""
  x, y = _features(seed, n1, n2, d)
  mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
  mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
  want = adm_frechet_distance(mu1, s1, mu2, s2)
  cond = np.linalg.cond(s1) * np.linalg.cond(s2)
  tol = d * EPS64 * np.sqrt(cond) * np.sqrt(np.abs(np.linalg.eigvals(s1 @ s2))).sum()
  got = metrics.frechet_distance(*metrics.statistics(x), *metrics.statistics(y))
  assert abs(got - want) <= tol, (got, want, tol, f"seed {seed}")
  from_features = metrics.fid_of_features(x, mu2, s2, metrics.psd_root(s2))
  assert abs(from_features - want) <= tol, (from_features, want, tol, f"seed {seed}")


@seeds.each()
def test_fid_rank_deficient(seed):
  """Fewer samples than dimensions (a singular product, ADM's eps case): the square root of an
  eigenvalue that is 0 up to rounding (d eps |s1| |s2|) is up to sqrt(d eps |s1| |s2|), for each
  of the d - rank null eigenvalues, in either method; twice that bounds the difference."""
  x, y = _features(seed, 40, 50, 64)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  want = adm_frechet_distance(x.mean(0), s1, y.mean(0), s2)
  null = 64 - min(np.linalg.matrix_rank(s1), np.linalg.matrix_rank(s2))
  tol = 2 * null * np.sqrt(64 * EPS64 * np.linalg.norm(s1, 2) * np.linalg.norm(s2, 2))
  # Through the singular values of the 40 centred rows (what evaluate_images does), through the
  # symmetric eigenproblem, and with the roles of the sets exchanged.
  for got in (
    metrics.fid_of_features(x, y.mean(0), s2),
    metrics.frechet_distance(*metrics.statistics(x), *metrics.statistics(y)),
    metrics.frechet_distance(*metrics.statistics(y), *metrics.statistics(x)),
  ):
    assert abs(got - want) <= tol, (got, want, tol, f"seed {seed}")


def test_fid_identical_sets_is_zero_and_refuses_non_psd():
  x, _ = _features(0, 300, 10, 32)
  mu, sigma = metrics.statistics(x)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
  bad = sigma - 2 * np.eye(32) * np.linalg.eigvalsh(sigma).max()
  with pytest.raises(metrics.EvaluationError, match="imaginary component"):
    metrics.frechet_distance(mu, bad, mu, sigma)
  with pytest.raises(metrics.EvaluationError, match="NaN or inf"):
    metrics.frechet_distance(mu * np.nan, sigma, mu, sigma)


@seeds.each()
def test_streamed_moments_are_np_cov(seed):
  """Statistics merged chunk by chunk (the reference writer) = np.mean / np.cov of all rows."""
  x, _ = _features(seed, 1000, 2, 48)
  x = x * 10 + 100  # a large mean, as pool features have
  m = metrics.Moments.of(x[:7])
  for a, b in ((7, 300), (300, 301), (301, 1000)):
    m = m.merge(metrics.Moments.of(x[a:b]))
  assert m.n == 1000
  np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e3 * EPS64, err_msg=f"seed {seed}")
  scale = np.abs(np.cov(x, rowvar=False)).max()
  np.testing.assert_allclose(
    m.sigma, np.cov(x, rowvar=False), rtol=0, atol=1e4 * EPS64 * scale, err_msg=f"seed {seed}"
  )


@seeds.each()
@pytest.mark.parametrize("split_size", [5000, 50])
def test_inception_score(split_size, seed):
  """ADM's splits (in order; the last one short) and formula, float64."""
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(230, 1008)) * 3).astype(np.float32)
  want = adm_inception_score(logits.astype(np.float64), split_size)
  got = metrics.inception_score(logits, split_size)
  assert abs(got - want) <= 1e3 * EPS64 * want, (got, want, f"seed {seed}")


@seeds.each()
@pytest.mark.parametrize("block", [4096, 64])
def test_precision_recall(block, seed):
  """k = 3 manifolds; several row and column blocks (block 64) or one; exact fractions."""
  ref, smp = _features(seed, 300, 200, 32)
  smp = smp * 0.9 + 0.2
  precision, recall, margin = adm_precision_recall(ref, smp)
  # float32 distances after centring: |x|^2 ~ 32 per point, d ~ 64, the norm formula rounds to
  # ~ 3 * 32 * 6e-8 / 64 relative; radii the same. 1e-5 leaves a factor of 40.
  assert margin > 1e-5, f"seed {seed}: a verdict lies within float32 rounding of its radius"
  assert metrics.precision_recall(ref, smp, block=block) == (precision, recall), f"seed {seed}"
  shift = ref.mean(0)
  np.testing.assert_allclose(
    metrics.manifold_radii(smp, block=block, shift=shift),
    adm_radii(smp),
    rtol=1e-5,
    err_msg=f"seed {seed}",
  )
  assert 0 < precision < 1 and 0 < recall < 1, (precision, recall)


def test_precision_recall_of_a_set_with_itself_is_one():
  ref, _ = _features(3, 150, 2, 16)
  assert metrics.precision_recall(ref, ref, block=64) == (1.0, 1.0)


def test_minimum_sample_counts_are_one_sentence():
  with pytest.raises(metrics.EvaluationError) as e:
    metrics.check_counts(["fid", "precision", "recall"], 10, 10_000)
  assert str(e.value) == (
    "precision needs at least 100 samples and there are 10: evaluate more "
    "samples, or leave it out of the metrics."
  )
  with pytest.raises(metrics.EvaluationError, match="reference holds 50"):
    metrics.check_counts(["recall"], 1000, 50)
  metrics.check_counts(["fid", "is"], 2, None)
  with pytest.raises(metrics.EvaluationError, match="Unknown metric"):
    metrics.parse_metrics("fid,kid")
