"""The digits feature net: a deterministic fit, its cache, and scores that tell digits from noise.

Samples here are real digits the net never trained on (the held-out fifth), resampled with a
stated seed, against noise images from the same seed.
"""

import logging

import jax
import numpy as np
import pytest

from dimsum_jax.evaluate import digits_features
from dimsum_jax.evaluate import metrics


def test_fit_is_deterministic_and_cached(digits_cache, monkeypatch):
  """A second fit equals the session's first (read back from its cache file) bit for bit."""
  cached, acc_cached = digits_features.load_or_fit(digits_cache)
  again, acc_again = digits_features.fit()
  assert acc_again == acc_cached and acc_again > 0.95, (acc_again, acc_cached)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(again), jax.tree.leaves(cached)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)
  monkeypatch.setattr(digits_features, "fit", lambda: pytest.fail("refitted despite the cache"))
  digits_features.load_or_fit(digits_cache)


def test_damaged_cache_is_fitted_again(tmp_path, digits_cache, caplog, monkeypatch):
  good = digits_features.load_or_fit(digits_cache)
  monkeypatch.setattr(digits_features, "fit", lambda: good)
  (tmp_path / digits_features.CACHE_FILE).write_bytes(b"PK\x03\x04 damaged")
  with caplog.at_level(logging.WARNING):
    digits_features.load_or_fit(str(tmp_path))
  assert "cannot be read" in caplog.text
  load = digits_features._load  # pylint: disable=protected-access
  params, _ = load(str(tmp_path / digits_features.CACHE_FILE))
  assert all(
    np.array_equal(x, y) for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(good[0]))
  )


@pytest.mark.parametrize("size,channels", [(16, 1), (8, 3)])
def test_real_digits_score_much_better_than_noise(digits_net, size, channels):
  seed = 7
  rng = np.random.default_rng(seed)
  images, labels = digits_features.digits_images(size, channels)
  held_out = np.flatnonzero(np.arange(len(labels)) % 5 == 0)
  pick = rng.choice(held_out, 300)
  real, real_labels = images[pick], labels[pick]
  noise = rng.integers(0, 256, real.shape, np.uint8)
  ref = digits_features.digits_reference(digits_net, size, channels)
  with jax.transfer_guard("disallow"):  # as inside the training loop
    scores = {
      name: metrics.evaluate_images(x, real_labels, ref, digits_net)
      for name, x in (("real", real), ("noise", noise))
    }
  r, n = scores["real"], scores["noise"]
  msg = f"seed {seed}: {scores}"
  assert r["accuracy"] > 0.95 and n["accuracy"] < 0.3, msg
  assert r["fid"] * 20 < n["fid"], msg
  assert r["precision"] > 0.9 and r["recall"] > 0.5 and n["precision"] < 0.05, msg
  assert r["inception_score"] > 2 * n["inception_score"], msg
  assert r["feature_net"] == digits_features.NAME and r["num_samples"] == 300
