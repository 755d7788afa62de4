"""The one sentence for a config field whose value is not one of its choices.

Each config section validates itself beside the code that reads it (models.validate,
transport.validate, optim.validate, sampling.validate_grid_config, data.config.validate); they
share this check so that every misspelt choice reads the same:

  --config.model.remat=dot is not a valid choice: use one of none, dots, full.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable


def check(
  flag: str, value: Any, choices: Iterable[str], canonical: Callable[[Any], Any] | None = None
) -> None:
  """ValueError naming `--config.<flag>=<value>` and the choices unless `value` is one of them
  (or, with `canonical`, unless canonical(value) accepts it: other spellings the reader takes)."""
  choices = tuple(choices)
  if canonical is None:
    ok = value in choices
  else:
    try:
      canonical(value)
      ok = True
    except (ValueError, TypeError, AttributeError):
      ok = False
  if not ok:
    raise ValueError(
      f'--config.{flag}={value} is not a valid choice: use one of {", ".join(choices)}.'
    )
