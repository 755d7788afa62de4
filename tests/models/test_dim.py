"""DiM (models/dim.py, dim_convert.py) against the official code: golden outputs and every
intermediate of shared/golden/dim (float64 to 1e-12, float32 to 2e-4 as its README says), the
published parameter counts and key set, the position-table transfer, Upsample Guidance, the
scan over depth, gradients, and the one-sentence refusals.

Golden arrays are NCHW (PyTorch); the model is NHWC. Relative errors are max |diff| / max |ref|.
"""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax import dpm_solver, upsample_guidance
from dimsum_jax.models import create_model, default_model_config, dim, dim_convert
from dimsum_jax.tools import hashfill
from tests import seeds
from tests.golden import golden_file
from tests.models import common

F64_TOL = 1e-12
F32_TOL = 2e-4


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def _nchw(a):
  return np.transpose(np.asarray(a), (0, 3, 1, 2))


@functools.lru_cache(None)
def _manifest():
  with open(golden_file("dim/manifest.json")) as f:
    return json.load(f)


@functools.lru_cache(None)
def _golden(name):
  return dict(np.load(golden_file(f"dim/{name}.npz")))


def _wide_fill(key, shape, seed=7):
  """wide.npz's weights by the README's formula (hashfill's SplitMix64 stream, DiM's rules)."""
  u = hashfill.uniform_stream(key, int(np.prod(shape)), seed).reshape(shape)
  if key.endswith("A_log"):
    v = np.log1p(np.arange(shape[-1], dtype=np.float64)) + 0.25 * u
  elif key.endswith("attn1.D"):
    v = 1 + 0.5 * u
  elif key.endswith("dt_proj.bias"):
    v = -4 + 2 * u
  elif key.endswith("norm.weight"):
    v = 1 + 0.25 * u
  elif key == "label_emb.weight" or key.endswith("embedding_table.weight"):
    v = u
  elif key in (
    "additional_embed",
    "a4m_adapter.pad_token",
    "a4m_adapter.pad_token_dec_split",
  ) or key.endswith("scale_shift_table"):
    v = 0.5 * u
  elif len(shape) >= 2:
    v = np.sqrt(3.0 / np.prod(shape[1:])) * u
  else:
    v = 0.1 * u
  return v.astype(np.float32)


def _state_dict(case):
  keys = _manifest()[case]["state_dict"]
  if case == "wide":
    return {k: _wide_fill(k, tuple(shape)) for k, (shape, _) in keys.items()}
  data = _golden(case)
  return {k: data[k] for k in keys}


def _model(case, dtype):
  cfg = json.loads(str(_golden(case)["config_json"]))
  return dim.DiM(**dim_convert.model_kwargs(cfg), scan_impl="reference", dtype=dtype)


@functools.lru_cache(None)
def _forward(case, dtype_name):
  """(model, params, jitted apply(params, x, t, y) -> (out, intermediates)) of a golden case."""
  dtype = {"float64": jnp.float64, "float32": jnp.float32}[dtype_name]
  model = _model(case, dtype)
  params = dim_convert.from_upstream(_state_dict(case), model, dtype=np.dtype(dtype_name))

  def run(params, x, t, y):
    out, state = model.apply({"params": params}, x, t, y, mutable=["intermediates"])
    return out, state["intermediates"]

  return model, params, jax.jit(run, compiler_options=common.FAST)


def _run(case, dtype_name, y=None):
  data = _golden(case)
  model, params, fn = _forward(case, dtype_name)
  f = np.dtype(dtype_name)
  with jax.enable_x64(dtype_name == "float64"):
    out, inter = fn(
      params, _nhwc(data["x"]).astype(f), data["t"].astype(f), data["y"] if y is None else y
    )
    return _nchw(out), jax.tree.map(np.asarray, inter)


def _streams(inter):
  """Stream after every block, in its scan order: [depth, b, L, D]."""
  return np.concatenate(
    [
      inter["block_0"]["stream"][0][None],
      inter["in_blocks"]["block"]["stream"][0],
      inter["out_blocks"]["block"]["stream"][0],
    ]
  )


# ---------------------------------------------------------------- golden forwards


