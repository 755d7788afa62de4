"""Golden parity with the official PyTorch DiMSUM (tiny.npz, l2.npz) and the parity tool itself.

The parity tool keeps one compiled forward per model config, so the float32 tiny checks (values,
CLI, corrupted weights, files derived from tiny.npz by dropping or reshaping arrays) share a
single compilation. Random inputs come from the seed of each randomised test (tests/seeds.py:
seed 0 in the default run, 51 seeds with -m slow), named in its id and failure messages.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax import command_line
from dimsum_jax import models
from dimsum_jax.models import create_model, default_model_config
from dimsum_jax.models import dimsum_convert
from dimsum_jax.tools import hashfill, parity
from tests import seeds
from tests.golden import golden_file, manifest


def _assert_all_ok(rows, seed=None):
  bad = [r for r in rows if not r[4]]
  assert not bad, f"outputs out of tolerance: {bad}" + ("" if seed is None else f" (seed {seed})")


def _tiny():
  return dict(np.load(golden_file("tiny.npz"), allow_pickle=False))


def test_tiny_float32_all_outputs():
  rows = parity.run_parity(str(golden_file("tiny.npz")), verbose=False)
  names = {r[0] for r in rows}
  # Final output, every block-0 intermediate, per-block outputs, shared attention and CFG.
  assert {
    "out",
    "t_emb",
    "y_emb",
    "c",
    "tokens_in",
    "block0_norm_out",
    "block0_spatial_mixer_in",
    "block0_spatial_mixer_out",
    "block0_spatial_out",
    "block0_wavelet_mixer_in",
    "block0_wavelet_mixer_out",
    "block0_wavelet_out",
    "block0_fusion_out",
    "block0_hidden_out",
    "block0_residual_out",
    "blocks_hidden_out",
    "blocks_residual_out",
    "attn_block_out",
    "cfg_out",
    "final_layer_out",
  } <= names
  _assert_all_ok(rows)
  # Upstream's own float32 run lands within 8.6e-6 of its float64 run; we are as close.
  assert max(r[2] for r in rows) < 2e-5


def test_tiny_float64_matches_to_roundoff():
  rows = parity.run_parity(str(golden_file("tiny.npz")), float64=True, verbose=False)
  assert len(rows) >= 20
  _assert_all_ok(rows)
  assert max(r[2] for r in rows) < 1e-12
  # The float64 run is scoped: it does not switch later computations to float64.
  assert jnp.zeros(1).dtype == jnp.float32


def test_cli_exit_codes(tmp_path, capsys):
  assert command_line.call(parity, [f"--golden={golden_file('tiny.npz')}"]) == 0
  text = capsys.readouterr().out
  assert "out " in text and "all " in text and "FAIL" not in text
  # A 1 % change of one weight deep in the stack must make the tool fail.
  data = dict(np.load(golden_file("tiny.npz")))
  key = "blocks.2.freq_mamba.mixer.out_proj.weight"
  data[key] = data[key] * 1.01
  bad = tmp_path / "bad.npz"
  np.savez(bad, **data)
  assert command_line.call(parity, [f"--golden={bad}"]) == 1
  text = capsys.readouterr().out
  assert "FAILED:" in text and "blocks_hidden_out" in text
  # Block 2's output is wrong, blocks 0 and 1 are not: the intermediates localise the error.
  rows = {r[0]: r for r in parity.run_parity(str(bad), verbose=False)}
  assert rows["block0_hidden_out"][4] and not rows["out"][4]


def test_cli_refuses_file_without_config(tmp_path):
  data = dict(np.load(golden_file("tiny.npz")))
  del data["config_json"]
  path = tmp_path / "noconfig.npz"
  np.savez(path, **data)
  with pytest.raises(SystemExit, match="config_json"):
    command_line.call(parity, [f"--golden={path}"])


@pytest.mark.parametrize(
  "key",
  [
    "pos_embed",
    "x_embedder.proj.bias",
    "y_embedder.embedding_table.weight",
    "blocks.0.norm.weight",
    "blocks.0.spatial_mamba.mixer.A_log",
    "blocks.0.spatial_mamba.mixer.D",
    "blocks.0.spatial_mamba.mixer.conv1d.weight",
    "blocks.0.spatial_mamba.mixer.dt_proj.bias",
    "blocks.0.freq_mamba.mixer.x_proj.weight",
    "blocks.7.norm_2.weight",
    "attn_block.attn.qkv.bias",
    "final_layer.linear.weight",
  ],
)
def test_hashfill_reproduces_manifest_checksums(key):
  """The README's weight fill, against the checksums of the golden generator (one per rule)."""
  shape, total, first = manifest()["l2"]["forward"]["hashfill_checksums"][key]
  value = hashfill.fill_value(key, tuple(shape), seed=0)
  assert value.dtype == np.float32 and list(value.shape) == shape
  np.testing.assert_allclose(value.astype(np.float64).sum(), total, rtol=1e-12, atol=1e-9)
  np.testing.assert_array_equal(value.reshape(-1)[:3], np.float32(first))


