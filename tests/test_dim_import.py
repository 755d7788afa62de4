"""`python -m dimsum_jax.convert` on DiM's released format (convert_dim, dim_convert).

DiM's `nnet_ema.pth` is a plain torch state dict under the official keys (upstream `train_ldm_discrete.py`).
The files here are written the same way: the official key set of the golden tiny model
(shared/golden/dim/manifest.json, D = 64, 5 blocks, 10 classes) with random tensors of a stated
seed, or the golden tiny.npz weights themselves. A conversion is read back as the sampler reads
it (`sample.load_model(checkpoint_dir=...)`) and mapped back with `dim_convert.to_upstream`; the
published sizes (DiM-L/2, DiM-H/2 at 256 px, DiM-H/2 at 512 px) are checked on their key sets
and shapes only (nothing allocated) against this repository's configs.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax import command_line, convert, convert_dim, model_loading, sample
from dimsum_jax.models import create_model, dim_convert
from tests import seeds
from tests.golden import golden_file

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32_TOL = 2e-4  # float32 port against upstream's float64 output (golden README)
PUBLISHED = {  # manifest entry: this repository's config of that model
  "imagenet256_L_DiM": "configs/imagenet256.py:dim",
  "imagenet256_H_DiM": "configs/imagenet256.py:dim_h",
  "imagenet512_H_DiM_ft": "configs/imagenet512.py:dim",
}


@functools.lru_cache(None)
def _manifest():
  with open(golden_file("dim/manifest.json")) as f:
    return json.load(f)


def _official_keys():
  """{key: shape} of the golden tiny model, as the manifest lists them."""
  return {k: tuple(v[0]) for k, v in _manifest()["tiny"]["state_dict"].items()}


def _random_state(seed):
  rng = np.random.default_rng(seed)
  return {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in _official_keys().items()}


def _golden_state():
  data = np.load(golden_file("dim/tiny.npz"))
  return {k: data[k] for k in _official_keys()}


def _save(path, state):
  """A plain state dict, as upstream's nnet_ema.pth."""
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
  return path


def _config_file(tmp_path, name="DiM-L/2", **model):
  """A config file whose model section is the golden tiny DiM (or `name` / overrides)."""
  fields = dict(
    name=name,
    depth=5,
    hidden_size=64,
    input_size=8,
    in_channels=4,
    num_classes=10,
    dim_padding="lateral",
    scan_impl="reference",
    **model,
  )
  path = tmp_path / "tiny_dim.py"
  path.write_text(
    "from dimsum_jax import config_utils\n\n\n"
    "def get_config():\n"
    "  c = config_utils.base_config()\n"
    f"  c.model.update({fields!r})\n"
    "  c.transport.path_type = 'ScaledLinear'\n"
    "  c.transport.prediction = 'noise'\n"
    "  return c\n"
  )
  return path


def _load(out_dir):
  """The conversion as `dimsum_jax.sample --checkpoint` loads it (VAE check skipped)."""
  with pytest.MonkeyPatch.context() as m:
    m.setattr(model_loading, "check_vae", lambda config, vae_dir=None: None)
    return sample.load_model(checkpoint_dir=str(out_dir))


def _refusal(argv):
  with pytest.raises(SystemExit) as e:
    command_line.call(convert, argv)
  text = str(e.value.code)
  assert text.startswith("error: ") and "\n" not in text, text
  return text


# ---------------------------------------------------------------- round trip and values


@seeds.each()
def test_official_key_set_round_trips_through_the_cli(tmp_path, capsys, seed):
  """Random tensors (seed) under every official key of the tiny model: converted by the CLI,
  read back by the sampler's loader, mapped back by to_upstream: bit for bit the same arrays."""
  state = _random_state(seed)
  path = _save(tmp_path / "nnet_ema.pth", state)
  out_dir = tmp_path / "converted"
  command_line.call(
    convert, [f"--upstream={path}", f"--config={_config_file(tmp_path)}", f"--out={out_dir}"]
  )
  summary = capsys.readouterr().out
  assert "Wrote 228,176 parameters of a DiM of depth 5, hidden 64, patch 2" in summary
  assert "lateral padding" in summary and "nnet_ema.pth" in summary
  mc = json.loads((out_dir / "model_config.json").read_text())
  assert (mc["name"], mc["depth"], mc["hidden_size"], mc["dim_padding"]) == (
    "DiM-L/2",
    5,
    64,
    "lateral",
  )
  loaded = _load(out_dir)
  back = dim_convert.to_upstream(loaded.params, loaded.model)
  assert sorted(back) == sorted(state), f"seed {seed}"
  for key, value in state.items():
    assert back[key].dtype == np.float32 and np.array_equal(back[key], value), (key, seed)


def test_golden_weights_give_the_official_output(tmp_path):
  """tiny.npz's weights through the CLI: the converted model's float32 output against the
  official float64 output (2e-4 relative, as the parity tool; measured 1.4e-5)."""
  data = np.load(golden_file("dim/tiny.npz"))
  path = _save(tmp_path / "nnet_ema.pth", _golden_state())
  out_dir = tmp_path / "converted"
  command_line.call(
    convert, [f"--upstream={path}", f"--config={_config_file(tmp_path)}", f"--out={out_dir}"]
  )
  loaded = _load(out_dir)
  x = jnp.asarray(np.transpose(data["x"], (0, 2, 3, 1)))
  with jax.default_matmul_precision("highest"):
    out = jax.jit(
      lambda p, x, t, y: loaded.model.apply({"params": p}, x, t, y),
      compiler_options={"xla_backend_optimization_level": 0},
    )(loaded.params, x, jnp.asarray(data["t"]), jnp.asarray(data["y"], jnp.int32))
  out = np.transpose(np.asarray(out, np.float64), (0, 3, 1, 2))
  ref = data["out_f64"]
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert rel < F32_TOL and np.abs(ref).max() > 0.1, rel


