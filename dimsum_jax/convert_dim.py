"""Import DiM's released weights (tyshiwo1/DiM-DiffusionMamba) for `python -m dimsum_jax.convert`.

  python -m dimsum_jax.convert --upstream=nnet_ema.pth --config=configs/imagenet256.py:dim \\
      --out=converted/dim_l256

`nnet_ema.pth` is a plain state dict of the EMA weights (written by upstream `train_ldm_discrete.py`, read by `eval_ldm_discrete.py`): the keys of
section 3 (`transformer_blocks.K.attn1.in_proj.weight`, `additional_embed` [1, 2 + n, D],
`a4m_adapter.pad_token` [1, D, 3], ...) in PyTorch layouts. It carries no hyperparameters, so
--config names the model: its `model` section must be a DiM (`DiM-L/2`, `DiM-H/2`, `DiM-S/2`
with input_size, num_classes and dim_padding as trained: configs/imagenet256.py:dim or :dim_h,
configs/imagenet512.py:dim). Every key and shape is checked against that model
(`dim_convert.check_state_dict`, keys and PyTorch shapes named) before anything is written; the
parameters are written as a DiMSUM conversion's (params/ + model_config.json,
`convert.save_params`), which `dimsum_jax.sample --checkpoint` reads.

Name collision: upstream DiMSUM also calls its models `DiM-L/2` (models/dimsum_convert.py reads
those as DiMSUM-L/2). The two are told apart by the weights' keys (DiM: transformer_blocks.*,
additional_embed, a4m_adapter.*, adaln_single.*; DiMSUM: blocks.*, x_embedder.*, y_embedder.*,
final_layer.*, pos_embed) and by --config's model name; a mismatch is refused in one sentence.
"""

from __future__ import annotations

import os
import re

import numpy as np

_DIM_KEY = re.compile(r"transformer_blocks\.\d+\.|a4m_adapter\.|adaln_single\.|additional_embed$")
_DIMSUM_KEY = re.compile(
  r"blocks\.\d+\.|x_embedder\.|y_embedder\.|t_embedder\.|final_layer\.|"
  r"pos_embed$"
)


def family(state) -> str | None:
  """'dim' (Teng et al.'s keys), 'dimsum' (DiMSUM's) or None (neither) for a state dict."""
  if any(_DIM_KEY.match(k) for k in state):
    return "dim"
  if any(_DIMSUM_KEY.match(k) for k in state):
    return "dimsum"
  return None


def is_dim_config(model_cfg) -> bool:
  from dimsum_jax.models import DIM_SIZES

  return model_cfg is not None and model_cfg.get("name") in DIM_SIZES


def suggest_config(state) -> str:
  """The config of this repository that matches a DiM state dict's width and position table."""
  width = np.shape(state.get("pos_embed.proj.weight", np.zeros((0,))))[:1]
  table = np.shape(state.get("additional_embed", np.zeros((1, 0))))
  grid = table[1] - 2 if len(table) == 3 else 0
  if width == (1536,) and grid > 16 * 16:
    return "configs/imagenet512.py:dim"
  if width == (1536,):
    return "configs/imagenet256.py:dim_h"
  return "configs/imagenet256.py:dim"


def uses_dim(upstream: str, state, model_cfg, spec: str | None) -> bool:
  """Whether the conversion is DiM's; ConvertError (one sentence) when the weights and --config
  are of different model families."""
  from dimsum_jax.models.dimsum_convert import ConvertError

  kind, dim_cfg = family(state), is_dim_config(model_cfg)
  if kind == "dim" and model_cfg is None:
    raise ConvertError(
      f"{upstream} holds DiM's weights (keys transformer_blocks.*), which carry "
      f"no hyperparameters: pass --config={suggest_config(state)} (or a config "
      "of the DiM it was trained as)."
    )
  if kind == "dim" and not dim_cfg:
    raise ConvertError(
      f"{upstream} holds DiM's weights (Teng et al.; keys transformer_blocks.*) "
      f"but --config={spec} builds {model_cfg.get('name')}: pass a DiM config "
      f"such as {suggest_config(state)}."
    )
  if kind == "dimsum" and dim_cfg:
    raise ConvertError(
      f"{upstream} holds DiMSUM's weights (keys blocks.*, x_embedder.*; "
      "upstream DiMSUM names its models DiM-L/2 too, which are DiMSUM-L/2 "
      f"here) but --config={spec} builds {model_cfg.name}, Teng et al.'s DiM: "
      "pass a DiMSUM config such as configs/imagenet256.py."
    )
  return kind == "dim" or (kind is None and dim_cfg)


def describe(mc) -> str:
  """The DiM of a model config in words: size, input, classes and pad layout."""
  from dimsum_jax.models import DIM_SIZES

  own_depth, own_hidden, patch = DIM_SIZES[mc.name]
  depth = own_depth if mc.depth < 0 else mc.depth
  hidden = own_hidden if mc.hidden_size < 0 else mc.hidden_size
  data = (
    f"{mc.input_size}x{mc.input_size}x{mc.in_channels} input, "
    + (f"{mc.num_classes} classes" if mc.num_classes else "unconditional")
    + f", {mc.dim_padding} padding"
  )
  if (depth, hidden) == (own_depth, own_hidden):
    return f"{mc.name} (depth {depth}, hidden {hidden}, patch {patch}; {data})"
  return (
    f"a DiM of depth {depth}, hidden {hidden}, patch {patch}, not a published size "
    f"(registry entry {mc.name} with depth/hidden_size overridden; {data})"
  )


def convert(upstream: str, out: str, state, model_cfg) -> str:
  """Check `state` against the DiM of `model_cfg`, write OUT; returns the one-line summary."""
  from dimsum_jax.convert import save_params
  from dimsum_jax.models.dimsum_convert import ConvertError
  from dimsum_jax.models import create_model, dim_convert

  try:
    model = create_model(model_cfg)
    abstract = dim_convert.abstract_params(model)
  except ValueError as e:
    raise ConvertError(f"The model config cannot be built: {e}") from e
  try:
    params = dim_convert.from_upstream(state, model, abstract)
  except dim_convert.DiMConvertError as e:
    raise ConvertError(f"{upstream} does not fit --config's {model_cfg.name}: {e}") from e
  save_params(out, params, model_cfg)
  n = sum(int(np.prod(np.shape(a))) for a in state.values())
  return (
    f"Wrote {n:,} parameters of {describe(model_cfg)} from {os.path.basename(upstream)} "
    f"to {os.path.abspath(out)}"
  )