def _l2_state_dict():
  m = manifest()["l2"]["forward"]
  keys = [(k, v[0]) for k, v in m["state_dict"].items()]
  state = hashfill.fill_state_dict(keys, seed=0)
  checked = 0
  for key, (shape, total, first) in list(m["hashfill_checksums"].items())[::7]:
    if key in state:
      assert list(state[key].shape) == shape
      np.testing.assert_allclose(state[key].astype(np.float64).sum(), total, rtol=1e-9, atol=1e-6)
      np.testing.assert_array_equal(state[key].reshape(-1)[:3], np.float32(first))
      checked += 1
  assert checked > 50
  return state, m["cfg"]


def test_l2_published_size(tmp_path):
  """The full DiMSUM-L/2 (459.9 M parameters) with the README's deterministic fill (about a
  minute and 5.5 GB of host memory on 2 cores: part of the default suite)."""
  state, cfg = _l2_state_dict()
  golden = dict(np.load(golden_file("l2.npz")))
  path = tmp_path / "l2_full.npz"
  np.savez(path, **state, **golden, config_json=np.array(json.dumps(cfg)))
  del state
  rows = parity.run_parity(str(path), verbose=False)
  names = {r[0] for r in rows}
  assert {
    "out",
    "c",
    "blocks_hidden_out_rms",
    "blocks_hidden_out_slice",
    "attn_block_out_rms",
    "attn_block_out_slice",
  } <= names
  _assert_all_ok(rows)
  assert max(r[2] for r in rows) < 2e-5


