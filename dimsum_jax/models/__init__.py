"""Model registry: DiMSUM sizes of upstream's `DiM_models`, the DiT/SiT baselines and DiM.

`create_model(config.model)` builds a Flax module from a model ConfigDict; see
`default_model_config()` for every field. `abstract_params(model, config.model)` is its parameter
tree as jax.ShapeDtypeStructs (nothing allocated), from the init on one NHWC image
[1, input_size, input_size, in_channels].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from dimsum_jax import choices
from dimsum_jax.models import dim
from dimsum_jax.models import layers
from dimsum_jax.models import mamba
from dimsum_jax.models.dimsum import DiMSUM
from dimsum_jax.models.dit import DiT
from dimsum_jax.ops import haar
from dimsum_jax.ops import scan_orders
from dimsum_jax.ops import selective_scan

# name -> (depth, hidden, patch)
DIMSUM_SIZES = {
  "DiMSUM-B/2": (12, 768, 2),
  "DiMSUM-L/2": (16, 1024, 2),
  "DiMSUM-L/2-v1": (20, 1024, 2),
  "DiMSUM-XL/2": (24, 1152, 2),
  "DiMSUM-L/4": (16, 1024, 4),
  "DiMSUM-L/4-v1": (20, 1024, 4),
}
# name -> (depth, hidden, heads); patch from the suffix.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_NAMES = tuple(f"DiT-{s}/{p}" for s in DIT_SIZES for p in (2, 4, 8))
# DiM (Teng et al. 2024, models/dim.py): name -> (depth, hidden, patch); 256 or 512 px by
# input_size (the 512 fine-tune uses dim_padding='rho_pad').
DIM_SIZES = {"DiM-S/2": (25, 512, 2), "DiM-L/2": (49, 1024, 2), "DiM-H/2": (49, 1536, 2)}
MODEL_NAMES = tuple(DIMSUM_SIZES) + DIT_NAMES + tuple(DIM_SIZES)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def default_model_config() -> ml_collections.ConfigDict:
  """Every model field with its default (DiMSUM-L/2, ImageNet 256 latents)."""
  return ml_collections.ConfigDict(
    {
      "name": "DiMSUM-L/2",
      "input_size": 32,  # spatial size of x (latent size = image size / 8)
      "in_channels": 4,
      "num_classes": 1000,  # 0 = unconditional; the null (CFG) label is num_classes
      "label_dropout": 0.1,
      "drop_path": 0.0,
      "cond_mamba": "none",  # "none" (as released) or "h0" (condition sets the initial state)
      "scan_type": "none",  # published orders; v2 (bidirectional); or the ablations sweep_4,
      # sweep_8, zigma_8, jpeg_8, jpeg_2
      "bidirectional": False,  # a second SSM reads each sequence reversed (upstream's
      # --bimamba-type v2 is scan_type v2 with this on)
      "scan_impl": "auto",  # selective scan: auto (Pallas on GPU), reference, pallas
      "wavelet_impl": "direct",  # Haar packet: direct (butterflies) or jaxwt (convolutions)
      "remat": "dots",  # backward recomputation per block group: none, dots, dots_mlp, full
      # (dots keeps the matmul outputs: larger micro-batches fit)
      "attention_impl": "auto",  # auto (cuDNN's fused attention where it runs, else XLA), xla,
      # cudnn
      "dtype": "float32",  # compute dtype; parameters are always float32
      "depth": -1,  # -1: the size's own; set to build smaller test models
      "hidden_size": -1,
      "attn_every": 4,  # shared transformer after every k DiMSUM blocks (0 = never)
      "scan_unroll": 0,  # DiMSUM block groups, DiT blocks per iteration of the stack's scan in
      # training-mode calls; 0: all (straight-line code: on an H100 DiMSUM-L/2 trains 1.32x and
      # DiT-L/2 1.23x faster, BENCHMARKS.md); 1: a rolled loop, the fastest compile.
      "inference_scan_unroll": 1,  # the same for inference-mode calls (sampling, evaluation):
      # 0 runs the stack's weights as static slices instead of one dynamic slice (a copy) per
      # block group and evaluation, for a longer compile; 1: a rolled loop.
      "inference_hoist_adaln": False,  # DiMSUM, inference-mode calls: every block's adaLN Linear
      # for all block groups in one batched matmul before the stack (fewer kernels at batch 1)
      "dim_padding": dim.DEFAULT_PADDING,  # DiM only: lateral (256 px) or rho_pad (512 px)
    }
  )


# The fields every model reads; each family adds its own (create_model refuses any other field
# set away from its default: a DiMSUM option given to a DiT would otherwise be silently ignored).
COMMON_FIELDS = (
  "name",
  "input_size",
  "in_channels",
  "num_classes",
  "label_dropout",
  "dtype",
  "depth",
  "hidden_size",
  "remat",
)
# Fields that change only how inference-mode calls run (sampling, evaluation), never the function
# or the parameters: a sampling command takes them from its own flags and defaults, not from the
# checkpoint's config (model_loading.read_config).
INFERENCE_FIELDS = ("inference_scan_unroll", "inference_hoist_adaln")
# Module keywords that differ from the config field's name.
MODULE_KEYWORDS = {"dim_padding": "padding"}
FAMILY_FIELDS = {
  "DiMSUM": (
    "drop_path",
    "cond_mamba",
    "scan_type",
    "bidirectional",
    "scan_impl",
    "wavelet_impl",
    "attention_impl",
    "attn_every",
    "scan_unroll",
    "inference_scan_unroll",
    "inference_hoist_adaln",
  ),
  "DiT": ("attention_impl", "scan_unroll", "inference_scan_unroll"),
  "DiM": ("scan_impl", "dim_padding"),
}


def family(name: str) -> str:
  """'DiMSUM', 'DiT' or 'DiM' for a registry name."""
  if name in DIMSUM_SIZES:
    return "DiMSUM"
  if name in DIM_SIZES:
    return "DiM"
  if name in DIT_NAMES:
    return "DiT"
  raise ValueError(f"Unknown model {name!r}; choose one of {MODEL_NAMES}.")


def fields_read(name: str) -> tuple[str, ...]:
  """The model config fields that the model `name` reads."""
  return COMMON_FIELDS + FAMILY_FIELDS[family(name)]


def field_choices() -> dict[str, tuple[str, ...]]:
  """The allowed values of each model field that is a choice."""
  return {
    "name": MODEL_NAMES,
    "dtype": tuple(DTYPES),
    "scan_type": scan_orders.SCAN_TYPES,
    "scan_impl": selective_scan.IMPLS,
    "wavelet_impl": haar.IMPLS,
    "cond_mamba": mamba.COND_MODES,
    "remat": tuple(layers.REMAT_POLICIES),
    "attention_impl": layers.ATTENTION_IMPLS,
    "dim_padding": dim.PADDINGS,
  }


def validate(config) -> None:
  """One sentence (ValueError) for a model section that cannot be built: an unknown key, a value
  that is not one of its field's choices, or a field the model does not read set away from its
  default. Sizes that do not fit (depth, input size) are the modules' own checks."""
  cfg = default_model_config()
  unknown = set(dict(config)) - set(cfg)
  if unknown:
    raise ValueError(f"Unknown model config keys {sorted(unknown)}; valid keys: {sorted(cfg)}.")
  cfg.update(dict(config))
  for key, allowed in field_choices().items():
    choices.check(f"model.{key}", cfg[key], allowed)
  check_fields_read(cfg)


