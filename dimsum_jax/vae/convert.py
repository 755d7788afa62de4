"""Import a local diffusers AutoencoderKL folder (e.g. stabilityai/sd-vae-ft-ema) into Flax.

  python -m dimsum_jax.vae.convert --diffusers=DIR --out=DIR [--overwrite]

DIR holds `config.json` and `diffusion_pytorch_model.safetensors` (needs `pip install
safetensors`) or `diffusion_pytorch_model.bin` (needs `pip install torch`; read with torch's
weights_only loader, so that a pickle asking for more than tensors is refused before it runs);
a full pipeline folder with a `vae/` subfolder also works. Nothing is downloaded. The output
folder gets config.json and an Orbax checkpoint; read it back with `dimsum_jax.vae.load_vae`.

The key mapping: diffusers `a.b.0.c.weight` is Flax `a/b_0/c/kernel` (convolutions and dense
layers) or `.../scale` (group norms); `bias` stays `bias`. Conv weights go from [out, in, kh, kw]
to [kh, kw, in, out], dense weights from [out, in] to [in, out]. Checkpoints saved by old
diffusers name the mid-block attention `query/key/value/proj_attn` (sometimes as 1x1 convs);
they are renamed to `to_q/to_k/to_v/to_out.0` first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys

from absl import app
from absl import flags
import flax.traverse_util
import numpy as np

from dimsum_jax import command_line
from dimsum_jax.vae import checkpoint, model

SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"
TORCH_FILE = "diffusion_pytorch_model.bin"
CONFIG_FILE = "config.json"
_OLD_ATTENTION_KEY = re.compile(
  r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$"
)
_NEW_ATTENTION_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_SHOWN = 4  # keys listed per kind of mismatch in an error message


def diffusers_key(flax_path) -> str:
  """A Flax parameter path as a diffusers key.

  ('encoder', 'down_blocks_0', 'resnets_1', 'norm1', 'scale')
  -> 'encoder.down_blocks.0.resnets.1.norm1.weight'
  """
  *modules, leaf = flax_path
  modules = [re.sub(r"_(\d+)$", r".\1", name) for name in modules]
  return ".".join(modules + ["bias" if leaf == "bias" else "weight"])


def rename_old_attention_keys(state_dict: dict) -> dict:
  """query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0 inside `attentions.N`; others kept."""
  renamed = {}
  for key, value in state_dict.items():
    match = _OLD_ATTENTION_KEY.match(key)
    if match:
      prefix, name, leaf = match.groups()
      key = f"{prefix}{_NEW_ATTENTION_NAME[name]}.{leaf}"
    renamed[key] = value
  return renamed


def _torch_shape(flax_shape) -> tuple:
  if len(flax_shape) == 4:
    kh, kw, cin, cout = flax_shape
    return (cout, cin, kh, kw)
  if len(flax_shape) == 2:
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def _to_flax_layout(array: np.ndarray, flax_shape) -> np.ndarray:
  if len(flax_shape) == 2 and array.ndim == 4 and array.shape[2:] == (1, 1):
    array = array[:, :, 0, 0]  # attention projections stored as 1x1 convs
  if len(flax_shape) == 4 and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if len(flax_shape) == 2 and array.ndim == 2:
    return array.T
  return array


def _listing(items) -> str:
  shown = ", ".join(items[:_SHOWN])
  return shown + (f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def params_from_state_dict(
  state_dict: dict, vae: model.AutoencoderKL, source: str = "The state dict"
):
  """The Flax parameter tree (float32 NumPy leaves) of `vae` from a diffusers state dict.

  Raises ValueError naming the missing, unexpected and wrongly shaped keys when the state dict
  is not the one of this architecture.
  """
  state = rename_old_attention_keys(state_dict)
  expected = flax.traverse_util.flatten_dict(model.abstract_params(vae))
  path_of_key = {diffusers_key(path): path for path in expected}
  missing = sorted(set(path_of_key) - set(state))
  unexpected = sorted(set(state) - set(path_of_key))
  wrong_shapes, flat = [], {}
  for key, path in path_of_key.items():
    if key not in state:
      continue
    target = expected[path].shape
    array = _to_flax_layout(np.asarray(state[key], dtype=np.float32), target)
    if array.shape != tuple(target):
      got = tuple(np.shape(state[key]))
      wrong_shapes.append(f"{key} (got {got}, expected {_torch_shape(target)})")
    flat[path] = array
  if missing or unexpected or wrong_shapes:
    problems = [
      f"{name} {_listing(items)}"
      for name, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", wrong_shapes),
      )
      if items
    ]
    raise ValueError(
      f"{source} does not match the AutoencoderKL its config.json describes "
      f"({'; '.join(problems)}): check that the folder is a diffusers "
      "AutoencoderKL (e.g. stabilityai/sd-vae-ft-ema) whose config.json belongs "
      "to these weights."
    )
  return flax.traverse_util.unflatten_dict(flat)


def find_vae_folder(directory: str) -> str:
  """`directory`, or its `vae/` subfolder for a full pipeline folder; checks the files exist."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"{directory} is not a directory: pass --diffusers=DIR, a local copy "
      "of a diffusers AutoencoderKL such as stabilityai/sd-vae-ft-ema."
    )
  if not os.path.exists(os.path.join(directory, CONFIG_FILE)):
    if os.path.exists(os.path.join(directory, "vae", CONFIG_FILE)):
      directory = os.path.join(directory, "vae")
    else:
      raise FileNotFoundError(
        f"{directory} has no {CONFIG_FILE}: download the whole diffusers "
        "VAE folder (config.json and its weights), e.g. `hf download "
        "stabilityai/sd-vae-ft-ema --local-dir DIR`."
      )
  weights = (os.path.join(directory, name) for name in (SAFETENSORS_FILE, TORCH_FILE))
  if not any(os.path.exists(path) for path in weights):
    raise FileNotFoundError(
      f"{directory} has no weights: expected {SAFETENSORS_FILE} or "
      f"{TORCH_FILE} next to {CONFIG_FILE}."
    )
  return directory