@seeds.each()
def test_tool_reads_other_sizes(tmp_path, seed):
  """A golden file for a model unlike tiny.npz (unconditional, 12x12 tokens, window 3, sweep_8
  scan orders that differ between the 2 groups of 2 blocks), written from a float64 forward of
  our own on hash-filled weights and inputs of `seed`: the tool converts it and passes; a
  corrupted weight fails it."""
  input_size, depth, hidden, every = 24, 4, 64, 2
  mc = default_model_config()
  mc.update(
    name="DiMSUM-L/2",
    input_size=input_size,
    depth=depth,
    hidden_size=hidden,
    num_classes=0,
    scan_type="sweep_8",
    scan_impl="reference",
    attn_every=every,
  )
  model = create_model(mc)
  # Upstream names and shapes of every parameter, then the README's fill (non-zero everywhere).
  abstract = models.abstract_params(model, mc)
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), abstract)
  state = hashfill.fill_state_dict(
    [(k, v.shape) for k, v in dimsum_convert.to_upstream(zeros, model).items()], seed=3
  )
  assert "blocks.3.freq_mamba.mixer.A_log" in state and "y_embedder.embedding_table.weight" in state
  params = dimsum_convert.from_upstream(state, model, abstract)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, input_size, input_size, 4))
  t = rng.uniform(size=2)
  with jax.enable_x64(True):
    mc64 = mc.copy_and_resolve_references()
    mc64.dtype = "float64"
    model64 = create_model(mc64)
    p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    out = jax.jit(
      lambda p, x, t: model64.apply({"params": p}, x, t),
      compiler_options={"xla_backend_optimization_level": 0},
    )(p64, x, t)
    out = np.asarray(out)
  assert out.dtype == np.float64 and 0.05 < np.abs(out).max() < 1e3, f"seed {seed}"
  cfg = dict(
    hidden_size=hidden,
    depth=depth,
    patch_size=2,
    img_resolution=input_size,
    in_channels=4,
    num_classes=1,
    label_dropout=0,
    use_attn_every_k_layers=every,
    scan_type="sweep_8",
    learn_sigma=False,
  )
  arrays = dict(
    state,
    x=np.transpose(x, (0, 3, 1, 2)).astype(np.float32),
    t=t.astype(np.float32),
    out_f64=np.transpose(out, (0, 3, 1, 2)),
    config_json=np.array(json.dumps(cfg)),
  )
  path = tmp_path / "own.npz"
  np.savez(path, **arrays)
  # x and t are rounded to float32 in the file: 6e-8 relative, far inside the 1e-4 tolerance.
  rows = parity.run_parity(str(path), verbose=False)
  assert [r[0] for r in rows] == ["out"]
  _assert_all_ok(rows, seed)
  arrays["final_layer.linear.weight"] = arrays["final_layer.linear.weight"] * 1.01
  np.savez(path, **arrays)
  assert not parity.run_parity(str(path), verbose=False)[0][4], f"seed {seed}"


def test_mismatched_checkpoint_names_the_keys():
  data = np.load(golden_file("tiny.npz"))
  state, inputs, _ = parity.split_golden(data)
  cfg = json.loads(str(inputs["config_json"]))
  mc = dimsum_convert.model_config_from_upstream(cfg, state)
  model = create_model(mc)
  abstract = models.abstract_params(model, mc)
  broken = dict(state)
  broken.pop("blocks.1.norm.weight")
  broken["blocks.0.mlp.w3.weight"] = np.zeros((5, 5), np.float32)
  broken["blocks.0.unknown.weight"] = np.zeros((3,), np.float32)
  with pytest.raises(ValueError) as e:
    dimsum_convert.from_upstream(broken, model, abstract)
  msg = str(e.value)
  assert (
    "Mis-shaped keys (1): blocks.0.mlp.w3.weight: checkpoint [5, 5] vs expected [96, 384]" in msg
  )
  assert "no place for (1): blocks.0.unknown.weight" in msg
  # Missing parameters are named by their upstream keys.
  assert "does not provide (2): blocks.0.mlp.w3.weight, blocks.1.norm.weight" in msg
  assert "Check the model name" in msg


def test_upstream_round_trip_and_cond_proj_dropping():
  data = np.load(golden_file("tiny.npz"))
  state, inputs, _ = parity.split_golden(data)
  mc = dimsum_convert.model_config_from_upstream(json.loads(str(inputs["config_json"])), state)
  assert mc.num_classes == 10 and mc.cond_mamba == "none"
  model = create_model(mc)
  params = dimsum_convert.from_upstream(state, model, models.abstract_params(model, mc))
  back = dimsum_convert.to_upstream(params, model)
  skipped = {k for k in state if "cond_proj" in k or ".dwt." in k or ".idwt." in k}
  assert len(skipped) == 4 * 2 * 2 + 4 * 5
  assert set(back) == set(state) - skipped
  for k, v in back.items():
    np.testing.assert_array_equal(v, state[k])
  # With the working conditional Mamba the release's cond_proj weights have a place.
  mc.cond_mamba = "h0"
  model = create_model(mc)
  params = dimsum_convert.from_upstream(state, model, models.abstract_params(model, mc))
  np.testing.assert_array_equal(
    params["groups"]["block_1"]["spatial_mamba"]["mixer"]["cond_proj"]["kernel"][0],
    state["blocks.1.spatial_mamba.mixer.cond_proj.weight"].T,
  )
  assert set(dimsum_convert.to_upstream(params, model)) == set(state) - {
    k for k in skipped if "cond_proj" not in k
  }


