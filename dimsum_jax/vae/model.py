"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) in Flax linen, channels-last.

Images are [batch, height, width, 3] in [-1, 1]; latents are [batch, height / f, width / f,
latent_channels] with f = 2 ** (len(block_out_channels) - 1) (8 for sd-vae-ft-ema / ft-mse).

  encoder: conv_in -> down_blocks (resnets, then a stride-2 conv on a (0, 1, 0, 1)-padded input,
           except the last) -> mid_block (resnet, single-head attention, resnet) -> GroupNorm, SiLU,
           conv_out (2 * latent_channels) -> quant_conv (1x1)
  decoder: post_quant_conv (1x1) -> conv_in -> mid_block -> up_blocks (layers_per_block + 1 resnets,
           then nearest 2x upsampling and a conv, except the last) -> GroupNorm, SiLU, conv_out

Submodule names follow the diffusers state-dict keys with "." before an index written "_"
(`encoder.down_blocks.0.resnets.1.conv1` is `encoder/down_blocks_0/resnets_1/conv1`), so the
import in `convert.py` is a renaming plus the NCHW -> NHWC kernel transposes.

Parameters are float32; `dtype` sets the compute dtype. Group-norm statistics and the attention
softmax are computed in float32 whatever `dtype` is; `encode` and `decode` return float32.
The functions at the bottom take (module, params, ...) and are pure, so they can be jitted
(module static) and sharded like any other function of a parameter tree.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

SCALING_FACTOR = 0.18215  # latents = posterior sample * SCALING_FACTOR (sd-vae-ft-ema / ft-mse)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance


def _conv(features, name, dtype, precision, kernel=3, stride=1, padding=1):
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((padding, padding), (padding, padding)),
    dtype=dtype,
    param_dtype=jnp.float32,
    precision=precision,
    name=name,
  )


def _group_norm(groups, eps, name, dtype):
  # Two-pass variance, as torch: the decoder's activations are large enough for E[x^2] - E[x]^2
  # to lose digits.
  return nn.GroupNorm(
    num_groups=groups,
    epsilon=eps,
    dtype=dtype,
    param_dtype=jnp.float32,
    use_fast_variance=False,
    name=name,
  )


class ResnetBlock(nn.Module):
  """GroupNorm, SiLU, conv, GroupNorm, SiLU, conv; 1x1 conv on the skip when channels change."""

  out_channels: int
  groups: int
  eps: float
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_group_norm(self.groups, self.eps, "norm1", self.dtype)(x))
    h = _conv(self.out_channels, "conv1", self.dtype, self.precision)(h)
    h = nn.silu(_group_norm(self.groups, self.eps, "norm2", self.dtype)(h))
    h = _conv(self.out_channels, "conv2", self.dtype, self.precision)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(
        self.out_channels, "conv_shortcut", self.dtype, self.precision, kernel=1, padding=0
      )(x)
    return x + h


class SpatialSelfAttention(nn.Module):
  """Single-head self-attention over all H*W positions, with a residual connection."""

  groups: int
  eps: float
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = _group_norm(self.groups, self.eps, "group_norm", self.dtype)(x)
    h = h.reshape(batch, height * width, channels)

    def dense(name):
      return nn.Dense(
        channels, dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision, name=name
      )

    q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
    logits = jnp.einsum(
      "bqc,bkc->bqk", q, k, precision=self.precision, preferred_element_type=jnp.float32
    ) / jnp.sqrt(channels)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v, precision=self.precision)
    h = dense("to_out_0")(h)
    return x + h.reshape(batch, height, width, channels)


class MidBlock(nn.Module):
  """resnet, attention (optional), resnet, all at the innermost width."""

  groups: int
  eps: float
  attention: bool = True
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kw = dict(groups=self.groups, eps=self.eps, dtype=self.dtype, precision=self.precision)
    x = ResnetBlock(channels, name="resnets_0", **kw)(x)
    if self.attention:
      x = SpatialSelfAttention(name="attentions_0", **kw)(x)
    return ResnetBlock(channels, name="resnets_1", **kw)(x)


class Downsample(nn.Module):
  """Stride-2 3x3 conv after padding one row at the bottom and one column at the right."""

  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], "conv", self.dtype, self.precision, stride=2, padding=0)(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], "conv", self.dtype, self.precision)(x)


