"""Numerical parity against a golden file produced by the official PyTorch DiMSUM.

  python -m dimsum_jax.tools.parity --golden=FILE.npz

The file is self-contained (format of the golden `tiny.npz`): parameters under upstream key names,
`config_json` with upstream's hyperparameters, inputs `x` [B, C, H, W], `t`, `y` (conditional
models), `out_f64`, and optionally intermediates (`t_emb_f64`, `block0_*_f64`,
`blocks_hidden_out_f64`, `attn_block_out_f64`, `cfg_out_f64`, ...). The model is built from the
file's own hyperparameters, the weights converted, the forward run in float32 (or float64 with
--float64), and one line printed per compared output: name, max abs error, relative error
(max |ours - ref| / max |ref|). Exit status 1 when any output misses its tolerance.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

INPUT_KEYS = {"x", "t", "y", "cfg_x", "cfg_t", "cfg_y", "config_json"}
TOLERANCE = {"float32": 1e-4, "float64": 1e-10}


def split_golden(data) -> tuple[dict, dict, dict]:
  """(state_dict, inputs, references) from a loaded golden npz."""
  state, inputs, refs = {}, {}, {}
  for k in data.files:
    if k in INPUT_KEYS:
      inputs[k] = data[k]
    elif k.endswith("_f64"):
      refs[k[:-4]] = data[k]
    elif k.endswith("_f32"):
      continue
    else:
      state[k] = data[k]
  return state, inputs, refs


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
      per_block.setdefault(name, {})[j] = np.asarray(value[0])[:, :batch]   # [groups, b, ...]
  for name, by_pos in per_block.items():
    n_groups = by_pos[0].shape[0]
    stacked = np.stack([by_pos[i % size][i // size] for i in range(n_groups * size)])
    out[f"blocks_{name}"] = stacked
    out[f"block0_{name}"] = stacked[0]
  if "attn_block_out" in groups:
    out["attn_block_out"] = np.asarray(groups["attn_block_out"][0])[:, :batch]
  return out


def _compare_names(refs: dict, ours: dict) -> dict:
  """Our array for each reference name the file holds (derived ones computed here)."""
  pairs = {}
  for name, ref in refs.items():
    if name in ("out", "cfg_out"):
      continue
    if name in ours:
      pairs[name] = ours[name]
    elif name.endswith("_rms") and name[:-4] in ours:
      a = ours[name[:-4]]
      pairs[name] = np.sqrt(np.mean(a.astype(np.float64) ** 2, axis=tuple(range(1, a.ndim))))
    elif name.endswith("_slice") and name[:-6] in ours:
      sl = tuple(slice(0, s) for s in ref.shape[1:])
      pairs[name] = ours[name[:-6]][(slice(None),) + sl]
  return pairs


# One jitted forward per model config, so that repeated checks of one model compile once.
_FORWARDS = {}


def _forward(model, mc):
  key = json.dumps(mc.to_dict(), sort_keys=True)
  if key not in _FORWARDS:
    import jax
    _FORWARDS[key] = jax.jit(lambda params, x, t, y: model.apply(
        {"params": params}, x, t, y, mutable=["intermediates"]))
  return _FORWARDS[key]


def run_parity(path: str, float64: bool = False, verbose: bool = True) -> list[tuple]:
  """Rows (name, max_abs, rel, tol, ok) for every output the golden file lets us check."""
  import jax
  with jax.enable_x64(float64):     # scoped: float64 does not leak to later computations
    return _run_parity(path, float64, verbose)


def _run_parity(path, float64, verbose):
  import jax
  import jax.numpy as jnp

  from dimsum_jax.convert import abstract_params, from_upstream, model_config_from_upstream
  from dimsum_jax.models import create_model

  data = np.load(path)
  state, inputs, refs = split_golden(data)
  if "config_json" not in inputs:
    raise SystemExit(f"{path} has no `config_json`: a golden file must carry upstream's "
                     "hyperparameters (see the format of tiny.npz).")
  if "out" not in refs:
    raise SystemExit(f"{path} has no `out_f64` to compare with.")
  cfg = json.loads(str(inputs["config_json"]))
  mc = model_config_from_upstream(cfg, state)
  mc.dtype = "float64" if float64 else "float32"
  mc.scan_impl = "reference"
  model = create_model(mc)
  dtype = np.float64 if float64 else np.float32
  params = from_upstream(state, model, abstract_params(model, mc), dtype=dtype)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  to_nhwc = lambda a: np.transpose(a, (0, 2, 3, 1)).astype(dtype)
  x, t = to_nhwc(inputs["x"]), np.asarray(inputs["t"], dtype)
  y = np.asarray(inputs["y"], np.int32) if "y" in inputs and mc.num_classes else None
  batch = x.shape[0]
  cfg_half = 0
  if "cfg_out" in refs and y is not None:
    # upstream forward_with_cfg(x, t, y, 1.5): the first half of the CFG batch with its labels
    # and with the null label; run in the same call as the main batch (one compilation).
    cfg_half = inputs["cfg_x"].shape[0] // 2
    cx, ct, cy = (inputs[k][:cfg_half] for k in ("cfg_x", "cfg_t", "cfg_y"))
    x = np.concatenate([x, to_nhwc(cx), to_nhwc(cx)])
    t = np.concatenate([t, ct.astype(dtype), ct.astype(dtype)])
    y = np.concatenate([y, cy.astype(np.int32), np.full(cfg_half, mc.num_classes, np.int32)])

  with jax.default_matmul_precision("highest"):
    out, tree = _forward(model, mc)(params, jnp.asarray(x), jnp.asarray(t),
                                    None if y is None else jnp.asarray(y))
  out = np.transpose(np.asarray(out), (0, 3, 1, 2))
  ours = _intermediates(jax.device_get(tree), model.attn_every or model.depth, batch)
  ours["out"] = out[:batch]
  pairs = {"out": ours["out"], **_compare_names(refs, ours)}
  if cfg_half:
    cond, uncond = out[batch:batch + cfg_half], out[batch + cfg_half:]
    guided = uncond + 1.5 * (cond - uncond)
    pairs["cfg_out"] = np.concatenate([guided, guided])
  tol = TOLERANCE["float64" if float64 else "float32"]
  rows = []
  for name, a in pairs.items():
    ref = refs[name]
    a = np.asarray(a, np.float64).reshape(ref.shape)
    err = float(np.max(np.abs(a - ref)))
    rel = err / max(float(np.max(np.abs(ref))), 1e-30)
    rows.append((name, err, rel, tol, rel <= tol))
  if verbose:
    for name, err, rel, tol, ok in rows:
      print(f"{name:32s} max_abs {err:.3e}  rel {rel:.3e}  tol {tol:.0e}  "
            f"{'ok' if ok else 'FAIL'}")
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description="Compare this port with a golden file of the "
                                   "official PyTorch DiMSUM.")
  parser.add_argument("--golden", required=True, help="self-contained golden .npz")
  parser.add_argument("--float64", action="store_true", help="run the port in float64")
  args = parser.parse_args(argv)
  rows = run_parity(args.golden, args.float64)
  failed = [r[0] for r in rows if not r[4]]
  if failed:
    print(f"FAILED: {', '.join(failed)}")
    return 1
  print(f"all {len(rows)} outputs within tolerance")
  return 0


if __name__ == "__main__":
  sys.exit(main())
