"""DiMSUM model: shared-block gradients, conditional Mamba, gradients against finite differences,
bfloat16, published parameter counts, bad input, stochastic depth, label dropout, scan orders.

Block internals are checked number by number against the official implementation in
tests/test_parity.py; here the references are an unrolled block-by-block forward
(tests/models/common.py), float64 finite differences, closed forms and the golden manifest.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax.models import create_model
from dimsum_jax.models import layers
from dimsum_jax.models.layers import LabelEmbedder, drop_path
from dimsum_jax.models.mamba import MambaMixer
from dimsum_jax.ops import scan_orders
from dimsum_jax.ops import selective_scan as ss
from tests import seeds
from tests.golden import manifest
from tests.jaxprs import count_calls, kernel_calls
from tests.models import common


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ---------------------------------------------------------------- gradients (float64)


def _np_tree(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


@pytest.fixture(scope="module")
def grads64():
  """A float64 tiny model with the conditional Mamba on and two applications of the shared
  transformer: params, jit(value_and_grad) of the loss sum(out * w) as a function of (params,
  x, t, y, w), and the unrolled model's loss (params, shared, x, t, y, w); each compiled once
  for all seeds (`_at_seed` draws the inputs)."""
  mc = common.tiny_config(cond_mamba="h0", dtype="float64")
  with jax.enable_x64(True):
    model = create_model(mc)
    params = _np_tree(common.filled_params(model, mc, seed=1))

    def loss(params, x, t, y, w):
      out = model.apply({"params": params}, x, t, y)
      return jnp.sum(out * w), out

    block_orders = common.orders("none", model.depth, 4)

    def unrolled_loss(params, shared, x, t, y, w):
      out = common.unrolled_forward(model, params, shared, x, t, y, block_orders)
      return jnp.sum(out * w), out

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=common.FAST)
    unrolled = jax.jit(unrolled_loss, compiler_options=common.FAST)
  return dict(model=model, mc=mc, params=params, value_and_grad=value_and_grad, unrolled=unrolled)


def _at_seed(g, seed):
  """grads64 with the inputs x, t, y and output weights w of `seed`, the output and gradient."""
  x, t, y = common.inputs(g["mc"], batch=2, seed=seed, dtype=np.float64)
  w = np.random.default_rng([seed, 1]).standard_normal(x.shape)
  with jax.enable_x64(True):
    (_, out), grads = g["value_and_grad"](g["params"], x, t, y, w)
  return dict(g, x=x, t=t, y=y, w=w, out=np.asarray(out), grads=_np_tree(grads))


def _direction(params, seed):
  """A random unit vector in parameter space."""
  rng = np.random.default_rng([seed, 2])
  v = jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape), params)
  norm = np.sqrt(_dot(v, v))
  return jax.tree_util.tree_map(lambda a: a / norm, v)


def _dot(a, b):
  return sum(
    float(np.vdot(x, y)) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  )


def _shift(tree, direction, step):
  return jax.tree_util.tree_map(lambda p, d: p + step * d, tree, direction)


@seeds.each()
def test_grad_matches_float64_finite_difference(grads64, seed):
  """jit(grad) on CPU: finite everywhere, and <grad, v> equals a central difference along a
  random direction v through all parameters (float64; truncation error O(eps^2) ~ 1e-10)."""
  g = _at_seed(grads64, seed)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(g["grads"]))
  v, eps = _direction(g["params"], seed), 1e-5
  inputs = (g["x"], g["t"], g["y"], g["w"])
  with jax.enable_x64(True):
    (plus, _), _ = g["value_and_grad"](_shift(g["params"], v, eps), *inputs)
    (minus, _), _ = g["value_and_grad"](_shift(g["params"], v, -eps), *inputs)
  numeric = (float(plus) - float(minus)) / (2 * eps)
  assert abs(numeric) > 1e-3, f"seed {seed}"
  np.testing.assert_allclose(_dot(g["grads"], v), numeric, rtol=1e-7, err_msg=f"seed {seed}")


@seeds.each()
def test_shared_block_is_one_parameter_set_with_summed_gradients(grads64, seed):
  """The shared transformer's parameters appear once (top-level `attn_block`, no block axis) and
  receive the sum of the gradients of its two applications. Reference: an unrolled model that
  gives each application its own copy of the parameters; perturbing one copy at a time gives
  each application's directional derivative (float64 central differences), and they must add
  up to the model's gradient along the same direction."""
  g = _at_seed(grads64, seed)
  params = g["params"]
  assert set(params) == {
    "pos_embed",
    "x_embedder",
    "t_embedder",
    "y_embedder",
    "groups",
    "attn_block",
    "final_layer",
  }
  assert set(params["groups"]) == {"block_0"}  # one block per group, stacked over depth
  assert "attn_block" not in str(jax.tree_util.tree_structure(params["groups"]))
  assert params["attn_block"]["attn"]["qkv"]["kernel"].shape == (32, 96)  # not stacked
  assert params["groups"]["block_0"]["norm"]["weight"].shape == (2, 32)

  theta = params["attn_block"]
  v, eps = _direction(theta, seed), 1e-5
  inputs = (g["x"], g["t"], g["y"], g["w"])
  with jax.enable_x64(True):
    run = lambda shared: g["unrolled"](params, shared, *inputs)
    value, out = run([theta, theta])
    per_use = []
    for k in range(2):
      shared = lambda step: [_shift(theta, v, step) if j == k else theta for j in range(2)]
      per_use.append((float(run(shared(eps))[0]) - float(run(shared(-eps))[0])) / (2 * eps))
  assert _rel(out, g["out"]) < 1e-12, f"seed {seed}"  # the unrolled model is the same function
  model_derivative = _dot(g["grads"]["attn_block"], v)
  np.testing.assert_allclose(sum(per_use), model_derivative, rtol=1e-7, err_msg=f"seed {seed}")
  # Each application contributes: neither one alone is the model's gradient.
  for k in range(2):
    assert abs(per_use[k]) > 1e-2 * abs(model_derivative), (per_use, f"seed {seed}")
    assert abs(per_use[k] - model_derivative) > 1e-2 * abs(model_derivative), (
      per_use,
      f"seed {seed}",
    )


