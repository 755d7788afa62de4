"""DiM golden files (shared/golden/dim/) for `python -m dimsum_jax.tools.parity`.

A file is a DiM file when its `config_json` is upstream's `config.nnet` of DiM (`num_layers`,
`pad_token_schedules`, ...) or its weights carry DiM's keys (`transformer_blocks.K.attn1.*`,
`additional_embed`, `a4m_adapter.*`); the model is built from that config
(`dim_convert.model_kwargs`: any width, depth, grid, padding, skip tune) and the weights mapped
by `dim_convert.from_upstream`. A file whose weights are given by the golden README's formula
(wide.npz) is checked with `--fill_seed=SEED` (`fill_state_dict`). Three kinds of file:

* forward (tiny, tiny_rho, wide): inputs x [B, C, H, W], t [B] on DiM's 0..1000 scale, y [B];
  compared: `out_f64`, `out_null_label_f64` (every label the null label), `out_f32` (upstream's
  float32 run; float32 checks only), the intermediates of the golden README (sequences
  [B, Lseq, D], `first_smoother_out` NCHW [B, D, h, w], per-block streams [depth, B, Lseq, D] in
  each block's scan order, `blocks_stream_f64as32` stored rounded to float32), their `_rms` /
  `_slice` summaries, the first consumer's `skip_linear_out` / `skip_linear_1_out`, and the
  layout tables `scan_perm` [depth, (h+3)(w+3)] and `skip_pairs` [(depth-1)/2, 2] (exactly);
* Upsample Guidance (upsample_guidance): for each `PREFIX_t_continuous` [B], U-ViT guidance of
  scale UG_CFG_SCALE at 1000 t (`PREFIX_cfg_pred`), the guided output of
  `upsample_guidance.make_upsample_guided_noise_fn` (`PREFIX_g_pred`), the low-resolution time
  (`PREFIX_tau_model`) and input (`PREFIX_x_low`), the low-resolution prediction from the file's
  own x_low and time (`PREFIX_low_pred`); the DPM-Solver call tables `dpm_calls_mM` [steps, 7]
  (times of `dpm_solver.dpm_solver_plan`, the rest from the file's times) and `preset_snrs_f32`;
* position tables (pos_interp): every `CASE_src` -> `CASE_dst` through
  `dim_convert.resize_position_table` (`transfer_additional_embed_*` through
  `transfer_state_dict`), in the table's stored dtype as upstream computes it, whatever
  --float64.

Tolerances, relative to max |ref|: 2e-4 in float32 (upstream's float32 sin/cos tables alone
deviate by up to 7.5e-5 at t = 999) and 1e-12 in float64; 2e-7 for arrays stored rounded to
float32; 1e-6 for upstream's float32 schedule tables; 0 for index tables.
"""

from __future__ import annotations

import json
import re

import numpy as np

from dimsum_jax.tools.hashfill import uniform_stream
from dimsum_jax.tools.parity import ParityError, Report, _derived, _fit, _shape_str

TOLERANCE = {"float32": 2e-4, "float64": 1e-12}
ROUNDED_TOL = 2e-7  # float64 values stored rounded to float32 (blocks_stream_f64as32)
TABLE_TOL = 1e-6  # upstream's float32 schedule tables (dpm_calls_mM, preset_snrs_f32)
# Columns of the golden dpm_calls_mM tables: (name, compared exactly).
DPM_COLUMNS = (
  ("t", False),
  ("tau", False),
  ("w", True),
  ("index", True),
  ("cum_alpha", False),
  ("cum_beta", False),
  ("snr", False),
)
UG_CFG_SCALE = 3.0  # U-ViT guidance scale of the golden upsample_guidance.npz (its README)
INPUT_KEYS = {"x", "t", "y", "config_json"}
LAYOUT_KEYS = ("scan_perm", "skip_pairs")
# Upstream's parameter names: `additional_embed` and dotted module paths.
_WEIGHT_KEY = re.compile(r"additional_embed|[A-Za-z_]\w*(\.\w+)+")
_DIM_KEY = re.compile(r"transformer_blocks\.\d+\.|a4m_adapter\.|additional_embed$")
_UG_TIME = re.compile(r"(t\d+)_t_continuous")
_FAST = {"xla_backend_optimization_level": 0}  # compile time, not the values, changes
_FORWARDS = {}  # one jitted function per (model, role): repeated checks compile once