def read_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  with open(path) as f:
    try:
      config = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8 text
      raise ValueError(f"{path} is not valid JSON ({e}): download it again.") from e
  if not isinstance(config, dict):
    raise ValueError(
      f"{path} holds a JSON {type(config).__name__}, not a diffusers config: download it again."
    )
  return config


def read_state_dict(directory: str) -> dict:
  """{diffusers key: float32 NumPy array}, from the safetensors file if there is one, else .bin."""
  safetensors_path = os.path.join(directory, SAFETENSORS_FILE)
  if os.path.exists(safetensors_path):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError(
        f"Reading {SAFETENSORS_FILE} needs the `safetensors` package: pip install safetensors."
      ) from e
    try:
      tensors = load_file(safetensors_path)
    except Exception as e:  # pylint: disable=broad-except  (SafetensorError, OSError...)
      raise ValueError(
        f"{safetensors_path} is not a readable safetensors file ({_reason(e)}): download it again."
      ) from e
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"Reading {TORCH_FILE} needs the `torch` package: pip install torch "
      f"(or provide {SAFETENSORS_FILE} and pip install safetensors)."
    ) from e
  path = os.path.join(directory, TORCH_FILE)
  try:
    # weights_only: tensors and plain containers only; a pickle asking for anything else (a
    # function, a class) is refused before it runs.
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (pickle, zip and torch errors alike)
    refused = re.search(r"GLOBAL ([\w.]+)", str(e))
    if refused:
      raise ValueError(
        f"{path} was refused without running it: its pickle asks for "
        f"{refused.group(1)}, but a diffusers state dict holds only tensors; use "
        f"the official weights, preferably {SAFETENSORS_FILE}."
      ) from None
    raise ValueError(
      f"{path} is not a readable PyTorch file ({_reason(e)}): download it again."
    ) from e
  if not isinstance(state, dict) or not all(hasattr(v, "detach") for v in state.values()):
    raise ValueError(
      f"{path} holds a {type(state).__name__}, not a state dict of tensors: "
      "download the diffusers VAE folder again."
    )
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def _reason(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def convert_diffusers_vae(diffusers_dir: str, out_dir: str | None = None, overwrite: bool = False):
  """Reads a diffusers VAE folder; returns (module, params) and writes them to out_dir if given."""
  directory = find_vae_folder(diffusers_dir)
  config = read_config(directory)
  vae = model.vae_from_config(config)
  scaling = config.get("scaling_factor", model.SCALING_FACTOR)
  if scaling != model.SCALING_FACTOR:
    logging.warning(
      "config.json has scaling_factor %s but dimsum_jax latents use %s.",
      scaling,
      model.SCALING_FACTOR,
    )
  params = params_from_state_dict(read_state_dict(directory), vae, source=directory)
  if out_dir is not None:
    checkpoint.save_vae(out_dir, config, params, overwrite=overwrite)
  return vae, params


FLAGS = flags.FlagValues()  # this command's own (see dimsum_jax.command_line)
flags.DEFINE_string(
  "diffusers",
  None,
  "Local diffusers AutoencoderKL folder (or a pipeline folder with a vae/ subfolder).",
  flag_values=FLAGS,
)
flags.DEFINE_string("out", None, "Output folder (config.json + Orbax params).", flag_values=FLAGS)
flags.DEFINE_boolean(
  "overwrite", False, "Replace an existing conversion in --out.", flag_values=FLAGS
)
flags.mark_flags_as_required(["diffusers", "out"], flag_values=FLAGS)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    _, params = convert_diffusers_vae(FLAGS.diffusers, FLAGS.out, overwrite=FLAGS.overwrite)
  except (FileNotFoundError, FileExistsError, ImportError, ValueError) as e:
    sys.exit(f"error: {e}")
  count = sum(leaf.size for leaf in flax.traverse_util.flatten_dict(params).values())
  print(f"Wrote {count:,} VAE parameters to {os.path.abspath(FLAGS.out)}")


def cli():
  """The `dimsum-vae-convert` console script."""
  command_line.run(main, FLAGS)


if __name__ == "__main__":
  cli()