class DownBlock(nn.Module):
  """`layers_per_block` resnets, then a Downsample unless it is the last block."""

  out_channels: int
  num_layers: int
  groups: int
  eps: float
  downsample: bool
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, precision=self.precision)
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.eps, name=f"resnets_{j}", **kw)(x)
    if self.downsample:
      x = Downsample(name="downsamplers_0", **kw)(x)
    return x


class UpBlock(nn.Module):
  """`layers_per_block + 1` resnets, then an Upsample unless it is the last block."""

  out_channels: int
  num_layers: int
  groups: int
  eps: float
  upsample: bool
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, precision=self.precision)
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, self.eps, name=f"resnets_{j}", **kw)(x)
    if self.upsample:
      x = Upsample(name="upsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module):
  """Images [B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels] (before quant_conv)."""

  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  eps: float
  latent_channels: int
  mid_block_attention: bool = True
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, precision=self.precision)
    x = _conv(self.block_out_channels[0], "conv_in", **kw)(x)
    last = len(self.block_out_channels) - 1
    for i, channels in enumerate(self.block_out_channels):
      x = DownBlock(
        channels,
        self.layers_per_block,
        self.groups,
        self.eps,
        i != last,
        name=f"down_blocks_{i}",
        **kw,
      )(x)
    x = MidBlock(self.groups, self.eps, self.mid_block_attention, name="mid_block", **kw)(x)
    x = nn.silu(_group_norm(self.groups, self.eps, "conv_norm_out", self.dtype)(x))
    return _conv(2 * self.latent_channels, "conv_out", **kw)(x)


