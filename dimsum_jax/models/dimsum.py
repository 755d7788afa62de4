"""DiMSUM: spatial + wavelet Mamba blocks fused by query-swapped cross-attention, with one shared
transformer block after every `attn_every` blocks (arXiv 2411.04168; VinAIResearch/DiMSUM).

The stack is `nn.scan`ned over groups of `attn_every` blocks closed by the shared transformer, so
compile time does not grow with depth. The shared block is one set of parameters (`attn_block`),
applied functionally inside the scan; its gradient is the sum over all its applications.

Inputs are channels-last: x [b, H, W, C], t [b] in [0, 1] (0 = noise, 1 = data), y [b] int labels
(num_classes is the null label; None for unconditional models). Output: velocity, shape of x.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dimsum_jax.models.layers import (
  ATTENTION_IMPLS,
  REMAT_POLICIES,
  AdaLN,
  FinalLayer,
  GatedMLP,
  LabelEmbedder,
  PatchEmbed,
  RMSNorm,
  SelfAttention,
  TimestepEmbedder,
  attention,
  drop_path,
  layer_norm,
  modulate,
  rematerialised,
  sincos_pos_embed_2d,
  stack_unroll,
  stacked_adaln,
  torch_default_kernel,
  unpatchify,
)
from dimsum_jax.models.mamba import COND_MODES, MambaMixer
from dimsum_jax.ops import haar, scan_orders
from dimsum_jax.ops.selective_scan import selective_scan_many

Dtype = Any


@jax.custom_vjp
def _gather_tokens(x, perm, inverse):
  return x.at[:, perm].get(mode="promise_in_bounds", unique_indices=True)


def _gather_tokens_fwd(x, perm, inverse):
  return _gather_tokens(x, perm, inverse), (perm, inverse)


def _gather_tokens_bwd(res, ct):
  perm, inverse = res
  # The adjoint of a permutation is its inverse: a gather, not the scatter-add that jnp.take's
  # own transpose would emit (atomic adds on the GPU).
  return ct.at[:, inverse].get(mode="promise_in_bounds", unique_indices=True), None, None


_gather_tokens.defvjp(_gather_tokens_fwd, _gather_tokens_bwd)


def permute_tokens(x, perm, inverse):
  """x [b, N, d] with its tokens reordered: x[:, perm]; `inverse` is perm's inverse."""
  return _gather_tokens(x, jnp.asarray(perm), jnp.asarray(inverse))


class GatedMambaBranch(nn.Module):
  """x + gate * Mamba(modulate(x, shift, scale)), (shift, scale, gate) from the condition.

  x [b, l, d] arrives in its scan order. Upstream's DiMBlockRaw / WaveDiMBlock core, in two
  halves around the selective scan (`scan_inputs`, `output`), so that DiMSUMBlock scans both
  branches in one `selective_scan_many`.
  """

  d_model: int
  depth: int
  cond_mamba: str
  scan_impl: str
  dtype: Dtype
  tag: str
  bidirectional: bool = False

  def setup(self):
    self.adaLN_modulation = AdaLN(3, self.d_model, dtype=self.dtype)
    self.mixer = MambaMixer(
      self.d_model,
      out_proj_scale=self.depth**-0.5,
      cond_mamba=self.cond_mamba,
      bidirectional=self.bidirectional,
      scan_impl=self.scan_impl,
      dtype=self.dtype,
    )

  def scan_inputs(self, x, c, adaln_out=None):
    """-> (the mixer's ScanInputs, what `output` needs besides their results). adaln_out: the
    adaLN Linear's output if computed for the whole stack (`AdaLN`)."""
    shift, scale, gate = self.adaLN_modulation(c, adaln_out)
    mixer_in = modulate(x, shift, scale)
    self.sow("intermediates", f"{self.tag}_mixer_in", mixer_in)
    return self.mixer.scan_inputs(mixer_in, c), (x, gate)

  def output(self, ys, rest):
    x, gate = rest
    mixer_out = self.mixer.output(ys)
    self.sow("intermediates", f"{self.tag}_mixer_out", mixer_out)
    return x + gate[:, None, :] * mixer_out