def _ours(inter, name):
  """Our intermediate under the golden file's name (without the _f64 suffix)."""
  block0 = inter["block_0"]
  table = {
    "patch_tokens": inter["patch_tokens"][0],
    "t_token": inter["t_token"][0],
    "y_token": inter["y_token"][0],
    "adaln_c": inter["adaln_c"][0],
    "adaln_out": inter["adaln_out"][0],
    "tokens_in": inter["tokens_in"][0],
    "first_smoother_out": _nchw(inter["first_smoother_out"][0]),
    "seq_prepared": inter["seq_prepared"][0],
    "block0_norm_out": block0["norm_out"][0],
    "block0_mixer_in": block0["mixer_in"][0],
    "block0_mamba_out": block0["mamba_out"][0],
    "block0_out": block0["block_out"][0],
    "blocks_stream": _streams(inter),
    "blocks_stream_f64as32": _streams(inter),
    "blocks_stream_rms": np.sqrt((_streams(inter) ** 2).mean(axis=(1, 2, 3))),
    # the first consumer's skip_linear (block (depth + 1) / 2)
    "skip_linear_out": inter["out_blocks"]["block"]["skip_linear_out"][0][0],
    "seq_before_finalize": inter["seq_before_finalize"][0],
    "finalized_tokens": inter["finalized_tokens"][0],
    "norm_out": inter["final_norm"][0],
    "final_shift_scale": inter["final_shift_scale"][0],
    "final_layer_out": inter["final_layer_out"][0],
  }
  return table[name]


@pytest.mark.parametrize("case", ["tiny", "tiny_rho"])
def test_golden_float64_every_intermediate(case):
  """tiny: lateral padding, 4x4 tokens, 5 blocks; tiny_rho: rho_pad, a 6x4 grid, 9 blocks (every
  scan-order transition of the 49-block models). Output, null-label output and every stored
  intermediate to 1e-12 (the per-block streams of tiny_rho are stored rounded to float32)."""
  data = _golden(case)
  out, inter = _run(case, "float64")
  checked = {"out": _rel(out, data["out_f64"])}
  null = np.full_like(data["y"], _model(case, jnp.float64).num_classes)
  checked["out_null_label"] = _rel(_run(case, "float64", y=null)[0], data["out_null_label_f64"])
  for key in data:
    if key.endswith("_f64") and key[:-4] not in ("out", "out_null_label"):
      checked[key[:-4]] = _rel(_ours(inter, key[:-4]), data[key])
  if "blocks_stream_f64as32" in data:
    checked["blocks_stream_f64as32"] = _rel(
      _ours(inter, "blocks_stream"), data["blocks_stream_f64as32"]
    )
  bad = {
    k: v for k, v in checked.items() if v > (2e-7 if k == "blocks_stream_f64as32" else F64_TOL)
  }
  assert len(checked) >= 20 and not bad, (case, bad)


