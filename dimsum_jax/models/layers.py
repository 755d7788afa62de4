"""Layers shared by DiMSUM and the DiT baseline: embeddings, norms, attention, MLPs, final layer.

Conventions: tokens are [batch, tokens, channels]; Dense kernels are [in, out] (the transpose of a
PyTorch Linear weight). `dtype` is the compute dtype; parameters stay float32 (`param_dtype`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

Dtype = Any

# PyTorch's default Linear/Conv init (kaiming_uniform with a = sqrt 5): U(-1/sqrt(fan_in), +).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def modulate(x, shift, scale):
  """x * (1 + scale) + shift, with [b, c] shift/scale broadcast over tokens."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """MAE/DiT 2-D sin-cos table [h*w, dim]: first half encodes the column, second half the row."""
  if dim % 4:
    raise ValueError(
      f"The sin-cos position embedding needs a hidden size divisible by 4, got {dim}."
    )

  def one_axis(pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(
    np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij"
  )
  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1)


def timestep_frequencies(t, dim: int = 256, max_period: float = 10000.0):
  """[cos(t f_i), sin(t f_i)] with f_i = exp(-ln(max_period) i / (dim/2)); t used raw (in [0, 1])."""
  half = dim // 2
  dtype = jnp.float64 if t.dtype == jnp.float64 else jnp.float32
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=dtype) / half)
  args = t.astype(dtype)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
  hidden_size: int
  frequency_size: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    init = nn.initializers.normal(0.02)
    h = timestep_frequencies(t, self.frequency_size).astype(self.dtype)
    h = nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name="mlp_0")(h)
    h = nn.silu(h)
    return nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name="mlp_2")(h)


class LabelEmbedder(nn.Module):
  """Class table with a null row (index num_classes) for classifier-free guidance.

  num_classes == 0 means unconditional: a single learned row, always used.
  """

  num_classes: int
  hidden_size: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y, train: bool = False):
    rows = self.num_classes + 1 if self.num_classes > 0 else 1
    table = nn.Embed(
      rows,
      self.hidden_size,
      embedding_init=nn.initializers.normal(0.02),
      dtype=self.dtype,
      name="embedding_table",
    )
    if self.num_classes == 0 or y is None:
      batch = 1 if y is None else y.shape[0]
      return table(jnp.full((batch,), rows - 1, jnp.int32))
    y = y.astype(jnp.int32)
    if train and self.dropout > 0:
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.dropout, y.shape)
      y = jnp.where(drop, self.num_classes, y)
    return table(y)


class PatchEmbed(nn.Module):
  """Conv(kernel p, stride p) as timm PatchEmbed, flattened row-major to tokens."""

  hidden_size: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    xavier = nn.initializers.variance_scaling(
      1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
    )
    x = nn.Conv(
      self.hidden_size,
      (self.patch_size,) * 2,
      strides=(self.patch_size,) * 2,
      padding="VALID",
      kernel_init=xavier,
      dtype=self.dtype,
      name="proj",
    )(x)
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)


class RMSNorm(nn.Module):
  """RMSNorm in float32 (as mamba_ssm's rms_norm_ref), cast to `dtype`."""

  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
    compute = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(compute)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.epsilon)
    return (y * weight.astype(compute)).astype(self.dtype)


def layer_norm(dtype):
  """LayerNorm without affine parameters, eps 1e-6 (DiT)."""
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype)


ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def cudnn_attention_supported(q) -> bool:
  """Whether cuDNN's fused attention takes q [b, tokens, heads, head_dim] here: an NVIDIA GPU,
  16-bit floats and a head width that is a multiple of 8 up to 128."""
  head_dim = q.shape[-1]
  return (
    jax.default_backend() == "gpu"
    and q.dtype in (jnp.bfloat16, jnp.float16)
    and head_dim % 8 == 0
    and head_dim <= 128
  )