def _config(arrays):
  try:
    cfg = json.loads(str(arrays["config_json"]))
  except (KeyError, ValueError):
    return None
  return cfg if isinstance(cfg, dict) else None


def is_dim(arrays) -> bool:
  """Whether a golden file's arrays are DiM's (keys or config), not DiMSUM's."""
  if any(_DIM_KEY.match(k) for k in arrays):
    return True
  cfg = _config(arrays)
  return cfg is not None and ("num_layers" in cfg or "pad_token_schedules" in cfg)


def is_position_tables(arrays) -> bool:
  """Whether a file holds position-table pairs (pos_interp.npz) and no model."""
  return "config_json" not in arrays and any(
    k.endswith("_src") and f"{k[:-4]}_dst" in arrays for k in arrays
  )


# ---------------------------------------------------------------- weights by formula


def fill_value(key: str, shape, seed: int) -> np.ndarray:
  """One parameter of the golden README's formula for wide.npz (DiM's rules by key name)."""
  shape = tuple(int(n) for n in shape)
  u = uniform_stream(key, int(np.prod(shape)), seed).reshape(shape)
  if key.endswith("A_log"):
    v = np.log1p(np.arange(shape[-1], dtype=np.float64)) + 0.25 * u
  elif key.endswith("attn1.D"):
    v = 1 + 0.5 * u
  elif key.endswith("dt_proj.bias"):
    v = -4 + 2 * u
  elif key.endswith("norm.weight"):
    v = 1 + 0.25 * u
  elif key == "label_emb.weight" or key.endswith("embedding_table.weight"):
    v = u
  elif key in (
    "additional_embed",
    "a4m_adapter.pad_token",
    "a4m_adapter.pad_token_dec_split",
  ) or key.endswith("scale_shift_table"):
    v = 0.5 * u
  elif len(shape) >= 2:
    v = np.sqrt(3.0 / np.prod(shape[1:])) * u
  else:
    v = 0.1 * u
  return v.astype(np.float32)


def fill_state_dict(shapes: dict, seed: int) -> dict[str, np.ndarray]:
  """{key: float32 array} of the formula for {upstream key: shape}."""
  return {key: fill_value(key, shape, seed) for key, shape in shapes.items()}


# ---------------------------------------------------------------- model


def _classify(arrays):
  state, inputs, refs, other = {}, {}, {}, []
  for k, v in arrays.items():
    if k in INPUT_KEYS or _UG_TIME.fullmatch(k):
      inputs[k] = v
    elif (
      k.endswith("_f64")
      or k in LAYOUT_KEYS
      or k == "blocks_stream_f64as32"
      or re.fullmatch(r"dpm_calls_m\d+|preset_snrs_f32|normed_timesteps_f32|out_f32", k)
    ):
      refs[k] = v
    elif _WEIGHT_KEY.fullmatch(k):
      state[k] = v
    else:
      other.append(k)
  return state, inputs, refs, other


