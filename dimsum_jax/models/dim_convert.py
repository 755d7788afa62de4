"""DiM's official state dict <-> this port's parameter tree, and the 256 -> 512 px warm start.

Upstream keys (`Mamba2DModel.state_dict()` of upstream `mamba_2d.py`) and layouts, PyTorch:
Linear weight [out, in] (here kernel [in, out]), Conv2d [out, in/groups, kh, kw] (here
[kh, kw, in/groups, out]), Mamba conv1d [E, 1, 3] (here [3, E]), dt_proj [E, R] (here [R, E]),
`additional_embed` [1, E + n, D] and `a4m_adapter.pad_token_dec_split` [1, 3, D] (here without
the leading 1), `a4m_adapter.pad_token` [1, D, 3] (here [3, D], pad vector j in row j).
Block k of `transformer_blocks.k.` lives at `block_0` (k = 0), `in_blocks/block[k - 1]`
(the skip producers 1..(L-1)/2) or `out_blocks/block[k - 1 - (L-1)/2]` (the consumers).

`from_upstream(state_dict, model)` -> params; `to_upstream(params, model)` inverts it;
`upstream_shapes(model)` is the official key set with PyTorch shapes (nothing allocated) and
`check_state_dict(shapes, model)` names every key that does not fit it;
`model_kwargs(config_nnet)` builds the DiM of upstream's hyperparameters (a golden file's
`config_json`), refusing by name the options this port does not compute.
`transfer_state_dict(src, dst)` is upstream's `load_pretrained_model` (section 10): same-shape
keys copied, `additional_embed` resized with `resize_position_table` (bilinear, as
`pos_embed_inteplot`), everything else left as the new model's.
"""

from __future__ import annotations

import math
import re

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from dimsum_jax.models import dim


class DiMConvertError(ValueError):
  """A state dict that does not fit the model; the message lists the keys."""


_BLOCK = {  # upstream name inside transformer_blocks.k -> (our path, to ours, to upstream)
  "scale_shift_table": (("scale_shift_table",), None, None),
  "norm1.norm.weight": (("norm1", "weight"), None, None),
  "attn1.in_proj.weight": (("mixer", "in_proj", "kernel"), "T", "T"),
  "attn1.conv1d.weight": (("mixer", "conv1d_kernel"), "conv1d", "conv1d"),
  "attn1.conv1d.bias": (("mixer", "conv1d_bias"), None, None),
  "attn1.x_proj.weight": (("mixer", "x_proj", "kernel"), "T", "T"),
  "attn1.dt_proj.weight": (("mixer", "dt_proj_kernel"), "T", "T"),
  "attn1.dt_proj.bias": (("mixer", "dt_proj_bias"), None, None),
  "attn1.A_log": (("mixer", "A_log"), None, None),
  "attn1.D": (("mixer", "D"), None, None),
  "attn1.out_proj.weight": (("mixer", "out_proj", "kernel"), "T", "T"),
  "skip_linear.weight": (("skip_linear", "kernel"), "T", "T"),
  "skip_linear.bias": (("skip_linear", "bias"), None, None),
  "skip_linear.0.weight": (("skip_linear_0", "kernel"), "T", "T"),
  "skip_linear.0.bias": (("skip_linear_0", "bias"), None, None),
  "skip_linear.1.weight": (("skip_linear_1", "kernel"), "T", "T"),
  "skip_linear.1.bias": (("skip_linear_1", "bias"), None, None),
}
_TOP = {
  "additional_embed": (("additional_embed",), "unbatch", "batch"),
  "pos_embed.proj.weight": (("x_embedder", "kernel"), "conv", "conv"),
  "pos_embed.proj.bias": (("x_embedder", "bias"), None, None),
  "adaln_single.emb.timestep_embedder.linear_1.weight": (
    ("t_embedder", "mlp_0", "kernel"),
    "T",
    "T",
  ),
  "adaln_single.emb.timestep_embedder.linear_1.bias": (("t_embedder", "mlp_0", "bias"), None, None),
  "adaln_single.emb.timestep_embedder.linear_2.weight": (
    ("t_embedder", "mlp_2", "kernel"),
    "T",
    "T",
  ),
  "adaln_single.emb.timestep_embedder.linear_2.bias": (("t_embedder", "mlp_2", "bias"), None, None),
  "adaln_single.emb.class_embedder.embedding_table.weight": (
    ("class_embedder", "embedding"),
    None,
    None,
  ),
  "adaln_single.linear.weight": (("adaLN_modulation", "linear", "kernel"), "T", "T"),
  "adaln_single.linear.bias": (("adaLN_modulation", "linear", "bias"), None, None),
  "label_emb.weight": (("label_emb", "embedding"), None, None),
  "a4m_adapter.pad_token_dec_split": (("pad_token_dec_split",), "unbatch", "batch"),
  "a4m_adapter.pad_token": (("pad_token",), "pad", "pad"),
  "a4m_adapter.first_smoother.weight": (("first_smoother", "kernel"), "conv", "conv"),
  "a4m_adapter.first_smoother.bias": (("first_smoother", "bias"), None, None),
  "a4m_adapter.last_smoother.weight": (("last_smoother", "kernel"), "conv", "conv"),
  "a4m_adapter.last_smoother.bias": (("last_smoother", "bias"), None, None),
  "norm_out.norm.weight": (("norm_out", "weight"), None, None),
  "proj_out_1.weight": (("proj_out_1", "kernel"), "T", "T"),
  "proj_out_1.bias": (("proj_out_1", "bias"), None, None),
  "proj_out_2.weight": (("proj_out_2", "kernel"), "T", "T"),
  "proj_out_2.bias": (("proj_out_2", "bias"), None, None),
}
_TO_OURS = {
  None: lambda a: a,
  "T": lambda a: a.T,
  "unbatch": lambda a: a[0],
  "conv": lambda a: a.transpose(2, 3, 1, 0),  # [O, I, kh, kw] -> [kh, kw, I, O]
  "conv1d": lambda a: a[:, 0, :].T,  # [E, 1, 3] -> [3, E]
  "pad": lambda a: a[0].T,  # [1, D, 3] -> [3, D]
}
_TO_UPSTREAM = {
  None: lambda a: a,
  "T": lambda a: a.T,
  "batch": lambda a: a[None],
  "conv": lambda a: a.transpose(3, 2, 0, 1),
  "conv1d": lambda a: a.T[:, None, :],
  "pad": lambda a: a.T[None],
}