def test_cond_proj_receives_gradients(grads64):
  """cond_mamba='h0': every block's spatial and wavelet cond_proj gets a non-zero gradient."""
  blocks = _at_seed(grads64, 0)["grads"]["groups"]["block_0"]
  for branch in ("spatial_mamba", "freq_mamba"):
    kernel = blocks[branch]["mixer"]["cond_proj"]["kernel"]  # [depth, D, d_inner]
    bias = blocks[branch]["mixer"]["cond_proj"]["bias"]
    assert kernel.shape == (2, 32, 32)
    for i in range(2):
      assert np.abs(kernel[i]).max() > 1e-6 and np.abs(bias[i]).max() > 1e-6, (branch, i)


# ---------------------------------------------------------------- conditional Mamba

# The forward tests share compilations (tests/models/common.py caches one jitted forward per
# config): depth 8 with one block per scanned group compiles as fast as depth 2.
DEPTH = 8


_H0 = MambaMixer(16, cond_mamba="h0", scan_impl="reference")
_NONE = MambaMixer(16, cond_mamba="none", scan_impl="reference")
_mixer_init = jax.jit(_H0.init)  # compiled once for all seeds
_mixer = jax.jit(
  lambda p, x, c, mode: (_H0 if mode else _NONE).apply({"params": p}, x, c),
  static_argnums=3,
  compiler_options=common.FAST,
)


