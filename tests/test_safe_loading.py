"""Readers of outside files never execute code: harmful pickles are refused before they run.

Every harmful file here carries an object whose `__reduce__` would create a marker file in
tmp_path when unpickled (through os.system or exec). Each test first shows that the file really
is harmful (an unsafe load creates the marker), then that the project's reader refuses it with
one sentence naming the file and the offending type, and that the marker does not exist
afterwards. Readers covered: upstream .pt checkpoints (dimsum_jax.convert), diffusers .bin VAE
weights (dimsum_jax.vae.convert), golden .npz files (dimsum_jax.tools.parity) and latent shards
(dimsum_jax.data.latent_parts.finish). A normal upstream checkpoint, with its argparse.Namespace
`args`, still converts.
"""

import argparse
import os
import pickle

import numpy as np
import pytest

from dimsum_jax import command_line
from dimsum_jax import convert
from dimsum_jax.data import latent_parts
from dimsum_jax.data import latents as latents_lib
from dimsum_jax.tools import parity
from dimsum_jax.vae import convert as vae_convert
from tests import train_util
from tests.golden import golden_file

torch = pytest.importorskip("torch")

from tests.test_convert import _golden, _save_torch  # pylint: disable=wrong-import-position


class RunsShell:
  """Unpickling it runs `touch MARKER` in a shell."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch '{self.marker}'",))


class RunsPython:
  """Unpickling it runs Python code that creates MARKER."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (exec, (f"open({self.marker!r}, 'w').close()",))


PAYLOADS = {"os.system": (RunsShell, "system"), "exec": (RunsPython, "exec")}


def _assert_harmful(load, marker):
  """The unsafe load of the file creates the marker (so the file is a real attack); reset."""
  assert not marker.exists()
  try:
    load()
  except Exception:  # pylint: disable=broad-except  (the payload ran; what follows may not load)
    pass
  assert marker.exists(), "the harmful file did not run its payload when loaded unsafely"
  marker.unlink()


def _assert_one_sentence(message, *parts):
  assert "\n" not in message and "Traceback" not in message, message
  for part in parts:
    assert part in message, message


# --- upstream .pt checkpoints (dimsum_jax.convert) ----------------------------------------------


def _harmful_checkpoint(path, payload, where):
  """An upstream-looking checkpoint with the payload as `args`, inside the Namespace of `args`,
  as a state-dict value, or as the whole file."""
  w = torch.zeros(2)
  if where == "args":
    obj = {"ema": {"w": w}, "model": {"w": w}, "args": payload}
  elif where == "namespace":
    obj = {"ema": {"w": w}, "model": {"w": w}, "args": argparse.Namespace(model=payload)}
  elif where == "state_dict":
    obj = {"ema": {"w": w, "evil": payload}}
  else:
    obj = payload
  torch.save(obj, path)
  return path


@pytest.mark.parametrize("where", ["args", "namespace", "state_dict", "file"])
@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_convert_refuses_a_harmful_checkpoint(tmp_path, kind, where):
  cls, name = PAYLOADS[kind]
  marker = tmp_path / "marker"
  path = _harmful_checkpoint(tmp_path / "evil.pt", cls(marker), where)
  _assert_harmful(lambda: torch.load(path, map_location="cpu", weights_only=False), marker)
  out_dir = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    command_line.call(convert, [f"--upstream={path}", f"--out={out_dir}"])
  _assert_one_sentence(str(e.value.code), str(path), name, "refused without running it")
  assert not marker.exists()
  assert not out_dir.exists()


def test_convert_cli_process_refuses_it_in_one_sentence(tmp_path):
  marker = tmp_path / "marker"
  path = _harmful_checkpoint(tmp_path / "evil.pt", RunsShell(marker), "args")
  r = train_util.run_python(
    ["-m", "dimsum_jax.convert", f"--upstream={path}", f"--out={tmp_path / 'out'}"], timeout=120
  )
  assert r.returncode == 1, r.stderr
  assert "Traceback" not in r.stderr, r.stderr
  assert r.stderr.strip().count("\n") == 0, r.stderr
  assert "posix.system" in r.stderr or "nt.system" in r.stderr, r.stderr
  assert not marker.exists()


def test_the_allowlist_is_exactly_the_namespace_of_upstream_args():
  assert convert.SAFE_GLOBALS == (argparse.Namespace,)


