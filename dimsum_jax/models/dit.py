"""DiT/SiT baseline (Peebles & Xie 2023; SiT) with DiMSUM's call signature: the paper's control.

adaLN-Zero blocks (self-attention + GELU-tanh MLP), fixed 2-D sin-cos position embedding, the same
time/label embedders and final layer as DiMSUM. Scanned over depth (one block compiled once).
learn_sigma is off: flow matching predicts a velocity only.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dimsum_jax.models.layers import (
  AdaLN,
  FinalLayer,
  LabelEmbedder,
  MLP,
  PatchEmbed,
  SelfAttention,
  TimestepEmbedder,
  layer_norm,
  modulate,
  rematerialised,
  sincos_pos_embed_2d,
  stack_unroll,
  unpatchify,
)


class DiTBlock(nn.Module):
  num_heads: int
  mlp_ratio: float
  dtype: Any
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, c):
    dim = x.shape[-1]
    s1, sc1, g1, s2, sc2, g2 = AdaLN(
      6, dim, zero_init=True, dtype=self.dtype, name="adaLN_modulation"
    )(c)
    x = x + g1[:, None] * SelfAttention(
      self.num_heads,
      self.dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      attention_impl=self.attention_impl,
      name="attn",
    )(modulate(layer_norm(self.dtype)(x), s1, sc1))
    return x + g2[:, None] * MLP(int(dim * self.mlp_ratio), self.dtype, name="mlp")(
      modulate(layer_norm(self.dtype)(x), s2, sc2)
    )


class _ScannedDiTBlock(nn.Module):
  num_heads: int
  mlp_ratio: float
  dtype: Any
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, _, c):
    return DiTBlock(self.num_heads, self.mlp_ratio, self.dtype, self.attention_impl, name="block")(
      x, c
    ), None


class DiT(nn.Module, kw_only=True):
  input_size: int = 32
  in_channels: int = 4
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  label_dropout: float = 0.1
  remat: str = "none"  # recompute in the backward: none, dots or full
  attention_impl: str = "auto"  # auto (cuDNN where it runs, else XLA), xla or cudnn
  scan_unroll: int = 1  # training-mode calls: blocks per iteration of the stack's nn.scan; 0: all
  inference_scan_unroll: int = 1  # the same for inference-mode calls (sampling, evaluation)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False):
    if self.input_size % self.patch_size:
      raise ValueError(
        f"input_size {self.input_size} is not divisible by patch_size "
        f"{self.patch_size}: pick an image/latent size that is a multiple of it."
      )
    if self.hidden_size % self.num_heads or self.hidden_size % 4:
      raise ValueError(
        f"hidden_size {self.hidden_size} must be a multiple of num_heads "
        f"{self.num_heads} and of 4 (sin-cos position embedding): use a multiple "
        f"of {np.lcm(self.num_heads, 4)}."
      )
    g = self.input_size // self.patch_size
    x = x.astype(self.dtype)
    c = TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="t_embedder")(t)
    c = c + LabelEmbedder(
      self.num_classes, self.hidden_size, self.label_dropout, self.dtype, name="y_embedder"
    )(y, train)
    pos = jnp.asarray(sincos_pos_embed_2d(self.hidden_size, g, g), self.dtype)
    h = PatchEmbed(self.hidden_size, self.patch_size, self.dtype, name="x_embedder")(x) + pos
    scan = nn.scan(
      rematerialised(_ScannedDiTBlock, self.remat),
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=self.depth,
      in_axes=(0, nn.broadcast),
      unroll=stack_unroll(self.scan_unroll, self.inference_scan_unroll, self.depth, train, "block"),
    )
    h, _ = scan(self.num_heads, self.mlp_ratio, self.dtype, self.attention_impl, name="blocks")(
      h, None, c
    )
    out = FinalLayer(self.patch_size, self.in_channels, self.dtype, name="final_layer")(h, c)
    return unpatchify(out, g, g, self.patch_size, self.in_channels).astype(
      jnp.promote_types(self.dtype, jnp.float32)
    )
