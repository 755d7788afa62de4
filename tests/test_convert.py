"""The conversion command (python -m dimsum_jax.convert) on upstream-format torch checkpoints.

The checkpoints are built here from tiny.npz's weights as upstream's train.py writes them: a torch
file holding {'model', 'ema', 'opt', 'epoch', 'args'}, `ema` the golden weights, `model` a
perturbed copy, `args` the golden file's own hyperparameters (an argparse.Namespace, as upstream
saves it). The converted directory is read back with the sampler's loader
(`sample.load_model(checkpoint_dir=...)`) and its forward is compared with upstream's float64
output `out_f64`; the perturbed weights are compared with their upstream arrays in the PyTorch
layouts of the golden README. The perturbation is drawn from SEED (named in failure messages).
"""

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax import command_line
from dimsum_jax import convert
from dimsum_jax import model_loading
from dimsum_jax import sample
from dimsum_jax.models import abstract_params, create_model
from dimsum_jax.models import dimsum_convert
from dimsum_jax.tools import parity
from tests.golden import golden_file

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL_TOL = 1e-4  # float32 port against upstream's float64 output, as the parity tool
SEED = 0  # of the perturbation of the `model` entry (its assertions hold for seeds 0-19)
_FORWARDS = {}  # one compiled forward per model config: the tests share one compilation


def _golden():
  state, inputs, refs = parity.split_golden(np.load(golden_file("tiny.npz")))
  return state, inputs, refs, json.loads(str(inputs["config_json"]))


def _perturbed(state, seed=SEED):
  """The `model` entry: the EMA weights plus noise of `seed` (Haar buffers kept, as upstream's
  are fixed)."""
  rng = np.random.default_rng(seed)
  return {
    k: v
    if ".dwt." in k or ".idwt." in k
    else (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
    for k, v in state.items()
  }


def _save_torch(path, ema, model=None, args=None):
  """A torch file laid out as upstream's train.py writes it."""
  tensors = lambda sd: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
  obj = {
    "model": tensors(model if model is not None else ema),
    "ema": tensors(ema),
    "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
    "epoch": 3,
  }
  if args is not None:
    obj["args"] = argparse.Namespace(**args)
  torch.save(obj, path)
  return path


@pytest.fixture(scope="module")
def golden():
  return _golden()


@pytest.fixture(scope="module")
def upstream_ckpt(tmp_path_factory, golden):
  state, _, _, cfg = golden
  path = tmp_path_factory.mktemp("upstream") / "tiny.pt"
  return _save_torch(path, state, _perturbed(state), cfg)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, upstream_ckpt):
  """The conversion without --config (the model read from the checkpoint's args)."""
  out = tmp_path_factory.mktemp("converted") / "tiny"
  command_line.call(convert, [f"--upstream={upstream_ckpt}", f"--out={out}"])
  return out


def _forward(out_dir, inputs):
  """Output [B, C, H, W] of the model in a converted directory, read as the sampler reads it
  (its VAE check is skipped: a latent model would need a VAE only to decode samples)."""
  with pytest.MonkeyPatch.context() as m:
    m.setattr(model_loading, "check_vae", lambda config, vae_dir=None: None)
    loaded = sample.load_model(checkpoint_dir=str(out_dir))
  key = json.dumps(loaded.config.model.to_dict(), sort_keys=True)
  if key not in _FORWARDS:
    model = loaded.model
    _FORWARDS[key] = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  x = jnp.asarray(np.transpose(inputs["x"], (0, 2, 3, 1)))
  with jax.default_matmul_precision("highest"):
    out = _FORWARDS[key](
      loaded.params, x, jnp.asarray(inputs["t"]), jnp.asarray(inputs["y"], jnp.int32)
    )
  return np.transpose(np.asarray(out, np.float64), (0, 3, 1, 2)), loaded


def _rel_err(a, ref):
  return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def _config_file(tmp_path, cfg):
  """A config file whose model section describes the golden model (as a user would write it)."""
  path = tmp_path / "tiny_config.py"
  path.write_text(
    "from dimsum_jax import config_utils\n\n\n"
    "def get_config():\n"
    "  c = config_utils.base_config()\n"
    f"  c.model.update(name='DiMSUM-B/2', depth={cfg['depth']}, hidden_size="
    f"{cfg['hidden_size']}, input_size={cfg['img_resolution']}, num_classes="
    f"{cfg['num_classes']}, label_dropout={cfg['label_dropout']}, attn_every="
    f"{cfg['use_attn_every_k_layers']}, scan_type='{cfg['scan_type']}')\n"
    "  return c\n"
  )
  return path