class CrossAttentionFusion(nn.Module):
  """Each branch attends with the other branch's queries: x12 = Attn(q1, k2, v2),
  x21 = Attn(q2, k1, v1); output proj(concat[x12, x21])."""

  num_heads: int
  dtype: Dtype
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, s, w):
    b, n, d = s.shape
    heads = lambda t: jnp.moveaxis(t.reshape(b, n, 3, self.num_heads, d // self.num_heads), 2, 0)
    dense = lambda name: nn.Dense(
      3 * d, kernel_init=torch_default_kernel, dtype=self.dtype, name=name
    )
    q1, k1, v1 = heads(dense("qkv1")(s))
    q2, k2, v2 = heads(dense("qkv2")(w))
    x12 = attention(q1, k2, v2, self.attention_impl).reshape(b, n, d)
    x21 = attention(q2, k1, v1, self.attention_impl).reshape(b, n, d)
    return nn.Dense(2 * d, kernel_init=torch_default_kernel, dtype=self.dtype, name="proj")(
      jnp.concatenate([x12, x21], axis=-1)
    )


class DiMSUMBlock(nn.Module, kw_only=True):
  """One DiMSUM block: (h, r) -> (h', r'), in the order of operations of upstream's
  `DiMBlockCombined` (dimsum/models_dim.py)."""

  hidden_size: int
  depth: int
  grid: tuple[int, int]
  wavelet_levels: int
  fusion_heads: int
  mlp_ratio: int
  cond_mamba: str
  scan_impl: str
  dtype: Dtype
  bidirectional: bool = False
  wavelet_impl: str = "direct"
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, h, r, c, orders, drop_rate, train: bool, adaln_outs=None):
    """adaln_outs: None, or this block's adaLN Linear outputs computed for the whole stack,
    {"block", "spatial", "wavelet"} -> [b, 3 x width] (`DiMSUM.inference_hoist_adaln`)."""
    adaln = adaln_outs or {}
    s_perm, s_inv, w_perm, w_inv = orders
    d = self.hidden_size // 2
    branch = lambda name, tag: GatedMambaBranch(
      d, self.depth, self.cond_mamba, self.scan_impl, self.dtype, tag, self.bidirectional, name=name
    )
    rng = self.make_rng("dropout") if train else None
    r = r + drop_path(h, drop_rate, not train, rng).astype(r.dtype)
    u = RMSNorm(1e-5, self.dtype, name="norm")(r)
    self.sow("intermediates", "norm_out", u)
    u1, u2 = u[..., :d], u[..., d:]

    # The spatial branch scans u1 in the spatial order, the wavelet branch the Haar subbands of
    # u2 window by window; their selective scans go through one call (one kernel at small batch).
    spatial, wavelet = branch("spatial_mamba", "spatial"), branch("freq_mamba", "wavelet")
    w0 = haar.wavelet_tokens(u2, self.grid, self.wavelet_levels, self.wavelet_impl)
    s_scans, s_rest = spatial.scan_inputs(
      permute_tokens(u1, s_perm, s_inv), c, adaln.get("spatial")
    )
    w_scans, w_rest = wavelet.scan_inputs(
      permute_tokens(w0, w_perm, w_inv), c, adaln.get("wavelet")
    )
    ys = selective_scan_many(s_scans + w_scans, True, impl=self.scan_impl)
    s = permute_tokens(spatial.output(ys[: len(s_scans)], s_rest), s_inv, s_perm)
    self.sow("intermediates", "spatial_out", s)
    w1 = permute_tokens(wavelet.output(ys[len(s_scans) :], w_rest), w_inv, w_perm)
    w = haar.inverse_wavelet_tokens(w1, self.grid, self.wavelet_levels, self.wavelet_impl)
    self.sow("intermediates", "wavelet_out", w)

    f = CrossAttentionFusion(self.fusion_heads, self.dtype, self.attention_impl, name="proj")(s, w)
    self.sow("intermediates", "fusion_out", f)
    h = u + f
    shift, scale, gate = AdaLN(
      3, self.hidden_size, zero_init=True, dtype=self.dtype, name="adaLN_modulation"
    )(c, adaln.get("block"))
    mlp_in = modulate(RMSNorm(1e-5, self.dtype, name="norm_2")(h), shift, scale)
    h = h + gate[:, None, :] * GatedMLP(self.mlp_ratio * self.hidden_size, self.dtype, name="mlp")(
      mlp_in
    )
    self.sow("intermediates", "hidden_out", h)
    self.sow("intermediates", "residual_out", r)
    return h, r


class SharedTransformerBlock(nn.Module):
  """DiT block with gated MLP; adaLN weight default-initialised (not zero), bias zero."""

  num_heads: int
  mlp_ratio: int
  dtype: Dtype
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, c, adaln_out=None):
    dim = x.shape[-1]
    s1, sc1, g1, s2, sc2, g2 = AdaLN(6, dim, dtype=self.dtype, name="adaLN_modulation")(
      c, adaln_out
    )
    x = x + g1[:, None] * SelfAttention(
      self.num_heads, self.dtype, attention_impl=self.attention_impl, name="attn"
    )(modulate(layer_norm(self.dtype)(x), s1, sc1))
    return x + g2[:, None] * GatedMLP(self.mlp_ratio * dim, self.dtype, name="mlp")(
      modulate(layer_norm(self.dtype)(x), s2, sc2)
    )


