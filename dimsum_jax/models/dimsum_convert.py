"""Upstream DiMSUM's state dict <-> this port's parameter tree, and its model config. NumPy only.

Upstream keys (the `model` / `ema` state dict of VinAIResearch/DiMSUM's train.py) and layouts,
PyTorch: Linear weight [out, in] (here kernel [in, out]), x_embedder.proj Conv2d [D, C, p, p]
(here [p, p, C, D]), a mixer's conv1d [E, 1, w] (here conv1d_kernel [w, E]) and dt_proj [E, R]
(here dt_proj_kernel [R, E]), pos_embed [1, N, D] (here [N, D]), `adaLN_modulation.1` and
`mlp.0` / `mlp.2` (here adaLN_modulation/linear, mlp_0, mlp_2), `embedding_table.weight` (here
embedding). Block k of `blocks.k.` lives at blocks/block[k] (one stack), or with attention every
A blocks at groups/block_{k % A}[k // A] (`block_layout`). The Haar filters (BUFFER_PATTERNS) are
fixed buffers, not parameters.

`from_upstream(state_dict, model, abstract_params)`: NumPy arrays under upstream names in, a Flax
parameter tree out; every missing, unknown or mis-shaped key is named (by upstream key and
PyTorch shape) in one ConvertError. `to_upstream(params, model)` inverts it.
`model_config_from_upstream(cfg, state_dict)` builds the model config of upstream's
hyperparameters (a checkpoint's train.py `args` or a golden file's `config_json`), refusing the
upstream options this port does not implement (PUBLISHED_FLAGS); `describe(config.model)` names
the model in words. Reading .pt files and writing a conversion is `python -m dimsum_jax.convert`.
"""

from __future__ import annotations

import re

from flax import traverse_util
import jax
import ml_collections
import numpy as np

# Upstream keys that carry no parameters of ours: fixed Haar filter buffers.
BUFFER_PATTERNS = (r"\.dwt\.w_(ll|lh|hl|hh)$", r"\.idwt\.filters$")


class ConvertError(ValueError):
  """The checkpoint, its arguments or the config cannot be converted; the message says why.

  The command line prints it as one message without a traceback (it is the user's input, not a
  bug of this module)."""


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
  target = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda s: s, abstract_params))
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
  return traverse_util.unflatten_dict(out)


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
  for path, value in traverse_util.flatten_dict(jax.device_get(params)).items():
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
