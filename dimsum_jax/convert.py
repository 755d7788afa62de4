"""Import official PyTorch DiMSUM weights (VinAIResearch/DiMSUM) into this project's parameters.

  python -m dimsum_jax.convert --upstream=CKPT.pt [--config=configs/imagenet256.py] --out=DIR

reads an upstream checkpoint (a torch file holding `model`, `ema`, `opt`, `epoch`, `args`, or a bare
state dict), takes `ema` (what upstream's samplers use; `--entry=model` for the raw weights), maps
every key and writes the parameters with their model config (params/ + model_config.json, read by
`dimsum_jax.sample --checkpoint`). Without --config the model comes from the checkpoint's `args`;
either way, upstream options this port does not implement are refused (PUBLISHED_FLAGS), as are
missing, unknown or mis-shaped keys, by upstream key and PyTorch shape, before anything is written.
The mapping itself and the model config of upstream's arguments are
dimsum_jax.models.dimsum_convert (`from_upstream(state_dict, model, abstract_params)`: NumPy
arrays under upstream names in, a Flax parameter tree out); this module reads the .pt file and
writes the conversion. torch is needed only to read .pt files.

DiM's released `nnet_ema.pth` (tyshiwo1/DiM-DiffusionMamba, a plain state dict) converts the
same way with a DiM --config (`convert_dim`: the two models are told apart by their keys).

A .pt file is unpickled by torch's weights_only loader, which builds tensors and plain Python
values only; the one class upstream's train.py adds, the argparse.Namespace of its arguments, is
allowlisted (SAFE_GLOBALS). A file that asks for anything else (a function, another class) is
refused before any of it runs, by that name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from dimsum_jax import command_line
from dimsum_jax import config_utils
from dimsum_jax.models.dimsum_convert import (
  ConvertError,
  check_published_flags,
  describe,
  from_upstream,
  model_config_from_upstream,
)

# The classes an upstream checkpoint holds beyond what torch's weights_only loader builds anyway
# (tensors, OrderedDict state dicts, the optimiser's dicts, lists, tuples, numbers, strings,
# None): train.py saves its argparse namespace as `args`. Nothing else is allowed.
SAFE_GLOBALS = (argparse.Namespace,)


def load_torch_checkpoint(path: str, entry: str = "ema"):
  """(state dict as NumPy arrays, training args as a dict or None) of an upstream torch file:
  entry `entry` of a train.py checkpoint, or a bare state dict (the Hugging Face file)."""
  try:
    import torch
  except ImportError as e:
    raise ConvertError("Reading an upstream .pt checkpoint needs PyTorch: pip install torch") from e
  allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
  try:
    with allow(list(SAFE_GLOBALS)) if allow else contextlib.nullcontext():
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (pickle, zip and torch errors alike)
    refused = re.search(r"GLOBAL ([\w.]+)", str(e))
    if refused:
      raise ConvertError(_refusal(path, refused.group(1))) from None
    reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
    raise ConvertError(
      f"{path} is not a readable PyTorch checkpoint ({reason}): download it "
      "again, or pass the .pt file that upstream's train.py wrote."
    ) from e
  if not isinstance(obj, dict):
    raise ConvertError(
      f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint "
      "written by upstream's train.py."
    )
  args = None
  entries = sorted(k for k in ("ema", "model") if isinstance(obj.get(k), dict))
  if entries:
    if entry not in entries:
      raise ConvertError(
        f"{path} has no {entry!r} entry (it has {entries}): pass --entry={entries[0]}."
      )
    args = obj.get("args")
    obj = obj[entry]
  state = {k: v.detach().cpu().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}
  if not state:
    raise ConvertError(f"{path} holds no tensors under {entry!r}.")
  if isinstance(args, argparse.Namespace):
    args = vars(args)
  elif args is not None and not isinstance(args, dict):
    raise ConvertError(
      f"{path}: its `args` is a {type(args).__name__}, not the "
      "argparse.Namespace upstream's train.py saves: convert the official "
      "checkpoint, or a bare state dict with --config=configs/<experiment>.py."
    )
  return state, args


def _refusal(path: str, name: str) -> str:
  """The sentence for a checkpoint whose pickle asks for `name`, which is not allowlisted."""
  if name in {f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS}:
    return (
      f"{path} holds {name}, which this PyTorch version cannot allowlist for safe loading: "
      "pip install -U 'torch>=2.5'."
    )
  return (
    f"{path} was refused without running it: its pickle asks for {name}, but an upstream "
    "checkpoint holds only tensors, plain Python values and argparse.Namespace, so it may "
    "run code when loaded; convert only checkpoints of the official release or a state "
    "dict saved with torch.save(model.state_dict(), PATH)."
  )


def load_model_config(spec: str) -> ml_collections.ConfigDict:
  """The `model` section of a config file, given as `path.py` or `path.py:arg` (the argument of
  its get_config, as `dimsum_jax.main --config` takes it)."""
  config = config_utils.load_config_file(spec)
  if "model" not in config:
    raise ConvertError(f"--config={spec}: its config has no `model` section.")
  return config.model


# What a conversion directory may hold: its two parts and Orbax's temporary folders.
_OUT_ENTRIES = re.compile(r"params(\..*)?|model_config\.json(\.tmp)?")


def _check_out_dir(out: str) -> None:
  """Refuse an --out that holds anything but an earlier conversion: writing there would mix two
  layouts (an export's config.json takes precedence over model_config.json when sampling)."""
  import os

  if os.path.exists(out) and not os.path.isdir(out):
    raise ConvertError(f"--out={out} is a file: pass a directory.")
  if os.path.isdir(out):
    other = sorted(n for n in os.listdir(out) if not _OUT_ENTRIES.fullmatch(n))
    if other:
      raise ConvertError(
        f"--out={out} already holds {other[:4]}, which is not a conversion: choose a new directory."
      )


def convert_checkpoint(
  upstream: str, out: str, config: str | None = None, entry: str = "ema"
) -> str:
  """Convert `upstream` into OUT (params/ + model_config.json); returns a one-line summary.

  Every check (arguments, config, keys, shapes) runs before anything is written, so a failed
  conversion leaves no directory behind."""
  import os

  from dimsum_jax.models import abstract_params, create_model

  if not os.path.exists(upstream):
    raise ConvertError(
      f"--upstream={upstream} does not exist: pass the path of an upstream .pt "
      "checkpoint (e.g. imnet256_510ep.pt)."
    )
  _check_out_dir(out)
  model_cfg = load_model_config(config) if config else None  # a bad --config fails fast
  state, up_args = load_torch_checkpoint(upstream, entry)
  from dimsum_jax import convert_dim

  if convert_dim.uses_dim(upstream, state, model_cfg, config):  # Teng et al.'s DiM
    return convert_dim.convert(upstream, out, state, model_cfg)
  if model_cfg is not None:
    if up_args:
      check_published_flags(up_args)
  elif up_args:
    model_cfg = model_config_from_upstream(up_args, state)
  else:
    raise ConvertError("This checkpoint has no `args`: pass --config=configs/<experiment>.py.")
  try:
    model = create_model(model_cfg)
    abstract = abstract_params(model, model_cfg)
  except ValueError as e:
    raise ConvertError(f"The model config cannot be built: {e}") from e
  params = from_upstream(state, model, abstract)
  save_params(out, params, model_cfg)
  n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
  return f"Wrote {n:,} parameters ({entry}) of {describe(model_cfg)} to {os.path.abspath(out)}"


FLAGS = flags.FlagValues()  # this command's own (see dimsum_jax.command_line)
flags.DEFINE_string(
  "upstream",
  None,
  "Upstream .pt checkpoint or state dict (DiMSUM's, or DiM's nnet_ema.pth with a DiM --config).",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "config",
  None,
  "Config file (configs/*.py, or path.py:arg); its `model` "
  "section must fit the weights. Default: the model of the checkpoint's `args`.",
  flag_values=FLAGS,
)
flags.DEFINE_enum(
  "entry",
  "ema",
  ["ema", "model"],
  "Which weights of a train.py checkpoint: ema (as upstream samples) or model (the raw weights).",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "out", None, "Output directory (params/ + model_config.json).", flag_values=FLAGS
)
flags.mark_flags_as_required(["upstream", "out"], flag_values=FLAGS)


def main(argv):
  """User mistakes (ConvertError, a config's ValueError) end the command with their message and
  exit status 1, not a traceback."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    summary = convert_checkpoint(FLAGS.upstream, FLAGS.out, FLAGS.config, FLAGS.entry)
  except ValueError as e:  # ConvertError, or a config that create_model refuses
    raise SystemExit(f"error: {e}") from None
  print(summary)


def cli():
  """The `dimsum-convert` console script."""
  command_line.run(main, FLAGS)


def save_params(out_dir, params, model_cfg):
  """Write params (Orbax, `params/`) + `model_config.json`; `dimsum_jax.sample --checkpoint`
  (sample.load_model) reads it. model_config.json is what marks a conversion, so it is removed
  first and written last, atomically: an interrupted run never leaves a directory that looks
  complete, nor old weights under a new config."""
  import os

  import orbax.checkpoint as ocp

  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  config_path = os.path.join(out_dir, "model_config.json")
  if os.path.exists(config_path):
    os.remove(config_path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out_dir, "params"), params, force=True)
  with open(config_path + ".tmp", "w") as f:
    json.dump(model_cfg.to_dict(), f, indent=2)
  os.replace(config_path + ".tmp", config_path)


if __name__ == "__main__":
  cli()
