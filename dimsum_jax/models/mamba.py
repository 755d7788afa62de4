"""The Mamba mixer (S6) of DiMSUM, with optional condition-initialised state.

Parameters follow mamba_ssm's `Mamba` (names of the PyTorch state dict where possible):
in_proj (no bias) -> causal depthwise conv1d + SiLU -> x_proj -> dt_proj -> selective scan
(A = -exp(A_log), D skip, SiLU(z) gate) -> out_proj (no bias).

cond_mamba:
  "none": zero initial state, no condition path. This is what the released code computes (its
          condition tensor is overwritten by the conv kernel), so it reproduces published weights.
  "h0":   the scan's initial state is a learned projection of the condition embedding,
          h0[b, d, :] = cond_proj(c)[b, d] for every state index; gradients reach cond_proj.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimsum_jax.models.layers import torch_default_bias, torch_default_kernel
from dimsum_jax.ops.selective_scan import selective_scan

COND_MODES = ("none", "h0")


def causal_depthwise_conv(x, kernel, bias):
  """x [b, l, d]; kernel [width, d] (tap width-1 multiplies the current position); bias [d]."""
  width = kernel.shape[0]
  padded = jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
  length = x.shape[1]
  out = bias.astype(x.dtype)
  for k in range(width):
    out = out + padded[:, k : k + length] * kernel[k].astype(x.dtype)
  return out


def dt_bias_init(dt_min=1e-3, dt_max=0.1, dt_floor=1e-4):
  """Inverse softplus of dt, with log(dt) ~ U(log dt_min, log dt_max), dt >= dt_floor."""

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, dt_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

  return init


class MambaMixer(nn.Module):
  d_model: int
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | None = None  # None: ceil(d_model / 16)
  out_proj_scale: float = 1.0  # upstream re-draws out_proj and divides by sqrt(depth)
  cond_mamba: str = "none"
  bidirectional: bool = False
  scan_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c=None):
    if self.cond_mamba not in COND_MODES:
      raise ValueError(f"cond_mamba={self.cond_mamba!r}; choose one of {COND_MODES}.")
    d_inner = self.expand * self.d_model
    rank = self.dt_rank or math.ceil(self.d_model / 16)
    dense = lambda features, name, **kw: nn.Dense(features, dtype=self.dtype, name=name, **kw)

    xz = dense(2 * d_inner, "in_proj", use_bias=False, kernel_init=torch_default_kernel)(x)
    x, z = jnp.split(xz, 2, axis=-1)

    h0 = None
    if self.cond_mamba == "h0":
      if c is None:
        raise ValueError("cond_mamba='h0' needs the condition embedding c.")
      cond = nn.Dense(
        d_inner, dtype=self.dtype, kernel_init=torch_default_kernel, name="cond_proj"
      )(c)
      h0 = jnp.broadcast_to(
        cond.astype(jnp.promote_types(cond.dtype, jnp.float32))[:, :, None],
        (cond.shape[0], d_inner, self.d_state),
      )

    y = self._ssm("", x, z, h0, d_inner, rank)
    if self.bidirectional:  # Vim "v2": a second SSM reads the flipped sequence
      y = y + self._ssm("_b", x[:, ::-1], z[:, ::-1], h0, d_inner, rank)[:, ::-1]
    out_init = _scaled(torch_default_kernel, self.out_proj_scale)
    return dense(self.d_model, "out_proj", use_bias=False, kernel_init=out_init)(y)

  def _ssm(self, suffix, x, z, h0, d_inner, rank):
    """conv1d + SiLU -> x_proj -> dt_proj -> selective scan; parameter names carry `suffix`."""
    bound = 1.0 / math.sqrt(self.d_conv)
    conv_kernel = self.param(f"conv1d{suffix}_kernel", _uniform(bound), (self.d_conv, d_inner))
    conv_bias = self.param(f"conv1d{suffix}_bias", torch_default_bias(self.d_conv), (d_inner,))
    x = nn.silu(causal_depthwise_conv(x, conv_kernel, conv_bias))
    x_dbl = nn.Dense(
      rank + 2 * self.d_state,
      use_bias=False,
      kernel_init=torch_default_kernel,
      dtype=self.dtype,
      name=f"x_proj{suffix}",
    )(x)
    dt, B, C = jnp.split(x_dbl, [rank, rank + self.d_state], axis=-1)
    dt_kernel = self.param(f"dt_proj{suffix}_kernel", _uniform(rank**-0.5), (rank, d_inner))
    dt_bias = self.param(f"dt_proj{suffix}_bias", dt_bias_init(), (d_inner,))
    delta = jnp.einsum("blr,rd->bld", dt, dt_kernel.astype(self.dtype))
    A_log = self.param(
      f"A{suffix}_log",
      lambda k, s: jnp.log(jnp.broadcast_to(jnp.arange(1, self.d_state + 1, dtype=jnp.float32), s)),
      (d_inner, self.d_state),
    )
    D = self.param(f"D{suffix}", nn.initializers.ones, (d_inner,))
    A = -jnp.exp(A_log.astype(jnp.promote_types(A_log.dtype, jnp.float32)))
    return selective_scan(x, delta, A, B, C, D, z, dt_bias, True, h0, impl=self.scan_impl)


def _uniform(bound):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _scaled(init, scale):
  return lambda key, shape, dtype=jnp.float32: init(key, shape, dtype) * scale