@seeds.each()
def test_h0_mixer_depends_on_the_condition(seed):
  """The mixer alone: with 'h0' its output changes with c; with 'none' c is ignored; 'h0' with
  cond_proj zeroed (initial state 0) is the plain mixer."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 9, 16)).astype(np.float32)
  c1, c2 = (rng.standard_normal((2, 24)).astype(np.float32) for _ in range(2))
  params = jax.device_get(_mixer_init(jax.random.key(seed), x, c1)["params"])
  run = lambda p, c, mode: _mixer(p, x, c, mode)
  assert _rel(run(params, c1, True), run(params, c2, True)) > 1e-3, f"seed {seed}"
  plain = {k: v for k, v in params.items() if k != "cond_proj"}
  np.testing.assert_array_equal(
    run(plain, c1, False), run(plain, c2, False), err_msg=f"seed {seed}"
  )
  zeroed = dict(params, cond_proj=jax.tree_util.tree_map(np.zeros_like, params["cond_proj"]))
  np.testing.assert_allclose(
    run(zeroed, c1, True), run(plain, c1, False), rtol=0, atol=1e-6, err_msg=f"seed {seed}"
  )


def _without_cond_proj(params, zero=False):
  """A copy of the tree with every cond_proj removed (or zeroed)."""
  out = jax.tree_util.tree_map(lambda a: a, params)
  for branch in ("spatial_mamba", "freq_mamba"):
    mixer = out["groups"]["block_0"][branch]["mixer"]
    if zero:
      mixer["cond_proj"] = jax.tree_util.tree_map(np.zeros_like, mixer["cond_proj"])
    else:
      del mixer["cond_proj"]
  return out


@seeds.each()
def test_h0_model_changes_with_label_and_equals_none_with_zero_cond_proj(seed):
  mc_h0 = common.tiny_config(depth=DEPTH, cond_mamba="h0")
  model_h0, f_h0 = common.forward(mc_h0)
  _, f_none = common.forward(common.tiny_config(depth=DEPTH))
  params = common.filled_params(model_h0, mc_h0, seed=2)
  x, t, y = common.inputs(mc_h0, batch=3, seed=seed)
  out = np.asarray(f_h0(params, x, t, y))
  changed = np.asarray(f_h0(params, x, t, (y + 1) % mc_h0.num_classes))
  assert min(_rel(changed[i], out[i]) for i in range(3)) > 1e-3, f"seed {seed}"
  plain = np.asarray(f_none(_without_cond_proj(params), x, t, y))
  assert _rel(out, plain) > 1e-3, f"seed {seed}"  # the initial state matters
  zeroed = np.asarray(f_h0(_without_cond_proj(params, zero=True), x, t, y))
  assert _rel(zeroed, plain) < 1e-6, f"seed {seed}"


# ---------------------------------------------------------------- bfloat16


@seeds.each()
def test_bfloat16_forward_close_to_float32(seed):
  mc32 = common.tiny_config(depth=DEPTH)
  model, f32 = common.forward(mc32)
  _, bf16 = common.forward(common.tiny_config(depth=DEPTH, dtype="bfloat16"))
  params = common.filled_params(model, mc32, seed=3)
  x, t, y = common.inputs(mc32, batch=4, seed=seed)
  ref, out = np.asarray(f32(params, x, t, y)), bf16(params, x, t, y)
  assert out.dtype == jnp.float32  # output promoted; parameters stay float32
  out = np.asarray(out)
  assert np.all(np.isfinite(out))
  # bfloat16 keeps 8 significant bits (2^-8 = 0.4 %) per rounding; through 8 blocks, 8 shared
  # transformer applications and the scans the error stays a few percent of the output.
  err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert 1e-4 < err < 5e-2, (err, f"seed {seed}")  # > 1e-4: really computed in bfloat16


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
  "name,input_size,num_classes,key,with_cond_proj,without",
  [
    (
      "DiMSUM-L/2",
      32,
      1000,
      "DiM-L/2 ImageNet-256 (1000 classes + null row)",
      459_916_304,
      426_329_104,
    ),
    (
      "DiMSUM-B/2",
      32,
      1000,
      "DiM-B/2 ImageNet-256 (1000 classes + null row)",
      198_547_216,
      184_373_008,
    ),
    (
      "DiMSUM-XL/2",
      32,
      1000,
      "DiM-XL/2 ImageNet-256 (1000 classes + null row)",
      854_831_248,
      791_074_960,
    ),
    (
      "DiMSUM-L/2",
      64,
      0,
      "DiM-L/2 unconditional 512 (1-row label table)",
      459_678_736,
      426_091_536,
    ),
  ],
)
def test_parameter_counts_match_upstream(
  name, input_size, num_classes, key, with_cond_proj, without
):
  """jax.eval_shape (nothing allocated): with cond_mamba='h0' the model has upstream's cond_proj
  layers and upstream's exact total (golden manifest, counted from the official model); without
  them ('none', as released) the total less cond_proj. (B/2 and L/2 'none' are also checked
  module by module in tests/test_flops.py.)"""
  expected = manifest()["l2"]["param_counts"][key]
  assert (expected["total"], expected["total_without_cond_proj"]) == (with_cond_proj, without)
  mc = common.tiny_config(
    name=name,
    input_size=input_size,
    num_classes=num_classes,
    depth=-1,
    hidden_size=-1,
    attn_every=4,
    cond_mamba="h0",
  )
  model = create_model(mc)
  y = jnp.zeros((1,), jnp.int32) if num_classes else None
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), jnp.zeros((1, input_size, input_size, 4)), jnp.zeros((1,)), y
    )
  )
  assert common.count(shapes["params"]) == with_cond_proj
  assert common.count(shapes["params"], skip="cond_proj") == without


# ---------------------------------------------------------------- bad input


def _init_shapes(mc, x_shape=None):
  model = create_model(mc)
  size = mc.input_size
  x = jnp.zeros(x_shape or (1, size, size, 4))
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  )


@pytest.mark.parametrize(
  "overrides,message",
  [
    (
      dict(hidden_size=40),
      "hidden_size 40: each half (20) must be divisible by 16 for the "
      "wavelet token layout; use a multiple of 32.",
    ),
    (
      dict(input_size=9),
      "input_size 9 is not divisible by patch_size 2: pick an image/latent "
      "size that is a multiple of it.",
    ),
    (dict(input_size=12), "The 6x6 token grid must be divisible by 4 for 2 wavelet levels"),
    (
      dict(scan_type="zigzag_8"),
      "--config.model.scan_type=zigzag_8 is not a valid choice: use one of none, v2, sweep_8",
    ),
    (
      dict(cond_mamba="prefix"),
      "--config.model.cond_mamba=prefix is not a valid choice: use one of none, h0.",
    ),
    (dict(depth=3, attn_every=2), "depth 3 must be a multiple of attn_every 2"),
  ],
)
def test_impossible_model_raises_clear_error(overrides, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    _init_shapes(common.tiny_config(**overrides))


@pytest.mark.parametrize(
  "overrides,message",
  [
    (
      dict(name="DiMSUM-M/2"),
      "--config.model.name=DiMSUM-M/2 is not a valid choice: use one of DiMSUM-B/2, ",
    ),
    (dict(dtype="float16"), "--config.model.dtype=float16 is not a valid choice: use one of"),
    (dict(heads=4), "Unknown model config keys ['heads']; valid keys:"),
  ],
)
def test_unknown_names_raise(overrides, message):
  cfg = dict(common.tiny_config().to_dict(), **overrides)
  with pytest.raises(ValueError, match=re.escape(message)):
    create_model(cfg)


def test_channels_first_input_is_refused():
  with pytest.raises(
    ValueError, match=re.escape("Expected inputs [b, 8, 8, 4] (channels last), got (1, 4, 8, 8).")
  ):
    _init_shapes(common.tiny_config(), (1, 4, 8, 8))


# ---------------------------------------------------------------- stochastic depth, labels


@seeds.each()
def test_drop_path_identity_at_eval_and_per_sample_at_train(seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((4000, 3, 5)).astype(np.float32)
  np.testing.assert_array_equal(drop_path(x, 0.3, True), x)
  out = np.asarray(drop_path(x, 0.3, False, jax.random.key(int(rng.integers(1 << 30)))))
  kept = np.all(out != 0, axis=(1, 2))
  dropped = np.all(out == 0, axis=(1, 2))
  assert np.all(kept | dropped)  # a whole sample is kept or dropped
  np.testing.assert_allclose(out[kept], x[kept] / 0.7, rtol=1e-6, err_msg=f"seed {seed}")
  # Bernoulli(0.3), 4000 samples: std 0.007, so 5 standard deviations.
  assert abs(dropped.mean() - 0.3) < 0.035, (dropped.mean(), f"seed {seed}")


@seeds.each()
def test_label_dropout_uses_the_null_row(seed):
  emb = LabelEmbedder(10, 8, dropout=0.5)
  y = np.random.default_rng(seed).integers(0, 10, 2000).astype(np.int32)
  params = jax.device_get(emb.init(jax.random.key(0), y)["params"])
  table = params["embedding_table"]["embedding"]
  assert table.shape == (11, 8)  # 10 classes + the null row
  np.testing.assert_array_equal(emb.apply({"params": params}, y), table[y])
  out = np.asarray(
    emb.apply({"params": params}, y, train=True, rngs={"dropout": jax.random.key(seed)})
  )
  null = np.all(out == table[10], axis=1)
  np.testing.assert_array_equal(out[~null], table[y][~null])
  # Bernoulli(0.5), 2000 labels: std 0.011, so 4.5 standard deviations.
  assert abs(null.mean() - 0.5) < 0.05, (null.mean(), f"seed {seed}")
  # The CFG null label reads the same row; an unconditional model has a single row.
  np.testing.assert_array_equal(
    emb.apply({"params": params}, np.full(3, 10)), np.repeat(table[10:], 3, 0)
  )
  uncond = LabelEmbedder(0, 8)
  assert uncond.init(jax.random.key(0), None)["params"]["embedding_table"]["embedding"].shape == (
    1,
    8,
  )


@seeds.each()
def test_model_stochastic_depth_and_label_dropout(seed):
  """label_dropout 1 and drop_path 0.9 (per-block rates [0, 0, p/7, ..., 6p/7], upstream's
  [0] + linspace(0, p, depth)). At eval: the model equals the one without either. At train on
  16 copies of one sample: the labels are all replaced by the null label (same output as
  passing the null label, same rng), and each copy draws its own stochastic-depth masks."""
  mc = common.tiny_config(depth=DEPTH, drop_path=0.9, label_dropout=1.0)
  model, f_eval = common.forward(mc)
  _, f_train = common.forward(mc, train=True)
  _, f_plain = common.forward(common.tiny_config(depth=DEPTH))
  params = common.filled_params(model, mc, seed=4)
  x, t, y = (np.repeat(a, 16, 0) for a in common.inputs(mc, batch=1, seed=seed))
  null = np.full_like(y, mc.num_classes)
  ev = np.asarray(f_eval(params, x, t, y))
  np.testing.assert_array_equal(ev, f_plain(params, x, t, y))
  np.testing.assert_array_equal(ev, np.repeat(ev[:1], 16, 0))
  assert _rel(ev, f_eval(params, x, t, null)) > 1e-3  # the label matters at eval
  key = jax.random.key(seed)
  tr = np.asarray(f_train(params, x, t, y, key))
  np.testing.assert_array_equal(tr, f_train(params, x, t, null, key))
  distinct = []
  for row in tr:
    if not any(_rel(row, d) < 1e-5 for d in distinct):
      distinct.append(row)
  assert len(distinct) >= 2, f"all 16 copies drew the same stochastic-depth masks (seed {seed})"
  assert all(np.all(np.isfinite(row)) for row in distinct)


# ---------------------------------------------------------------- scan orders


@seeds.each()
def test_every_scan_type_gives_valid_permutations_and_a_different_output(seed):
  """Depth 8 on a 4x4 token grid (enough for sweep_4 and sweep_8 to differ: block 4 uses path
  4 vs path 0): the per-block orders of both branches are permutations, and the model outputs
  of all scan types differ pairwise. That the orders reach the blocks as given is checked by
  the unrolled model (published orders) and the golden files."""
  grid, n = 4, 16
  mc0 = common.tiny_config(depth=DEPTH)
  params = common.filled_params(create_model(mc0), mc0, seed=6)
  x, t, y = common.inputs(mc0, batch=2, seed=seed)
  outs = {}
  for scan_type in scan_orders.SCAN_TYPES:
    mc = common.tiny_config(depth=DEPTH, scan_type=scan_type, bidirectional=scan_type == "v2")
    model, f = common.forward(mc)
    for perms in common.orders(scan_type, DEPTH, grid):
      assert perms.shape == (DEPTH, n)
      np.testing.assert_array_equal(np.sort(perms, -1), np.broadcast_to(np.arange(n), perms.shape))
    p = params
    if scan_type == "v2":  # bidirectional mixers: a second set of SSM weights
      p = common.filled_params(model, mc, seed=6)
      assert "A_b_log" in p["groups"]["block_0"]["spatial_mamba"]["mixer"]
    outs[scan_type] = np.asarray(f(p, x, t, y))
    assert np.all(np.isfinite(outs[scan_type]))
  names = list(outs)
  for i, a in enumerate(names):
    for b in names[i + 1 :]:
      assert _rel(outs[a], outs[b]) > 1e-3, (a, b, f"seed {seed}")


# ---------------------------------------------------------------- initialisation


def _sincos_table(dim, grid):
  """MAE's 2-D sin-cos table written out per entry: column first, then row; [sin, cos] halves."""
  quarter = dim // 4
  table = np.zeros((grid * grid, dim))
  for row in range(grid):
    for col in range(grid):
      for i in range(quarter):
        omega = 1.0 / 10000 ** (i / quarter)
        token = row * grid + col
        table[token, i] = np.sin(col * omega)
        table[token, quarter + i] = np.cos(col * omega)
        table[token, 2 * quarter + i] = np.sin(row * omega)
        table[token, 3 * quarter + i] = np.cos(row * omega)
  return table


