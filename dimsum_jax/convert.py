"""Import official PyTorch DiMSUM weights (VinAIResearch/DiMSUM) into this project's parameters.

  python -m dimsum_jax.convert --upstream=CKPT.pt --config=configs/imagenet256.py --out=DIR

reads an upstream checkpoint (a torch file holding `model`, `ema`, `opt`, `epoch`, `args`, or a bare
state dict), takes `ema` (what upstream's samplers use; `--entry=model` for the raw weights), maps
every key and writes an Orbax checkpoint of the EMA parameters with their model config. The mapping
itself is `from_upstream(state_dict, model, example_inputs)`: NumPy arrays under upstream names in,
a Flax parameter tree out. torch is needed only to read .pt files.
"""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# Upstream keys that carry no parameters of ours: fixed Haar filter buffers.
BUFFER_PATTERNS = (r"\.dwt\.w_(ll|lh|hl|hh)$", r"\.idwt\.filters$")


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
  if mods and mods[-1] in ("conv1d", "dt_proj", "conv1d_b", "dt_proj_b") and len(mods) >= 2 \
      and mods[-2] == "mixer":
    base = tuple(_module_path(mods[:-1]))
    name = f"{mods[-1]}_{'kernel' if leaf == 'weight' else 'bias'}"
    if leaf == "bias":
      return base + (name,), block, lambda a: a
    if mods[-1].startswith("conv1d"):          # [d, 1, w] -> [w, d]
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
    if key.startswith("x_embedder.proj"):   # [D, C, p, p] -> [p, p, C, D]
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
  Raises a ValueError naming every missing, unexpected or mis-shaped key.
  """
  collection, size = block_layout(model)
  target = _flatten(jax.tree_util.tree_map(lambda s: s, abstract_params))
  filled = {}
  unexpected, bad_shape, dropped = [], [], []
  for key, value in state_dict.items():
    if any(re.search(p, key) for p in BUFFER_PATTERNS):
      continue
    try:
      path, block, fn = _target(key)
    except KeyError:
      unexpected.append(key)
      continue
    value = fn(np.asarray(value))
    if block is not None:
      if collection == "groups":
        path = ("groups", f"block_{block % size}") + path
      else:
        path = ("blocks", "block") + path
      index = block // size
    if path not in target:
      if "cond_proj" in path:   # the release's dead layers; a model without them drops them
        dropped.append(key)
        continue
      unexpected.append(key)
      continue
    spec = target[path]
    want = spec.shape[1:] if block is not None else spec.shape
    if tuple(value.shape) != tuple(want):
      bad_shape.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")
      continue
    if block is not None:
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
      n = spec.shape[0]
      if sorted(v) != list(range(n)):
        missing += _upstream_keys(path, sorted(set(range(n)) - set(v)), collection, size)
        continue
      v = np.stack([v[i] for i in range(n)])
    out[path] = np.asarray(v, dtype=dtype)
  if unexpected or bad_shape or missing:
    msg = ["The upstream checkpoint does not match this model config."]
    if bad_shape:
      msg.append(f"Mis-shaped keys ({len(bad_shape)}): " + "; ".join(bad_shape[:8]))
    if unexpected:
      msg.append(f"Keys the model has no place for ({len(unexpected)}): "
                 + ", ".join(unexpected[:8]))
    if missing:
      msg.append(f"Parameters the checkpoint does not provide ({len(missing)}): "
                 + ", ".join(missing[:8]))
    msg.append("Check the model name, image size, num_classes and cond_mamba of the config "
               "against the checkpoint's training arguments.")
    raise ValueError("\n".join(msg))
  return _unflatten(out)


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


def model_config_from_upstream(cfg: dict, state_dict=None) -> ml_collections.ConfigDict:
  """Model ConfigDict from upstream hyperparameters (golden `config_json` or a checkpoint's args).

  Understands the golden-file keys (hidden_size, depth, patch_size, img_resolution, ...) and
  upstream train.py args (model 'DiM-L/2', image_size in pixels, num_classes, ...).
  """
  from dimsum_jax.models import DIMSUM_SIZES, default_model_config
  mc = default_model_config()
  if "model" in cfg and isinstance(cfg["model"], str):
    name = cfg["model"].replace("DiM-", "DiMSUM-")
    if name not in DIMSUM_SIZES:
      raise ValueError(f"Upstream model {cfg['model']!r} is not one of "
                       f"{[n.replace('DiMSUM-', 'DiM-') for n in DIMSUM_SIZES]}.")
    mc.name = name
    mc.input_size = int(cfg.get("image_size", 256)) // 8
    depth, hidden, patch = DIMSUM_SIZES[name]
  else:
    hidden, depth, patch = int(cfg["hidden_size"]), int(cfg["depth"]), int(cfg["patch_size"])
    matches = [n for n, s in DIMSUM_SIZES.items() if s[2] == patch]
    if not matches:
      raise ValueError(f"No DiMSUM size with patch {patch}.")
    mc.name = matches[0]
    mc.depth, mc.hidden_size = depth, hidden
    mc.input_size = int(cfg["img_resolution"])
  mc.in_channels = int(cfg.get("in_channels", 4))
  if cfg.get("learn_sigma"):
    raise ValueError("learn_sigma models (8 output channels) are not supported.")
  bimamba = cfg.get("scan_type", cfg.get("bimamba_type", "none"))
  mc.scan_type = bimamba
  mc.attn_every = int(cfg.get("use_attn_every_k_layers", 4))
  mc.label_dropout = max(float(cfg.get("label_dropout", 0.1)), 0.0)
  classes = int(cfg.get("num_classes", 1000))
  if state_dict is not None and "y_embedder.embedding_table.weight" in state_dict:
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    classes = 0 if rows == 1 else rows - 1
  elif classes <= 1:
    classes = 0
  elif mc.label_dropout > 0:
    pass
  else:
    classes -= 1    # upstream samplers pass num_classes 1001 = 1000 + null row
  mc.num_classes = classes
  # The release's conditional Mamba has no effect (reference section 9): reproduce it.
  mc.cond_mamba = "none"
  return mc


def abstract_params(model, config):
  size = config.input_size
  x = jnp.zeros((1, size, size, config.in_channels))
  t = jnp.zeros((1,))
  y = jnp.zeros((1,), jnp.int32) if config.num_classes else None
  return jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, t, y))["params"]


def load_torch_checkpoint(path: str, entry: str = "ema"):
  try:
    import torch
  except ImportError as e:
    raise ImportError("Reading an upstream .pt checkpoint needs PyTorch: pip install torch") from e
  obj = torch.load(path, map_location="cpu", weights_only=False)
  args = None
  if isinstance(obj, dict) and entry in obj and isinstance(obj[entry], dict):
    args = obj.get("args")
    obj = obj[entry]
  state = {k: v.detach().cpu().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}
  if args is not None and not isinstance(args, dict):
    args = vars(args)
  return state, args


def main(argv=None):
  import argparse
  import os

  from dimsum_jax.models import create_model
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--upstream", required=True, help="upstream .pt checkpoint or state dict")
  parser.add_argument("--config", default=None,
                      help="config file (configs/*.py); its `model` section must fit the weights")
  parser.add_argument("--entry", default="ema", help="which entry of the checkpoint: ema or model")
  parser.add_argument("--out", required=True, help="output directory (Orbax checkpoint)")
  args = parser.parse_args(argv)
  if not os.path.exists(args.upstream):
    raise SystemExit(f"No such checkpoint: {args.upstream}")
  state, up_args = load_torch_checkpoint(args.upstream, args.entry)
  if args.config:
    from ml_collections import config_flags  # noqa: F401
    import importlib.util
    spec = importlib.util.spec_from_file_location("cfg", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model_cfg = module.get_config().model
  elif up_args:
    model_cfg = model_config_from_upstream(up_args, state)
  else:
    raise SystemExit("This checkpoint has no `args`: pass --config=configs/<experiment>.py.")
  model = create_model(model_cfg)
  params = from_upstream(state, model, abstract_params(model, model_cfg))
  save_params(args.out, params, model_cfg)
  n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
  print(f"Wrote {n:,} parameters of {model_cfg.name} to {args.out}")


def save_params(out_dir, params, model_cfg):
  """Write params (Orbax, `params/`) + `model_config.json`; `dimsum_jax.sample --checkpoint` reads it."""
  import os

  import orbax.checkpoint as ocp
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out_dir, "params"), params, force=True)
  with open(os.path.join(out_dir, "model_config.json"), "w") as f:
    json.dump(model_cfg.to_dict(), f, indent=2)


if __name__ == "__main__":
  main()