# --- golden files derived from tiny.npz ----------------------------------------------------------


def _batch_axis(key):
  """The batch axis of a reference array of the golden format ([blocks or applications, B, ...]
  for the per-block and shared-attention arrays)."""
  return 1 if key.startswith(("blocks_", "attn_block_out")) else 0


def _unconditional_from_tiny(rows=(1, 1)):
  """tiny.npz as the unconditional model whose one label row is tiny's null row: row 1 of tiny's
  batch has the null label, so upstream's values for that row are the unconditional model's
  (taken here for every row of the new batch; the label embedding is per row, [B, D])."""
  data = _tiny()
  cfg = json.loads(str(data["config_json"]))
  table = data["y_embedder.embedding_table.weight"]
  assert cfg["num_classes"] == 10 and table.shape[0] == 11 and int(data["y"][1]) == 10
  out = {}
  for key, value in data.items():
    if key.startswith("cfg_") or key == "y":
      continue  # guidance needs a conditional model; an unconditional one takes no y
    if key in ("x", "t"):
      out[key] = value[list(rows)]
    elif key.endswith(("_f64", "_f32")):
      out[key] = np.take(value, list(rows), axis=_batch_axis(key))
    else:
      out[key] = value
  out["y_embedder.embedding_table.weight"] = table[10:11]
  out["config_json"] = np.array(json.dumps(dict(cfg, num_classes=1)))
  return out


def test_unconditional_with_the_label_embedding_per_row(tmp_path, capsys):
  """Upstream gives an unconditional model's label embedding per batch row ([B, D]); this model
  computes the one row once: it is compared with every row (this used to crash in a reshape)."""
  arrays = _unconditional_from_tiny()
  assert arrays["y_emb_f64"].shape == (2, 96)
  path = tmp_path / "unconditional.npz"
  np.savez(path, **arrays)
  rows = parity.run_parity(str(path), verbose=False)
  names = {r[0] for r in rows}
  assert {
    "out",
    "t_emb",
    "y_emb",
    "c",
    "block0_hidden_out",
    "blocks_residual_out",
    "attn_block_out",
    "final_layer_out",
  } <= names and "cfg_out" not in names
  _assert_all_ok(rows)
  assert max(r[2] for r in rows) < 2e-5
  assert command_line.call(parity, [f"--golden={path}"]) == 0
  assert "all 19 outputs within tolerance" in capsys.readouterr().out
  # The label row is really compared: changing it fails y_emb, c and the output.
  arrays["y_embedder.embedding_table.weight"] = arrays["y_embedder.embedding_table.weight"] * 1.01
  np.savez(path, **arrays)
  rows = {r[0]: r for r in parity.run_parity(str(path), verbose=False)}
  assert not rows["y_emb"][4] and not rows["c"][4] and rows["t_emb"][4]


def _layouts(key, value, rng):
  """The same values in another shape, picked by `rng`: as stored, a token grid [.., g, g, D]
  for [.., N, D], one row per sample ([B, -1]), or without a leading axis of 1."""
  shapes = [value.shape]
  if value.ndim >= 3 and value.shape[-2] == 64:
    shapes.append(value.shape[:-2] + (8, 8, value.shape[-1]))
  if value.ndim >= 2:
    axis = _batch_axis(key)
    shapes.append(value.shape[: axis + 1] + (-1,))
  if value.shape[0] == 1:
    shapes.append(value.shape[1:])
  return value.reshape(shapes[rng.integers(len(shapes))])


