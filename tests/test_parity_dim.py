"""`python -m dimsum_jax.tools.parity` on DiM's golden files (tools/parity_dim.py).

Every file of shared/golden/dim/ in float32 (2e-4 relative, the golden README's bound) and
float64 (1e-12): the forward files (tiny, tiny_rho, wide with the README's weight formula of
seed 7) with every output and intermediate they hold, Upsample Guidance with its solver tables,
and the position tables. Files derived from tiny.npz (a changed weight, a dropped or reshaped
array, unknown arrays, a missing input) check what the tool reports; a golden-format file of
another DiM (unconditional, rho_pad, 6x4 tokens) is written from our own float64 forward on the
formula's weights and inputs of a stated seed. The tool keeps one compiled forward per model,
so the float32 checks of tiny and its variants compile once.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax import command_line
from dimsum_jax.models import dim, dim_convert
from dimsum_jax.tools import parity, parity_dim
from tests import seeds
from tests.golden import golden_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_NAMES = {
  "out",
  "out_null_label",
  "out_f32",
  "patch_tokens",
  "t_token",
  "y_token",
  "adaln_c",
  "adaln_out",
  "tokens_in",
  "first_smoother_out",
  "seq_prepared",
  "block0_norm_out",
  "block0_mixer_in",
  "block0_mamba_out",
  "block0_out",
  "blocks_stream",
  "blocks_stream_rms",
  "skip_linear_out",
  "seq_before_finalize",
  "finalized_tokens",
  "norm_out",
  "final_shift_scale",
  "final_layer_out",
  "scan_perm",
  "skip_pairs",
}
# file: (--fill_seed, names that must be compared, float32 bound on the largest relative
# error (measured 1.4e-5, 7.0e-5, 1.1e-5, 3.2e-5, 0), float64 bound)
FILES = {
  "tiny": (None, TINY_NAMES, 3e-5, 1e-12),
  "tiny_rho": (
    None,
    TINY_NAMES - {"block0_norm_out", "block0_mixer_in", "blocks_stream"}
    | {"blocks_stream_f64as32"},
    1e-4,
    1e-12,
  ),
  "wide": (
    7,
    {
      "out",
      "out_f32",
      "seq_prepared_slice",
      "block0_out_slice",
      "blocks_stream_slice",
      "blocks_stream_rms",
      "skip_linear_1_out_slice",
    },
    3e-5,
    1e-12,
  ),
  "upsample_guidance": (
    None,
    {
      "t090_cfg_pred",
      "t090_g_pred",
      "t090_low_pred",
      "t090_x_low",
      "t090_tau_model",
      "t050_cfg_pred",
      "t050_g_pred",
      "preset_snrs_f32",
    }
    | {f"dpm_calls_m{m}.{c}" for m in (2, 3) for c, _ in parity_dim.DPM_COLUMNS},
    5e-5,
    1e-12,
  ),
  "pos_interp": (
    None,
    {
      "up2x_4to8",
      "up3x_4to12",
      "down2x_8to4",
      "down3x_12to4",
      "up_5to8",
      "transfer_additional_embed",
    },
    1e-12,
    1e-12,
  ),
}
# Arrays stored rounded to float32 and upstream's float32 tables: their own tolerances.
OWN_TOLERANCE = (
  "blocks_stream_f64as32",
  "dpm_calls_",
  "preset_snrs_f32",
  "transfer_additional_embed",
)


def _path(name):
  return str(golden_file(f"dim/{name}.npz"))


def _tiny():
  return dict(np.load(_path("tiny"), allow_pickle=False))


def _assert_all_ok(report, msg=""):
  bad = [r for r in report.rows if not r[4]]
  assert not bad, f"out of tolerance: {bad} {msg}"


# ---------------------------------------------------------------- every golden file

# The float64 runs of the larger files are in the slow run (-m slow): tests/models/test_dim.py
# checks the same float64 values through the model directly in the default run.
SLOW_FLOAT64 = ("tiny_rho", "upsample_guidance", "wide")


@pytest.mark.parametrize(
  "name, float64",
  [
    pytest.param(
      name,
      float64,
      id=f"{name}-{'float64' if float64 else 'float32'}",
      marks=[pytest.mark.slow] if float64 and name in SLOW_FLOAT64 else [],
    )
    for name in sorted(FILES)
    for float64 in (False, True)
  ],
)
def test_every_golden_file(name, float64):
  fill_seed, names, f32_bound, f64_bound = FILES[name]
  report = parity.check(_path(name), float64=float64, fill_seed=fill_seed)
  compared = {r[0] for r in report.rows}
  want = names - ({"out_f32"} if float64 else set())
  assert want <= compared, sorted(want - compared)
  _assert_all_ok(report)
  bound = f64_bound if float64 else f32_bound
  worst = max(r[2] for r in report.rows if not r[0].startswith(OWN_TOLERANCE))
  assert worst < bound, (name, worst)
  skipped = {k for k, _ in report.not_compared}
  expected = {"normed_timesteps_f32"} if name == "upsample_guidance" else set()
  if float64 and name in ("tiny", "tiny_rho", "wide"):
    expected.add("out_f32")  # upstream's float32 output: compared by float32 checks
  assert skipped == expected, report.not_compared
  if float64:
    assert jnp.zeros(1).dtype == jnp.float32  # the float64 run is scoped


def test_wide_fill_reproduces_the_manifest_checksums():
  """The README's weight formula of wide.npz (parity_dim.fill_value) against the checksums of
  the golden generator, one key per rule."""
  with open(golden_file("dim/manifest.json")) as f:
    checks = json.load(f)["wide"]["hashfill_checksums"]
  for key, (shape, total, first) in checks.items():
    value = parity_dim.fill_value(key, shape, seed=7)
    assert value.dtype == np.float32 and list(value.shape) == shape, key
    np.testing.assert_allclose(value.astype(np.float64).sum(), total, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(value.reshape(-1)[:3], np.float32(first), err_msg=key)


# ---------------------------------------------------------------- the command line


def test_cli_exit_codes_and_localisation(tmp_path, capsys):
  assert command_line.call(parity, [f"--golden={_path('tiny')}"]) == 0
  text = capsys.readouterr().out
  assert "all 25 outputs within tolerance" in text and "FAIL" not in text
  # A 1 % change of block 3's out_proj: block 0, the smoothers and the skip input still match,
  # the block streams and the output do not.
  data = _tiny()
  key = "transformer_blocks.3.attn1.out_proj.weight"
  data[key] = data[key] * 1.01
  path = tmp_path / "bad.npz"
  np.savez(path, **data)
  assert command_line.call(parity, [f"--golden={path}"]) == 1
  text = capsys.readouterr().out
  assert "FAILED:" in text and "blocks_stream" in text
  rows = {r[0]: r for r in parity.check(str(path)).rows}
  assert rows["block0_out"][4] and rows["first_smoother_out"][4] and rows["skip_linear_out"][4]
  assert not rows["out"][4] and not rows["blocks_stream"][4]


def test_cli_process_one_sentence_without_traceback():
  """`python -m dimsum_jax.tools.parity` on wide.npz without --fill_seed: exit status 1 and one
  sentence naming the flag (the error raised in parity_dim is the one the command catches)."""
  r = subprocess.run(
    [sys.executable, "-m", "dimsum_jax.tools.parity", f"--golden={_path('wide')}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=300,
  )
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
  lines = [s for s in r.stderr.splitlines() if s.startswith("error:")]
  assert len(lines) == 1 and "stores no weights: pass --fill_seed=SEED" in lines[0]
  assert "7 for wide.npz" in lines[0]


# ---------------------------------------------------------------- derived files


@seeds.each()
def test_any_subset_and_unknown_arrays(tmp_path, seed):
  """tiny.npz with a random subset of its references (seed), plus arrays the format does not
  define: what is there is compared and matches, the rest is listed as not compared."""
  rng = np.random.default_rng(seed)
  data = _tiny()
  refs = sorted(k for k in data if k.endswith("_f64") or k in ("scan_perm", "skip_pairs"))
  keep = set(rng.choice(refs, size=rng.integers(1, len(refs) + 1), replace=False))
  arrays = {k: v for k, v in data.items() if k not in refs or k in keep}
  arrays.pop("out_f32")
  arrays["notes_f64"] = rng.standard_normal(3)
  arrays["seed"] = np.array(seed)
  path = tmp_path / "subset.npz"
  np.savez(path, **arrays)
  report = parity.check(str(path))
  msg = f"seed {seed}: kept {sorted(keep)}"
  assert {r[0] for r in report.rows} == {k.removesuffix("_f64") for k in keep}, msg
  assert dict(report.not_compared) == {
    "notes_f64": "this model computes no array of that name",
    "seed": "not an array of the DiM golden format",
  }, msg
  _assert_all_ok(report, msg)


def test_a_reference_of_another_shape_fails_by_name(tmp_path, capsys):
  data = _tiny()
  data["adaln_c_f64"] = data["adaln_c_f64"][:, :50]
  path = tmp_path / "bad_shape.npz"
  np.savez(path, **data)
  assert command_line.call(parity, [f"--golden={path}"]) == 1
  text = capsys.readouterr().out
  assert "shape [2, 50] in the file, [2, 64] here" in text and "FAILED: adaln_c" in text


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda d: d.pop("config_json"), "has no `config_json`"),
    (lambda d: d.pop("x"), "has no input `x`"),
    (lambda d: d.pop("y"), "class-conditional (10 classes) but it holds no labels `y`"),
    (lambda d: d.update(x=d["x"][:, :3]), "`x` is [2, 3, 8, 8] but the model"),
    (lambda d: d.update(t=d["t"][:1]), "`t` is [1], not [2]"),
    (
      lambda d: d.pop("transformer_blocks.4.attn1.A_log"),
      "missing (1): transformer_blocks.4.attn1.A_log",
    ),
    (
      lambda d: d.update(
        config_json=np.array(json.dumps(dict(json.loads(str(d["config_json"])), is_uconnect=False)))
      ),
      "Upstream option is_uconnect=False is not implemented",
    ),
    (
      lambda d: d.update(
        config_json=np.array(json.dumps(dict(json.loads(str(d["config_json"])), num_layers=4)))
      ),
      "odd depth",
    ),
    (
      lambda d: [
        d.pop(k)
        for k in list(d)
        if k.endswith("_f64") or k in ("scan_perm", "skip_pairs", "out_f32")
      ],
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


def test_fill_seed_only_where_weights_are_missing():
  with pytest.raises(SystemExit, match="stores its own weights: drop --fill_seed"):
    command_line.call(parity, [f"--golden={_path('tiny')}", "--fill_seed=7"])
  with pytest.raises(SystemExit, match="is a DiMSUM golden file"):
    command_line.call(parity, [f"--golden={golden_file('tiny.npz')}", "--fill_seed=7"])
  # Another seed than the formula's: the weights differ, so the output misses.
  rows = {r[0]: r for r in parity.check(_path("wide"), fill_seed=8).rows}
  assert not rows["out"][4]


def test_changed_position_table_and_solver_table_fail(tmp_path):
  data = dict(np.load(_path("pos_interp")))
  data["up_5to8_dst"] = data["up_5to8_dst"] * 1.001
  data["notes"] = np.zeros(2)
  path = tmp_path / "pos.npz"
  np.savez(path, **data)
  report = parity.check(str(path))
  assert [r[0] for r in report.rows if not r[4]] == ["up_5to8"]
  assert dict(report.not_compared) == {"notes": "not a position-table pair CASE_src / CASE_dst"}
  # One model call of the Upsample Guidance solver table at another trunc(1000 t) (the
  # model's outputs left out: the tables alone are compared, no forward runs).
  data = {
    k: v
    for k, v in np.load(_path("upsample_guidance")).items()
    if not k.startswith(("t090_", "t050_"))
  }
  data["dpm_calls_m2"][10, 3] += 1
  path = tmp_path / "ug.npz"
  np.savez(path, **data)
  report = parity.check(str(path))
  assert [r[0] for r in report.rows if not r[4]] == ["dpm_calls_m2.index"]
  assert len(report.rows) == 2 * 7 + 1


@seeds.each()
def test_golden_format_file_of_another_dim(tmp_path, seed):
  """An unconditional rho_pad DiM on a 6x4 token grid (D = 32, 3 blocks), weights by the
  formula of `seed`, inputs of `seed`: a file written from our float64 forward in the golden
  format (config_json as upstream's config.nnet) passes in float32; a changed weight fails."""
  rng = np.random.default_rng(seed)
  cfg = json.loads(str(_tiny()["config_json"]))
  cfg.update(
    attention_head_dim=32,
    num_layers=3,
    num_embeds_ada_norm=None,
    num_patches=24,
    pad_token_schedules=["dec_split", "rho_pad"],
  )
  model = dim.DiM(**dim_convert.model_kwargs(cfg), scan_impl="reference", dtype=jnp.float64)
  assert model.num_classes == 0 and model.table_grid() == (6, 4)
  state = parity_dim.fill_state_dict(dim_convert.upstream_shapes(model), seed)
  assert "label_emb.weight" not in state and state["additional_embed"].shape == (1, 25, 32)
  x = rng.standard_normal((2, 4, 12, 8)).astype(np.float32)
  t = rng.uniform(1, 1000, size=2).astype(np.float32)
  with jax.enable_x64(True):
    params = dim_convert.from_upstream(state, model, dtype=np.float64)
    out = jax.jit(
      lambda p, x, t: model.apply({"params": p}, x, t),
      compiler_options={"xla_backend_optimization_level": 0},
    )(params, np.transpose(x, (0, 2, 3, 1)).astype(np.float64), t.astype(np.float64))
  out = np.transpose(np.asarray(out), (0, 3, 1, 2))
  assert out.dtype == np.float64 and 0.05 < np.abs(out).max() < 1e3, f"seed {seed}"
  arrays = dict(state, x=x, t=t, out_f64=out, config_json=np.array(json.dumps(cfg)))
  path = tmp_path / "own.npz"
  np.savez(path, **arrays)
  report = parity.check(str(path))
  assert [r[0] for r in report.rows] == ["out"], f"seed {seed}"
  _assert_all_ok(report, f"seed {seed}")
  arrays["proj_out_2.weight"] = arrays["proj_out_2.weight"] * 1.01
  np.savez(path, **arrays)
  assert not parity.check(str(path)).rows[0][4], f"seed {seed}"
