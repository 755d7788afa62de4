"""Import official PyTorch DiMSUM weights (VinAIResearch/DiMSUM) into this project's parameters.

  python -m dimsum_jax.convert --upstream=CKPT.pt [--config=configs/imagenet256.py] --out=DIR

reads an upstream checkpoint (a torch file holding `model`, `ema`, `opt`, `epoch`, `args`, or a bare
state dict), takes `ema` (what upstream's samplers use; `--entry=model` for the raw weights), maps
every key and writes the parameters with their model config (params/ + model_config.json, read by
`dimsum_jax.sample --checkpoint`). Without --config the model comes from the checkpoint's `args`;
either way, upstream options this port does not implement are refused (PUBLISHED_FLAGS), as are
missing, unknown or mis-shaped keys, by upstream key and PyTorch shape, before anything is written.
The mapping itself is `from_upstream(state_dict, model, abstract_params)`: NumPy arrays under
upstream names in, a Flax parameter tree out. torch is needed only to read .pt files.

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

# Upstream keys that carry no parameters of ours: fixed Haar filter buffers.
BUFFER_PATTERNS = (r"\.dwt\.w_(ll|lh|hl|hh)$", r"\.idwt\.filters$")


class ConvertError(ValueError):
  """The checkpoint, its arguments or the config cannot be converted; the message says why.

  The command line prints it as one message without a traceback (it is the user's input, not a
  bug of this module)."""


# The classes an upstream checkpoint holds beyond what torch's weights_only loader builds anyway
# (tensors, OrderedDict state dicts, the optimiser's dicts, lists, tuples, numbers, strings,
# None): train.py saves its argparse namespace as `args`. Nothing else is allowed.
SAFE_GLOBALS = (argparse.Namespace,)


def _module_path(parts):
  """Upstream module names -> ours (dotted parts, leaf excluded)."""
  out = []
  i = 0
  while i < len(parts):
    p = parts[i]
    if p == "adaLN_modulation" and i + 1 < len(parts) and parts[i + 1] == "1":
      out += ["adaLN_modulation", "linear"]
      i += 2
      continue
    if p == "mlp" and i + 1 < len(parts) and parts[i + 1] in ("0", "2"):
      out.append(f"mlp_{parts[i + 1]}")
      i += 2
      continue
    out.append(p)
    i += 1
  return out


def _target(key: str):
  """Upstream state-dict key -> (our path tuple, block index or None, array transform)."""
  parts = key.split(".")
  block = None
  if parts[0] == "blocks":
    block = int(parts[1])
    parts = parts[2:]
  *mods, leaf = parts
  if key == "pos_embed":
    return ("pos_embed",), None, lambda a: a.reshape(a.shape[-2], a.shape[-1])
  if mods and mods[-1] == "mixer":
    if leaf in ("A_log", "D", "A_b_log", "D_b"):
      return tuple(_module_path(mods)) + (leaf,), block, lambda a: a
  if (
    mods
    and mods[-1] in ("conv1d", "dt_proj", "conv1d_b", "dt_proj_b")
    and len(mods) >= 2
    and mods[-2] == "mixer"
  ):
    base = tuple(_module_path(mods[:-1]))
    name = f"{mods[-1]}_{'kernel' if leaf == 'weight' else 'bias'}"
    if leaf == "bias":
      return base + (name,), block, lambda a: a
    if mods[-1].startswith("conv1d"):  # [d, 1, w] -> [w, d]
      return base + (name,), block, lambda a: a[:, 0, :].T
    return base + (name,), block, lambda a: a.T
  path = tuple(_module_path(mods))
  if mods and mods[-1] == "embedding_table":
    return path + ("embedding",), block, lambda a: a
  if mods and mods[-1] in ("norm", "norm_2") and leaf == "weight":
    return path + ("weight",), block, lambda a: a
  if leaf == "bias":
    return path + ("bias",), block, lambda a: a
  if leaf == "weight":
    if key.startswith("x_embedder.proj"):  # [D, C, p, p] -> [p, p, C, D]
      return path + ("kernel",), block, lambda a: a.transpose(2, 3, 1, 0)
    return path + ("kernel",), block, lambda a: a.T
  raise KeyError(key)


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def _unflatten(flat):
  tree = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def block_layout(model):
  """Where block i lives: (top-level collection name, blocks per scan step)."""
  if hasattr(model, "attn_every"):
    return "groups", (model.attn_every or model.depth)
  return "blocks", 1


def from_upstream(state_dict, model, abstract_params, dtype=np.float32):
  """Map an upstream state dict (NumPy arrays by upstream key) onto `abstract_params`.

  abstract_params: the tree of jax.ShapeDtypeStruct from jax.eval_shape(model.init, ...)["params"].
  Raises a ConvertError naming every missing, unexpected or mis-shaped key. Shapes are checked in
  upstream's layout, before any transpose, so that the message shows what the user can look up
  in the checkpoint (e.g. x_embedder.proj.weight [96, 4, 2, 2]), not our internal layout.
  """
  collection, size = block_layout(model)
  target = _flatten(jax.tree_util.tree_map(lambda s: s, abstract_params))
  filled = {}
  unexpected, bad_shape = [], []
  for key, value in state_dict.items():
    if any(re.search(p, key) for p in BUFFER_PATTERNS):
      continue
    try:
      path, block, fn = _target(key)
    except (KeyError, ValueError, IndexError):  # not a name of upstream's modules
      unexpected.append(key)
      continue
    inner = path
    index = None
    if block is not None:
      if collection == "groups":
        path = ("groups", f"block_{block % size}") + path
      else:
        path = ("blocks", "block") + path
      index = block // size
    if path not in target:
      if "cond_proj" in path:  # the release's dead layers; a model without them drops them
        continue
      unexpected.append(key)
      continue
    spec = target[path]
    if index is not None and index >= spec.shape[0]:
      unexpected.append(key)  # a block beyond this model's depth
      continue
    want = _upstream_shape(inner, spec.shape[1:] if block is not None else spec.shape)
    value = np.asarray(value)
    if tuple(value.shape) != want:
      bad_shape.append(
        f"{key}: checkpoint {_shape_str(value.shape)} vs expected {_shape_str(want)}"
      )
      continue
    value = fn(value)
    if index is not None:
      filled.setdefault(path, {})[index] = value
    else:
      filled[path] = value
  missing = []
  out = {}
  for path, spec in target.items():
    in_blocks = path[0] == collection
    if path not in filled:
      missing += _upstream_keys(path, range(spec.shape[0]) if in_blocks else (), collection, size)
      continue
    v = filled[path]
    if isinstance(v, dict):
      absent = sorted(set(range(spec.shape[0])) - set(v))
      if absent:
        missing += _upstream_keys(path, absent, collection, size)
        continue
      v = np.stack([v[i] for i in range(spec.shape[0])])
    out[path] = np.asarray(v, dtype=dtype)
  if unexpected or bad_shape or missing:
    raise ConvertError(_mismatch_message(bad_shape, unexpected, missing))
  return _unflatten(out)


def _shape_str(shape):
  """Upstream shapes as PyTorch prints them: [96, 4, 2, 2]."""
  return "[" + ", ".join(str(int(n)) for n in shape) + "]"


def _upstream_shape(path, shape):
  """The upstream (PyTorch-layout) shape of our parameter `path` of shape `shape`."""
  _, fn = _upstream_name(path)
  return tuple(fn(np.broadcast_to(np.zeros((), np.float32), tuple(shape))).shape)


def _mismatch_message(bad_shape, unexpected, missing):
  msg = ["The upstream checkpoint does not match this model config."]
  if bad_shape:
    msg.append(f"Mis-shaped keys ({len(bad_shape)}): " + "; ".join(bad_shape[:8]))
  if unexpected:
    msg.append(f"Keys the model has no place for ({len(unexpected)}): " + ", ".join(unexpected[:8]))
  if missing:
    msg.append(
      f"Parameters the checkpoint does not provide ({len(missing)}): " + ", ".join(missing[:8])
    )
  msg.append(
    "Check the model name, depth, hidden size, image size, num_classes and cond_mamba "
    "of the config against the checkpoint's training arguments."
  )
  return "\n".join(msg)


def _upstream_keys(path, indices, collection, size):
  """Upstream key names of our parameter `path` (for the blocks `indices` of a block stack)."""
  if path[0] != collection:
    return [_upstream_name(path)[0]]
  key = _upstream_name(path[2:])[0]
  j = int(path[1].split("_")[-1]) if collection == "groups" else 0
  return [f"blocks.{n * size + j}.{key}" for n in indices]


def _upstream_name(path):
  """Our module path + leaf -> (upstream dotted key, array transform); inverse of `_target`."""
  *mods, leaf = path
  names = []
  for m in mods:
    if m == "linear" and names and names[-1] == "adaLN_modulation":
      names.append("1")
    elif m in ("mlp_0", "mlp_2"):
      names += ["mlp", m[-1]]
    else:
      names.append(m)
  if re.fullmatch(r"(conv1d|dt_proj)(_b)?_(kernel|bias)", leaf):
    layer, kind = leaf.rsplit("_", 1)
    key = ".".join(names + [layer, "weight" if kind == "kernel" else "bias"])
    if leaf.startswith("conv1d") and kind == "kernel":
      return key, lambda a: a.T[:, None, :]
    return key, (lambda a: a.T) if kind == "kernel" else (lambda a: a)
  if path == ("pos_embed",):
    return "pos_embed", lambda a: a[None]
  if leaf == "kernel":
    if names[:2] == ["x_embedder", "proj"]:
      return ".".join(names + ["weight"]), lambda a: a.transpose(3, 2, 0, 1)
    return ".".join(names + ["weight"]), lambda a: a.T
  if leaf == "embedding":
    return ".".join(names + ["weight"]), lambda a: a
  return ".".join(names + [leaf]), lambda a: a


def to_upstream(params, model) -> dict[str, np.ndarray]:
  """Our parameter tree -> upstream state dict (NumPy, upstream key names and layouts)."""
  collection, size = block_layout(model)
  out = {}
  for path, value in _flatten(jax.device_get(params)).items():
    value = np.asarray(value)
    if path[0] == collection:
      inner = path[2:]
      key, fn = _upstream_name(inner)
      for n in range(value.shape[0]):
        block = n * size + int(path[1].split("_")[-1]) if collection == "groups" else n
        out[f"blocks.{block}.{key}"] = fn(value[n])
    else:
      key, fn = _upstream_name(path)
      out[key] = fn(value)
  return out


# Upstream model flags this port implements only in their published setting (upstream's
# scripts/*.sh: the flags of every published script and the defaults they leave untouched), as
# (argument name, published value, upstream command-line flag or None for DiM(...) keywords).
# Train-script names (not_use_gated_mlp) and the golden files' DiM(...) names (use_gated_mlp) are
# both listed; an argument that is absent counts as published. Accepted whatever their value, as
# they change nothing a converted forward computes: fused_add_norm (the same RMSNorm, fused or
# not), cond_mamba (the release's conditional Mamba has no effect: upstream's
# `causal_conv1d_fwd_cond` overwrites the condition it is given; without
# it the mixers are plain Mamba, which is what this port runs), learnable_pe (pos_embed is an
# nn.Parameter either way, frozen or not, so the state dict holds the table the model used) and
# drop_path (training only).
PUBLISHED_FLAGS = (
  ("block_type", "combined", "--block-type"),
  ("rms_norm", True, "--rms-norm"),
  ("pe_type", "ape", "--pe-type"),
  ("learn_sigma", False, "--learn-sigma"),
  ("use_final_norm", False, "--use-final-norm"),
  ("scanning_continuity", False, "--scanning-continuity"),
  ("enable_fourier_layers", False, "--enable-fourier-layers"),
  ("not_use_gated_mlp", False, "--not-use-gated-mlp"),
  ("use_gated_mlp", True, None),
  ("is_moe", False, "--is-moe"),
  ("use_independent_attn", False, None),
)


def check_published_flags(cfg: dict) -> None:
  """Refuse upstream arguments that select a model variant this port does not implement.

  Converting such a checkpoint would either fail on key names far from the cause or, worse
  (scanning_continuity: no parameters of its own), succeed and compute something else."""
  from dimsum_jax.ops.scan_orders import SCAN_TYPES

  bad = []
  for name, published, flag in PUBLISHED_FLAGS:
    if name in cfg and cfg[name] is not None and type(published)(cfg[name]) != published:
      spelled = f" ({flag})" if flag else ""
      bad.append(f"{name}={cfg[name]!r}{spelled}, published {published!r}")
  scan_key = "scan_type" if "scan_type" in cfg else "bimamba_type"
  if cfg.get(scan_key, "none") not in SCAN_TYPES:
    bad.append(f"{scan_key}={cfg[scan_key]!r} (--bimamba-type), which is none of {SCAN_TYPES}")
  if bad:
    raise ConvertError(
      "The checkpoint's arguments select upstream model options that this port "
      "does not implement: " + "; ".join(bad) + ". This port implements only "
      "the published setting of these flags (that of upstream's "
      "scripts/train.sh)."
    )


def _registry_name(depth: int, hidden: int, patch: int) -> tuple[str, bool]:
  """(registry name, whether it is exactly that size) for these dimensions.

  The model takes depth and hidden_size overrides but its patch only from the name, so the name
  must have the right patch; among those, the exact size or else the closest one (hidden width
  first, then depth) names the model."""
  from dimsum_jax.models import DIMSUM_SIZES

  same_patch = [n for n, s in DIMSUM_SIZES.items() if s[2] == patch]
  if not same_patch:
    patches = sorted({s[2] for s in DIMSUM_SIZES.values()})
    raise ConvertError(
      f"patch_size {patch} is not supported: the model takes its patch from its registry name "
      f"(dimsum_jax.models.DIMSUM_SIZES, upstream's DiM_models sizes), which has patch "
      f"{' and '.join(map(str, patches))} only."
    )
  name = min(
    same_patch, key=lambda n: (abs(DIMSUM_SIZES[n][1] - hidden), abs(DIMSUM_SIZES[n][0] - depth))
  )
  return name, DIMSUM_SIZES[name][:2] == (depth, hidden)


def model_config_from_upstream(cfg: dict, state_dict=None) -> ml_collections.ConfigDict:
  """Model ConfigDict from upstream hyperparameters (golden `config_json` or a checkpoint's args).

  Understands the golden-file keys (hidden_size, depth, patch_size, img_resolution, ...) and
  upstream train.py args (model 'DiM-L/2', image_size in pixels, num_in_channels, ...). A size
  that is not in the registry keeps the name of the closest registry size with its patch and sets
  depth/hidden_size; `describe` tells the two apart. Raises ConvertError for what this port
  cannot build (see PUBLISHED_FLAGS).
  """
  from dimsum_jax.models import DIMSUM_SIZES, default_model_config

  check_published_flags(cfg)
  mc = default_model_config()
  if isinstance(cfg.get("model"), str):
    name = cfg["model"].replace("DiM-", "DiMSUM-")
    if name not in DIMSUM_SIZES:
      raise ConvertError(
        f"Upstream model {cfg['model']!r} is not one of "
        f"{[n.replace('DiMSUM-', 'DiM-') for n in DIMSUM_SIZES]}."
      )
    mc.name = name
    mc.input_size = int(cfg.get("image_size", 256)) // 8
  elif all(k in cfg for k in ("hidden_size", "depth", "patch_size", "img_resolution")):
    depth, hidden = int(cfg["depth"]), int(cfg["hidden_size"])
    mc.name, exact = _registry_name(depth, hidden, int(cfg["patch_size"]))
    if not exact:
      mc.depth, mc.hidden_size = depth, hidden
    mc.input_size = int(cfg["img_resolution"])
  else:
    raise ConvertError(
      "The checkpoint's arguments name no model (neither `model`, e.g. "
      "'DiM-L/2', nor hidden_size/depth/patch_size/img_resolution): pass "
      "--config=configs/<experiment>.py."
    )
  mc.in_channels = int(cfg.get("in_channels", cfg.get("num_in_channels", 4)))
  mc.scan_type = cfg.get("scan_type", cfg.get("bimamba_type", "none"))
  mc.bidirectional = mc.scan_type == "v2"  # upstream's v2: the flipped sequence in every mixer
  mc.attn_every = max(int(cfg.get("use_attn_every_k_layers", 4)), 0)  # upstream: -1 = none
  mc.label_dropout = max(float(cfg.get("label_dropout", 0.1)), 0.0)
  mc.num_classes = _num_classes(cfg, state_dict, mc.label_dropout)
  # The release's conditional Mamba has no effect (upstream's `causal_conv1d_fwd_cond` overwrites
  # the condition it is given): reproduce it.
  mc.cond_mamba = "none"
  return mc


def _num_classes(cfg, state_dict, label_dropout):
  """Our num_classes (0 = unconditional; the null row is extra): from the label table when the
  weights are at hand, as its row count is what the checkpoint was trained with."""
  classes = int(cfg.get("num_classes", 1000))
  if state_dict is not None and "y_embedder.embedding_table.weight" in state_dict:
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    return 0 if rows == 1 else rows - 1
  if classes <= 1:
    return 0
  if label_dropout > 0:
    return classes
  return classes - 1  # upstream samplers pass num_classes 1001 = 1000 + null row


def describe(mc) -> str:
  """The model in words, by its actual depth, width and patch: a registry name alone would call
  a 4-block test model "DiMSUM-B/2"."""
  from dimsum_jax.models import DIMSUM_SIZES

  if mc.name not in DIMSUM_SIZES:
    return str(mc.name)
  own_depth, own_hidden, patch = DIMSUM_SIZES[mc.name]
  depth = own_depth if mc.depth < 0 else mc.depth
  hidden = own_hidden if mc.hidden_size < 0 else mc.hidden_size
  data = f"{mc.input_size}x{mc.input_size}x{mc.in_channels} input, " + (
    f"{mc.num_classes} classes" if mc.num_classes else "unconditional"
  )
  if (depth, hidden) == (own_depth, own_hidden):
    return f"{mc.name} (depth {depth}, hidden {hidden}, patch {patch}; {data})"
  return (
    f"a DiMSUM of depth {depth}, hidden {hidden}, patch {patch}, not a published size "
    f"(registry entry {mc.name} with depth/hidden_size overridden; {data})"
  )


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
