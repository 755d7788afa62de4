"""DiM, Diffusion Mamba (Teng et al. 2024, arXiv 2405.14224; tyshiwo1/DiM-DiffusionMamba).

One Mamba per block over a single token sequence, adaLN-single conditioning, U-ViT long skips,
a scan order that changes from block to block, learned pad tokens that close every row and
column of the token grid, and a depthwise 3x3 convolution before and after the stack. The
reference is `shared/reference/dim-reference.md` (section numbers below are its sections).

Call: `model.apply({'params': p}, x, t, y, train=False)` with x [b, H, W, C] channels-last, t [b]
on DiM's discrete time scale (training n in 1..1000, samplers 1000 t_cont; see
`transport` path 'ScaledLinear', which maps the package's t in [0, 1] onto it) and y [b] integer
labels (num_classes is the null label; None = null for a conditional model). Output: the
predicted noise, x's shape, float32 (float64 for a float64 model).

Tokens (4.3-4.4): with an h x w token grid, E extra tokens (time, class; 1 unconditional) and
P = 3 pads, the sequence is [b, E + P + (h+P)(w+P), D]:
  [time token, class token, 3 split pads, (h+P) x (w+P) grid row-major]
where grid cell (r, c) holds a patch for r < h, c < w and a learned pad vector elsewhere
(`dim_padding` 'lateral': pad p_j in column w + j and pad p_i in the whole row h + i;
'rho_pad': the pads cycle p_0 p_1 p_2 over the pad cells in row-major order).
The learned position table [E + n, D] covers the extra tokens and the n = h0 w0 patches of the
model's own grid; another grid (w = floor(sqrt(h w)), as upstream's layout requires) resizes the
table's grid part bilinearly on every call, as upstream does (utils.py).

Blocks (4.5-4.8): block 0, then `(depth - 1) / 2` skip producers and as many consumers (an odd
depth). Each block first permutes the grid part of the stream from the previous block's scan
order into its own (row-major, reversed, column-major, reversed column-major; `scan_patterns`),
then s = r + (1 + gate) Mamba(modulate(RMSNorm(r))), with r the stream or, in a consumer, the
skip Linear of (stream, producer's stream). The producers and the consumers are two `nn.scan`s
whose bodies compile once (the producers' streams are the scan outputs, fed reversed to the
consumers), so compile time does not grow with depth. The last block is row-major again.

Parameters (`dim_convert` maps upstream's state dict): x_embedder (patch conv), additional_embed
[E + n, D], label_emb and class_embedder (num_classes + 1 rows), t_embedder (adaLN-single's
timestep MLP), adaLN_modulation (its Linear D -> 3D), pad_token / pad_token_dec_split [3, D],
first_smoother / last_smoother, block_0, in_blocks/block and out_blocks/block (stacked over the
scan; consumers add skip_linear, or skip_linear_0 and _1 when D > 512), norm_out, proj_out_1,
proj_out_2. Initialisation as upstream's (mamba_2d.py, init_weights.py). Compute runs in
`dtype`; the residual stream, the adaLN modulations and the RMSNorm statistics stay float32
(upstream's residual_in_fp32).
DiM-only options: `padding` (model config `dim_padding`) and `skip_tune` (upstream's
is_skip_tune, for its Upsample Guidance runs; not in the model config).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dimsum_jax.models.dimsum import permute_tokens
from dimsum_jax.models.layers import (
  REMAT_POLICIES,
  AdaLN,
  RMSNorm,
  TimestepEmbedder,
  modulate,
  rematerialised,
  timestep_frequencies,
  torch_default_bias,
  torch_default_kernel,
  unpatchify,
)
from dimsum_jax.models.mamba import MambaMixer

Dtype = Any

PADDINGS = ("lateral", "rho_pad")
DEFAULT_PADDING = "lateral"
PAD_LEN = 3  # pad tokens per row / column = mamba_d_conv (mamba_2d.py)
SCAN_IDS = (0, -2, 1, -1)  # row-major, reversed, column-major, reversed column-major
SPLIT_SKIP_WIDTH = 512  # wider models split skip_linear into two Linear(D, D)
D_STATE, D_CONV, EXPAND = 16, 3, 2


# ------------------------------------------------------------------------------------------------
# Layout: grids, scan orders, padding


def grid_allowed(h: int, w: int) -> bool:
  """Whether upstream's layout takes an h x w token grid: w = floor(sqrt(h w)) columns."""
  return h > 0 and w > 0 and math.isqrt(h * w) == w


