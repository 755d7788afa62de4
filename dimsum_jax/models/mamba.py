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
from dimsum_jax.ops.selective_scan import ScanInputs, selective_scan_many

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
  """x [b, l, d_model] (and the condition c [b, d_cond] for cond_mamba="h0") -> [b, l, d_model].

  Calling it runs `scan_inputs`, the selective scan and `output`. A caller with several
  independent mixers (DiMSUM's two branches) calls those two halves itself so that all their scans
  go through one `selective_scan_many`.
  """

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

  def setup(self):
    if self.cond_mamba not in COND_MODES:
      raise ValueError(f"cond_mamba={self.cond_mamba!r}; choose one of {COND_MODES}.")
    d_inner = self.expand * self.d_model
    rank = self.dt_rank or math.ceil(self.d_model / 16)
    dense = lambda features, name, **kw: nn.Dense(
      features, use_bias=False, dtype=self.dtype, name=name, **kw
    )
    self.in_proj = dense(2 * d_inner, "in_proj", kernel_init=torch_default_kernel)
    if self.cond_mamba == "h0":
      self.cond_proj = nn.Dense(
        d_inner, dtype=self.dtype, kernel_init=torch_default_kernel, name="cond_proj"
      )
    # One SSM, or two with bidirectional (Vim "v2": the second reads the reversed sequence);
    # parameter names carry the suffix. Created in the order of the PyTorch module.
    self.ssm = [
      self._ssm_params(sfx, d_inner, rank) for sfx in ("", "_b")[: 1 + self.bidirectional]
    ]
    self.x_proj = [
      dense(rank + 2 * self.d_state, f"x_proj{sfx}", kernel_init=torch_default_kernel)
      for sfx in ("", "_b")[: 1 + self.bidirectional]
    ]
    out_init = _scaled(torch_default_kernel, self.out_proj_scale)
    self.out_proj = dense(self.d_model, "out_proj", kernel_init=out_init)

  def _ssm_params(self, sfx, d_inner, rank):
    bound = 1.0 / math.sqrt(self.d_conv)
    n = self.d_state
    a_init = lambda k, s: jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), s))
    return dict(
      conv_kernel=self.param(f"conv1d{sfx}_kernel", _uniform(bound), (self.d_conv, d_inner)),
      conv_bias=self.param(f"conv1d{sfx}_bias", torch_default_bias(self.d_conv), (d_inner,)),
      dt_kernel=self.param(f"dt_proj{sfx}_kernel", _uniform(rank**-0.5), (rank, d_inner)),
      dt_bias=self.param(f"dt_proj{sfx}_bias", dt_bias_init(), (d_inner,)),
      A_log=self.param(f"A{sfx}_log", a_init, (d_inner, n)),
      D=self.param(f"D{sfx}", nn.initializers.ones, (d_inner,)),
    )

  def __call__(self, x, c=None):
    ys = selective_scan_many(self.scan_inputs(x, c), True, impl=self.scan_impl)
    return self.output(ys)

  def scan_inputs(self, x, c=None) -> list[ScanInputs]:
    """in_proj -> causal depthwise conv1d + SiLU -> x_proj -> dt_proj: the arguments of the
    selective scan (delta before its bias and softplus), one per SSM, each [b, l, .]."""
    xz = self.in_proj(x)
    x, z = jnp.split(xz, 2, axis=-1)
    h0 = None
    if self.cond_mamba == "h0":
      if c is None:
        raise ValueError("cond_mamba='h0' needs the condition embedding c.")
      cond = self.cond_proj(c)
      h0 = jnp.broadcast_to(
        cond.astype(jnp.promote_types(cond.dtype, jnp.float32))[:, :, None],
        (*cond.shape, self.d_state),
      )
    scans = []
    for i, (p, x_proj) in enumerate(zip(self.ssm, self.x_proj)):
      xs, zs = (x, z) if i == 0 else (x[:, ::-1], z[:, ::-1])
      xs = nn.silu(causal_depthwise_conv(xs, p["conv_kernel"], p["conv_bias"]))
      rank = p["dt_kernel"].shape[0]
      dt, B, C = jnp.split(x_proj(xs), [rank, rank + self.d_state], axis=-1)
      delta = jnp.einsum("blr,rd->bld", dt, p["dt_kernel"].astype(self.dtype))
      A = -jnp.exp(p["A_log"].astype(jnp.promote_types(p["A_log"].dtype, jnp.float32)))
      scans.append(ScanInputs(xs, delta, A, B, C, p["D"], zs, p["dt_bias"], h0))
    return scans

  def output(self, ys):
    """The scans' outputs (in scan_inputs' order) -> out_proj(sum, the reversed one flipped back)."""
    y = ys[0]
    for y_b in ys[1:]:
      y = y + y_b[:, ::-1]
    return self.out_proj(y)


def _uniform(bound):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _scaled(init, scale):
  return lambda key, shape, dtype=jnp.float32: init(key, shape, dtype) * scale