def _block_place(k: int, depth: int):
  """(collection path, index in the stack or None) of upstream block k."""
  n_in = (depth - 1) // 2
  if k == 0:
    return ("block_0",), None
  if k <= n_in:
    return ("in_blocks", "block"), k - 1
  return ("out_blocks", "block"), k - 1 - n_in


def _locate(key: str, depth: int):
  """(our path, stack index or None, transform name) of an upstream key; KeyError if unknown."""
  if key in _TOP:
    path, fn, _ = _TOP[key]
    return path, None, fn
  m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key)
  if not m or m.group(2) not in _BLOCK or int(m.group(1)) >= depth:
    raise KeyError(key)
  prefix, index = _block_place(int(m.group(1)), depth)
  path, fn, _ = _BLOCK[m.group(2)]
  return prefix + path, index, fn


def abstract_params(model, grid: tuple[int, int] | None = None):
  """The model's parameter tree as jax.ShapeDtypeStructs (jax.eval_shape: nothing allocated)."""
  h, w = grid or model.table_grid()
  p = model.patch_size
  model = model.clone(dtype=jnp.float32)  # the same tree for any compute dtype
  x = jnp.zeros((1, h * p, w * p, model.in_channels))
  y = jnp.zeros((1,), jnp.int32) if model.num_classes else None
  return jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, jnp.zeros((1,)), y))[
    "params"
  ]


def upstream_shapes(model, abstract=None) -> dict[str, tuple[int, ...]]:
  """{upstream key: PyTorch-layout shape} of every parameter of `model` (nothing allocated: the
  layouts are applied to zero-stride views)."""
  abstract = abstract_params(model) if abstract is None else abstract
  back = {ours: up for _, (ours, _, up) in _TOP.items()}
  inner = {ours: up for _, (ours, _, up) in _BLOCK.items()}
  out = {}
  for path, spec in traverse_util.flatten_dict(abstract).items():
    stacked = path[0] in ("in_blocks", "out_blocks")
    shape = spec.shape[1:] if stacked else spec.shape
    up = (
      inner[path[2:] if stacked else path[1:]]
      if path[0] in ("block_0", "in_blocks", "out_blocks")
      else back[path]
    )
    view = np.broadcast_to(np.zeros((), np.float32), tuple(shape))
    shape = tuple(_TO_UPSTREAM[up](view).shape)
    for i in range(spec.shape[0]) if stacked else [None]:
      out[_upstream_key(path, i, model.depth)] = shape
  return out