def _model(path, arrays, state, float64, fill_seed):
  """(model, parameters) of the file's config_json and weights (or the formula's)."""
  import jax.numpy as jnp
  from dimsum_jax.models import dim, dim_convert

  if "config_json" not in arrays:
    raise ParityError(
      f"{path} has no `config_json`: a DiM golden file carries upstream's "
      "config.nnet as JSON (see the golden data's tiny.npz)."
    )
  cfg = _config(arrays)
  if cfg is None:
    raise ParityError(
      f"{path}: `config_json` is not a JSON object of upstream's config.nnet: "
      "write it with json.dumps(config.nnet)."
    )
  try:
    kwargs = dim_convert.model_kwargs(cfg)
    model = dim.DiM(**kwargs, scan_impl="reference", dtype=jnp.float64 if float64 else jnp.float32)
    model.check()
    abstract = dim_convert.abstract_params(model)
  except KeyError as e:
    raise ParityError(
      f"{path}: `config_json` has no {e} entry: write upstream's full "
      "config.nnet (num_layers, attention_head_dim, ...)."
    ) from e
  except (TypeError, ValueError) as e:
    raise ParityError(
      f"{path}: config_json does not describe a DiM this port builds: "
      f"{' '.join(str(e).splitlines())}"
    ) from e
  if fill_seed is not None:
    if state:
      raise ParityError(
        f"{path} stores its own weights: drop --fill_seed (it generates the "
        "weights of files that give them by formula, as wide.npz)."
      )
    state = fill_state_dict(dim_convert.upstream_shapes(model, abstract), fill_seed)
  elif not state:
    raise ParityError(
      f"{path} stores no weights: pass --fill_seed=SEED of the golden README's "
      "weight formula (7 for wide.npz)."
    )
  try:
    params = dim_convert.from_upstream(
      state, model, abstract, dtype=np.float64 if float64 else np.float32
    )
  except ValueError as e:
    raise ParityError(
      f"{path}: the weights and config_json do not make a model this port "
      f"builds: {' '.join(str(e).splitlines())}"
    ) from e
  return model, params, cfg


def _inputs(path, inputs, model, dtype, need_t=True):
  """(x NHWC, t or None, y or None) of the file, checked against the model."""
  for key in ("x", "t") if need_t else ("x",):
    if key not in inputs:
      raise ParityError(
        f"{path} has no input `{key}`: a DiM golden file holds x [B, C, H, W], "
        "t [B] on the 0..1000 scale and y [B] for a conditional model."
      )
  x = np.asarray(inputs["x"])
  p, c = model.patch_size, model.in_channels
  if x.ndim != 4 or x.shape[1] != c or x.shape[2] % p or x.shape[3] % p:
    raise ParityError(
      f"{path}: `x` is {_shape_str(x.shape)} but the model of its config_json "
      f"takes [B, {c}, H, W] with H and W multiples of {p}: check in_channels "
      "and patch_size of config_json."
    )
  batch = x.shape[0]
  t = None
  if need_t:
    t = np.asarray(inputs["t"])
    if t.shape != (batch,):
      raise ParityError(
        f"{path}: `t` is {_shape_str(t.shape)}, not [{batch}] (one time per row of x)."
      )
    t = t.astype(dtype)
  y = None
  if model.num_classes:
    if "y" not in inputs or np.shape(inputs["y"]) != (batch,):
      raise ParityError(
        f"{path}: its model is class-conditional ({model.num_classes} classes) "
        f"but it holds no labels `y` of shape [{batch}]: add y to the file."
      )
    y = np.asarray(inputs["y"]).astype(np.int32)
  return np.transpose(x, (0, 2, 3, 1)).astype(dtype), t, y


def _jit(key, fn):
  """jit(fn), kept per key (the model's fields, which name its config and dtype, and a role)."""
  import jax

  key = (repr(key[0]),) + tuple(key[1:])
  if key not in _FORWARDS:
    _FORWARDS[key] = jax.jit(fn, compiler_options=_FAST)
  return _FORWARDS[key]


def _run(path, fn, *args):
  """fn(*args) at full matmul precision; a grid the model refuses is one sentence."""
  import jax

  try:
    with jax.default_matmul_precision("highest"):
      return jax.device_get(fn(*args))
  except ValueError as e:
    raise ParityError(
      f"{path}: the model cannot run on the file's inputs: {' '.join(str(e).splitlines())}"
    ) from e


# ---------------------------------------------------------------- comparison


def _row(name, ours, ref, tol):
  """(row, note or None): max abs and relative error of ours against ref."""
  ref = np.asarray(ref, np.float64)
  a = _fit(ours, ref.shape)
  if a is None:
    return (name, float("inf"), float("inf"), tol, False), (
      f"shape {_shape_str(ref.shape)} in the file, {_shape_str(np.shape(ours))} here"
    )
  finite = np.isfinite(ref)
  if not np.array_equal(finite, np.isfinite(a)) or not np.array_equal(a[~finite], ref[~finite]):
    return (name, float("inf"), float("inf"), tol, False), "non-finite entries differ"
  err = float(np.max(np.abs(a[finite] - ref[finite]))) if finite.any() else 0.0
  scale = float(np.max(np.abs(ref[finite]))) if finite.any() else 0.0
  rel = err / max(scale, 1e-30)
  return (name, err, rel, tol, bool(rel <= tol)), None


