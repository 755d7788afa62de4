"""Parameters of JAX primitives read the same way on every JAX release this package runs on.

A scan equation's operands are its constants, then its carries, then its scanned inputs. JAX 0.10
states the first two counts as `num_consts` and `num_carry`; JAX 0.11 packs the three groups into
one flat tree, `ft_in`, instead. Code that walks jaxprs (`precast`, `tools.flops`) reads them here.
"""

from __future__ import annotations


def scan_operand_counts(params) -> tuple[int, int] | None:
  """(constants, carries) of a scan equation with these params, or None for a layout this
  module does not know (a later JAX)."""
  if 'num_consts' in params and 'num_carry' in params:
    return params['num_consts'], params['num_carry']
  packed = params.get('ft_in')
  if packed is not None and hasattr(packed, 'unpack'):
    groups = packed.unpack()
    if len(groups) == 3:
      return len(groups[0]), len(groups[1])
  return None