# --- end to end ----------------------------------------------------------------------------------


def test_converts_ema_from_the_checkpoint_args(converted, golden, capsys):
  _, inputs, refs, _ = golden
  out, loaded = _forward(converted, inputs)
  assert _rel_err(out, refs["out"]) <= REL_TOL
  mc = json.loads((converted / "model_config.json").read_text())
  assert (mc["depth"], mc["hidden_size"], mc["input_size"], mc["num_classes"]) == (4, 96, 16, 10)
  assert mc["cond_mamba"] == "none" and mc["attn_every"] == 4
  assert loaded.step is None and loaded.num_classes == 10


def test_converts_with_a_config_file(tmp_path, upstream_ckpt, golden, capsys):
  _, inputs, refs, cfg = golden
  out_dir = tmp_path / "with_config"
  command_line.call(
    convert,
    [f"--upstream={upstream_ckpt}", f"--config={_config_file(tmp_path, cfg)}", f"--out={out_dir}"],
  )
  summary = capsys.readouterr().out
  # Not called "DiMSUM-B/2" bare: the summary gives the real depth and width.
  assert "depth 4, hidden 96, patch 2, not a published size" in summary
  assert "registry entry DiMSUM-B/2" in summary and "(ema)" in summary
  out, _ = _forward(out_dir, inputs)
  assert _rel_err(out, refs["out"]) <= REL_TOL


def test_entry_model_takes_the_raw_weights(tmp_path, upstream_ckpt, golden):
  state, inputs, refs, _ = golden
  out_dir = tmp_path / "raw"
  command_line.call(convert, [f"--upstream={upstream_ckpt}", "--entry=model", f"--out={out_dir}"])
  out, loaded = _forward(out_dir, inputs)
  assert _rel_err(out, refs["out"]) > 100 * REL_TOL, f"seed {SEED}"
  # The perturbed arrays, in the PyTorch layouts of the golden README ([out, in] Linear,
  # [out, in, kh, kw] Conv2d, [1, N, D] pos_embed).
  raw = _perturbed(state)
  p = loaded.params
  msg = f"seed {SEED}"
  np.testing.assert_array_equal(
    p["final_layer"]["linear"]["kernel"], raw["final_layer.linear.weight"].T, err_msg=msg
  )
  np.testing.assert_array_equal(
    p["x_embedder"]["proj"]["kernel"],
    raw["x_embedder.proj.weight"].transpose(2, 3, 1, 0),
    err_msg=msg,
  )
  np.testing.assert_array_equal(p["pos_embed"], raw["pos_embed"][0], err_msg=msg)
  np.testing.assert_array_equal(
    p["groups"]["block_2"]["norm_2"]["weight"][0], raw["blocks.2.norm_2.weight"], err_msg=msg
  )


def test_failed_save_leaves_no_complete_looking_directory(tmp_path, upstream_ckpt, monkeypatch):
  """model_config.json marks a conversion: gone before the weights are rewritten, so an
  interrupted re-conversion is not taken for a good one."""
  import orbax.checkpoint as ocp

  out_dir = tmp_path / "again"
  command_line.call(convert, [f"--upstream={upstream_ckpt}", f"--out={out_dir}"])
  assert (out_dir / "model_config.json").exists()

  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", fail)
  with pytest.raises(OSError, match="disk full"):
    command_line.call(convert, [f"--upstream={upstream_ckpt}", f"--out={out_dir}"])
  assert not (out_dir / "model_config.json").exists()
  with pytest.raises(sample.SampleError, match="holds no model"):
    model_loading.read_config(checkpoint_dir=str(out_dir))


# --- checkpoints that do not fit ---------------------------------------------------------------


def _broken(state, kind):
  broken = dict(state)
  if kind == "missing":
    del broken["blocks.1.norm.weight"]
    return broken, ["does not provide (1): blocks.1.norm.weight"]
  if kind == "renamed":
    broken["blocks.0.mlp.w4.weight"] = broken.pop("blocks.0.mlp.w3.weight")
    return broken, [
      "no place for (1): blocks.0.mlp.w4.weight",
      "does not provide (1): blocks.0.mlp.w3.weight",
    ]
  # A patch-4 embedding in a patch-2 model: reported in upstream's [out, in, kh, kw] layout.
  broken["x_embedder.proj.weight"] = np.zeros((96, 4, 4, 4), np.float32)
  return broken, [
    "Mis-shaped keys (1): x_embedder.proj.weight: checkpoint [96, 4, 4, 4] vs "
    "expected [96, 4, 2, 2]"
  ]