def check_grid(h: int, w: int) -> None:
  if not grid_allowed(h, w):
    raise ValueError(
      f"DiM's token layout takes an h x w grid only when w = floor(sqrt(h w)) "
      f"(square, or a few more rows than columns), not {h}x{w}: use a square "
      f"latent or swap its height and width."
    )


def scan_patterns(depth: int) -> list[int]:
  """Scan pattern id of every block (mamba_2d.py): up the cycle SCAN_IDS over the producers,
  back down over the consumers, row-major (0) for block 0 and the last block."""
  mid = 1 + (depth - 1) // 2
  c, out = 0, []
  for k in range(depth):
    if k < 1 or k == depth - 1:
      c = 0
    elif k < mid:
      c = (c + 1) % 4
    else:
      c = (c - 1) % 4
    out.append(SCAN_IDS[c])
  return out


def pattern_order(pattern: int, hp: int, wp: int) -> np.ndarray:
  """[hp wp]: the row-major cell at each position of the scan `pattern` of an hp x wp grid."""
  cells = np.arange(hp * wp).reshape(hp, wp)
  if pattern in (0, -2):
    order = cells.reshape(-1)
  elif pattern in (1, -1):
    order = cells.T.reshape(-1)  # position j holds cell (j mod hp, j div hp)
  else:
    raise ValueError(f"Unknown scan pattern {pattern}.")
  return order[::-1].copy() if pattern < 0 else order


def block_orders(depth: int, hp: int, wp: int) -> tuple[np.ndarray, np.ndarray]:
  """(perm, inverse), each [depth, hp wp]: block k reads its grid tokens as x[:, perm[k]] of the
  previous block's order (block 0: identity)."""
  absolute = [pattern_order(p, hp, wp) for p in scan_patterns(depth)]
  perms = [np.arange(hp * wp)]
  for k in range(1, depth):
    perms.append(np.argsort(absolute[k - 1])[absolute[k]])
  perm = np.stack(perms)
  return perm, np.argsort(perm, axis=-1)


def pad_source(padding: str, h: int, w: int) -> np.ndarray:
  """[(h+P) (w+P)] indices into [patches (h w), pads (P)] that fill the padded grid row-major."""
  if padding not in PADDINGS:
    raise ValueError(f"dim_padding={padding!r}; choose one of {PADDINGS}.")
  hp, wp = h + PAD_LEN, w + PAD_LEN
  r, c = np.meshgrid(np.arange(hp), np.arange(wp), indexing="ij")
  pad = np.where(c >= w, c - w, 0)  # right columns: p_0, p_1, p_2
  bottom = (r - h) if padding == "lateral" else ((r - h) * wp + c)
  pad = np.where(r >= h, bottom % PAD_LEN, pad)
  inside = (r < h) & (c < w)
  return np.where(inside, r * w + np.minimum(c, w - 1), h * w + pad).reshape(-1)