class Decoder(nn.Module):
  """Latents [B, h, w, latent_channels] (after post_quant_conv) -> images [B, h*f, w*f, out]."""

  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  eps: float
  out_channels: int
  mid_block_attention: bool = True
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, z):
    kw = dict(dtype=self.dtype, precision=self.precision)
    x = _conv(self.block_out_channels[-1], "conv_in", **kw)(z)
    x = MidBlock(self.groups, self.eps, self.mid_block_attention, name="mid_block", **kw)(x)
    widths = tuple(reversed(self.block_out_channels))
    last = len(widths) - 1
    for i, channels in enumerate(widths):
      x = UpBlock(
        channels,
        self.layers_per_block + 1,
        self.groups,
        self.eps,
        i != last,
        name=f"up_blocks_{i}",
        **kw,
      )(x)
    x = nn.silu(_group_norm(self.groups, self.eps, "conv_norm_out", self.dtype)(x))
    return _conv(self.out_channels, "conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL; the defaults are the sd-vae-ft-ema / sd-vae-ft-mse configuration.

  `encode(images) -> (mean, logvar)` of the diagonal-Gaussian posterior (logvar clamped to
  [-30, 20]); `decode(latents) -> images`. Neither applies SCALING_FACTOR: see
  `images_to_latents` / `latents_to_images`.
  """

  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  latent_channels: int = 4
  in_channels: int = 3
  out_channels: int = 3
  mid_block_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  dtype: Any = jnp.float32
  precision: Any = None

  def setup(self):
    shared = dict(
      block_out_channels=tuple(self.block_out_channels),
      layers_per_block=self.layers_per_block,
      groups=self.norm_num_groups,
      eps=self.norm_eps,
      mid_block_attention=self.mid_block_attention,
      dtype=self.dtype,
      precision=self.precision,
    )
    self.encoder = Encoder(latent_channels=self.latent_channels, **shared)
    self.decoder = Decoder(out_channels=self.out_channels, **shared)
    if self.use_quant_conv:
      self.quant_conv = _conv(
        2 * self.latent_channels, None, self.dtype, self.precision, kernel=1, padding=0
      )
    if self.use_post_quant_conv:
      self.post_quant_conv = _conv(
        self.latent_channels, None, self.dtype, self.precision, kernel=1, padding=0
      )

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def encode(self, images):
    moments = self.encoder(images.astype(self.dtype))
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, latents):
    z = latents.astype(self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images):
    """Reconstruction from the posterior mean; used to create every parameter at init."""
    mean, _ = self.encode(images)
    return self.decode(mean)


def vae_from_config(config: Mapping, dtype=jnp.float32, precision=None) -> AutoencoderKL:
  """The module a diffusers AutoencoderKL config.json describes (missing keys take diffusers'
  defaults). Raises ValueError, in one sentence, for a configuration this port does not build."""
  config = dict(config)
  widths = tuple(int(c) for c in config.get("block_out_channels", (64,)))
  groups = int(config.get("norm_num_groups", 32))
  down = tuple(config.get("down_block_types", ("DownEncoderBlock2D",)))
  up = tuple(config.get("up_block_types", ("UpDecoderBlock2D",)))
  problems = []
  if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    problems.append(f"_class_name is {config['_class_name']!r}, not 'AutoencoderKL'")
  if down != ("DownEncoderBlock2D",) * len(widths):
    problems.append(f"down_block_types {list(down)} are not {len(widths)} x DownEncoderBlock2D")
  if up != ("UpDecoderBlock2D",) * len(widths):
    problems.append(f"up_block_types {list(up)} are not {len(widths)} x UpDecoderBlock2D")
  if config.get("act_fn", "silu") != "silu":
    problems.append(f"act_fn is {config['act_fn']!r}, not 'silu'")
  if any(width % groups for width in widths):
    problems.append(f"norm_num_groups {groups} does not divide block_out_channels {list(widths)}")
  if problems:
    raise ValueError(
      "This VAE configuration is not the Stable Diffusion AutoencoderKL that "
      f"dimsum_jax builds ({'; '.join(problems)}): use a config.json of a "
      "diffusers AutoencoderKL such as stabilityai/sd-vae-ft-ema."
    )
  return AutoencoderKL(
    block_out_channels=widths,
    layers_per_block=int(config.get("layers_per_block", 1)),
    norm_num_groups=groups,
    latent_channels=int(config.get("latent_channels", 4)),
    in_channels=int(config.get("in_channels", 3)),
    out_channels=int(config.get("out_channels", 3)),
    mid_block_attention=bool(config.get("mid_block_add_attention", True)),
    use_quant_conv=bool(config.get("use_quant_conv", True)),
    use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
    dtype=jnp.dtype(dtype),
    precision=precision,
  )


def abstract_params(vae: AutoencoderKL):
  """The parameter tree as jax.ShapeDtypeStruct leaves, without computing anything."""
  side = vae.downsampling_factor
  images = jax.ShapeDtypeStruct((1, side, side, vae.in_channels), jnp.float32)
  return jax.eval_shape(vae.init, jax.random.key(0), images)["params"]


def encode(vae: AutoencoderKL, params, images):
  """(mean, logvar) of the posterior for images in [-1, 1]; both float32."""
  return vae.apply({"params": params}, images, method=AutoencoderKL.encode)


def images_to_latents(vae: AutoencoderKL, params, images, rng=None):
  """Scaled latents: a posterior sample (rng given) or its mean (rng None), times 0.18215."""
  mean, logvar = encode(vae, params, images)
  if rng is None:
    return mean * SCALING_FACTOR
  noise = jax.random.normal(rng, mean.shape, mean.dtype)
  return (mean + jnp.exp(0.5 * logvar) * noise) * SCALING_FACTOR


def batch_encoder(vae: AutoencoderKL, params, rng, out_sharding=None):
  """encode(images, step) -> scaled latents, jitted: a posterior sample with key fold_in(rng,
  step), so each training step draws its own (as upstream's loop does)."""

  @functools.partial(jax.jit, out_shardings=out_sharding)
  def encode_batch(images, step):
    return images_to_latents(vae, params, images, jax.random.fold_in(rng, step))

  return encode_batch


def latents_to_images(vae: AutoencoderKL, params, latents):
  """Images (nominally in [-1, 1], not clipped) from scaled latents: decode(latents / 0.18215)."""
  return vae.apply({"params": params}, latents / SCALING_FACTOR, method=AutoencoderKL.decode)


def to_uint8(images):
  """Images in [-1, 1] -> uint8 as upstream's sample.py: clamp(127.5 x + 128, 0, 255), truncated."""
  return jnp.clip(127.5 * jnp.asarray(images, jnp.float32) + 128.0, 0, 255).astype(jnp.uint8)


def decode_latents(vae: AutoencoderKL, params, latents):
  """uint8 images [B, h*f, w*f, 3] from scaled latents [B, h, w, c]: to_uint8(latents_to_images).

  Pure: jit it with the module static, e.g. jax.jit(functools.partial(decode_latents, vae)).
  """
  return to_uint8(latents_to_images(vae, params, latents))