@pytest.mark.parametrize("kind", ["missing", "renamed", "shape"])
def test_mismatched_checkpoint_fails_with_the_upstream_key(tmp_path, golden, kind):
  state, _, _, cfg = golden
  broken, expected = _broken(state, kind)
  path = _save_torch(tmp_path / "broken.pt", broken, args=cfg)
  out_dir = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    command_line.call(convert, [f"--upstream={path}", f"--out={out_dir}"])
  msg = str(e.value.code)
  assert msg.startswith("error: The upstream checkpoint does not match")
  for part in expected:
    assert part in msg
  assert not out_dir.exists()


def test_cli_process_prints_the_message_without_traceback(tmp_path, golden):
  """A real `python -m dimsum_jax.convert` run: exit status 1, the key on stderr, no traceback."""
  state, _, _, cfg = golden
  broken, expected = _broken(state, "shape")
  path = _save_torch(tmp_path / "broken.pt", broken, args=cfg)
  out_dir = tmp_path / "out"
  r = subprocess.run(
    [sys.executable, "-m", "dimsum_jax.convert", f"--upstream={path}", f"--out={out_dir}"],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 1, r.stderr
  assert expected[0] in r.stderr and "Traceback" not in r.stderr
  assert not out_dir.exists()


def test_blocks_beyond_the_model_depth_are_named(golden):
  """A deeper checkpoint than the config: its extra blocks are reported, not silently dropped."""
  state, _, _, cfg = golden
  deeper = dict(state)
  for key, value in state.items():
    if key.startswith("blocks."):
      _, i, rest = key.split(".", 2)
      deeper[f"blocks.{int(i) + 4}.{rest}"] = value
  mc = dimsum_convert.model_config_from_upstream(cfg, state)
  model = create_model(mc)
  with pytest.raises(
    dimsum_convert.ConvertError, match=r"no place for \(\d+\): blocks\.4\.norm\.weight"
  ):
    dimsum_convert.from_upstream(deeper, model, abstract_params(model, mc))


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda p: p.write_bytes(b"not a torch file"), "is not a readable PyTorch checkpoint"),
    (lambda p: torch.save([1, 2], p), "holds a list, not a state dict"),
    (lambda p: torch.save({"ema": {"w": torch.zeros(1)}}, p), "has no 'model' entry"),
  ],
)
def test_unreadable_files_fail_in_one_line(tmp_path, make, message):
  path = tmp_path / "file.pt"
  make(path)
  with pytest.raises(SystemExit) as e:
    command_line.call(convert, [f"--upstream={path}", "--entry=model", f"--out={tmp_path / 'out'}"])
  assert message in str(e.value.code) and "\n" not in str(e.value.code)
  assert not (tmp_path / "out").exists()


def test_refuses_an_out_dir_holding_something_else(tmp_path, upstream_ckpt):
  out_dir = tmp_path / "export"
  out_dir.mkdir()
  (out_dir / "config.json").write_text("{}")
  with pytest.raises(SystemExit, match=r"already holds \['config.json'\]"):
    command_line.call(convert, [f"--upstream={upstream_ckpt}", f"--out={out_dir}"])
  assert sorted(os.listdir(out_dir)) == ["config.json"]


# --- hyperparameters -----------------------------------------------------------------------------

# Upstream's train.py arguments of the published ImageNet run (scripts/train.sh; reference
# section 1 and 10), as `vars(args)` of its argparse namespace.
TRAIN_ARGS = dict(
  model="DiM-L/2",
  image_size=256,
  num_in_channels=4,
  num_classes=1000,
  label_dropout=0.15,
  bimamba_type="none",
  block_type="combined",
  cond_mamba=True,
  rms_norm=True,
  fused_add_norm=True,
  learnable_pe=True,
  use_attn_every_k_layers=4,
  drop_path=0.1,
  pe_type="ape",
  learn_sigma=False,
  use_final_norm=False,
  scanning_continuity=False,
  enable_fourier_layers=False,
  not_use_gated_mlp=False,
  is_moe=False,
  num_moe_experts=8,
  routing_mode="top1",
  gated_linear_unit=False,
)