def _assert_uniform(w, bound):
  """w ~ U(-bound, bound): inside the bound, reaching near it, with the uniform's std."""
  w = np.asarray(w, np.float64).ravel()
  assert w.size > 2000
  assert np.abs(w).max() <= bound * (1 + 1e-6)
  assert np.abs(w).max() > 0.95 * bound
  np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.06)
  assert abs(w.mean()) < 0.05 * bound


def _assert_normal(w, std):
  w = np.asarray(w, np.float64).ravel()
  np.testing.assert_allclose(w.std(), std, rtol=0.06)
  assert abs(w.mean()) < 0.1 * std


@pytest.fixture(scope="module")
def initialised():
  """(model, jitted init: key -> params), compiled once for all seeds."""
  mc = common.tiny_config(hidden_size=256, depth=8, attn_every=4, input_size=16, num_classes=1000)
  model = create_model(mc)
  x, t, y = common.inputs(mc, batch=1, seed=0)
  return model, jax.jit(lambda key: model.init(key, x, t, y)["params"])


@seeds.each()
def test_initialisation_follows_upstream(initialised, seed):
  """Upstream's DiM.initialize_weights + _init_weights + Mamba's init (upstream `dimsum/models_dim.py`, `mamba_ssm/modules/mamba_simple.py`),
  from the init key PRNGKey(seed)."""
  model, init = initialised
  p = jax.tree_util.tree_map(np.asarray, init(jax.random.PRNGKey(seed)))
  D, depth, patch = model.hidden_size, model.depth, model.patch_size
  d = D // 2
  E, n, k = MambaMixer.expand * d, MambaMixer.d_state, MambaMixer.d_conv
  rank = int(np.ceil(d / 16))
  g = model.input_size // patch

  np.testing.assert_allclose(p["pos_embed"], _sincos_table(D, g), atol=1e-6)
  _assert_uniform(p["x_embedder"]["proj"]["kernel"], np.sqrt(6 / (4 * patch * patch + D)))
  _assert_normal(p["y_embedder"]["embedding_table"]["embedding"], 0.02)
  for layer in ("mlp_0", "mlp_2"):
    _assert_normal(p["t_embedder"][layer]["kernel"], 0.02)
  # Zero: each block's MLP adaLN and the whole final layer.
  for leaf in jax.tree_util.tree_leaves(
    [p["final_layer"]]
    + [p["groups"][f"block_{j}"]["adaLN_modulation"] for j in range(model.attn_every)]
  ):
    assert not np.any(leaf)
  # Every Linear bias is zero (conv biases and dt_proj's bias are not Linear biases here).
  biases = [
    leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(p)[0]
    if getattr(path[-1], "key", None) == "bias"
  ]
  assert len(biases) > 20 and not any(np.any(b) for b in biases)

  blocks = [p["groups"][f"block_{j}"] for j in range(model.attn_every)]
  stack = lambda get: np.stack([get(b) for b in blocks])
  for branch in ("spatial_mamba", "freq_mamba"):
    mixer = lambda b: b[branch]["mixer"]
    # Not zero-initialised: the half-branches' adaLN (PyTorch default Linear init).
    _assert_uniform(
      stack(lambda b: b[branch]["adaLN_modulation"]["linear"]["kernel"]), 1 / np.sqrt(D)
    )
    _assert_uniform(stack(lambda b: mixer(b)["in_proj"]["kernel"]), 1 / np.sqrt(d))
    # out_proj re-drawn with the default init and divided by sqrt(depth).
    _assert_uniform(
      stack(lambda b: mixer(b)["out_proj"]["kernel"]), 1 / np.sqrt(E) / np.sqrt(depth)
    )
    _assert_uniform(stack(lambda b: mixer(b)["x_proj"]["kernel"]), 1 / np.sqrt(E))
    _assert_uniform(stack(lambda b: mixer(b)["conv1d_kernel"]), 1 / np.sqrt(k))
    _assert_uniform(stack(lambda b: mixer(b)["dt_proj_kernel"]), rank**-0.5)
    a_log = stack(lambda b: mixer(b)["A_log"])
    np.testing.assert_allclose(
      a_log, np.broadcast_to(np.log(np.arange(1, n + 1)), a_log.shape), rtol=1e-6
    )
    assert np.all(stack(lambda b: mixer(b)["D"]) == 1)
    # softplus(dt_bias) = dt with log dt ~ U(log 1e-3, log 1e-1).
    log_dt = np.log(np.logaddexp(0, stack(lambda b: mixer(b)["dt_proj_bias"]).astype(np.float64)))
    assert log_dt.min() >= np.log(1e-3) - 1e-4 and log_dt.max() <= np.log(1e-1) + 1e-4
    np.testing.assert_allclose(log_dt.mean(), np.log(1e-2), atol=0.25)
    np.testing.assert_allclose(log_dt.std(), np.log(100) / np.sqrt(12), rtol=0.1)
  assert np.all(stack(lambda b: b["norm"]["weight"]) == 1)
  # Shared block: adaLN weight default-initialised (not zero), its bias zero.
  _assert_uniform(p["attn_block"]["adaLN_modulation"]["linear"]["kernel"], 1 / np.sqrt(D))
  _assert_uniform(stack(lambda b: b["mlp"]["w12"]["kernel"]), 1 / np.sqrt(D))