@seeds.each()
def test_any_subset_in_any_layout(tmp_path, seed):
  """tiny.npz with a random subset of its reference arrays, each in a random layout of its
  values, plus arrays the golden format does not define: what is there is compared (and
  matches), the unknown arrays are reported as not compared."""
  rng = np.random.default_rng(seed)
  data = _tiny()
  refs = sorted(k for k in data if k.endswith("_f64"))
  keep = set(rng.choice(refs, size=rng.integers(1, len(refs) + 1), replace=False))
  arrays = {k: v for k, v in data.items() if not k.endswith("_f64") or k in keep}
  arrays.update({k: _layouts(k, data[k], rng) for k in keep})
  drop_cfg_inputs = bool(rng.integers(2))
  if drop_cfg_inputs:
    del arrays["cfg_x"]
  arrays["notes_f64"] = rng.standard_normal(3)
  arrays["seed"] = np.array(seed)
  path = tmp_path / "subset.npz"
  np.savez(path, **arrays)
  report = parity.check(str(path))
  unknown = {"notes_f64", "seed"}
  if drop_cfg_inputs and "cfg_out_f64" in keep:
    unknown.add("cfg_out_f64")
  compared = {k[:-4] for k in keep} - {k[:-4] for k in unknown}
  msg = f"seed {seed}: kept {sorted(keep)}"
  assert {r[0] for r in report.rows} == compared, msg
  assert {k for k, _ in report.not_compared} == unknown, msg
  _assert_all_ok(report.rows, seed)
  assert max(r[2] for r in report.rows) < 2e-5, msg


def test_a_reference_of_another_shape_fails_by_name(tmp_path, capsys):
  """A documented array whose shape cannot hold this model's values is a failure naming both
  shapes, not a crash; the other arrays are still compared."""
  data = _tiny()
  data["c_f64"] = data["c_f64"][:, :50]
  path = tmp_path / "bad_shape.npz"
  np.savez(path, **data)
  assert command_line.call(parity, [f"--golden={path}"]) == 1
  text = capsys.readouterr().out
  assert "shape [3, 50] in the file, [3, 96] here" in text and "FAILED: c" in text
  rows = {r[0]: r for r in parity.run_parity(str(path), verbose=False)}
  assert not rows["c"][4] and math.isinf(rows["c"][2])
  assert all(r[4] for name, r in rows.items() if name != "c")


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda d: d.pop("y"), "has no labels `y` but its model is class-conditional (10 classes)"),
    (lambda d: d.pop("x"), "has no input `x`"),
    (lambda d: d.update(x=d["x"][:, :, :8]), "`x` is [3, 4, 8, 16] but the model"),
    (lambda d: d.update(config_json=np.array("{not json")), "`config_json` is not valid JSON"),
    (lambda d: d.pop("blocks.1.norm.weight"), "does not provide (1): blocks.1.norm.weight"),
    (
      lambda d: [d.pop(k) for k in list(d) if k.endswith("_f64")],
      "holds no reference array that this tool can compare",
    ),
  ],
)
def test_files_that_cannot_be_checked_are_one_sentence(tmp_path, change, message):
  data = _tiny()
  change(data)
  path = tmp_path / "golden.npz"
  np.savez(path, **data)
  with pytest.raises(SystemExit) as e:
    command_line.call(parity, [f"--golden={path}"])
  text = str(e.value.code)
  assert text.startswith(f"error: {path}") and message in text and "\n" not in text, text


def test_missing_and_unreadable_files_are_one_sentence(tmp_path):
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not an archive at all" * 10)
  truncated = tmp_path / "truncated.npz"
  data = golden_file("tiny.npz").read_bytes()
  truncated.write_bytes(data[: len(data) // 2])
  for path, message in (
    (tmp_path / "missing.npz", "does not exist"),
    (tmp_path, "is a directory"),
    (junk, "is not an .npz archive"),
    (truncated, "is not a readable .npz file"),
  ):
    with pytest.raises(SystemExit) as e:
      command_line.call(parity, [f"--golden={path}"])
    text = str(e.value.code)
    assert text.startswith(f"error: --golden={path}") and message in text, text
    assert "\n" not in text, text