def check_state_dict(shapes, model, abstract=None) -> None:
  """Raise DiMConvertError naming every mis-shaped (with both shapes), unexpected and missing
  key of a state dict given as {upstream key: shape} (or arrays), in upstream's layout."""
  want = upstream_shapes(model, abstract)
  bad_shape, unexpected = [], []
  for key, value in shapes.items():
    shape = tuple(int(n) for n in (value if isinstance(value, (tuple, list)) else np.shape(value)))
    if key not in want:
      unexpected.append(key)
    elif shape != want[key]:
      bad_shape.append(f"{key}: {list(shape)}, expected {list(want[key])}")
  missing = [key for key in want if key not in shapes]
  if unexpected or bad_shape or missing:
    parts = [
      f"{name} ({len(keys)}): {', '.join(keys[:8])}"
      for name, keys in (
        ("mis-shaped", bad_shape),
        ("unexpected", unexpected),
        ("missing", missing),
      )
      if keys
    ]
    raise DiMConvertError(
      "The DiM state dict does not fit this model (check depth, width, "
      "classes and image size): " + "; ".join(parts) + "."
    )


def from_upstream(state_dict, model, abstract=None, dtype=np.float32):
  """Map an upstream DiM state dict (NumPy arrays by upstream key) onto `model`'s parameters.

  Raises DiMConvertError naming every missing, unexpected or mis-shaped key (shapes in
  upstream's layout, `check_state_dict`) before anything is converted."""
  abstract = abstract_params(model) if abstract is None else abstract
  check_state_dict(state_dict, model, abstract)
  target = traverse_util.flatten_dict(abstract)
  filled = {}
  for key, value in state_dict.items():
    path, index, fn = _locate(key, model.depth)
    value = _TO_OURS[fn](np.asarray(value))
    if index is None:
      filled[path] = value
    else:
      filled.setdefault(path, {})[index] = value
  out = {}
  for path, spec in target.items():
    v = filled[path]
    if isinstance(v, dict):
      v = np.stack([v[i] for i in range(spec.shape[0])])
    out[path] = np.asarray(v, dtype)
  return traverse_util.unflatten_dict(out)


def _upstream_key(path, index, depth):
  """The upstream key of our parameter `path` (block stack entry `index`)."""
  for key, (ours, _, _) in _TOP.items():
    if ours == path:
      return key
  n_in = (depth - 1) // 2
  if path[0] == "block_0":
    k, inner = 0, path[1:]
  else:
    k = 1 + index + (n_in if path[0] == "out_blocks" else 0)
    inner = path[2:]
  name = next(key for key, (ours, _, _) in _BLOCK.items() if ours == inner)
  return f"transformer_blocks.{k}.{name}"


def to_upstream(params, model) -> dict[str, np.ndarray]:
  """Our parameter tree -> upstream state dict (NumPy, upstream key names and layouts)."""
  back = {ours: (key, up) for key, (ours, _, up) in _TOP.items()}
  inner = {ours: (key, up) for key, (ours, _, up) in _BLOCK.items()}
  n_in = (model.depth - 1) // 2
  out = {}
  for path, value in traverse_util.flatten_dict(jax.device_get(params)).items():
    value = np.asarray(value)
    if path[0] == "block_0":
      key, up = inner[path[1:]]
      out[f"transformer_blocks.0.{key}"] = _TO_UPSTREAM[up](value)
    elif path[0] in ("in_blocks", "out_blocks"):
      key, up = inner[path[2:]]
      first = 1 if path[0] == "in_blocks" else 1 + n_in
      for i in range(value.shape[0]):
        out[f"transformer_blocks.{first + i}.{key}"] = _TO_UPSTREAM[up](value[i])
    else:
      key, up = back[path]
      out[key] = _TO_UPSTREAM[up](value)
  return out


# ------------------------------------------------------------------------------------------------
# 256 -> 512 px warm start (section 10)


def table_grid(rows: int) -> tuple[int, int]:
  """The (h, w) grid upstream reads a position table's n grid rows as: h = floor(sqrt(n))."""
  h = math.isqrt(rows)
  return h, rows // h