# ---------------------------------------------------------------- rematerialisation


@pytest.mark.parametrize(
  "name,overrides",
  [
    pytest.param("DiMSUM-L/2", dict(drop_path=0.2), marks=pytest.mark.slow),  # 19 s on 2 cores
    ("DiT-S/2", dict(hidden_size=48, depth=2)),
  ],
)
def test_remat_changes_memory_not_values(name, overrides):
  """remat='dots' / 'dots_mlp' / 'full' recompute parts of each block group in the backward: the parameter tree,
  the training-mode loss (drop path and label dropout through the lifted rngs) and every gradient
  equal those of remat='none' (float64, so only the order of operations could differ)."""
  with jax.enable_x64(True):
    base = common.tiny_config(name=name, dtype="float64", **overrides)
    x, t, y = common.inputs(base, batch=3, dtype=np.float64)
    rngs = {"params": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}
    # Zero-initialised layers (adaLN-Zero, the final layer) would hide most gradients: shift
    # every parameter by a fixed non-zero pattern.
    shift = lambda a: a + 0.05 * np.cos(np.arange(a.size) * 0.7).reshape(a.shape)
    results = {}
    for remat in layers.REMAT_POLICIES:
      model = create_model(dict(base, remat=remat))
      init = jax.jit(
        lambda r, model=model: model.init(r, x, t, y)["params"], compiler_options=common.FAST
      )
      params = jax.tree_util.tree_map(shift, init(rngs))

      def loss(p, model=model):
        out = model.apply(
          {"params": p}, x, t, y, train=True, rngs={"dropout": jax.random.PRNGKey(3)}
        )
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

      results[remat] = (
        params,
        *jax.jit(jax.value_and_grad(loss), compiler_options=common.FAST)(params),
      )
    params, value, grads = results["none"]
    assert abs(float(value)) > 1e-3
    for remat in set(layers.REMAT_POLICIES) - {"none"}:
      p, v, g = results[remat]
      assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(params)
      jax.tree_util.tree_map(np.testing.assert_array_equal, p, params)
      np.testing.assert_allclose(v, value, rtol=1e-12)
      jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), g, grads
      )