def _report(pairs, not_compared, path):
  """Report of {name: (ours, ref, tol)}, "out" first."""
  if not pairs:
    raise ParityError(
      f"{path} holds no reference array that this tool can compare "
      f"({', '.join(k for k, _ in not_compared) or 'no *_f64 array'}): a DiM "
      "golden file holds out_f64 and the documented intermediates."
    )
  rows, notes = [], {}
  for name in sorted(pairs, key=lambda n: n != "out"):
    row, note = _row(name, *pairs[name])
    rows.append(row)
    if note:
      notes[name] = note
  return Report(rows, not_compared, notes)


def check(path, arrays, float64=False, fill_seed=None) -> Report:
  """A DiM forward or Upsample Guidance file (call inside jax.enable_x64(float64))."""
  state, inputs, refs, other = _classify(arrays)
  model, params, cfg = _model(path, arrays, state, float64, fill_seed)
  not_compared = [(k, "not an array of the DiM golden format") for k in sorted(other)]
  if any(_UG_TIME.fullmatch(k) for k in inputs) or any(
    k.startswith("dpm_calls_m") or k == "preset_snrs_f32" for k in refs
  ):
    return _check_upsample(path, model, params, cfg, inputs, refs, not_compared, float64)
  return _check_forward(path, model, params, inputs, refs, not_compared, float64)


def _intermediates(inter, batch):
  """Our sown arrays under the golden names (first `batch` rows; NCHW where the file is)."""
  take = lambda a: np.asarray(a[0])[:batch]
  stack = lambda a: np.asarray(a[0])[:, :batch]
  b0, ins, outs = inter["block_0"], inter["in_blocks"]["block"], inter["out_blocks"]["block"]
  ours = {
    name: take(inter[name])
    for name in (
      "patch_tokens",
      "t_token",
      "y_token",
      "adaln_c",
      "adaln_out",
      "tokens_in",
      "seq_prepared",
      "seq_before_finalize",
      "finalized_tokens",
      "final_shift_scale",
      "final_layer_out",
    )
    if name in inter
  }
  ours["first_smoother_out"] = np.transpose(take(inter["first_smoother_out"]), (0, 3, 1, 2))
  ours["norm_out"] = take(inter["final_norm"])
  for name, sown in (
    ("norm_out", "norm_out"),
    ("mixer_in", "mixer_in"),
    ("mamba_out", "mamba_out"),
    ("out", "block_out"),
  ):
    ours[f"block0_{name}"] = take(b0[sown])
  ours["blocks_stream"] = np.concatenate(
    [take(b0["stream"])[None], stack(ins["stream"]), stack(outs["stream"])]
  )
  for name in ("skip_linear_out", "skip_linear_1_out"):
    if name in outs:
      ours[name] = stack(outs[name])[0]  # the first consumer's
  return ours


def _layout(model, h, w):
  from dimsum_jax.models import dim

  hp, wp = h + dim.PAD_LEN, w + dim.PAD_LEN
  n_in = (model.depth - 1) // 2
  return {
    "scan_perm": np.stack([dim.pattern_order(p, hp, wp) for p in dim.scan_patterns(model.depth)]),
    "skip_pairs": np.array([(n_in + 1 + i, n_in - i) for i in range(n_in)]),
  }


