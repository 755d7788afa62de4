"""Helpers of the model tests: tiny configs, non-trivial weights, cached jitted forwards, and an
unrolled DiMSUM forward written block by block (the reference for the scanned model)."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from dimsum_jax import models
from dimsum_jax.models import create_model, default_model_config
from dimsum_jax.models import dimsum_convert
from dimsum_jax.models.dimsum import DiMSUMBlock, SharedTransformerBlock
from dimsum_jax.models.layers import (
  FinalLayer,
  LabelEmbedder,
  PatchEmbed,
  TimestepEmbedder,
  unpatchify,
)
from dimsum_jax.ops import scan_orders
from dimsum_jax.tools import hashfill

# These tests check values, not speed: compile without LLVM optimisation (about 2x faster).
FAST = {"xla_backend_optimization_level": 0}


def tiny_config(**overrides):
  """DiMSUM with D = 32 (branch width 16, the least the wavelet layout allows), 4x4 tokens, and
  the shared transformer after every block, so the scanned body holds one block (quick compile)."""
  mc = default_model_config()
  mc.update(
    name="DiMSUM-L/2",
    hidden_size=32,
    depth=2,
    attn_every=1,
    input_size=8,
    num_classes=10,
    label_dropout=0.1,
    scan_impl="reference",
  )
  mc.update(overrides)
  defaults = default_model_config()
  for key in ("scan_impl", "attn_every"):  # back to the default where the model does not read it
    if (
      key not in overrides
      and mc.name in models.MODEL_NAMES
      and key not in models.fields_read(mc.name)
    ):
      mc[key] = defaults[key]
  return mc


def filled_params(model, mc, seed=0):
  """Every parameter non-zero (upstream zero-initialises the output layers): the golden l2.npz
  weight fill (dimsum_jax.tools.hashfill) by upstream key name, float32 NumPy."""
  abstract = models.abstract_params(model, mc)
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), abstract)
  keys = [(k, v.shape) for k, v in dimsum_convert.to_upstream(zeros, model).items()]
  return dimsum_convert.from_upstream(hashfill.fill_state_dict(keys, seed), model, abstract)


def inputs(mc, batch=3, seed=0, dtype=np.float32):
  """Random (x, t, y) of `batch` samples for model config `mc`, drawn from `seed`."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, mc.input_size, mc.input_size, mc.in_channels)).astype(dtype)
  t = rng.uniform(size=batch).astype(dtype)
  y = rng.integers(0, mc.num_classes, size=batch).astype(np.int32) if mc.num_classes else None
  return x, t, y


_FORWARDS = {}


def forward(mc, train=False):
  """(model, jitted fn(params, x, t, y, rng)) per config, compiled once per test session."""
  key = (json.dumps(mc.to_dict(), sort_keys=True), train)
  if key not in _FORWARDS:
    model = create_model(mc)

    def fn(params, x, t, y, rng=None):
      rngs = {"dropout": rng} if train else None
      return model.apply({"params": params}, x, t, y, train=train, rngs=rngs)

    _FORWARDS[key] = (model, jax.jit(fn, compiler_options=FAST))
  return _FORWARDS[key]


def orders(scan_type, depth, grid, levels=2):
  """(s_perm, s_inv, w_perm, w_inv), each [depth, N], from dimsum_jax.ops.scan_orders."""
  spatial = scan_orders.spatial_orders(scan_type, depth, grid, grid)
  wavelet = scan_orders.wavelet_orders(depth, grid, grid, levels, scan_type)
  return tuple(
    np.asarray(o, np.int32)
    for o in (spatial, np.argsort(spatial, -1), wavelet, np.argsort(wavelet, -1))
  )


def block_params(params, model, i):
  """Parameters of DiMSUM block i out of the scanned tree (groups/block_j/...[group])."""
  size = model.attn_every or model.depth
  return jax.tree_util.tree_map(lambda a: a[i // size], params["groups"][f"block_{i % size}"])


def unrolled_forward(model, params, shared, x, t, y, block_orders):
  """DiMSUM written out top to bottom: every block called on its own slice of the stacked
  parameters with explicitly given scan orders, and shared-transformer application k called with
  its own parameter set `shared[k]` (all equal to params['attn_block'] to match the model)."""
  dt, D, p, c_in = model.dtype, model.hidden_size, model.patch_size, model.in_channels
  g = model.input_size // p
  t_emb = TimestepEmbedder(D, dtype=dt).apply({"params": params["t_embedder"]}, t)
  y_emb = LabelEmbedder(model.num_classes, D, model.label_dropout, dt).apply(
    {"params": params["y_embedder"]}, y
  )
  c = t_emb + jnp.broadcast_to(y_emb, t_emb.shape)
  h = PatchEmbed(D, p, dt).apply({"params": params["x_embedder"]}, x.astype(dt))
  h = h + params["pos_embed"].astype(dt)
  r = jnp.zeros(h.shape, jnp.promote_types(dt, jnp.float32))
  block = DiMSUMBlock(
    hidden_size=D,
    depth=model.depth,
    grid=(g, g),
    wavelet_levels=model.wavelet_levels,
    fusion_heads=model.fusion_heads,
    mlp_ratio=model.mlp_ratio,
    cond_mamba=model.cond_mamba,
    scan_impl=model.scan_impl,
    dtype=dt,
    bidirectional=model.bidirectional,
  )
  attn = SharedTransformerBlock(model.attn_heads, model.mlp_ratio, dt)
  applications = 0
  for i in range(model.depth):
    h, r = block.apply(
      {"params": block_params(params, model, i)},
      h,
      r,
      c,
      tuple(o[i] for o in block_orders),
      0.0,
      False,
    )
    if model.attn_every and (i + 1) % model.attn_every == 0:
      h = attn.apply({"params": shared[applications]}, h, c)
      applications += 1
  assert applications == len(shared)
  out = FinalLayer(p, c_in, dt).apply({"params": params["final_layer"]}, h, c)
  return unpatchify(out, g, g, p, c_in).astype(jnp.promote_types(dt, jnp.float32))


def count(tree, skip=None):
  """Number of parameters; with `skip`, leaves whose path contains that name are left out."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if skip is None or skip not in names:
      total += int(np.prod(leaf.shape))
  return total