def check_fields_read(cfg) -> None:
  """Refuses, in one sentence, a field that cfg.name's model does not read set away from its
  default."""
  defaults = default_model_config()
  read = fields_read(cfg.name)
  for key in defaults:
    if key not in read and cfg[key] != defaults[key]:
      raise ValueError(
        f"model.{key}={cfg[key]!r} has no effect on {cfg.name} ({family(cfg.name)} "
        f"models do not read it): leave it at its default {defaults[key]!r}."
      )


def create_model(config):
  """Build the Flax module described by a model ConfigDict (or dict)."""
  validate(config)
  cfg = default_model_config()
  cfg.update(dict(config))
  dtype = DTYPES[cfg.dtype]
  fam = family(cfg.name)
  if fam == "DiMSUM":
    depth, hidden, patch = DIMSUM_SIZES[cfg.name]
    module, extra = DiMSUM, {}
  elif fam == "DiM":
    depth, hidden, patch = DIM_SIZES[cfg.name]
    module, extra = dim.DiM, {}
  else:
    size, patch = cfg.name[len("DiT-") :].split("/")
    depth, hidden, heads = DIT_SIZES[size]
    module, extra = DiT, {"num_heads": heads}
  # Every field the family reads is the module's keyword of the same name (DiM's `padding` is
  # model.dim_padding: one option name for all families).
  family_fields = {MODULE_KEYWORDS.get(f, f): cfg[f] for f in FAMILY_FIELDS[fam]}
  model = module(
    input_size=cfg.input_size,
    in_channels=cfg.in_channels,
    patch_size=int(patch),
    hidden_size=hidden if cfg.hidden_size < 0 else cfg.hidden_size,
    depth=depth if cfg.depth < 0 else cfg.depth,
    num_classes=cfg.num_classes,
    label_dropout=cfg.label_dropout,
    remat=cfg.remat,
    dtype=dtype,
    **extra,
    **family_fields,
  )
  if fam == "DiM":
    model.check()  # a bad size fails at construction, not at the first call
  return model


def abstract_params(model, config):
  """The parameters of `model` (built from the model config `config`) as jax.ShapeDtypeStructs:
  jax.eval_shape of its init, so nothing is allocated or computed. The init sees one image
  x [1, input_size, input_size, in_channels] float32, t [1] and, when the model is conditional
  (num_classes > 0), a label y [1] int32; the tree does not depend on the batch size."""
  size, channels, conditional = config.input_size, config.in_channels, config.num_classes > 0

  def init():
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if conditional else None
    return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, t, y)

  return jax.eval_shape(init)["params"]