# ---------------------------------------------------------------- published sizes


@pytest.mark.parametrize("entry", sorted(PUBLISHED))
def test_published_key_sets_fit_the_configs(entry):
  """The official key set and PyTorch shapes of each published model (manifest, from upstream's
  configs) fit the model of this repository's config exactly, and the right config is
  suggested for those weights; nothing is allocated (zero-stride views, abstract params)."""
  shapes = {
    k: tuple(v) for k, v in _manifest()["param_counts_published"][entry]["state_dict"].items()
  }
  model = create_model(convert.load_model_config(os.path.join(ROOT, PUBLISHED[entry])))
  abstract = dim_convert.abstract_params(model)
  assert dim_convert.upstream_shapes(model, abstract) == shapes
  dim_convert.check_state_dict(shapes, model, abstract)
  views = {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in shapes.items()}
  assert convert_dim.family(views) == "dim"
  assert convert_dim.suggest_config(views) == PUBLISHED[entry]
  # One key of each kind of fault, named with its PyTorch shapes.
  bad = dict(shapes)
  bad["transformer_blocks.30.skip_linear.1.weight"] = (7, 7)
  del bad["transformer_blocks.48.attn1.A_log"]
  bad["transformer_blocks.49.attn1.D"] = bad.pop("transformer_blocks.0.attn1.D")
  with pytest.raises(dim_convert.DiMConvertError) as e:
    dim_convert.check_state_dict(bad, model, abstract)
  d = model.hidden_size
  text = str(e.value)
  for part in (
    f"transformer_blocks.30.skip_linear.1.weight: [7, 7], expected [{d}, {d}]",
    "unexpected (1): transformer_blocks.49.attn1.D",
    "transformer_blocks.48.attn1.A_log",
    "transformer_blocks.0.attn1.D",
  ):
    assert part in text, text


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("kind", ["missing", "renamed", "shape"])
def test_mismatching_key_or_shape_is_refused_by_name(tmp_path, kind):
  state = _random_state(0)
  if kind == "missing":
    del state["transformer_blocks.2.attn1.x_proj.weight"]
    expected = "missing (1): transformer_blocks.2.attn1.x_proj.weight"
  elif kind == "renamed":
    state["transformer_blocks.3.skip_linear.weights"] = state.pop(
      "transformer_blocks.3.skip_linear.weight"
    )
    expected = "unexpected (1): transformer_blocks.3.skip_linear.weights"
  else:
    state["a4m_adapter.pad_token"] = np.zeros((1, 3, 64), np.float32)
    expected = "mis-shaped (1): a4m_adapter.pad_token: [1, 3, 64], expected [1, 64, 3]"
  path = _save(tmp_path / "nnet_ema.pth", state)
  out_dir = tmp_path / "out"
  text = _refusal([f"--upstream={path}", f"--config={_config_file(tmp_path)}", f"--out={out_dir}"])
  assert "does not fit --config's DiM-L/2" in text and expected in text, text
  assert not out_dir.exists()


def test_dim_and_dimsum_weights_are_told_apart(tmp_path):
  """Upstream DiMSUM names its models DiM-L/2 too: the keys decide which model the weights are,
  and --config must build that model."""
  dim_state = _save(tmp_path / "nnet_ema.pth", _random_state(0))
  data = np.load(golden_file("tiny.npz"))  # DiMSUM's golden weights
  dimsum_keys = {
    k: data[k]
    for k in data.files
    if k.startswith(
      ("blocks.", "x_embedder", "y_embedder", "t_embedder", "final_layer", "attn_block", "pos_")
    )
  }
  assert convert_dim.family(dimsum_keys) == "dimsum"
  dimsum_state = _save(tmp_path / "dimsum.pt", dimsum_keys)
  digits = os.path.join(ROOT, "configs/digits.py")  # a DiMSUM model
  out = f"--out={tmp_path / 'out'}"
  text = _refusal([f"--upstream={dim_state}", f"--config={digits}", out])
  assert "holds DiM's weights" in text and "builds DiMSUM-L/4" in text
  text = _refusal([f"--upstream={dimsum_state}", f"--config={_config_file(tmp_path)}", out])
  assert "holds DiMSUM's weights" in text and "configs/imagenet256.py" in text
  text = _refusal([f"--upstream={dim_state}", out])
  assert "carry no hyperparameters: pass --config=configs/imagenet256.py:dim" in text
  assert not (tmp_path / "out").exists()


def test_cli_process_refuses_in_one_line(tmp_path):
  """A real `python -m dimsum_jax.convert` run on a DiM file with a mis-shaped key: exit status
  1, the key on stderr, no traceback, nothing written."""
  state = _random_state(1)
  state["additional_embed"] = np.zeros((1, 66, 64), np.float32)  # an 8x8-token table
  path = _save(tmp_path / "nnet_ema.pth", state)
  out_dir = tmp_path / "out"
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "dimsum_jax.convert",
      f"--upstream={path}",
      f"--config={_config_file(tmp_path)}",
      f"--out={out_dir}",
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 1, r.stderr
  line = [s for s in r.stderr.splitlines() if s.startswith("error: ")]
  assert len(line) == 1 and "additional_embed: [1, 66, 64], expected [1, 18, 64]" in line[0]
  assert "Traceback" not in r.stderr and not out_dir.exists()