def attention(q, k, v, impl: str = "auto"):
  """Softmax attention, scale head_dim^-1/2; q, k, v [b, tokens, heads, head_dim].

  impl: "cudnn" (cuDNN's fused flash attention: NVIDIA GPUs, bfloat16/float16, head width a
  multiple of 8 up to 128; no [b, heads, q, k] tensor is stored), "xla" (the scores are formed
  and kept for the backward), or "auto" (cudnn where `cudnn_attention_supported`, else xla).
  float64 (parity checks) is computed by hand, since the fused op works in at most float32.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r}; choose one of {ATTENTION_IMPLS}.")
  if impl == "auto":
    impl = "cudnn" if cudnn_attention_supported(q) else "xla"
  if impl == "cudnn":
    if not cudnn_attention_supported(q):
      raise ValueError(
        f"attention_impl='cudnn' needs an NVIDIA GPU, bfloat16 compute and a head "
        f"width that is a multiple of 8 up to 128 (backend "
        f"{jax.default_backend()}, dtype {q.dtype}, head width {q.shape[-1]}): "
        f"set model.attention_impl=auto or xla."
      )
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  if q.dtype != jnp.float64:
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


class SelfAttention(nn.Module):
  """timm Attention: qkv Linear(D -> 3D) laid out [3, heads, head_dim], then proj."""

  num_heads: int
  dtype: Dtype = jnp.float32
  kernel_init: Any = torch_default_kernel
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    b, n, c = x.shape
    qkv = nn.Dense(3 * c, kernel_init=self.kernel_init, dtype=self.dtype, name="qkv")(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads), 2, 0)
    out = attention(q, k, v, self.attention_impl).reshape(b, n, c)
    return nn.Dense(c, kernel_init=self.kernel_init, dtype=self.dtype, name="proj")(out)


class SplitDense(nn.Module):
  """One Dense layer [in, parts * features] applied as `parts` separate matmuls.

  The parameters (`kernel` [in, parts * features], `bias` [parts * features]) and their init
  are those of `nn.Dense(parts * features)`, so checkpoints and converted weights do not change.
  Returning the parts of one matmul by slicing its output makes the backward pass concatenate
  their cotangents into one [tokens, parts * features] buffer; with one matmul per part the
  gradient of the input is a sum of matmuls and only the (small) kernel gradient is joined.
  """

  features: int
  parts: int
  kernel_init: Any = torch_default_kernel
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = self.parts * self.features
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], width), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (width,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    cut = lambda i: slice(i * self.features, (i + 1) * self.features)  # noqa: E731
    return [jnp.dot(x, kernel[:, cut(i)]) + bias[cut(i)] for i in range(self.parts)]


class GatedMLP(nn.Module):
  """w12 = Linear(D -> 2H) as (a, b); GELU_tanh(a) * b; w3 = Linear(H -> D)."""

  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    a, b = SplitDense(self.hidden, 2, dtype=self.dtype, name="w12")(x)
    h = checkpoint_name(nn.gelu(a, approximate=True) * b, MLP_HIDDEN)
    return nn.Dense(x.shape[-1], kernel_init=torch_default_kernel, dtype=self.dtype, name="w3")(h)


class MLP(nn.Module):
  """DiT's MLP: fc1 -> GELU(tanh) -> fc2."""

  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    xavier = nn.initializers.xavier_uniform()
    h = nn.Dense(self.hidden, kernel_init=xavier, dtype=self.dtype, name="fc1")(x)
    h = checkpoint_name(nn.gelu(h, approximate=True), MLP_HIDDEN)
    return nn.Dense(x.shape[-1], kernel_init=xavier, dtype=self.dtype, name="fc2")(h)


class AdaLN(nn.Module):
  """SiLU -> Linear(D -> chunks * features) of the condition, split into `chunks`."""

  chunks: int
  features: int
  zero_init: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, c, linear_out=None):
    """c [b, D] -> `chunks` arrays [b, features]. linear_out [b, chunks * features]: the Linear's
    output computed elsewhere (`stacked_adaln`, for a whole stack at once); the layer's
    parameters are then not read."""
    if linear_out is None:
      init = nn.initializers.zeros if self.zero_init else torch_default_kernel
      linear_out = nn.Dense(
        self.chunks * self.features, kernel_init=init, dtype=self.dtype, name="linear"
      )(nn.silu(c))
    return jnp.split(linear_out, self.chunks, axis=-1)