def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of 1-D linear resizing as torch's bilinear, align_corners=False,
  no antialias: source coordinate (i + 0.5) n_in / n_out - 0.5 clamped at 0, edges clamped."""
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = max((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = min(int(src), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    frac = src - i0
    m[i, i0] += 1.0 - frac
    m[i, i1] += frac
  return m


def resize_grid_table(table, src: tuple[int, int], dst: tuple[int, int], extra: int):
  """A position table [extra + hs ws, D] resized to [extra + hd wd, D] (the extra rows kept);
  NumPy or JAX arrays (`pos_embed_inteplot`, utils.py)."""
  if tuple(src) == tuple(dst):
    return table
  xp = jnp if isinstance(table, jax.Array) else np
  (hs, ws), (hd, wd) = src, dst
  grid = table[extra:].reshape(hs, ws, -1)
  mh = interpolation_matrix(hs, hd).astype(table.dtype)
  mw = interpolation_matrix(ws, wd).astype(table.dtype)
  out = xp.einsum("ia,jb,abd->ijd", mh, mw, grid).reshape(hd * wd, -1)
  return xp.concatenate([table[:extra], out.astype(table.dtype)], axis=0)


# ------------------------------------------------------------------------------------------------
# Blocks


class DiMBlock(nn.Module):
  """One DiM block (mamba_2d.py) on the stream [b, L, D]; `skip` 'none', 'concat' (D <= 512:
  Linear(2D -> D) of [stream, skip]) or 'split' (Linear(D -> D) of each, summed)."""

  hidden_size: int
  depth: int
  skip: str = "none"
  scan_impl: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, s, mods, skip=None, perm=None, inverse=None, tune=None):
    d = self.hidden_size
    stream = s.dtype
    mods = mods.astype(stream)
    dense = lambda name: nn.Dense(d, kernel_init=torch_default_kernel, dtype=self.dtype, name=name)
    if self.skip != "none":
      if tune is not None:
        skip = skip * tune.astype(skip.dtype)
      if self.skip == "concat":
        s = dense("skip_linear")(jnp.concatenate([s, skip], axis=-1))
      else:
        tail = dense("skip_linear_1")(skip)
        self.sow("intermediates", "skip_linear_1_out", tail)
        s = dense("skip_linear_0")(s) + tail
      s = s.astype(stream)
      self.sow("intermediates", "skip_linear_out", s)
    r = s if perm is None else permute_tokens(s, perm, inverse)
    table = self.param("scale_shift_table", nn.initializers.normal(d**-0.5), (3, d))
    shift, scale, gate = (mods[:, i] + table[i] for i in range(3))
    u = RMSNorm(1e-5, self.dtype, name="norm1")(r)
    self.sow("intermediates", "norm_out", u)
    u = modulate(u, shift, scale).astype(self.dtype)
    self.sow("intermediates", "mixer_in", u)
    m = MambaMixer(
      d,
      d_state=D_STATE,
      d_conv=D_CONV,
      expand=EXPAND,
      out_proj_scale=self.depth**-0.5,
      scan_impl=self.scan_impl,
      dtype=self.dtype,
      name="mixer",
    )(u)
    self.sow("intermediates", "mamba_out", m)
    h = (1 + gate[:, None, :]) * m
    self.sow("intermediates", "block_out", h)
    s = r + h.astype(stream)
    self.sow("intermediates", "stream", s)
    return s


class _Producer(nn.Module):
  """Scan body of the skip producers: (stream, (perm, inverse)) -> (stream, stream)."""

  spec: DiMBlock

  @nn.compact
  def __call__(self, s, xs, mods):
    perm, inverse = xs
    s = self.spec.clone(name="block", parent=self)(s, mods, None, perm, inverse)
    return s, s


class _Consumer(nn.Module):
  """Scan body of the skip consumers: (stream, (perm, inverse, tune, skip)) -> (stream, None)."""

  spec: DiMBlock

  @nn.compact
  def __call__(self, s, xs, mods):
    perm, inverse, tune, skip = xs
    return self.spec.clone(name="block", parent=self)(s, mods, skip, perm, inverse, tune), None


class DiM(nn.Module, kw_only=True):
  input_size: int | tuple[int, int] = 32  # latent size (or (height, width)) of the table
  in_channels: int = 4
  patch_size: int = 2
  hidden_size: int = 1024
  depth: int = 49
  num_classes: int = 1000
  label_dropout: float = 0.15
  padding: str = "lateral"  # 'lateral' (ImageNet 256) or 'rho_pad' (the 512 fine-tune)
  skip_tune: tuple[float, float] | None = None  # upstream's is_skip_tune (top, bottom) values
  scan_impl: str = "auto"
  remat: str = "none"  # recompute in the backward: none, dots or full (REMAT_POLICIES)
  dtype: Dtype = jnp.float32

  def table_grid(self) -> tuple[int, int]:
    hl, wl = (self.input_size,) * 2 if isinstance(self.input_size, int) else tuple(self.input_size)
    return hl // self.patch_size, wl // self.patch_size

  def check(self):
    """Raise a ValueError naming the fix for sizes and options DiM cannot take."""
    hl, wl = (self.input_size,) * 2 if isinstance(self.input_size, int) else tuple(self.input_size)
    if hl % self.patch_size or wl % self.patch_size:
      raise ValueError(
        f"input_size {self.input_size} is not divisible by patch_size "
        f"{self.patch_size}: pick a latent size that is a multiple of it."
      )
    check_grid(*self.table_grid())
    if self.depth < 3 or self.depth % 2 == 0:
      raise ValueError(
        f"DiM needs an odd depth of at least 3 (block 0, then as many skip "
        f"producers as consumers), got {self.depth}: use "
        f"{max(3, self.depth + 1)}."
      )
    if self.padding not in PADDINGS:
      raise ValueError(f"dim_padding={self.padding!r}; choose one of {PADDINGS}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; choose one of {tuple(REMAT_POLICIES)}.")
    if self.hidden_size % 2:
      raise ValueError(f"hidden_size {self.hidden_size} must be even (sin-cos time token).")

  def skip_factors(self, n_out: int) -> np.ndarray:
    """Per consumer: the scale of its skip (1 without skip tune; upstream's formula with its
    constant t = 1/1000 otherwise, as make_ufg_nnet)."""
    if self.skip_tune is None:
      return np.ones(n_out)
    top, bottom = self.skip_tune
    top = bottom + (top - bottom) * (1.0 / 1000)
    span = max(n_out - 1, 1)
    return np.arange(n_out) / span * (top - bottom) + bottom

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False):
    self.check()
    b, hl, wl, channels = x.shape
    p, d = self.patch_size, self.hidden_size
    if channels != self.in_channels or hl % p or wl % p:
      raise ValueError(
        f"Expected inputs [b, H, W, {self.in_channels}] (channels last) with H "
        f"and W multiples of the patch {p}, got {tuple(x.shape)}."
      )
    h, w = hl // p, wl // p
    check_grid(h, w)
    dt = self.dtype
    stream = jnp.promote_types(dt, jnp.float32)
    cond = self.num_classes > 0
    extra = 2 if cond else 1
    head = extra + PAD_LEN
    hp, wp = h + PAD_LEN, w + PAD_LEN

    # Conditioning (4.2): time token, class token, adaLN-single.
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    tt = timestep_frequencies(t, d).astype(dt)
    e = TimestepEmbedder(d, dtype=dt, name="t_embedder")(t)
    if cond:
      y = (
        jnp.full((b,), self.num_classes, jnp.int32)
        if y is None
        else jnp.broadcast_to(jnp.asarray(y, jnp.int32), (b,))
      )
      if train and self.label_dropout > 0:
        drop = jax.random.bernoulli(self.make_rng("dropout"), self.label_dropout, y.shape)
        y = jnp.where(drop, self.num_classes, y)
      embed = lambda name: nn.Embed(
        self.num_classes + 1, d, embedding_init=nn.initializers.normal(0.02), dtype=dt, name=name
      )
      yt = embed("label_emb")(y)
      c = e + embed("class_embedder")(y)
      tokens = [tt[:, None], yt[:, None]]
      final_cond = tt + yt
      self.sow("intermediates", "y_token", yt)
    else:
      c, tokens, final_cond = e, [tt[:, None]], tt
    mods = jnp.stack(AdaLN(3, d, dtype=dt, name="adaLN_modulation")(c), axis=1)  # [b, 3, D]
    self.sow("intermediates", "t_token", tt)
    self.sow("intermediates", "adaln_c", c)
    self.sow("intermediates", "adaln_out", mods.reshape(b, 3 * d))

    # Tokens (4.3): patches, learned position table over [extra tokens, patches].
    patches = nn.Conv(
      d,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=dt,
      kernel_init=torch_default_kernel,
      bias_init=torch_default_bias(self.in_channels * p * p),
      name="x_embedder",
    )(x.astype(dt)).reshape(b, h * w, d)
    self.sow("intermediates", "patch_tokens", patches)
    h0, w0 = self.table_grid()
    pos = self.param("additional_embed", nn.initializers.zeros, (extra + h0 * w0, d))
    if (h, w) != (h0, w0):
      if h0 != w0:
        raise ValueError(
          f"Resizing the position table of a non-square {h0}x{w0} grid is "
          f"ambiguous upstream: build the model for the {h}x{w} grid instead."
        )
      pos = resize_grid_table(pos, (h0, w0), (h, w), extra)
    seq = jnp.concatenate(tokens + [patches], axis=1) + pos.astype(dt)[None]
    self.sow("intermediates", "tokens_in", seq)

    # Prepare (4.4): smoother, pad to (h+P) x (w+P), split pad tokens after the extra tokens.
    smoother = lambda name: nn.Conv(
      d,
      (3, 3),
      padding=((1, 1), (1, 1)),
      feature_group_count=d,
      dtype=dt,
      kernel_init=torch_default_kernel,
      bias_init=torch_default_bias(9),
      name=name,
    )
    grid = smoother("first_smoother")(seq[:, extra:].reshape(b, h, w, d))
    self.sow("intermediates", "first_smoother_out", grid)
    pads = self.param("pad_token", nn.initializers.normal(0.02), (PAD_LEN, d)).astype(dt)
    split = self.param("pad_token_dec_split", nn.initializers.normal(0.02), (PAD_LEN, d))
    cells = jnp.concatenate(
      [grid.reshape(b, h * w, d), jnp.broadcast_to(pads[None], (b, PAD_LEN, d))], axis=1
    )
    padded = cells[:, pad_source(self.padding, h, w)]
    s = jnp.concatenate(
      [seq[:, :extra], jnp.broadcast_to(split.astype(dt)[None], (b, PAD_LEN, d)), padded], axis=1
    )
    s = s.astype(stream)
    self.sow("intermediates", "seq_prepared", s)

    # Blocks (4.5-4.8): block 0, the producers' scan, the consumers' scan.
    n_in = (self.depth - 1) // 2
    perm, inverse = block_orders(self.depth, hp, wp)
    full = lambda q: np.concatenate(
      [np.broadcast_to(np.arange(head), (len(q), head)), q + head], axis=1
    ).astype(np.int32)
    perm, inverse = full(perm), full(inverse)
    block = lambda skip: DiMBlock(d, self.depth, skip, self.scan_impl, dt, parent=None)
    skip_form = "concat" if d <= SPLIT_SKIP_WIDTH else "split"
    s = rematerialised(DiMBlock, self.remat)(
      d, self.depth, "none", self.scan_impl, dt, name="block_0"
    )(s, mods)
    scan = lambda body: nn.scan(
      rematerialised(body, self.remat),
      variable_axes={"params": 0, "intermediates": 0},
      split_rngs={"params": True},
      length=n_in,
      in_axes=(0, nn.broadcast),
    )
    s, skips = scan(_Producer)(block("none"), name="in_blocks")(
      s, (jnp.asarray(perm[1 : 1 + n_in]), jnp.asarray(inverse[1 : 1 + n_in])), mods
    )
    tune = jnp.asarray(self.skip_factors(n_in), stream)
    s, _ = scan(_Consumer)(block(skip_form), name="out_blocks")(
      s, (jnp.asarray(perm[1 + n_in :]), jnp.asarray(inverse[1 + n_in :]), tune, skips[::-1]), mods
    )
    self.sow("intermediates", "seq_before_finalize", s)

    # Finalize (4.9) and the final layer (4.10).
    fin = s[:, head:].reshape(b, hp, wp, d)[:, :h, :w].astype(dt)
    fin = smoother("last_smoother")(fin).reshape(b, h * w, d)
    self.sow("intermediates", "finalized_tokens", fin)
    shift_scale = nn.Dense(2 * d, kernel_init=torch_default_kernel, dtype=dt, name="proj_out_1")(
      nn.silu(final_cond)
    )
    self.sow("intermediates", "final_shift_scale", shift_scale)
    shift, scale = jnp.split(shift_scale, 2, axis=-1)
    normed = RMSNorm(1e-5, dt, name="norm_out")(fin)
    self.sow("intermediates", "final_norm", normed)
    out = nn.Dense(
      p * p * self.in_channels, kernel_init=torch_default_kernel, dtype=dt, name="proj_out_2"
    )(modulate(normed, shift, scale))
    self.sow("intermediates", "final_layer_out", out)
    return unpatchify(out, h, w, p, self.in_channels).astype(stream)