def test_unknown_remat_is_refused():
  with pytest.raises(ValueError, match="--config.model.remat=some is not a valid choice"):
    create_model(common.tiny_config(remat="some")).init(
      jax.random.PRNGKey(0), *common.inputs(common.tiny_config(), batch=1)
    )


# ---------------------------------------------------------------- attention implementations


def test_cudnn_attention_off_gpu_names_the_fix():
  mc = common.tiny_config(attention_impl="cudnn", dtype="bfloat16")
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
    create_model(mc).init(jax.random.PRNGKey(0), *common.inputs(mc, batch=1))
  with pytest.raises(ValueError, match="--config.model.attention_impl=flash is not a valid choice"):
    create_model(common.tiny_config(attention_impl="flash")).init(
      jax.random.PRNGKey(0), *common.inputs(mc, batch=1)
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
  "name,overrides",
  [
    ("DiMSUM-L/2", dict(hidden_size=128, depth=2, attn_every=2, input_size=16)),
    ("DiT-S/2", dict(hidden_size=384, depth=2, input_size=16)),
  ],
)
def test_cudnn_attention_matches_xla(name, overrides):
  """On an NVIDIA GPU (pytest -m gpu -n 0): cuDNN's fused attention gives the XLA path's output and
  gradients within bfloat16 rounding."""
  assert jax.default_backend() == "gpu", (
    "run with `pytest -m gpu -n 0` on a host with an NVIDIA GPU"
  )
  outs = {}
  for impl in ("xla", "cudnn"):
    mc = common.tiny_config(
      name=name, dtype="bfloat16", attention_impl=impl, scan_impl="auto", **overrides
    )
    model = create_model(mc)
    x, t, y = common.inputs(mc, batch=4, seed=0)
    params = model.init(jax.random.PRNGKey(0), x, t, y)["params"]
    params = jax.tree_util.tree_map(
      lambda a: a + 0.05 * np.cos(np.arange(a.size) * 0.7).reshape(a.shape), params
    )
    loss = lambda p, model=model: jnp.mean(model.apply({"params": p}, x, t, y) ** 2)
    outs[impl] = jax.jit(jax.value_and_grad(loss))(params)
  (v0, g0), (v1, g1) = outs["xla"], outs["cudnn"]
  np.testing.assert_allclose(v1, v0, rtol=2e-2)
  assert (
    _rel(
      np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(g1)]),
      np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(g0)]),
    )
    < 3e-2
  )