def resize_position_table(table, rows: int, extra_len: int = 2):
  """Upstream's `pos_embed_inteplot`: `additional_embed` [1, extra + n, D] -> [1, extra + rows,
  D] with the first `extra_len` rows kept and the n grid rows resized bilinearly
  (align_corners=False) to the new grid; NumPy in the table's dtype."""
  table = np.asarray(table)
  src = table_grid(table.shape[1] - extra_len)
  dst = table_grid(rows)
  return dim.resize_grid_table(table[0], src, dst, extra_len)[None]


def transfer_state_dict(src: dict, dst: dict, extra_len: int = 2):
  """Upstream's `load_pretrained_model`: (new state dict, keys left as `dst`'s). Every key of
  `dst` found in `src` with the same shape is copied; `additional_embed` of another grid is
  resized; any other key keeps `dst`'s value."""
  out, kept = {}, []
  for key, value in dst.items():
    old = src.get(key)
    if old is not None and np.shape(old) == np.shape(value):
      out[key] = np.asarray(old)
    elif old is not None and key == "additional_embed":
      out[key] = resize_position_table(old, np.shape(value)[1] - extra_len, extra_len)
    else:
      out[key], _ = np.asarray(value), kept.append(key)
  return out, kept


# ------------------------------------------------------------------------------------------------
# Upstream hyperparameters


# Upstream config keys (config.nnet) this port computes only in their published setting.
PUBLISHED = {
  "encoder_start_blk_id": 1,
  "mamba_d_state": dim.D_STATE,
  "mamba_d_conv": dim.D_CONV,
  "mamba_expand": dim.EXPAND,
  "is_uconnect": True,
  "no_ff": True,
  "rms": True,
  "is_extra_tokens": True,
  "use_pad_token": True,
  "use_a4m_adapter": True,
  "norm_type": "ada_norm_single",
  "mamba_type": "enc",
  "scan_pattern_len": 3,
  "pos_encoding_type": "learnable",
  "is_absorb": False,
  "is_random_patterns": False,
  "is_align_exchange_q_kv": False,
  "drop_path_rate": 0.0,
  "is_freeu": False,
}


def model_kwargs(config_nnet: dict) -> dict:
  """`DiM(**kwargs)` of upstream's `config.nnet` (a golden file's `config_json`). The table grid
  is the first entry of `num_patches` (w = floor(sqrt(n)) columns) or sample_size / patch
  square. Raises DiMConvertError naming an upstream option this port does not compute."""
  for key, value in PUBLISHED.items():
    if key in config_nnet and config_nnet[key] != value:
      raise DiMConvertError(
        f"Upstream option {key}={config_nnet[key]!r} is not implemented "
        f"(only {value!r}, as every published DiM config)."
      )
  if config_nnet.get("out_channels", config_nnet.get("in_channels", 4)) != config_nnet.get(
    "in_channels", 4
  ):
    raise DiMConvertError(
      "out_channels != in_channels (learned sigma) is not implemented: DiM predicts the noise only."
    )
  schedules = list(config_nnet.get("pad_token_schedules", ["dec_split", "lateral"]))
  if schedules[0] != "dec_split" or schedules[1] not in dim.PADDINGS:
    raise DiMConvertError(
      f"pad_token_schedules={schedules} is not implemented: use "
      f"['dec_split', 'lateral'] or ['dec_split', 'rho_pad']."
    )
  p = int(config_nnet.get("patch_size", 2))
  patches = config_nnet.get("num_patches")
  if patches is None:
    size = int(config_nnet["sample_size"])
  else:
    n = int(patches[0] if isinstance(patches, (list, tuple)) else patches)
    w = math.isqrt(n)
    size = (n // w * p, w * p)
  classes = config_nnet.get("num_embeds_ada_norm")
  tune = tuple(config_nnet["skip_tune_param"]) if config_nnet.get("is_skip_tune") else None
  return dict(
    input_size=size,
    in_channels=int(config_nnet.get("in_channels", 4)),
    patch_size=p,
    hidden_size=int(config_nnet["attention_head_dim"]) * int(config_nnet["num_attention_heads"]),
    depth=int(config_nnet["num_layers"]),
    num_classes=int(classes or 0),
    padding=schedules[1],
    skip_tune=tune,
  )
