"""The seeds of the randomised tests.

Every random input of a test comes from a seed the test states, and a failure names it (in the
test id, `test_x[seed7]`, and in the assertion message). The default suite runs each randomised
check with its default seed; `pytest -m slow -k seed` runs the same checks with MANY - 1 more
seeds, which shows that their tolerances hold for any draw rather than for one lucky one.
"""

import pytest

MANY = 51  # seeds of each randomised check in the slow run, the default one included


def seed_list(default=0, many=MANY):
  """`default` first, then the next seeds up to `many` in all."""
  return [default] + [s for s in range(many) if s != default][: many - 1]


def each(default=0, many=MANY):
  """@pytest.mark.parametrize('seed', ...): `default` in the default run, the rest of
  seed_list(default, many) marked slow."""
  seeds = seed_list(default, many)
  return pytest.mark.parametrize(
    'seed',
    [pytest.param(seeds[0], id=f'seed{seeds[0]}')]
    + [pytest.param(s, id=f'seed{s}', marks=pytest.mark.slow) for s in seeds[1:]],
  )
