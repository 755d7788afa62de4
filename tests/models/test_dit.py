"""DiT baseline: a float64 NumPy forward written from the DiT paper's description, adaLN-Zero at
init, parameter counts (DiT paper figures), bad input."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax.models import create_model
from tests import seeds
from tests.models import common


def _dit_config(**overrides):
  """DiT-S/2 layout (6 heads) at D = 48, depth 2, 4x4 tokens, 10 classes."""
  return common.tiny_config(**dict(dict(name="DiT-S/2", hidden_size=48, depth=2), **overrides))


def _np_params(params):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


# ---------------------------------------------------------------- NumPy reference


def _dense(p, x):
  return x @ p["kernel"] + p["bias"]


def _silu(x):
  return x / (1 + np.exp(-x))


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _sincos(dim, g):
  """2-D sin-cos table: first half of the channels encodes the column, second half the row;
  each half is [sin(pos w_i), cos(pos w_i)] with w_i = 10000^(-i / (dim/4)), i < dim/4."""
  omega = 10000.0 ** (-np.arange(dim // 4) / (dim / 4))
  table = np.zeros((g * g, dim))
  for row in range(g):
    for col in range(g):
      half = lambda pos: np.concatenate([np.sin(pos * omega), np.cos(pos * omega)])
      table[row * g + col] = np.concatenate([half(col), half(row)])
  return table


def numpy_dit(p, x, t, y, heads, patch):
  """x [b, H, W, C] channels-last; returns the velocity [b, H, W, C] in float64."""
  b, size, _, chans = x.shape
  g = size // patch
  freqs = np.exp(-math.log(10000.0) * np.arange(128) / 128)
  emb = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  c = _dense(p["t_embedder"]["mlp_2"], _silu(_dense(p["t_embedder"]["mlp_0"], emb)))
  c = c + p["y_embedder"]["embedding_table"]["embedding"][y]
  patches = x.reshape(b, g, patch, g, patch, chans).transpose(0, 1, 3, 2, 4, 5)
  kernel = p["x_embedder"]["proj"]["kernel"]  # [p, p, C, D]
  h = np.einsum("bijuvc,uvcd->bijd", patches, kernel).reshape(b, g * g, -1)
  h = h + p["x_embedder"]["proj"]["bias"]
  D = h.shape[-1]
  h = h + _sincos(D, g)
  blocks = p["blocks"]["block"]
  depth = blocks["attn"]["qkv"]["kernel"].shape[0]
  hd = D // heads
  for i in range(depth):
    bp = jax.tree_util.tree_map(lambda a: a[i], blocks)
    mod = _dense(bp["adaLN_modulation"]["linear"], _silu(c))[:, None, :]
    s1, sc1, g1, s2, sc2, g2 = np.split(mod, 6, axis=-1)
    a = _layer_norm(h) * (1 + sc1) + s1
    q, k, v = np.split(_dense(bp["attn"]["qkv"], a), 3, axis=-1)
    split = lambda z: z.reshape(b, -1, heads, hd).transpose(0, 2, 1, 3)
    att = _softmax(split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(hd)) @ split(v)
    h = h + g1 * _dense(bp["attn"]["proj"], att.transpose(0, 2, 1, 3).reshape(b, -1, D))
    m = _layer_norm(h) * (1 + sc2) + s2
    h = h + g2 * _dense(bp["mlp"]["fc2"], _gelu_tanh(_dense(bp["mlp"]["fc1"], m)))
  fl = p["final_layer"]
  shift, scale = np.split(_dense(fl["adaLN_modulation"]["linear"], _silu(c))[:, None], 2, -1)
  out = _dense(fl["linear"], _layer_norm(h) * (1 + scale) + shift)  # [b, N, p*p*C]
  out = out.reshape(b, g, g, patch, patch, chans).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(b, size, size, chans)


@seeds.each()
def test_forward_matches_numpy_float64(seed):
  mc = _dit_config(dtype="float64")
  x, t, y = common.inputs(mc, batch=3, seed=seed, dtype=np.float64)
  with jax.enable_x64(True):
    model, f = common.forward(mc)
    params = _np_params(common.filled_params(model, mc, seed=7))
    out = f(params, x, t, y)
    assert out.dtype == jnp.float64
    out = np.asarray(out)
  ref = numpy_dit(params, x, t, y, heads=model.num_heads, patch=2)
  assert np.abs(ref).max() > 0.1, f"seed {seed}"
  np.testing.assert_allclose(
    out, ref, rtol=0, atol=1e-11 * np.abs(ref).max(), err_msg=f"seed {seed}"
  )


@seeds.each()
def test_float32_forward_and_null_label(seed):
  mc = _dit_config()
  model, f = common.forward(mc)
  params = common.filled_params(model, mc, seed=8)
  x, t, y = common.inputs(mc, batch=2, seed=seed)
  ref = numpy_dit(_np_params(params), x.astype(np.float64), t.astype(np.float64), y, 6, 2)
  out = np.asarray(f(params, x, t, y))
  np.testing.assert_allclose(
    out, ref, rtol=0, atol=2e-5 * np.abs(ref).max(), err_msg=f"seed {seed}"
  )
  null = np.full_like(y, 10)
  np.testing.assert_allclose(
    f(params, x, t, null),
    numpy_dit(_np_params(params), x.astype(np.float64), t.astype(np.float64), null, 6, 2),
    rtol=0,
    atol=2e-5 * np.abs(ref).max(),
    err_msg=f"seed {seed}",
  )


def test_adaln_zero_init_outputs_zero():
  """DiT's adaLN-Zero: every block's modulation and the final layer start at zero, so the
  blocks are identities and the initial prediction is exactly 0."""
  mc = _dit_config()
  model, f = common.forward(mc)
  x, t, y = common.inputs(mc, batch=2)
  params = jax.device_get(
    jax.jit(model.init, compiler_options=common.FAST)(jax.random.key(0), x, t, y)["params"]
  )
  for leaf in (params["blocks"]["block"]["adaLN_modulation"], params["final_layer"]):
    assert all(np.all(a == 0) for a in jax.tree_util.tree_leaves(leaf))
  assert np.abs(params["blocks"]["block"]["attn"]["qkv"]["kernel"]).max() > 0
  np.testing.assert_array_equal(f(params, x, t, y), np.zeros_like(x))


# ---------------------------------------------------------------- sizes and bad input


@pytest.mark.parametrize("name,total", [("DiT-XL/2", 674_816_272), ("DiT-L/2", 457_824_272)])
def test_parameter_counts(name, total):
  """jax.eval_shape, nothing allocated. The DiT paper's models add a variance output
  (learn_sigma: 4 more output channels per pixel of a patch) and count the fixed sin-cos position
  table as parameters: for DiT-XL/2 that gives the paper's 675,129,632."""
  mc = common.tiny_config(name=name, input_size=32, num_classes=1000, depth=-1, hidden_size=-1)
  model = create_model(mc)
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
    )
  )
  assert common.count(shapes["params"]) == total
  if name == "DiT-XL/2":
    D, tokens, p = 1152, 256, 2
    assert total + (D * p * p * 4 + p * p * 4) + tokens * D == 675_129_632