def test_golden_wide_split_skip_float64():
  """D = 1024 (DiM-L's width): the split skip_linear.0 / .1, weights by the README's formula
  (checked against the manifest's checksums), output and the stored slices to 1e-12."""
  sums = _manifest()["wide"]["hashfill_checksums"]
  state = _state_dict("wide")
  for key, (shape, total, first) in sums.items():
    assert list(state[key].shape) == shape, key
    np.testing.assert_allclose(state[key].astype(np.float64).sum(), total, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(state[key].reshape(-1)[:3], np.float32(first))
  data = _golden("wide")
  out, inter = _run("wide", "float64")
  cut = lambda a: a[..., :8, :16]
  streams = _streams(inter)
  errors = {
    "out": _rel(out, data["out_f64"]),
    "seq_prepared": _rel(cut(inter["seq_prepared"][0]), data["seq_prepared_slice_f64"]),
    "block0_out": _rel(cut(inter["block_0"]["block_out"][0]), data["block0_out_slice_f64"]),
    "skip_linear_1": _rel(
      cut(inter["out_blocks"]["block"]["skip_linear_1_out"][0][0]),
      data["skip_linear_1_out_slice_f64"],
    ),
    "streams": _rel(cut(streams), data["blocks_stream_slice_f64"]),
    "stream_rms": _rel(np.sqrt((streams**2).mean(axis=(1, 2, 3))), data["blocks_stream_rms_f64"]),
  }
  assert all(v < F64_TOL for v in errors.values()), errors


@pytest.mark.parametrize("case", ["tiny", "tiny_rho", "wide"])
def test_golden_float32(case):
  """Float32 against the float64 reference and upstream's own float32 output (2e-4 relative; most
  of the deviation is the float32 sin/cos tables at t near 1000, as upstream's)."""
  data = _golden(case)
  out, _ = _run(case, "float32")
  errors = (_rel(out, data["out_f64"]), _rel(out, data["out_f32"]))
  assert max(errors) < F32_TOL, (case, errors)


# ---------------------------------------------------------------- layout


@pytest.mark.parametrize("case", ["tiny", "tiny_rho"])
def test_scan_orders_and_skip_pairs_match_golden(case):
  data = _golden(case)
  model = _model(case, jnp.float32)
  h, w = model.table_grid()
  hp, wp = h + dim.PAD_LEN, w + dim.PAD_LEN
  absolute = np.stack([dim.pattern_order(p, hp, wp) for p in dim.scan_patterns(model.depth)])
  np.testing.assert_array_equal(absolute, data["scan_perm"])
  # Composing the per-block relative permutations gives each block's absolute order.
  perm, inverse = dim.block_orders(model.depth, hp, wp)
  order = np.arange(hp * wp)
  for k in range(model.depth):
    order = order[perm[k]]
    np.testing.assert_array_equal(order, data["scan_perm"][k])
    np.testing.assert_array_equal(perm[k][inverse[k]], np.arange(hp * wp))
  n_in = (model.depth - 1) // 2
  pairs = [(n_in + 1 + i, n_in - i) for i in range(n_in)]
  np.testing.assert_array_equal(pairs, data["skip_pairs"])


def test_scan_patterns_of_published_depth():
  published = _manifest()["param_counts_published"]["imagenet256_L_DiM"]
  assert dim.scan_patterns(49) == published["scan_patterns_per_block"]["(16, 16)"]
  assert [[25 + i, 24 - i] for i in range(24)] == published["skip_pairs_consumer_producer"]


# ---------------------------------------------------------------- sizes and the key set


def _abstract(name, size, classes=1000, channels=4, padding="lateral"):
  mc = default_model_config()
  mc.update(
    name=name, input_size=size, num_classes=classes, in_channels=channels, dim_padding=padding
  )
  model = create_model(mc)
  return model, dim_convert.abstract_params(model)


PUBLISHED = {  # manifest entry: (registry name, latent size, classes, channels, padding)
  "imagenet256_L_DiM": ("DiM-L/2", 32, 1000, 4, "lateral"),
  "imagenet256_H_DiM": ("DiM-H/2", 32, 1000, 4, "lateral"),
  "imagenet512_H_DiM_ft": ("DiM-H/2", 64, 1000, 4, "rho_pad"),
  "cifar10_S_DiM": ("DiM-S/2", 32, 10, 3, "lateral"),
}
UPSTREAM_MODULE = {
  "x_embedder": "pos_embed",
  "t_embedder": "adaln_single",
  "class_embedder": "adaln_single",
  "adaLN_modulation": "adaln_single",
  "pad_token": "a4m_adapter",
  "pad_token_dec_split": "a4m_adapter",
  "first_smoother": "a4m_adapter",
  "last_smoother": "a4m_adapter",
  "block_0": "transformer_blocks",
  "in_blocks": "transformer_blocks",
  "out_blocks": "transformer_blocks",
}


@pytest.mark.parametrize("entry", sorted(PUBLISHED))
def test_published_parameter_counts_and_key_set(entry):
  """jax.eval_shape (nothing allocated): the total and every upstream top-level module equal
  the official counts (386,063,376 / 862,407,184 / 863,586,832 / 50,568,716), and to_upstream
  of the tree gives exactly the official keys and shapes."""
  published = _manifest()["param_counts_published"][entry]
  model, abstract = _abstract(*PUBLISHED[entry])
  per = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    top = path[0].key
    per[UPSTREAM_MODULE.get(top, top)] = per.get(UPSTREAM_MODULE.get(top, top), 0) + leaf.size
  assert sum(per.values()) == published["total"]
  assert per == published["top_level"]
  empty = jax.tree.map(lambda s: np.empty(s.shape, np.float32), abstract)  # untouched memory
  shapes = {k: list(v.shape) for k, v in dim_convert.to_upstream(empty, model).items()}
  assert shapes == {k: v for k, v in published["state_dict"].items()}


def test_round_trip_on_official_key_set():
  """to_upstream(from_upstream(sd)) == sd, bit for bit, on the official DiM-S key set (CIFAR-10
  config, D = 512: the concat skip form) with values drawn from seed 0, and on the golden files'
  own weights (both skip forms, rho_pad, the skip-tune model)."""
  published = _manifest()["param_counts_published"]["cifar10_S_DiM"]["state_dict"]
  rng = np.random.default_rng(0)
  model, abstract = _abstract(*PUBLISHED["cifar10_S_DiM"])
  state = {k: rng.standard_normal(shape, np.float32) for k, shape in published.items()}
  cases = [(model, abstract, state)]
  for case in ("tiny", "tiny_rho", "upsample_guidance", "wide"):
    m = _model(case, jnp.float32)
    cases.append((m, dim_convert.abstract_params(m), _state_dict(case)))
  for model, abstract, state in cases:
    back = dim_convert.to_upstream(dim_convert.from_upstream(state, model, abstract), model)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
      assert back[key].dtype == np.float32 and np.array_equal(back[key], value), key


def test_from_upstream_names_every_bad_key():
  state = dict(_state_dict("tiny"))
  model = _model("tiny", jnp.float32)
  del state["transformer_blocks.3.attn1.D"]
  state["transformer_blocks.9.attn1.D"] = np.zeros(128, np.float32)
  state["a4m_adapter.pad_token"] = np.zeros((1, 3, 64), np.float32)
  with pytest.raises(dim_convert.DiMConvertError) as e:
    dim_convert.from_upstream(state, model)
  text = str(e.value)
  for key in (
    "transformer_blocks.3.attn1.D",
    "transformer_blocks.9.attn1.D",
    "a4m_adapter.pad_token: [1, 3, 64]",
  ):
    assert key in text


def test_model_kwargs_refuses_unimplemented_upstream_option():
  cfg = json.loads(str(_golden("tiny")["config_json"]))
  assert dim_convert.model_kwargs(cfg)["padding"] == "lateral"
  with pytest.raises(dim_convert.DiMConvertError, match="is_uconnect"):
    dim_convert.model_kwargs(dict(cfg, is_uconnect=False))


# ---------------------------------------------------------------- position tables


@pytest.mark.parametrize(
  "case", ["up2x_4to8", "up3x_4to12", "down2x_8to4", "down3x_12to4", "up_5to8"]
)
def test_position_table_resizing_matches_golden(case):
  data = _golden("pos_interp")
  src, dst = data[f"{case}_src"], data[f"{case}_dst"]
  out = dim_convert.resize_position_table(src, dst.shape[1] - 2)
  assert out.dtype == np.float64 and _rel(out, dst) < 1e-15


def test_256_to_512_transfer_matches_golden():
  """upstream load_pretrained_model from a 4x4-token model (D = 32, 3 blocks) into an 8x8-token
  one: the position table resized (float32, as upstream), the 56 other keys copied unchanged,
  and the 8x8 model's Flax tree takes the result."""
  data = _golden("pos_interp")
  models = [create_model(_tiny(hidden_size=32, depth=3, input_size=size)) for size in (8, 16)]
  src, dst = (_filled(m, seed) for m, seed in zip(models, (0, 1)))
  src["additional_embed"] = data["transfer_additional_embed_src"]
  out, kept = dim_convert.transfer_state_dict(src, dst)
  assert kept == [] and len(out) == _manifest()["pos_interp"]["transfer"]["keys_total"] == 57
  np.testing.assert_array_equal(out["additional_embed"], data["transfer_additional_embed_dst"])
  assert all(np.array_equal(out[k], src[k]) for k in out if k != "additional_embed")
  dim_convert.from_upstream(out, models[1])


# ---------------------------------------------------------------- Upsample Guidance


def test_upsample_guidance_matches_golden():
  """A rho_pad model with skip tune and a 64-token table, U-ViT guidance 3, m = 2: the guided
  prediction at t = 0.9 (full and 2x-pooled low-resolution calls, the table resized at run
  time) and at t = 0.5 (unguided), float64; the low-resolution time of every DPM-Solver call."""
  data = _golden("upsample_guidance")
  model = _model("upsample_guidance", jnp.float64)
  assert model.skip_tune == (0.82, 1.0) and model.padding == "rho_pad"
  params = dim_convert.from_upstream(_state_dict("upsample_guidance"), model, dtype=np.float64)
  for m in (2, 3):
    calls = data[f"dpm_calls_m{m}"]
    index, tau = upsample_guidance.upsample_guidance_times(calls[:, 0].astype(np.float32), m)
    np.testing.assert_array_equal(index, calls[:, 3])
    np.testing.assert_allclose(tau, calls[:, 1], rtol=0, atol=1e-7)
  with jax.enable_x64(True):
    net = lambda x, t, y: model.apply({"params": params}, x, t, y)
    guided = lambda x, t, y: dpm_solver.uvit_guided_noise(net, x, t, y, 3.0, 10)
    fn = jax.jit(
      upsample_guidance.make_upsample_guided_noise_fn(guided, 2), compiler_options=common.FAST
    )
    low = jax.jit(guided, compiler_options=common.FAST)
    x, y = _nhwc(data["x"]).astype(np.float64), data["y"]
    t = data["t090_t_continuous"]
    errors = {
      "t090_cfg_pred": _rel(_nchw(low(x, 1000 * t, y)), data["t090_cfg_pred_f64"]),
      "t090_low_pred": _rel(
        _nchw(low(_nhwc(data["t090_x_low_f64"]), data["t090_tau_model_f64"], y)),
        data["t090_low_pred_f64"],
      ),
      "t090_tau": _rel(
        1000 * np.asarray(upsample_guidance.upsample_guidance_times(t, 2)[1]),
        data["t090_tau_model_f64"],
      ),
      "t090_g_pred": _rel(_nchw(fn(x, t, y)), data["t090_g_pred_f64"]),
      "t050_g_pred": _rel(_nchw(fn(x, data["t050_t_continuous"], y)), data["t050_g_pred_f64"]),
    }
  assert all(v < F64_TOL for v in errors.values()), errors
  np.testing.assert_array_equal(data["t050_g_pred_f64"], data["t050_cfg_pred_f64"])


# ---------------------------------------------------------------- registry, scan, refusals


def _tiny(**overrides):
  mc = default_model_config()
  mc.update(
    name="DiM-L/2",
    hidden_size=32,
    depth=5,
    input_size=8,
    num_classes=10,
    label_dropout=0.15,
    scan_impl="reference",
    remat="none",
  )
  mc.update(overrides)
  return mc


def _filled(model, seed):
  """Upstream state dict of `model` with wide.npz's weight formula under `seed` (every weight
  non-zero and of a sensible size; no init to trace)."""
  empty = jax.tree.map(lambda s: np.empty(s.shape, np.float32), dim_convert.abstract_params(model))
  state = dim_convert.to_upstream(empty, model)
  return {k: _wide_fill(k, v.shape, seed) for k, v in state.items()}


def _lowered_text(depth):
  mc = _tiny(depth=depth)
  model = create_model(mc)
  abstract = dim_convert.abstract_params(model)
  x, t, y = (
    jax.ShapeDtypeStruct(s, d)
    for s, d in (((2, 8, 8, 4), jnp.float32), ((2,), jnp.float32), ((2,), jnp.int32))
  )
  return (
    jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    .lower(abstract, x, t, y)
    .as_text()
  )


def test_scan_bodies_are_traced_once_whatever_the_depth():
  """Depth 5 and the published 49 lower to programs with the same operations (three copies of
  the block: block 0 and the two scan bodies); only the index tables grow."""
  ops = lambda text: sorted(re.findall(r"stablehlo\.(\w+)", text))
  small, large = _lowered_text(5), _lowered_text(49)
  assert ops(small) == ops(large) and "while" in ops(small)
  assert len(small.splitlines()) == len(large.splitlines())


def test_bad_input_is_one_sentence_each():
  cases = [
    (dict(depth=4), "odd depth"),
    (dict(depth=1), "odd depth"),
    (dict(input_size=7), "not divisible by patch_size"),
    (dict(dim_padding="zigzag"), "dim_padding=zigzag is not a valid choice: use one of lateral"),
    (dict(drop_path=0.1), r"model.drop_path=0.1 has no effect on DiM-L/2"),
    (dict(wavelet_impl="jaxwt"), r"model.wavelet_impl='jaxwt' has no effect on DiM-L/2"),
    (dict(name="DiMSUM-L/2", dim_padding="rho_pad"), "has no effect on DiMSUM-L/2"),
    (dict(name="DiT-S/2", scan_impl="auto", dim_padding="rho_pad"), "has no effect on DiT-S/2"),
    (
      dict(name="DiT-S/2", scan_impl="auto", scan_type="sweep_4"),
      r"model.scan_type='sweep_4' has no effect",
    ),
    (dict(name="DiT-S/2", scan_impl="auto", drop_path=0.1), "leave it at its default 0.0"),
  ]
  for overrides, text in cases:
    with pytest.raises(ValueError, match=text) as e:
      create_model(_tiny(**overrides))
    message = str(e.value)
    assert "\n" not in message and message.endswith("."), message
  model = create_model(_tiny())
  params = dim_convert.abstract_params(model)
  for shape in ((1, 8, 16, 4), (1, 16, 4, 4)):  # 4x8 and 8x2 token grids
    with pytest.raises(ValueError, match="w = floor"):
      jax.eval_shape(
        lambda p: model.apply(
          {"params": p}, jnp.zeros(shape), jnp.zeros(1), jnp.zeros(1, jnp.int32)
        ),
        params,
      )
  assert dim.grid_allowed(6, 4) and dim.grid_allowed(5, 5) and not dim.grid_allowed(4, 6)


def test_unconditional_model_has_one_extra_token():
  mc = _tiny(num_classes=0)
  model = create_model(mc)
  abstract = dim_convert.abstract_params(model)
  assert "label_emb" not in abstract and "class_embedder" not in abstract
  assert abstract["additional_embed"].shape == (1 + 16, 32)
  model_fn = jax.jit(
    lambda p, x, t: model.apply({"params": p}, x, t, None), compiler_options=common.FAST
  )
  params = dim_convert.from_upstream(_filled(model, 0), model)
  out = model_fn(params, jnp.ones((2, 8, 8, 4)), jnp.array([1.0, 500.0]))
  assert out.shape == (2, 8, 8, 4) and out.dtype == jnp.float32 and np.isfinite(out).all()


@seeds.each(3)
def test_label_dropout_and_gradient_float64(seed):
  """Training forward with label dropout 1 equals the null-label forward (one draw for both
  tables); the float64 gradient (remat 'full', through both scans, the skips and the custom
  permutation VJP) matches a central difference along a random direction."""
  rng = np.random.default_rng(seed)
  mc = _tiny(dtype="float64", remat="full", label_dropout=1.0)
  model = create_model(mc)
  x = rng.standard_normal((2, 8, 8, 4))
  t = rng.uniform(1, 1000, size=2)
  y = rng.integers(0, 10, size=2).astype(np.int32)
  w = rng.standard_normal(x.shape)
  params = dim_convert.from_upstream(_filled(model, seed), model, dtype=np.float64)
  with jax.enable_x64(True):
    dropped, null = jax.jit(
      lambda p: (
        model.apply({"params": p}, x, t, y, train=True, rngs={"dropout": jax.random.key(0)}),
        model.apply({"params": p}, x, t, np.full(2, 10, np.int32)),
      ),
      compiler_options=common.FAST,
    )(params)
    assert _rel(dropped, null) == 0, seed

    def loss(p):
      return jnp.sum(model.apply({"params": p}, x, t, y) * w)

    value_and_grad = jax.jit(jax.value_and_grad(loss), compiler_options=common.FAST)
    _, grads = value_and_grad(params)
    v = jax.tree.map(lambda a: rng.standard_normal(a.shape), params)
    eps = 1e-6
    plus = value_and_grad(jax.tree.map(lambda p, d: p + eps * d, params, v))[0]
    minus = value_and_grad(jax.tree.map(lambda p, d: p - eps * d, params, v))[0]
  numeric = (float(plus) - float(minus)) / (2 * eps)
  analytic = sum(float(np.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v)))
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6, err_msg=f"seed {seed}")


@seeds.each(0)
def test_bfloat16_compute_is_close_to_float32(seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = rng.uniform(1, 1000, size=2).astype(np.float32)
  y = rng.integers(0, 10, size=2).astype(np.int32)
  outs = []
  for dtype in ("float32", "bfloat16"):
    model = create_model(_tiny(dtype=dtype))
    params = dim_convert.from_upstream(_filled(model, seed), model)
    outs.append(
      jax.jit(lambda p: model.apply({"params": p}, x, t, y), compiler_options=common.FAST)(params)
    )
  assert outs[1].dtype == jnp.float32
  assert _rel(outs[1], outs[0]) < 5e-2, seed
