"""The selective scan of Mamba (S6), as a pure function.

Layout is channels-last, the natural one for JAX:
  u, delta, z: [batch, length, dim]     A: [dim, state]
  B, C:        [batch, length, state]   D, delta_bias: [dim]
  initial_state: [batch, dim, state]

  Δ = softplus(delta + delta_bias)      (when delta_softplus)
  s_l = exp(Δ_l A) ⊙ s_{l-1} + Δ_l B_l u_l,   s_0 = initial_state (zeros by default)
  y_l = C_l · s_l + D u_l;  out = y ⊙ SiLU(z)

The state is always carried in float32; inputs may be bfloat16. `selective_scan` picks the
implementation: the associative-scan reference here (CPU, TPU), or the Pallas GPU kernel.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "reference", "pallas")


def _combine(left, right):
  a_l, b_l = left
  a_r, b_r = right
  return a_r * a_l, a_r * b_l + b_r


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, initial_state=None,
                             return_last_state=False):
  """Selective scan through `jax.lax.associative_scan`; materialises [b, l, d, n]."""
  dtype = u.dtype
  f32 = jnp.promote_types(dtype, jnp.float32)   # float32 state; float64 stays float64
  u, delta, A, B, C = (v.astype(f32) for v in (u, delta, A, B, C))
  if delta_bias is not None:
    delta = delta + delta_bias.astype(f32)
  if delta_softplus:
    delta = jax.nn.softplus(delta)
  decay = jnp.exp(delta[..., None] * A)                          # [b, l, d, n]
  drive = (delta * u)[..., None] * B[:, :, None, :]               # [b, l, d, n]
  if initial_state is not None:
    # Fold h0 into the first input: s_1 = a_1 h0 + b_1.
    drive = drive.at[:, 0].add(decay[:, 0] * initial_state.astype(f32))
  _, states = jax.lax.associative_scan(_combine, (decay, drive), axis=1)
  y = jnp.einsum("bldn,bln->bld", states, C)
  if D is not None:
    y = y + u * D.astype(f32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(f32))
  y = y.astype(dtype)
  if return_last_state:
    return y, states[:, -1]
  return y


def resolve_impl(impl: str = "auto") -> str:
  """'auto' takes the Pallas kernel on GPU and the reference elsewhere."""
  if impl not in IMPLS:
    raise ValueError(f"Unknown selective-scan implementation {impl!r}; choose one of {IMPLS}.")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" and _pallas_available() else "reference"
  return impl


def _pallas_available() -> bool:
  try:
    from dimsum_jax.ops import selective_scan_pallas  # noqa: F401
  except ImportError:
    return False
  return True


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False, *, impl: str = "auto"):
  """Selective scan; see the module docstring for shapes. `impl`: auto, reference, pallas."""
  if resolve_impl(impl) == "pallas":
    from dimsum_jax.ops import selective_scan_pallas
    return selective_scan_pallas.selective_scan_pallas(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_last_state)
  return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  initial_state, return_last_state)