def test_an_upstream_checkpoint_with_namespace_args_still_converts(tmp_path):
  """As upstream's train.py writes it: model, ema, opt (an AdamW state dict), epoch and the
  argparse.Namespace of its arguments."""
  state, _, _, cfg = _golden()
  path = _save_torch(tmp_path / "upstream.pt", state, args=cfg)
  loaded, args = convert.load_torch_checkpoint(str(path))
  assert args == cfg
  assert set(loaded) == set(state)
  for key in ("pos_embed", "blocks.3.freq_mamba.mixer.A_log", "final_layer.linear.weight"):
    np.testing.assert_array_equal(loaded[key], state[key], err_msg=key)
  out_dir = tmp_path / "converted"
  command_line.call(convert, [f"--upstream={path}", f"--out={out_dir}"])
  assert (out_dir / "model_config.json").exists() and (out_dir / "params").is_dir()


# --- diffusers .bin VAE weights (dimsum_jax.vae.convert) -----------------------------------------


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_vae_import_refuses_a_harmful_bin(tmp_path, kind):
  cls, name = PAYLOADS[kind]
  marker = tmp_path / "marker"
  folder = tmp_path / "vae"
  folder.mkdir()
  (folder / "config.json").write_text("{}")
  path = folder / vae_convert.TORCH_FILE
  torch.save({"encoder.conv_in.weight": torch.zeros(1), "evil": cls(marker)}, path)
  _assert_harmful(lambda: torch.load(path, map_location="cpu", weights_only=False), marker)
  with pytest.raises(SystemExit) as e:
    command_line.call(vae_convert, [f"--diffusers={folder}", f"--out={tmp_path / 'out'}"])
  _assert_one_sentence(str(e.value.code), str(path), name, "refused without running it")
  assert not marker.exists()
  assert not (tmp_path / "out").exists()


# --- golden .npz files (dimsum_jax.tools.parity) -------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_parity_refuses_an_npz_holding_objects(tmp_path, kind):
  cls, _ = PAYLOADS[kind]
  marker = tmp_path / "marker"
  arrays = dict(np.load(golden_file("tiny.npz"), allow_pickle=False))
  path = tmp_path / "evil.npz"
  np.savez(path, **arrays, notes=np.array([cls(marker)], dtype=object))
  _assert_harmful(lambda: np.load(path, allow_pickle=True)["notes"], marker)
  with pytest.raises(SystemExit) as e:
    command_line.call(parity, [f"--golden={path}"])
  _assert_one_sentence(str(e.value.code), str(path), "'notes'", "Python objects")
  assert not marker.exists()


def test_parity_refuses_a_bare_pickle(tmp_path):
  """A file that is a pickle, not an .npz: numpy would unpickle it with allow_pickle=True."""
  marker = tmp_path / "marker"
  path = tmp_path / "evil.npz"
  with open(path, "wb") as f:
    pickle.dump(RunsPython(marker), f)
  _assert_harmful(lambda: np.load(path, allow_pickle=True), marker)
  with pytest.raises(SystemExit) as e:
    command_line.call(parity, [f"--golden={path}"])
  _assert_one_sentence(str(e.value.code), str(path), "not an .npz archive")
  assert not marker.exists()


# --- latent shards (dimsum_jax.data.latent_parts) ------------------------------------------------


def test_encode_verification_refuses_a_shard_holding_objects(tmp_path):
  """A complete one-part latent set whose latents shard is replaced by an object array: the
  verification pass refuses to read it, naming the shard."""
  out = tmp_path / "latents"
  part = out / latent_parts.part_name(0, 1)
  extra = dict(
    num_images=2, total_images=2, skipped=[], mode="mean", seed=0, dtype="float32", crop="adm"
  )
  with latents_lib.LatentShardWriter(
    str(part), latent_shape=(2, 2, 4), num_classes=0, shard_size=2, extra=extra
  ) as writer:
    writer.append(np.zeros((2, 2, 2, 4), np.float32), np.zeros(2, np.int32))
  shard = part / latents_lib.read_meta(str(part))["shards"][0]["latents"]
  marker = tmp_path / "marker"
  np.save(shard, np.array([RunsShell(marker)] * 2, dtype=object), allow_pickle=True)
  _assert_harmful(lambda: np.load(shard, allow_pickle=True), marker)
  with pytest.raises(latent_parts.EncodeError) as e:
    latent_parts.finish(str(out))
  _assert_one_sentence(str(e.value), os.path.relpath(shard, out), "delete its part")
  assert not marker.exists()
  assert not (out / latents_lib.META).exists()
