"""Numerical parity against a golden file produced by the official PyTorch DiMSUM.

  python -m dimsum_jax.tools.parity --golden=FILE.npz

The file is self-contained (format of the golden `tiny.npz`): parameters under upstream key names,
`config_json` with upstream's hyperparameters, inputs `x` [B, C, H, W], `t`, `y` (conditional
models), and reference arrays `NAME_f64`: the output `out_f64` and any subset of the documented
intermediates (`t_emb_f64`, `y_emb_f64`, `c_f64`, `block0_*_f64`, `blocks_hidden_out_f64`,
`attn_block_out_f64`, their `_rms` / `_slice` summaries, `cfg_out_f64` with `cfg_x`, `cfg_t`,
`cfg_y`, ...). The model is built from the file's own hyperparameters (any size, token grid and
scan order, conditional or not), the weights converted, the forward run in float32 (or float64
with --float64), and one line printed per compared array: name, max abs error, relative error
(max |ours - ref| / max |ref|). A reference laid out in another shape of the same values (a token
grid [B, g, g, D] for [B, N, D]) is compared in its own shape; one computed for every batch row
where this model computes one row (the label embedding of an unconditional model) is compared
row by row. Arrays the tool does not know are listed as "not compared". Exit status 1 when any
array misses its tolerance, or, with one sentence on stderr, when the file cannot be read or
checked. The file is read without unpickling (allow_pickle=False): one holding Python objects is
refused.

DiM (Teng et al.) golden files, recognised by their config_json or weight keys, and DiM's
position-table file are checked by `parity_dim` with DiM's tolerances (2e-4 in float32, 1e-12 in
float64); `--fill_seed=7` supplies the weights that wide.npz gives by formula.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from absl import app
from absl import flags
import numpy as np

from dimsum_jax import command_line

INPUT_KEYS = {"x", "t", "y", "cfg_x", "cfg_t", "cfg_y", "config_json"}
CFG_INPUTS = ("cfg_x", "cfg_t", "cfg_y")
CFG_SCALE = 1.5  # the guidance scale of the golden files' `cfg_out` (their README)
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
# Upstream state-dict keys: `pos_embed` and dotted module paths (blocks.0.norm.weight).
_WEIGHT_KEY = re.compile(r"pos_embed|[A-Za-z_]\w*(\.\w+)+")


class ParityError(ValueError):
  """A golden file that cannot be read or checked; the message names it and the fix."""


@dataclasses.dataclass
class Report:
  """What a check found: `rows` (name, max_abs, rel, tol, ok) per compared array, `not_compared`
  (file key, reason) for the arrays it could not compare, `notes` {name: why a row failed}."""

  rows: list
  not_compared: list
  notes: dict


def read_golden(path: str) -> dict:
  """Every array of a golden .npz, read without unpickling; ParityError in one sentence."""
  if not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "does not exist"
    raise ParityError(
      f"--golden={path} {what}: pass a golden .npz file in the format of the "
      "golden data's tiny.npz."
    )
  try:
    data = np.load(path, allow_pickle=False)
  except ValueError as e:  # neither a zip nor an .npy: numpy would have to unpickle it
    raise ParityError(
      f"--golden={path} is not an .npz archive (numpy could only unpickle it, "
      "which is refused as it can run code): write the golden file with "
      "numpy.savez."
    ) from e
  except Exception as e:  # pylint: disable=broad-except  (zip, zlib and OS errors alike)
    raise ParityError(
      f"--golden={path} is not a readable .npz file ({_first_line(e)}): write "
      "it again with numpy.savez."
    ) from e
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ParityError(
      f"--golden={path} holds a single array (.npy), not an .npz archive of "
      "named arrays: write the golden file with numpy.savez."
    )
  arrays = {}
  with data:
    for key in data.files:
      try:
        arrays[key] = data[key]
      except ValueError as e:
        if "allow_pickle" not in str(e):
          raise ParityError(
            f"--golden={path}: array {key!r} cannot be read ({_first_line(e)}): "
            "write the golden file again with numpy.savez."
          ) from e
        raise ParityError(
          f"--golden={path}: array {key!r} holds Python objects, which are not "
          "loaded as unpickling them can run code: a golden file holds only "
          "numeric arrays and the config_json string."
        ) from e
      except Exception as e:  # pylint: disable=broad-except  (a damaged zip member)
        raise ParityError(
          f"--golden={path}: array {key!r} cannot be read ({_first_line(e)}): "
          "write the golden file again with numpy.savez."
        ) from e
  return arrays


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _classify(data) -> tuple[dict, dict, dict, list]:
  """(state_dict, inputs, references, other keys) of a golden file's arrays."""
  state, inputs, refs, other = {}, {}, {}, []
  for k in data.keys() if isinstance(data, dict) else data.files:
    if k in INPUT_KEYS:
      inputs[k] = data[k]
    elif k.endswith("_f64"):
      refs[k[:-4]] = data[k]
    elif k.endswith("_f32"):
      continue  # upstream's own float32 run: the port is compared with float64
    elif _WEIGHT_KEY.fullmatch(k):
      state[k] = data[k]
    else:
      other.append(k)
  return state, inputs, refs, other


