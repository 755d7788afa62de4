"""Shared fixtures of the evaluation tests: the digits feature net, fitted once per session into
a temporary cache (never the user's ~/.cache)."""

import pytest

from dimsum_jax.evaluate import digits_features


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
  cache = tmp_path_factory.mktemp("digits_features_cache")
  digits_features.load_or_fit(str(cache))
  return str(cache)


@pytest.fixture(scope="session")
def digits_net(digits_cache):
  return digits_features.digits_feature_net(digits_cache)