def test_unrolled_group_scan_changes_nothing_but_the_program():
  """scan_unroll > 1 runs several block groups per iteration of the stack's scan in training-mode
  calls (3 here: all of them, straight-line code, as 0 asks): the parameter tree, the training-mode
  value (drop path and label dropout through the lifted rngs) and every gradient equal the rolled
  scan's in float64; 2 of 3 groups leaves a remainder iteration. Inference calls run the rolled
  loop whatever scan_unroll says; inference_scan_unroll=0 unrolls them with the rolled loop's
  value; scan_unroll=-1 is one sentence."""
  with jax.enable_x64(True):
    base = common.tiny_config(dtype="float64", depth=3, drop_path=0.2)  # 3 groups of one block
    x, t, y = common.inputs(base, batch=2, dtype=np.float64)
    rngs = {"params": jax.random.PRNGKey(4), "dropout": jax.random.PRNGKey(5)}
    shift = lambda a: a + 0.05 * np.cos(np.arange(a.size) * 0.3).reshape(a.shape)
    results = {}
    for unroll in (1, 2, 3):
      model = create_model(dict(base, scan_unroll=unroll))
      params = jax.tree_util.tree_map(shift, jax.jit(model.init)(rngs, x, t, y)["params"])

      def loss(p, model=model):
        out = model.apply(
          {"params": p}, x, t, y, train=True, rngs={"dropout": jax.random.PRNGKey(6)}
        )
        return jnp.sum(out * jnp.sin(jnp.arange(out.size).reshape(out.shape)))

      results[unroll] = (params, *jax.jit(jax.value_and_grad(loss))(params))
    params, value, grads = results[1]
    assert abs(float(value)) > 1e-3
    for unroll in (2, 3):
      p, v, g = results[unroll]
      jax.tree_util.tree_map(np.testing.assert_array_equal, p, params)
      np.testing.assert_allclose(v, value, rtol=1e-12)
      jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), g, grads
      )
    # scan_unroll=0 is the program of 3 (all groups) in training and the rolled loop otherwise.
    model = create_model(dict(base, scan_unroll=0))
    unrolls = {}
    for train in (True, False):
      jaxpr = jax.make_jaxpr(
        lambda p, train=train: model.apply(
          {"params": p}, x, t, y, train=train, rngs={"dropout": jax.random.PRNGKey(6)}
        )
      )(params)
      unrolls[train] = [e.params["unroll"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert unrolls == {True: [3], False: [1]}, unrolls
    inference = lambda m: jax.jit(lambda p: m.apply({"params": p}, x, t, y))
    unrolled = create_model(dict(base, inference_scan_unroll=0))
    jaxpr = jax.make_jaxpr(lambda p: unrolled.apply({"params": p}, x, t, y))(params)
    assert [e.params["unroll"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"] == [3]
    np.testing.assert_allclose(
      inference(unrolled)(params), inference(create_model(base))(params), rtol=1e-12, atol=1e-14
    )
  with pytest.raises(ValueError, match=r"scan_unroll=-1 must be 0 \(every block group"):
    model = create_model(dict(common.tiny_config(), scan_unroll=-1))
    model.init(rngs, *common.inputs(common.tiny_config(), batch=1))


@seeds.each(5)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_branch_scans_share_one_kernel_call_at_small_batch(seed, bidirectional, monkeypatch):
  """At batch 1 the spatial and wavelet branches' selective scans (two each when bidirectional)
  run as one Pallas call (the kernel interpreted on the CPU): 1 / 2 or 1 / 4 of the calls of one per
  scan, the same output bit for bit, and the sequential scan's output to float32 rounding."""
  mc = common.tiny_config(scan_impl="pallas", bidirectional=bidirectional)
  model = create_model(mc)
  params = common.filled_params(model, mc, seed=seed)
  x, t, y = common.inputs(mc, batch=1, seed=seed)

  def run():
    fn = lambda p: model.apply({"params": p}, x, t, y)
    calls = kernel_calls(fn, params)
    return calls, jax.jit(fn)(params)

  fused_calls, fused = run()
  monkeypatch.setattr(ss, "FUSE_MAX_PROGRAMS", 0)
  apart_calls, apart = run()
  scans = 4 if bidirectional else 2
  assert fused_calls >= 1 and apart_calls == scans * fused_calls, (fused_calls, apart_calls)
  np.testing.assert_array_equal(fused, apart)
  sequential = create_model(dict(mc, scan_impl="sequential")).apply({"params": params}, x, t, y)
  assert _rel(fused, sequential) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("scan_type", ["none", "sweep_8"])
@seeds.each()
def test_hoisted_adaln_is_the_same_function(scan_type, seed):
  """inference_hoist_adaln computes every block's adaLN Linear (block, spatial and wavelet
  branch, shared transformer) before the stack, one batched matmul per block position: in
  float64, with every weight random (the zero-initialised adaLN too), the output equals the
  per-block Linears' (2 groups of 2 blocks; fixed and per-block scan orders), and the scanned
  body holds 3 x 2 + 1 = 7 matmuls fewer. Training-mode calls keep the per-block Linears."""
  with jax.enable_x64(True):
    base = common.tiny_config(dtype="float64", depth=4, attn_every=2, scan_type=scan_type)
    x, t, y = common.inputs(base, batch=2, dtype=np.float64, seed=seed)
    model, hoisted = create_model(base), create_model(dict(base, inference_hoist_adaln=True))
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), x, t, y)["params"]
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    params = jax.tree.unflatten(treedef, [a + 0.1 * rng.standard_normal(a.shape) for a in leaves])
    apply = lambda m, **kw: jax.jit(lambda p: m.apply({"params": p}, x, t, y, **kw))
    want, got = apply(model)(params), apply(hoisted)(params)
    assert float(jnp.abs(want).max()) > 1e-2, f"seed {seed}"
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12, err_msg=f"seed {seed}")

    def body_dots(m, train):
      jaxpr = jax.make_jaxpr(
        lambda p: m.apply(
          {"params": p}, x, t, y, train=train, rngs={"dropout": jax.random.PRNGKey(0)}
        )
      )(params)
      (scan,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
      return count_calls(scan.params["jaxpr"], "dot_general")

    assert body_dots(model, False) - body_dots(hoisted, False) == 7
    assert body_dots(model, True) == body_dots(hoisted, True)