def stacked_adaln(params, c, dtype: Dtype):
  """The Linear of AdaLN for a stack of layers at once: params {"linear": {"kernel": [..., D, F],
  "bias": [..., F]}} (leading stack axes, e.g. nn.scan's), c [b, D] -> [..., b, F], the same
  arithmetic as nn.Dense(dtype=dtype) per layer, as one batched matmul."""
  kernel, bias = params["linear"]["kernel"], params["linear"]["bias"]
  x, kernel, bias = nn.dtypes.promote_dtype(nn.silu(c), kernel, bias, dtype=dtype)
  # The stack axes as batch axes of both operands (x broadcast, a few KB): a batched GEMM that
  # reads the kernel as stored, where contracting its middle axis would transpose (copy) it.
  x = jnp.broadcast_to(x, kernel.shape[:-2] + x.shape)
  return jnp.einsum("...bd,...df->...bf", x, kernel) + bias[..., None, :]


class FinalLayer(nn.Module):
  """LayerNorm -> modulate(shift, scale) -> Linear(D -> p*p*C); zero-initialised."""

  patch_size: int
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    shift, scale = AdaLN(2, x.shape[-1], zero_init=True, dtype=self.dtype, name="adaLN_modulation")(
      c
    )
    x = modulate(layer_norm(self.dtype)(x), shift, scale)
    return nn.Dense(
      self.patch_size**2 * self.out_channels,
      kernel_init=nn.initializers.zeros,
      dtype=self.dtype,
      name="linear",
    )(x)


def unpatchify(x, grid_h: int, grid_w: int, patch: int, channels: int):
  """[b, h*w, p*p*C] tokens (each read as (p_row, p_col, C)) -> [b, h*p, w*p, C]."""
  b = x.shape[0]
  x = x.reshape(b, grid_h, grid_w, patch, patch, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, grid_h * patch, grid_w * patch, channels)


# What the backward keeps of a rematerialised stage (jax.checkpoint policies): "none" keeps
# everything (no remat), "dots" keeps the outputs of the weight matmuls and recomputes the
# elementwise work, attention and scans, "dots_mlp" also keeps each MLP's activated hidden
# layer (named MLP_HIDDEN: [tokens, hidden] more per block, its recomputation saved), "full"
# keeps only each stage's input.
MLP_HIDDEN = "mlp_hidden"
REMAT_POLICIES = {
  "none": None,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "dots_mlp": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(MLP_HIDDEN),
  ),
  "full": jax.checkpoint_policies.nothing_saveable,
}


def rematerialised(module_class, remat: str):
  """`module_class`, or its nn.remat with the policy REMAT_POLICIES[remat] (same parameters)."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}; choose one of {tuple(REMAT_POLICIES)}.")
  if remat == "none":
    return module_class
  # prevent_cse=False: a rolled scan recomputes anyway; in an unrolled stack XLA may merge the
  # recomputation with the forward (faster, more memory: BENCHMARKS.md, the unrolled profile).
  return nn.remat(module_class, policy=REMAT_POLICIES[remat], prevent_cse=False)


def stack_unroll(
  scan_unroll: int, inference_scan_unroll: int, length: int, train: bool, unit: str
) -> int:
  """nn.scan's `unroll` for a stack of `length` units (`unit` names them in the error):
  scan_unroll units per iteration in training-mode calls, inference_scan_unroll in inference
  (sampling, evaluation); 0 unrolls every one (straight-line code), 1 keeps a rolled loop."""
  for name, value in (
    ("scan_unroll", scan_unroll),
    ("inference_scan_unroll", inference_scan_unroll),
  ):
    if value < 0:
      raise ValueError(
        f"model.{name}={value} must be 0 (every {unit} unrolled) or a number of {unit}s per "
        "iteration (1: a rolled loop)."
      )
  unroll = scan_unroll if train else inference_scan_unroll
  return min(unroll or length, length)


def drop_path(x, rate, deterministic: bool, rng=None):
  """Per-sample stochastic depth, rescaled by 1/keep. `rate` may be a traced scalar."""
  if deterministic:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.maximum(keep, 1e-12), jnp.zeros_like(x)).astype(x.dtype)