def test_train_script_args_name_a_published_size():
  mc = dimsum_convert.model_config_from_upstream(TRAIN_ARGS)
  assert (mc.name, mc.depth, mc.hidden_size, mc.input_size) == ("DiMSUM-L/2", -1, -1, 32)
  assert (mc.num_classes, mc.label_dropout, mc.attn_every, mc.scan_type) == (1000, 0.15, 4, "none")
  assert dimsum_convert.describe(mc) == (
    "DiMSUM-L/2 (depth 16, hidden 1024, patch 2; 32x32x4 input, 1000 classes)"
  )
  # Upstream's default -1 means no shared attention; a 1-row label table means unconditional.
  table = {"y_embedder.embedding_table.weight": np.zeros((1, 1024), np.float32)}
  mc = dimsum_convert.model_config_from_upstream(
    dict(TRAIN_ARGS, use_attn_every_k_layers=-1, model="DiM-XL/2", image_size=512), table
  )
  assert (mc.name, mc.attn_every, mc.num_classes, mc.input_size) == ("DiMSUM-XL/2", 0, 0, 64)


@pytest.mark.parametrize(
  "dims, name, overridden",
  [
    ((16, 1024, 4), "DiMSUM-L/4", False),  # a registry size: its own depth and width
    ((4, 96, 2), "DiMSUM-B/2", True),  # tiny.npz: the closest size with patch 2
    ((8, 1100, 2), "DiMSUM-XL/2", True),  # width 1100 is nearer XL's 1152 than L's 1024
    ((20, 1024, 4), "DiMSUM-L/4-v1", False),
  ],
)
def test_golden_style_sizes_are_named_honestly(dims, name, overridden):
  depth, hidden, patch = dims
  mc = dimsum_convert.model_config_from_upstream(
    dict(depth=depth, hidden_size=hidden, patch_size=patch, img_resolution=32, num_classes=10)
  )
  assert mc.name == name
  assert (mc.depth, mc.hidden_size) == ((depth, hidden) if overridden else (-1, -1))
  text = dimsum_convert.describe(mc)
  assert f"depth {depth}, hidden {hidden}, patch {patch}" in text
  assert ("not a published size" in text) == overridden


def test_unsupported_patch_names_the_registry_patches():
  with pytest.raises(dimsum_convert.ConvertError, match=r"patch_size 8 .* patch 2 and 4 only"):
    dimsum_convert.model_config_from_upstream(
      dict(depth=4, hidden_size=96, patch_size=8, img_resolution=32)
    )


@pytest.mark.parametrize(
  "flag, value, spelled",
  [
    ("use_final_norm", True, "--use-final-norm"),
    ("scanning_continuity", True, "--scanning-continuity"),
    ("enable_fourier_layers", True, "--enable-fourier-layers"),
    ("not_use_gated_mlp", True, "--not-use-gated-mlp"),
    ("block_type", "linear", "--block-type"),
    ("pe_type", "rope", "--pe-type"),
    ("rms_norm", False, "--rms-norm"),
    ("is_moe", True, "--is-moe"),
    ("learn_sigma", True, "--learn-sigma"),
    ("bimamba_type", "spiral_2", "--bimamba-type"),
  ],
)
def test_unpublished_flags_are_refused(flag, value, spelled):
  with pytest.raises(dimsum_convert.ConvertError) as e:
    dimsum_convert.model_config_from_upstream(dict(TRAIN_ARGS, **{flag: value}))
  msg = str(e.value)
  assert f"{flag}={value!r}" in msg and spelled in msg and "only the published setting" in msg


def test_flags_without_effect_on_the_forward_are_accepted(golden):
  """learnable_pe False still stores pos_embed (a frozen nn.Parameter); cond_mamba is dead in the
  release; fused_add_norm is the same RMSNorm; the golden files' use_gated_mlp=True."""
  _, _, _, cfg = golden
  assert cfg["use_gated_mlp"] is True
  for changes in (
    dict(learnable_pe=False),
    dict(cond_mamba=False),
    dict(fused_add_norm=False),
    dict(bimamba_type="v2"),
    dict(bimamba_type="sweep_8"),
  ):
    mc = dimsum_convert.model_config_from_upstream(dict(TRAIN_ARGS, **changes))
    assert mc.scan_type == changes.get("bimamba_type", "none")
    assert mc.bidirectional == (mc.scan_type == "v2")
  assert dimsum_convert.model_config_from_upstream(cfg).name == "DiMSUM-B/2"


def test_config_path_still_refuses_unpublished_flags(tmp_path, golden):
  """scanning_continuity has no parameters of its own: without this check --config would
  convert it silently into a model that computes something else."""
  state, _, _, cfg = golden
  path = _save_torch(tmp_path / "snake.pt", state, args=dict(cfg, scanning_continuity=True))
  with pytest.raises(SystemExit, match="scanning_continuity=True"):
    command_line.call(
      convert,
      [
        f"--upstream={path}",
        f"--config={_config_file(tmp_path, cfg)}",
        f"--out={tmp_path / 'out'}",
      ],
    )
  assert not (tmp_path / "out").exists()