def _check_forward(path, model, params, inputs, refs, not_compared, float64):
  import jax.numpy as jnp

  dtype = np.float64 if float64 else np.float32
  x, t, y = _inputs(path, inputs, model, dtype)
  batch = x.shape[0]
  null = "out_null_label_f64" in refs
  if null and not model.num_classes:
    not_compared.append(("out_null_label_f64", "the model is unconditional (no null label)"))
    null = False
  if null:  # the null-label batch in the same call (one compilation)
    x, t = np.concatenate([x, x]), np.concatenate([t, t])
    y = np.concatenate([y, np.full(batch, model.num_classes, np.int32)])
  fn = _jit(
    (model, "forward"),
    lambda p, x, t, y: model.apply({"params": p}, x, t, y, mutable=["intermediates"]),
  )
  out, tree = _run(
    path, fn, params, jnp.asarray(x), jnp.asarray(t), None if y is None else jnp.asarray(y)
  )
  out = np.transpose(np.asarray(out), (0, 3, 1, 2))
  ours = _intermediates(tree["intermediates"], batch)
  ours["out"] = out[:batch]
  if null:
    ours["out_null_label"] = out[batch:]
  ours.update(_layout(model, x.shape[1] // model.patch_size, x.shape[2] // model.patch_size))
  tol = TOLERANCE["float64" if float64 else "float32"]
  pairs = {}
  for key, ref in refs.items():
    name, want = key, tol
    if key.endswith("_f64"):
      name = key[:-4]
    elif key == "blocks_stream_f64as32":
      ours[key], want = ours["blocks_stream"], (tol if not float64 else ROUNDED_TOL)
    elif key == "out_f32":
      if float64:
        not_compared.append((key, "upstream's float32 run: compared by float32 checks"))
        continue
      ours[key] = ours["out"]
    elif key in LAYOUT_KEYS:
      want = 0.0
    else:
      not_compared.append((key, "not an array of a DiM forward file"))
      continue
    a = _derived(name, np.asarray(ref), ours)
    if a is None:
      not_compared.append((key, "this model computes no array of that name"))
    else:
      pairs[name] = (a, ref, want)
  return _report(pairs, not_compared, path)


def _check_upsample(path, model, params, cfg, inputs, refs, not_compared, float64):
  from dimsum_jax import dpm_solver, transport, upsample_guidance

  dtype = np.float64 if float64 else np.float32
  m = int(cfg.get("multi_times", 2))
  x, _, y = _inputs(path, inputs, model, dtype, need_t=False)
  if y is None:
    raise ParityError(
      f"{path}: Upsample Guidance with U-ViT guidance needs a class-conditional "
      "model: set num_embeds_ada_norm in config_json."
    )
  null = model.num_classes
  net = lambda p: lambda x, t, y: model.apply({"params": p}, x, t, y)
  guided = lambda p: (
    lambda x, t, y: dpm_solver.uvit_guided_noise(net(p), x, t, y, UG_CFG_SCALE, null)
  )
  cfg_fn = _jit((model, "cfg"), lambda p, x, t, y: guided(p)(x, t, y))
  ug_fn = _jit(
    (model, "ug", m),
    lambda p, x, t, y: upsample_guidance.make_upsample_guided_noise_fn(guided(p), m)(x, t, y),
  )
  tol = TOLERANCE["float64" if float64 else "float32"]
  alphabar = np.concatenate([[1.0], transport.scaled_linear_alphas_cumprod()])
  pairs, used = {}, set()
  nchw = lambda a: np.transpose(np.asarray(a), (0, 3, 1, 2))
  for key in sorted(k for k in inputs if _UG_TIME.fullmatch(k)):
    pre = _UG_TIME.fullmatch(key).group(1)
    t = np.asarray(inputs[key]).astype(dtype)
    if t.shape != (x.shape[0],):
      raise ParityError(
        f"{path}: `{key}` is {_shape_str(t.shape)}, not [{x.shape[0]}] (one time per row of x)."
      )
    index, tau = (np.asarray(a) for a in upsample_guidance.upsample_guidance_times(t, m))
    ab = alphabar[index].astype(dtype)[:, None, None, None]
    b, h, w, c = x.shape
    pooled = x.reshape(b, h // m, m, w // m, m, c).mean(axis=(2, 4))
    ours = {
      "cfg_pred": lambda: nchw(_run(path, cfg_fn, params, x, 1000 * t, y)),
      "g_pred": lambda: nchw(_run(path, ug_fn, params, x, t, y)),
      "tau_model": lambda: 1000 * tau.astype(np.float64),
      "x_low": lambda: nchw(pooled / np.sqrt(ab + (1 - ab) / m**2)),
    }
    if f"{pre}_x_low_f64" in refs and f"{pre}_tau_model_f64" in refs:
      x_low = np.transpose(refs[f"{pre}_x_low_f64"], (0, 2, 3, 1)).astype(dtype)
      tau_model = np.asarray(refs[f"{pre}_tau_model_f64"]).astype(dtype)
      ours["low_pred"] = lambda: nchw(_run(path, cfg_fn, params, x_low, tau_model, y))
    for name, compute in ours.items():
      if f"{pre}_{name}_f64" in refs:
        used.add(f"{pre}_{name}_f64")
        pairs[f"{pre}_{name}"] = (compute(), refs[f"{pre}_{name}_f64"], tol)
  for key, ref in refs.items():
    calls = re.fullmatch(r"dpm_calls_m(\d+)", key)
    if calls:
      ref = np.asarray(ref)
      if ref.ndim != 2 or ref.shape[1] != len(DPM_COLUMNS):
        not_compared.append(
          (key, f"{_shape_str(ref.shape)} is not a call table [steps, {len(DPM_COLUMNS)}]")
        )
        continue
      ours = _dpm_calls(ref, int(calls.group(1)), alphabar)
      for j, (column, exact) in enumerate(DPM_COLUMNS):
        pairs[f"{key}.{column}"] = (ours[:, j], ref[:, j], 0.0 if exact else TABLE_TOL)
    elif key == "preset_snrs_f32":
      presets = upsample_guidance.upsample_tables()[2]
      pairs[key] = (presets, ref, TABLE_TOL)
    elif key == "normed_timesteps_f32":
      not_compared.append(
        (key, "the time grid of the preset table, an input of preset_snrs_f32 (compared)")
      )
    elif key not in used:
      not_compared.append((key, "not an array of an Upsample Guidance file"))
  return _report(pairs, not_compared, path)


def _dpm_calls(ref, m, alphabar):
  """Our [steps, 7] call table (t, tau, w, trunc(1000 t), alphabar, 1 - alphabar, snr): t from
  DPM-Solver's plan, the rest from the file's float32 times, as upstream computes them."""
  from dimsum_jax import dpm_solver, upsample_guidance

  t = ref[:, 0].astype(np.float32)
  index, tau = (np.asarray(a) for a in upsample_guidance.upsample_guidance_times(t, m))
  ab = alphabar[index]
  plan = dpm_solver.dpm_solver_plan(steps=len(ref), predict_x0=False)
  return np.stack(
    [plan.t, tau, (t >= 0.7).astype(np.float64), index, ab, 1 - ab, ab / (1 - ab)], axis=1
  )


def check_position_tables(path, arrays, float64=False) -> Report:
  """pos_interp.npz: every CASE_src -> CASE_dst pair, each in its stored dtype."""
  del float64  # upstream resizes a table in its own dtype
  from dimsum_jax.models import dim_convert

  pairs, not_compared, seen = {}, [], set()
  for key in sorted(arrays):
    if not key.endswith("_src") or f"{key[:-4]}_dst" not in arrays:
      continue
    case, src, dst = key[:-4], np.asarray(arrays[key]), np.asarray(arrays[f"{key[:-4]}_dst"])
    seen |= {key, f"{case}_dst"}
    if src.ndim != 3 or dst.ndim != 3 or src.shape[0] != 1 or src.shape[2] != dst.shape[2]:
      not_compared.append(
        (
          case,
          f"tables {_shape_str(src.shape)} -> {_shape_str(dst.shape)} "
          "are not position tables [1, 2 + n, D]",
        )
      )
      continue
    if case == "transfer_additional_embed":
      ours = dim_convert.transfer_state_dict(
        {"additional_embed": src}, {"additional_embed": np.zeros_like(dst)}
      )[0]
      ours = ours["additional_embed"]
    else:
      ours = dim_convert.resize_position_table(src, dst.shape[1] - 2)
    tol = TOLERANCE["float64"] if dst.dtype == np.float64 else ROUNDED_TOL
    pairs[case] = (ours, dst, tol)
  not_compared += [
    (k, "not a position-table pair CASE_src / CASE_dst") for k in sorted(arrays) if k not in seen
  ]
  return _report(pairs, not_compared, path)