def test_unrolled_block_scan_changes_nothing_but_the_program():
  """scan_unroll unrolls the stack's scan over blocks in training-mode calls (0: all 3 blocks):
  the parameters, the training-mode value (label dropout through the lifted rng) and every
  gradient equal the rolled loop's in float64 (a remainder iteration is the DiMSUM test's case);
  inference calls keep the rolled loop unless inference_scan_unroll asks (0: the same value)."""
  with jax.enable_x64(True):
    base = _dit_config(dtype="float64", depth=3, label_dropout=0.5)
    x, t, y = common.inputs(base, batch=4, dtype=np.float64)
    rngs = {"params": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}
    shift = lambda a: a + 0.05 * np.cos(np.arange(a.size) * 0.7).reshape(a.shape)
    results, unrolls = {}, {}
    for unroll in (1, 0):
      model = create_model(dict(base, scan_unroll=unroll))
      params = jax.tree_util.tree_map(shift, jax.jit(model.init)(rngs, x, t, y)["params"])

      def out(p, train, model=model):
        return model.apply({"params": p}, x, t, y, train=train, rngs={"dropout": rngs["dropout"]})

      def loss(p, out=out):
        o = out(p, True)
        return jnp.sum(o * jnp.sin(jnp.arange(o.size).reshape(o.shape)))

      results[unroll] = (params, *jax.jit(jax.value_and_grad(loss))(params))
      jaxprs = [jax.make_jaxpr(out, static_argnums=1)(params, train) for train in (True, False)]
      unrolls[unroll] = [
        [e.params["unroll"] for e in j.eqns if e.primitive.name == "scan"] for j in jaxprs
      ]
    params, value, grads = results[1]
    assert abs(float(value)) > 1e-3
    p, v, g = results[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, p, params)
    np.testing.assert_allclose(v, value, rtol=1e-12)
    jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), g, grads
    )
    inference = lambda m: jax.jit(lambda p: m.apply({"params": p}, x, t, y))
    unrolled = create_model(dict(base, inference_scan_unroll=0))
    jaxpr = jax.make_jaxpr(lambda p: unrolled.apply({"params": p}, x, t, y))(params)
    unrolls["inference 0"] = [e.params["unroll"] for e in jaxpr.eqns if e.primitive.name == "scan"]
    np.testing.assert_allclose(
      inference(unrolled)(params), inference(create_model(base))(params), rtol=1e-12, atol=1e-14
    )
  assert unrolls == {1: [[1], [1]], 0: [[3], [1]], "inference 0": [3]}, unrolls


@pytest.mark.parametrize(
  "overrides,message",
  [
    (
      dict(input_size=9),
      "input_size 9 is not divisible by patch_size 2: pick an image/latent "
      "size that is a multiple of it.",
    ),
    (
      dict(scan_unroll=-1),
      "model.scan_unroll=-1 must be 0 (every block unrolled) or a number of blocks per "
      "iteration (1: a rolled loop).",
    ),
    (
      dict(inference_scan_unroll=-1),
      "model.inference_scan_unroll=-1 must be 0 (every block unrolled) or a number of blocks "
      "per iteration (1: a rolled loop).",
    ),
    (
      dict(hidden_size=40),
      "hidden_size 40 must be a multiple of num_heads 6 and of 4 (sin-cos "
      "position embedding): use a multiple of 12.",
    ),
  ],
)
def test_impossible_dit_raises_clear_error(overrides, message):
  mc = _dit_config(**overrides)
  model = create_model(mc)
  size = mc.input_size
  with pytest.raises(ValueError, match=re.escape(message)):
    jax.eval_shape(
      lambda: model.init(
        jax.random.key(0),
        jnp.zeros((1, size, size, 4)),
        jnp.zeros((1,)),
        jnp.zeros((1,), jnp.int32),
      )
    )


def test_unknown_dit_size():
  with pytest.raises(
    ValueError, match=re.escape("--config.model.name=DiT-M/2 is not a valid choice: use one of")
  ):
    create_model(common.tiny_config(name="DiT-M/2", hidden_size=48))
