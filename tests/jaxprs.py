"""Counting what a traced program does, for tests that check how many kernels a model launches."""

import jax


def count_calls(jaxpr, primitive: str = "pallas_call") -> int:
  """Equations of `primitive` in `jaxpr` (a Jaxpr or ClosedJaxpr) and every sub-program, each
  call site of a shared sub-program counted once per site (printing the jaxpr shows it once)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn.primitive.name == primitive
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          total += count_calls(sub, primitive)
  return total


def kernel_calls(fn, *args) -> int:
  """Pallas kernel launches of the forward program of fn(*args)."""
  return count_calls(jax.make_jaxpr(fn)(*args))