class BlockGroup(nn.Module):
  """`size` DiMSUM blocks then the shared transformer; the body of the scan over depth.

  static_orders: per position in the group, (s_perm, s_inv, w_perm, w_inv) as tuples, when the
  scan orders repeat with the group; otherwise the orders arrive per block through the scan.
  """

  size: int
  block: DiMSUMBlock
  shared: SharedTransformerBlock | None
  static_orders: tuple | None
  train: bool

  @nn.compact
  def __call__(self, carry, xs, c, shared_params, shared_adaln_out):
    h, r = carry
    drop_rates, dynamic_orders, adaln_outs = xs
    train = self.train
    for j in range(self.size):
      if self.static_orders is not None:
        orders = tuple(np.asarray(o) for o in self.static_orders[j])
      else:
        orders = tuple(o[j] for o in dynamic_orders)
      h, r = self.block.clone(name=f"block_{j}", parent=self)(
        h,
        r,
        c,
        orders,
        drop_rates[j],
        train,
        None if adaln_outs is None else adaln_outs[f"block_{j}"],
      )
    if self.shared is not None:
      h = self.shared.clone(parent=None).apply({"params": shared_params}, h, c, shared_adaln_out)
      self.sow("intermediates", "attn_block_out", h)
    return (h, r), None


class DiMSUM(nn.Module, kw_only=True):
  input_size: int = 32
  in_channels: int = 4
  patch_size: int = 2
  hidden_size: int = 1024
  depth: int = 16
  num_classes: int = 1000
  label_dropout: float = 0.1
  drop_path: float = 0.0
  attn_every: int = 4
  attn_heads: int = 16
  fusion_heads: int = 8
  mlp_ratio: int = 4
  wavelet_levels: int = 2
  wavelet_impl: str = "direct"  # Haar packet: 'direct' (butterflies) or 'jaxwt' (convolutions)
  cond_mamba: str = "none"
  scan_type: str = "none"
  bidirectional: bool = False  # a second SSM per mixer reads the sequence reversed (Vim "v2")
  scan_impl: str = "auto"
  remat: str = "none"  # recompute in the backward: none, dots or full (REMAT_POLICIES)
  attention_impl: str = "auto"  # auto (cuDNN where it runs, else XLA), xla or cudnn
  scan_unroll: int = 1  # training-mode calls: block groups per iteration of the stack's nn.scan
  # (0: all of them, straight-line code; same parameters)
  inference_scan_unroll: int = 1  # the same for inference-mode calls (sampling, evaluation)
  inference_hoist_adaln: bool = False  # inference: every block's adaLN Linear for all groups at
  # once, before the stack (one batched matmul per block position instead of one per block)
  dtype: Dtype = jnp.float32

  def check(self):
    """Raise a ValueError naming the fix for impossible sizes."""
    if self.input_size % self.patch_size:
      raise ValueError(
        f"input_size {self.input_size} is not divisible by patch_size "
        f"{self.patch_size}: pick an image/latent size that is a multiple of it."
      )
    if self.scan_type == "v2" and not self.bidirectional:
      raise ValueError(
        "scan_type 'v2' is upstream's bidirectional Vim scan: set "
        "model.bidirectional=True as well (or pick another scan_type)."
      )
    g = self.input_size // self.patch_size
    step = 2**self.wavelet_levels
    if g % step:
      raise ValueError(
        f"The {g}x{g} token grid must be divisible by {step} for "
        f"{self.wavelet_levels} wavelet levels: change input_size or patch_size."
      )
    d = self.hidden_size // 2
    if self.hidden_size % 2 or d % (4**self.wavelet_levels):
      raise ValueError(
        f"hidden_size {self.hidden_size}: each half ({d}) must be divisible by "
        f"{4**self.wavelet_levels} for the wavelet token layout; use a multiple "
        f"of {2 * 4**self.wavelet_levels}."
      )
    if d % self.fusion_heads or self.hidden_size % self.attn_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} must give whole heads: half width {d} "
        f"over {self.fusion_heads} fusion heads and {self.hidden_size} over "
        f"{self.attn_heads} attention heads."
      )
    if self.attn_every and self.depth % self.attn_every:
      raise ValueError(f"depth {self.depth} must be a multiple of attn_every {self.attn_every}.")
    if self.cond_mamba not in COND_MODES:
      raise ValueError(f"cond_mamba={self.cond_mamba!r}; choose one of {COND_MODES}.")
    if self.wavelet_impl not in haar.IMPLS:
      raise ValueError(f"wavelet_impl={self.wavelet_impl!r}; choose one of {haar.IMPLS}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; choose one of {tuple(REMAT_POLICIES)}.")
    return g

  def _orders(self, g):
    spatial = scan_orders.spatial_orders(self.scan_type, self.depth, g, g)
    wavelet = scan_orders.wavelet_orders(self.depth, g, g, self.wavelet_levels, self.scan_type)
    inv = lambda p: np.stack([scan_orders.inverse_permutation(q) for q in p])
    return [np.asarray(a, np.int32) for a in (spatial, inv(spatial), wavelet, inv(wavelet))]

  def _hoisted_adaln(self, c, size, shared_params):
    """The adaLN Linear outputs of every block for all block groups at once, from the stacked
    parameters: ({block_j: {"block", "spatial", "wavelet"} -> [groups, b, 3 x width]} for the
    scan to slice, the shared block's [b, 6D] or None). At batch 1 each Linear is a kernel
    launch of its own; this issues one per block position and module instead of one per block."""
    stacked = self.variables["params"]["groups"]
    outs = {}
    for j in range(size):
      block = stacked[f"block_{j}"]
      modules = {"block": block, "spatial": block["spatial_mamba"], "wavelet": block["freq_mamba"]}
      outs[f"block_{j}"] = {
        key: stacked_adaln(module["adaLN_modulation"], c, self.dtype)
        for key, module in modules.items()
      }
    shared = None
    if shared_params is not None:
      shared = stacked_adaln(shared_params["adaLN_modulation"], c, self.dtype)
    return outs, shared

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False):
    g = self.check()
    b, height, width, channels = x.shape
    if (height, width, channels) != (self.input_size, self.input_size, self.in_channels):
      raise ValueError(
        f"Expected inputs [b, {self.input_size}, {self.input_size}, "
        f"{self.in_channels}] (channels last), got {tuple(x.shape)}."
      )
    x = x.astype(self.dtype)
    t_emb = TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="t_embedder")(t)
    y_emb = LabelEmbedder(
      self.num_classes, self.hidden_size, self.label_dropout, self.dtype, name="y_embedder"
    )(y, train)
    c = t_emb + jnp.broadcast_to(y_emb, t_emb.shape)
    self.sow("intermediates", "t_emb", t_emb)
    self.sow("intermediates", "y_emb", y_emb)
    self.sow("intermediates", "c", c)

    pos = self.param(
      "pos_embed",
      lambda k, s: jnp.asarray(sincos_pos_embed_2d(s[-1], g, g), jnp.float32),
      (g * g, self.hidden_size),
    )
    h = PatchEmbed(self.hidden_size, self.patch_size, self.dtype, name="x_embedder")(x)
    h = h + pos.astype(self.dtype)
    self.sow("intermediates", "tokens_in", h)

    size = self.attn_every or self.depth
    groups = self.depth // size
    block = DiMSUMBlock(
      hidden_size=self.hidden_size,
      depth=self.depth,
      grid=(g, g),
      wavelet_levels=self.wavelet_levels,
      fusion_heads=self.fusion_heads,
      mlp_ratio=self.mlp_ratio,
      cond_mamba=self.cond_mamba,
      scan_impl=self.scan_impl,
      dtype=self.dtype,
      bidirectional=self.bidirectional,
      wavelet_impl=self.wavelet_impl,
      attention_impl=self.attention_impl,
      parent=None,
    )
    shared, shared_params = None, None
    if self.attn_every:
      shared = SharedTransformerBlock(
        self.attn_heads, self.mlp_ratio, self.dtype, self.attention_impl, parent=None
      )
      bound = shared.clone(name="attn_block", parent=self)
      if self.is_initializing():
        bound(h, c)
      shared_params = bound.variables["params"]

    orders = self._orders(g)
    periodic = all(np.array_equal(o, np.tile(o[:size], (groups, 1))) for o in orders)
    static = tuple(tuple(tuple(int(i) for i in o[j]) for o in orders) for j in range(size))
    dynamic = tuple(jnp.asarray(o.reshape(groups, size, -1)) for o in orders)
    rates = np.concatenate([[0.0], np.linspace(0.0, self.drop_path, self.depth)])[: self.depth]
    rates = jnp.asarray(rates.reshape(groups, size), jnp.float32)

    adaln_outs, shared_adaln_out = None, None
    if self.inference_hoist_adaln and not train and not self.is_initializing():
      adaln_outs, shared_adaln_out = self._hoisted_adaln(c, size, shared_params)

    scan = nn.scan(
      rematerialised(BlockGroup, self.remat),
      variable_axes={"params": 0, "intermediates": 0},
      split_rngs={"params": True, "dropout": True},
      length=groups,
      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
      unroll=stack_unroll(
        self.scan_unroll, self.inference_scan_unroll, groups, train, "block group"
      ),
    )
    stack = scan(size, block, shared, static if periodic else None, train, name="groups")
    residual = jnp.zeros(h.shape, jnp.promote_types(self.dtype, jnp.float32))
    (h, _), _ = stack(
      (h, residual),
      (rates, None if periodic else dynamic, adaln_outs),
      c,
      shared_params,
      shared_adaln_out,
    )

    out = FinalLayer(self.patch_size, self.in_channels, self.dtype, name="final_layer")(h, c)
    self.sow("intermediates", "final_layer_out", out)
    return unpatchify(out, g, g, self.patch_size, self.in_channels).astype(
      jnp.promote_types(self.dtype, jnp.float32)
    )