def split_golden(data) -> tuple[dict, dict, dict]:
  """(state_dict, inputs, references) from a loaded golden npz (or a dict of its arrays)."""
  return _classify(data)[:3]


def _intermediates(tree, size, batch):
  """Flatten sown values to golden names, keeping the first `batch` samples."""
  inter = tree.get("intermediates", {})
  out = {}
  for name in ("t_emb", "y_emb", "c", "tokens_in", "final_layer_out"):
    if name in inter:
      out[name] = np.asarray(inter[name][0])[:batch]
  groups = inter.get("groups", {})
  per_block = {}
  for j in range(size):
    blk = groups.get(f"block_{j}", {})
    flat = dict(blk)
    for sub in ("spatial_mamba", "freq_mamba"):
      flat.update(flat.pop(sub, {}))
    for name, value in flat.items():
      per_block.setdefault(name, {})[j] = np.asarray(value[0])[:, :batch]  # [groups, b, ...]
  for name, by_pos in per_block.items():
    n_groups = by_pos[0].shape[0]
    stacked = np.stack([by_pos[i % size][i // size] for i in range(n_groups * size)])
    out[f"blocks_{name}"] = stacked
    out[f"block0_{name}"] = stacked[0]
  if "attn_block_out" in groups:
    out["attn_block_out"] = np.asarray(groups["attn_block_out"][0])[:, :batch]
  return out


def _derived(name: str, ref: np.ndarray, ours: dict):
  """Our array for the reference `name` (computed here for `_rms` / `_slice`), or None."""
  if name in ours:
    return ours[name]
  if name.endswith("_rms") and name[:-4] in ours:
    a = np.asarray(ours[name[:-4]], np.float64)
    return np.sqrt(np.mean(a**2, axis=tuple(range(1, a.ndim))))
  if name.endswith("_slice") and name[:-6] in ours:
    a = ours[name[:-6]]
    if a.ndim != ref.ndim:
      return a  # reported as a shape mismatch
    return a[(slice(None),) + tuple(slice(0, s) for s in ref.shape[1:])]
  return None


def _fit(a, shape):
  """`a` as an array of `shape`: itself, the same values in another layout of the axes (a token
  grid [B, g, g, D] for [B, N, D]), or broadcast over the batch where this model computes one
  row for every sample (the label embedding of an unconditional model); None if none fits."""
  a = np.asarray(a, np.float64)
  if a.shape == shape:
    return a
  if a.size == int(np.prod(shape)):
    return a.reshape(shape)
  try:
    return np.broadcast_to(a, shape)
  except ValueError:
    return None


def _shape_str(shape):
  return "[" + ", ".join(str(int(n)) for n in shape) + "]"


# One jitted forward per model config, so that repeated checks of one model compile once.
_FORWARDS = {}


def _forward(model, mc):
  key = json.dumps(mc.to_dict(), sort_keys=True)
  if key not in _FORWARDS:
    import jax

    _FORWARDS[key] = jax.jit(
      lambda params, x, t, y: model.apply({"params": params}, x, t, y, mutable=["intermediates"])
    )
  return _FORWARDS[key]


def check(path: str, float64: bool = False, fill_seed: int | None = None) -> Report:
  """Compares the port with every array of the golden file at `path` that it can compare.

  DiM golden files (their config_json or weight keys say so) and DiM's position-table file are
  checked by `parity_dim`; `fill_seed` generates the weights of a DiM file that stores none."""
  import jax
  from dimsum_jax.tools import parity_dim

  arrays = read_golden(path)  # before anything is built: a bad file fails fast
  if parity_dim.is_position_tables(arrays):
    return parity_dim.check_position_tables(path, arrays, float64)
  dim_file = parity_dim.is_dim(arrays)
  if fill_seed is not None and not dim_file:
    raise ParityError(
      f"{path} is a DiMSUM golden file, and --fill_seed generates the weights "
      "of DiM files only (wide.npz): drop --fill_seed."
    )
  with jax.enable_x64(float64):  # scoped: float64 does not leak to later computations
    if dim_file:
      return parity_dim.check(path, arrays, float64, fill_seed)
    return _check(path, arrays, float64)


def run_parity(
  path: str, float64: bool = False, verbose: bool = True, fill_seed: int | None = None
) -> list[tuple]:
  """Rows (name, max_abs, rel, tol, ok) for every output the golden file lets us check."""
  report = check(path, float64, fill_seed)
  if verbose:
    print_report(report)
  return report.rows


def print_report(report: Report, out=print) -> None:
  for name, err, rel, tol, ok in report.rows:
    note = f"  ({report.notes[name]})" if name in report.notes else ""
    out(
      f"{name:32s} max_abs {err:.3e}  rel {rel:.3e}  tol {tol:.0e}  {'ok' if ok else 'FAIL'}{note}"
    )
  for key, reason in report.not_compared:
    out(f"{key:32s} not compared: {reason}")


def _model(path, state, inputs, float64):
  """(model config, model, parameters) from the file's config_json and weights."""
  from dimsum_jax.models import abstract_params, create_model
  from dimsum_jax.models import dimsum_convert

  if "config_json" not in inputs:
    raise ParityError(
      f"{path} has no `config_json`: a golden file must carry upstream's "
      "hyperparameters (see the format of tiny.npz)."
    )
  try:
    cfg = json.loads(str(inputs["config_json"]))
  except ValueError as e:
    raise ParityError(
      f"{path}: `config_json` is not valid JSON ({e}): write upstream's "
      "hyperparameters as a JSON object (see the format of tiny.npz)."
    ) from e
  if not isinstance(cfg, dict):
    raise ParityError(
      f"{path}: `config_json` holds a {type(cfg).__name__}, not a JSON object of "
      "upstream's hyperparameters (see the format of tiny.npz)."
    )
  try:
    mc = dimsum_convert.model_config_from_upstream(cfg, state)
    mc.dtype = "float64" if float64 else "float32"
    mc.scan_impl = "reference"
    model = create_model(mc)
    dtype = np.float64 if float64 else np.float32
    params = dimsum_convert.from_upstream(state, model, abstract_params(model, mc), dtype=dtype)
  except ValueError as e:  # ConvertError, or a config that create_model refuses
    raise ParityError(
      f"{path}: the weights and config_json do not make a model this port "
      f"builds: {' '.join(str(e).splitlines())}"
    ) from e
  return mc, model, params


def _inputs(path, inputs, mc, dtype):
  """(x NHWC, t, y or None) of the file, checked against the model."""
  size, channels = mc.input_size, mc.in_channels
  for key in ("x", "t"):
    if key not in inputs:
      raise ParityError(
        f"{path} has no input `{key}`: a golden file holds the inputs x "
        "[B, C, H, W], t [B] (and y [B] for a conditional model)."
      )
  x, t = np.asarray(inputs["x"]), np.asarray(inputs["t"])
  if x.ndim != 4 or x.shape[1:] != (channels, size, size):
    raise ParityError(
      f"{path}: `x` is {_shape_str(x.shape)} but the model of its config_json "
      f"takes [B, {channels}, {size}, {size}]: check img_resolution, "
      "patch_size and in_channels of config_json."
    )
  batch = x.shape[0]
  if t.shape != (batch,):
    raise ParityError(
      f"{path}: `t` is {_shape_str(t.shape)}, not [{batch}] (one time per row of x)."
    )
  y = None
  if mc.num_classes:
    if "y" not in inputs:
      raise ParityError(
        f"{path} has no labels `y` but its model is class-conditional "
        f"({mc.num_classes} classes): add y [B] to the file."
      )
    y = np.asarray(inputs["y"])
    if y.shape != (batch,):
      raise ParityError(
        f"{path}: `y` is {_shape_str(y.shape)}, not [{batch}] (one label per row of x)."
      )
    y = y.astype(np.int32)
  return np.transpose(x, (0, 2, 3, 1)).astype(dtype), t.astype(dtype), y


def _cfg_inputs(inputs, mc, x, dtype):
  """The first half of the CFG batch (x NHWC, t, y), or a reason why `cfg_out` is not compared."""
  if not mc.num_classes:
    return "the model is unconditional (no guidance)"
  absent = [k for k in CFG_INPUTS if k not in inputs]
  if absent:
    return f"its inputs {', '.join(absent)} are not in the file"
  cx, ct, cy = (np.asarray(inputs[k]) for k in CFG_INPUTS)
  n = cx.shape[0] if cx.ndim else 0
  nchw = (x.shape[3], x.shape[1], x.shape[2])
  if cx.shape[1:] != nchw or n % 2 or ct.shape != (n,) or cy.shape != (n,):
    return (
      f"cfg_x {_shape_str(cx.shape)}, cfg_t {_shape_str(ct.shape)}, cfg_y "
      f"{_shape_str(cy.shape)} are not an even batch of the model's inputs"
    )
  half = n // 2
  return (
    np.transpose(cx[:half], (0, 2, 3, 1)).astype(dtype),
    ct[:half].astype(dtype),
    cy[:half].astype(np.int32),
  )


def _check(path, arrays, float64):
  import jax
  import jax.numpy as jnp

  state, inputs, refs, other = _classify(arrays)
  mc, model, params = _model(path, state, inputs, float64)
  dtype = np.float64 if float64 else np.float32
  x, t, y = _inputs(path, inputs, mc, dtype)
  batch = x.shape[0]
  not_compared = [(k, "not an array of the golden format") for k in sorted(other)]
  cfg_half = 0
  if "cfg_out" in refs:
    cfg = _cfg_inputs(inputs, mc, x, dtype)
    if isinstance(cfg, str):
      not_compared.append(("cfg_out_f64", cfg))
    else:
      # upstream forward_with_cfg(x, t, y, 1.5): the first half of the CFG batch with its labels
      # and with the null label; run in the same call as the main batch (one compilation).
      cx, ct, cy = cfg
      cfg_half = cx.shape[0]
      x = np.concatenate([x, cx, cx])
      t = np.concatenate([t, ct, ct])
      y = np.concatenate([y, cy, np.full(cfg_half, mc.num_classes, np.int32)])

  params = jax.tree_util.tree_map(jnp.asarray, params)
  with jax.default_matmul_precision("highest"):
    out, tree = _forward(model, mc)(
      params, jnp.asarray(x), jnp.asarray(t), None if y is None else jnp.asarray(y)
    )
  out = np.transpose(np.asarray(out), (0, 3, 1, 2))
  ours = _intermediates(jax.device_get(tree), model.attn_every or model.depth, batch)
  ours["out"] = out[:batch]
  pairs = {}
  for name, ref in refs.items():
    if name == "cfg_out":
      if cfg_half:
        cond, uncond = out[batch : batch + cfg_half], out[batch + cfg_half :]
        guided = uncond + CFG_SCALE * (cond - uncond)
        pairs[name] = np.concatenate([guided, guided])
      continue
    a = _derived(name, ref, ours)
    if a is None:
      not_compared.append((f"{name}_f64", "this model computes no array of that name"))
    else:
      pairs[name] = a
  if not pairs:
    raise ParityError(
      f"{path} holds no reference array that this tool can compare "
      f"({', '.join(k for k, _ in not_compared) or 'no *_f64 array'}): a golden "
      "file holds out_f64 and the documented intermediates (see tiny.npz)."
    )

  tol = TOLERANCE["float64" if float64 else "float32"]
  rows, notes = [], {}
  order = ["out"] + [n for n in pairs if n != "out"]
  for name in (n for n in order if n in pairs):
    ref = np.asarray(refs[name], np.float64)
    a = _fit(pairs[name], ref.shape)
    if a is None:
      notes[name] = (
        f"shape {_shape_str(ref.shape)} in the file, {_shape_str(np.shape(pairs[name]))} here"
      )
      rows.append((name, float("inf"), float("inf"), tol, False))
      continue
    err = float(np.max(np.abs(a - ref))) if ref.size else 0.0
    rel = err / max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1e-30)
    rows.append((name, err, rel, tol, bool(rel <= tol)))
  return Report(rows, not_compared, notes)


FLAGS = flags.FlagValues()  # this command's own (see dimsum_jax.command_line)
flags.DEFINE_string(
  "golden", None, "Self-contained golden .npz (the format of tiny.npz).", flag_values=FLAGS
)
flags.DEFINE_boolean("float64", False, "Run the port in float64.", flag_values=FLAGS)
flags.DEFINE_integer(
  "fill_seed",
  None,
  "DiM files that store no weights (wide.npz: 7): generate "
  "them by the golden README's formula with this seed.",
  flag_values=FLAGS,
)
flags.mark_flag_as_required("golden", flag_values=FLAGS)


def main(argv):
  """Compares this port with a golden file of the official PyTorch DiMSUM or DiM; returns the
  exit status (1 when an array misses its tolerance)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    report = check(FLAGS.golden, FLAGS.float64, FLAGS.fill_seed)
  except ParityError as e:
    raise SystemExit(f"error: {e}") from None
  print_report(report)
  failed = [r[0] for r in report.rows if not r[4]]
  skipped = f"; {len(report.not_compared)} not compared" if report.not_compared else ""
  if failed:
    print(f"FAILED: {', '.join(failed)}{skipped}")
    return 1
  print(f"all {len(report.rows)} outputs within tolerance{skipped}")
  return 0


def cli():
  """The `dimsum-parity` console script."""
  command_line.run(main, FLAGS)


if __name__ == "__main__":
  # Run the imported module's command, so that parity_dim raises the ParityError caught there
  # (under `python -m` this file is also `__main__`, a second module object).
  from dimsum_jax.tools import parity as _parity

  _parity.cli()
