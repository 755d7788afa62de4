"""FID versus NFE and versus guidance: one set of initial noises, every sampler setting.

  python -m dimsum_jax.evaluate.sweep --checkpoint=runs/digits/export --features=digits \\
      --num_samples=1000 --solver=euler,heun --num_steps=2,4,8,16,32 --cfg_scale=1,2,3 \\
      --out=sweeps/digits
  python -m dimsum_jax.evaluate.sweep --workdir=runs/in256 --vae_dir=vae \\
      --reference=VIRTUAL_imagenet256_labeled.npz --inception=pt_inception-2015-12-05-*.pth \\
      --num_samples=10000 --solver=euler --num_steps=10,25,50,100 --cfg_scale=1,1.5,2 --out=DIR

Every setting (solver x num_steps x cfg_scale; dopri5 takes --atol/--rtol and no num_steps)
samples the same N samples from the same initial noises: sample i starts from
jax.random.normal(fold_in(k, i), (H, W, C)), k = jax.random.split(PRNGKey(seed))[0], as
`python -m dimsum_jax.sample` draws it, and carries label classes[i % len(classes)]. The noises
are drawn once and cached (OUT/noise-*.npy), so the settings differ only by the sampler, and a
fixed-step setting gives the samples that `python -m dimsum_jax.sample` gives with its flags
(dopri5 shares its step sizes over a batch, as there; a last short batch is padded with zero
noises here, with the next samples' noises there).
Each setting is one jitted sampler over every device (the batch split over them), then the
metrics of dimsum_jax.evaluate (evaluate_images, one shared Extractor). Rows go to
OUT/sweep.json after every setting (atomically); rerunning the command skips the settings already
there, so a sweep resumes and can be extended. The table is printed at the end.

From code: `run_sweep(SweepModel.from_loaded(sample.load_model(...)), settings, ...)`, or a
SweepModel around any `model_fn(params, x, t, y)`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dimsum_jax import command_line
from dimsum_jax import sampling
from dimsum_jax import sharding
from dimsum_jax.evaluate import config as eval_config
from dimsum_jax.evaluate import features as features_lib
from dimsum_jax.evaluate import metrics as metrics_lib
from dimsum_jax.evaluate import npz

RESULTS = "sweep.json"


@dataclasses.dataclass(eq=False)
class SweepModel:
  model_fn: Callable  # (params, x [B, H, W, C], t [B], y [B] or None) -> prediction
  params: Any
  image_shape: tuple  # the model's input (H, W, C)
  num_classes: int = 0  # 0: unconditional; else the null label for guidance
  path_type: str = "GVP"
  prediction: str = "velocity"
  t0: float = 0.0
  t1: float = 1.0
  decode: Callable | None = None  # (decode_params, x1) -> images in [-1, 1] (a VAE), or None
  decode_params: Any = None
  compiled: dict = dataclasses.field(default_factory=dict, repr=False)  # setting -> sampler

  @classmethod
  def from_loaded(cls, loaded) -> "SweepModel":
    """From dimsum_jax.sample.load_model(...) (EMA weights, its config, its VAE)."""
    from dimsum_jax import transport  # pylint: disable=g-import-not-at-top

    config, model = loaded.config, loaded.model
    conditional = loaded.num_classes > 0
    t0, t1 = transport.time_interval(config.transport, eval=True)
    decode, decode_params = None, None
    if loaded.vae is not None:
      from dimsum_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top

      decode = functools.partial(vae_lib.latents_to_images, loaded.vae[0])
      decode_params = loaded.vae[1]
    return cls(
      model_fn=lambda p, x, t, y: model.apply({"params": p}, x, t, y if conditional else None),
      params=loaded.params,
      image_shape=tuple(loaded.image_shape),
      num_classes=loaded.num_classes,
      path_type=config.transport.path_type,
      prediction=config.transport.prediction,
      t0=t0,
      t1=t1,
      decode=decode,
      decode_params=decode_params,
    )


def initial_noise(seed: int, num_samples: int, shape, cache_dir: str | None = None) -> np.ndarray:
  """float32 [N, *shape]: sample i's noise as `python -m dimsum_jax.sample` draws it (cached)."""
  name = f"noise-seed{seed}-{num_samples}x{'x'.join(map(str, shape))}.npy"
  path = os.path.join(cache_dir, name) if cache_dir else None
  if path and os.path.exists(path):
    return np.load(path, allow_pickle=False)
  key = jax.random.split(jax.random.PRNGKey(seed))[0]
  draw = jax.jit(
    jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), tuple(shape), jnp.float32))
  )
  noise = np.concatenate(
    [
      np.asarray(draw(jnp.arange(s, min(s + 4096, num_samples))))
      for s in range(0, num_samples, 4096)
    ]
  )
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, noise)
    os.replace(tmp, path)
  return noise


def labels_for(num_samples: int, classes: Sequence[int]) -> np.ndarray:
  if not classes:
    return np.zeros(num_samples, np.int32)
  return np.asarray(classes, np.int32)[np.arange(num_samples) % len(classes)]


def settings_grid(
  solvers=("euler",), num_steps=(50,), cfg_scales=(1.0,), atol=1e-6, rtol=1e-3
) -> list[dict]:
  """Every (solver, num_steps, cfg_scale); dopri5 once per cfg_scale with atol/rtol."""
  out = []
  for solver in solvers:
    solver = sampling.canonical_solver(solver)
    for cfg in cfg_scales:
      if solver == "dopri5":
        out.append(
          {"solver": solver, "atol": float(atol), "rtol": float(rtol), "cfg_scale": float(cfg)}
        )
        continue
      for n in num_steps:
        out.append({"solver": solver, "num_steps": int(n), "cfg_scale": float(cfg)})
  return out


def _to_uint8(x):
  return jnp.clip(127.5 * x.astype(jnp.float32) + 128.0, 0.0, 255.0).astype(jnp.uint8)


def make_sampler(sm: SweepModel, setting: dict, mesh):
  """jitted (params, decode_params, x0 [B, ...], labels [B]) -> (uint8 images, nfe, status)."""
  cfg = float(setting["cfg_scale"])
  if cfg != 1.0 and not sm.num_classes:
    raise metrics_lib.EvaluationError(
      "Guidance (cfg_scale != 1) needs a class-conditional model: sweep cfg_scale=1 only."
    )

  def run(params, decode_params, x0, labels):
    velocity = sampling.make_sampling_velocity_fn(
      lambda x, t, y: sm.model_fn(params, x, t, y),
      path_type=sm.path_type,
      prediction=sm.prediction,
      cfg_scale=cfg,
      null_label=sm.num_classes if sm.num_classes else None,
    )
    res = sampling.solve_ode(
      velocity,
      x0,
      solver=setting["solver"],
      num_steps=setting.get("num_steps", 50),
      atol=setting.get("atol", 1e-6),
      rtol=setting.get("rtol", 1e-3),
      t0=sm.t0,
      t1=sm.t1,
      args=labels if sm.num_classes else None,
    )
    x1 = res.x1 if sm.decode is None else sm.decode(decode_params, res.x1)
    return _to_uint8(x1), res.nfe, jnp.max(res.status)

  batch = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  return jax.jit(run, in_shardings=(rep, rep, batch, batch), out_shardings=(batch, rep, rep))


def sample_setting(sm: SweepModel, setting: dict, noise, labels, *, batch_size: int, mesh):
  """(uint8 images [N, ...], NFE per batch) of one setting from the given noises."""
  n_dev = mesh.devices.size
  batch_size = max(n_dev, batch_size // n_dev * n_dev)
  key = (_key(setting), tuple(d.id for d in mesh.devices.flat))
  if key not in sm.compiled:
    sm.compiled[key] = make_sampler(sm, setting, mesh)
  fn = sm.compiled[key]
  rep = sharding.replicated(mesh)
  params = jax.device_put(sm.params, rep)
  decode_params = jax.device_put(sm.decode_params, rep)
  bsh = sharding.batch_sharding(mesh)
  images, nfes = [], []
  for start in range(0, len(noise), batch_size):
    x0, y = noise[start : start + batch_size], labels[start : start + batch_size]
    n = len(x0)
    if n < batch_size:  # pad with zeros (fixed-step samplers treat each sample alone)
      x0 = np.concatenate([x0, np.zeros((batch_size - n, *x0.shape[1:]), x0.dtype)])
      y = np.concatenate([y, np.zeros(batch_size - n, y.dtype)])
    out, nfe, status = jax.device_get(
      fn(params, decode_params, jax.device_put(x0, bsh), jax.device_put(y, bsh))
    )
    if int(status) != sampling.STATUS_OK:
      raise sampling.ODESolveError(
        f"The ODE solve of {setting} stopped before t1 (status "
        f"{int(status)}): loosen the tolerances."
      )
    images.append(np.asarray(out)[:n])
    nfes.append(int(nfe))
  return np.concatenate(images), nfes


def _key(setting):
  return json.dumps(setting, sort_keys=True)


def run_sweep(
  sm: SweepModel,
  settings: Sequence[dict],
  *,
  reference,
  feature_net,
  num_samples: int,
  seed: int = 0,
  classes: Sequence[int] | None = None,
  metrics=None,
  batch_size: int = 64,
  out: str | None = None,
  devices=None,
  keep_images: bool = False,
) -> list[dict]:
  """One row per setting: the setting, NFE, the metrics, seconds (see the module docstring).

  classes: the classes samples cycle through (default: all of a conditional model). out: where
  the noise cache and sweep.json go (resumed from), or None. keep_images: rows also carry the
  uint8 samples under 'images' (not written to sweep.json).
  """
  classes = list(range(sm.num_classes)) if classes is None and sm.num_classes else (classes or [])
  mesh = features_lib.extraction_mesh(devices)
  noise = initial_noise(seed, num_samples, sm.image_shape, out)
  labels = labels_for(num_samples, classes)
  metrics = metrics_lib.parse_metrics(metrics) if metrics is not None else None
  extractor = None
  rows, done = [], {}
  path = os.path.join(out, RESULTS) if out else None
  if path and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for row in json.load(f):
        done[_key(row["setting"])] = row
  header = {
    "seed": seed,
    "num_samples": num_samples,
    "classes": list(classes),
    "metrics": list(metrics) if metrics else None,
    "feature_net": feature_net.name,
    "reference": reference.name,
  }
  for setting in settings:
    key = _key(setting)
    if key in done and all(done[key].get(k) == v for k, v in header.items()):
      rows.append(done[key])
      continue
    start = time.monotonic()
    images, nfes = sample_setting(sm, setting, noise, labels, batch_size=batch_size, mesh=mesh)
    sample_seconds = time.monotonic() - start
    if extractor is None:
      wanted = metrics or metrics_lib.available_metrics(feature_net, reference)
      kinds = sorted({metrics_lib.NEEDS[m] for m in wanted})
      extractor = features_lib.Extractor(feature_net, devices, kinds=kinds)
    scores = metrics_lib.evaluate_images(
      images,
      labels if classes else None,
      reference,
      feature_net,
      metrics=metrics,
      extractor=extractor,
    )
    row = {
      "setting": setting,
      **header,
      "nfe": float(np.mean(nfes)),
      **scores,
      "sample_seconds": round(sample_seconds, 3),
      "seconds": round(time.monotonic() - start, 3),
    }
    done[key] = row
    if path:
      npz.write_json(path, list(done.values()))
    logging.info(
      "Sweep %s: NFE %.1f, %s.",
      setting,
      row["nfe"],
      ", ".join(
        f"{k} {row[k]:.4g}"
        for k in ("fid", "sfid", "inception_score", "precision", "recall", "accuracy")
        if k in row
      ),
    )
    if keep_images:
      row = dict(row, images=images)
    rows.append(row)
  return rows


def format_table(rows) -> str:
  cols = [
    k
    for k in ("fid", "sfid", "inception_score", "precision", "recall", "accuracy")
    if any(k in r for r in rows)
  ]
  lines = ["solver  steps  cfg    NFE    " + "  ".join(f"{c:>15}" for c in cols)]
  for r in rows:
    s = r["setting"]
    steps = s.get("num_steps", f"rtol={s.get('rtol')}")
    lines.append(
      f"{s['solver']:<7} {str(steps):>5}  {s['cfg_scale']:<5} {r['nfe']:>6.1f}  "
      + "  ".join(f"{r.get(c, float('nan')):>15.6g}" for c in cols)
    )
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Command line


FLAGS = flags.FlagValues()  # this command's own (see dimsum_jax.command_line)
flags.DEFINE_string(
  "checkpoint",
  None,
  "Exported (dimsum_jax.export) or converted model directory.",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "workdir", None, "Training workdir: its newest good checkpoint (or --step).", flag_values=FLAGS
)
flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step.", flag_values=FLAGS)
flags.DEFINE_string(
  "vae_dir", None, "VAE for latent models (default: config.vae.dir).", flag_values=FLAGS
)
flags.DEFINE_string(
  "out",
  None,
  "Directory for sweep.json and the noise cache (a rerun resumes there).",
  flag_values=FLAGS,
)
flags.DEFINE_integer("num_samples", 1000, "Samples per setting.", flag_values=FLAGS)
flags.DEFINE_integer(
  "batch_size", 64, "Global sampling batch (over all devices).", flag_values=FLAGS
)
flags.DEFINE_integer(
  "seed",
  0,
  "Sample i starts from the noise of fold_in(key(seed), i), as in python -m dimsum_jax.sample.",
  flag_values=FLAGS,
)
flags.DEFINE_list(
  "classes", [], "Class indices the samples cycle through (default: all).", flag_values=FLAGS
)
flags.DEFINE_list("solver", ["euler"], "Comma list of euler, heun, dopri5.", flag_values=FLAGS)
flags.DEFINE_list(
  "num_steps", ["50"], "Comma list of step counts (euler, heun).", flag_values=FLAGS
)
flags.DEFINE_list(
  "cfg_scale", ["1"], "Comma list of guidance scales (1 = none).", flag_values=FLAGS
)
flags.DEFINE_float("atol", 1e-6, "dopri5 absolute tolerance.", flag_values=FLAGS)
flags.DEFINE_float("rtol", 1e-3, "dopri5 relative tolerance.", flag_values=FLAGS)
flags.DEFINE_string(
  "reference",
  "",
  "Reference batch .npz (the digits features have a built-in one).",
  flag_values=FLAGS,
)
flags.DEFINE_enum(
  "features", "inception", list(eval_config.FEATURES), "The feature net.", flag_values=FLAGS
)
flags.DEFINE_string(
  "inception", "", "pytorch-fid's pt_inception-2015-12-05-*.pth (or its .npz).", flag_values=FLAGS
)
flags.DEFINE_enum(
  "preprocess",
  "pytorch_fid",
  list(eval_config.PREPROCESS),
  "Inception input: pytorch-fid's resize, or the TF graph's.",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "metrics",
  "fid",
  "Comma-separated subset of fid,sfid,is,precision,recall,accuracy.",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "feature_batch_size", 50, "Images per device per step of the feature net.", flag_values=FLAGS
)
flags.DEFINE_string(
  "cache_dir", "", "Digits features cache ('' = ~/.cache/dimsum_jax).", flag_values=FLAGS
)
flags.mark_flag_as_required("out", flag_values=FLAGS)


def _numbers(name, values, kind=float):
  """A comma-list flag's values as numbers of `kind` (empty items left out); EvaluationError
  naming the flag when one is not."""
  try:
    return [kind(v) for v in values if v.strip()]
  except ValueError as e:
    what = "integers" if kind is int else "numbers"
    raise metrics_lib.EvaluationError(
      f"--{name}={','.join(values)} is not a comma list of {what}."
    ) from e


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from dimsum_jax import sample  # pylint: disable=g-import-not-at-top
  from dimsum_jax.evaluate import digits_features  # pylint: disable=g-import-not-at-top
  from dimsum_jax.evaluate import inception  # pylint: disable=g-import-not-at-top
  from dimsum_jax.evaluate import reference_batch  # pylint: disable=g-import-not-at-top

  args = command_line.values(FLAGS)
  try:
    settings = settings_grid(
      [v for v in args.solver if v.strip()],
      _numbers("num_steps", args.num_steps, int),
      _numbers("cfg_scale", args.cfg_scale),
      args.atol,
      args.rtol,
    )
    config = eval_config.default_eval_config()
    config.update(
      features=args.features,
      inception_weights=args.inception,
      preprocess=args.preprocess,
      batch_size=args.feature_batch_size,
      cache_dir=args.cache_dir or config.cache_dir,
    )
    ref = reference_batch.load_reference(args.reference) if args.reference else None
    if ref is None and args.features != "digits":
      raise metrics_lib.EvaluationError(
        "Pass --reference=REF.npz (only the digits features have a built-in reference)."
      )
    net = features_lib.build_feature_net(config)
    loaded = sample.load_model(
      checkpoint_dir=args.checkpoint, workdir=args.workdir, step=args.step, vae_dir=args.vae_dir
    )
    sm = SweepModel.from_loaded(loaded)
    if ref is None:
      h, _, c = loaded.output_shape
      ref = digits_features.digits_reference(net, h, c)
    classes = _numbers("classes", args.classes, int) or None
    os.makedirs(args.out, exist_ok=True)
    rows = run_sweep(
      sm,
      settings,
      reference=ref,
      feature_net=net,
      num_samples=args.num_samples,
      seed=args.seed,
      classes=classes,
      metrics=args.metrics,
      batch_size=args.batch_size,
      out=args.out,
    )
  except (ValueError, inception.WeightsError, sample.SampleError, sampling.ODESolveError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(format_table(rows))
  print(f"(written to {os.path.join(args.out, RESULTS)})")
  return 0


def cli():
  """python -m dimsum_jax.evaluate.sweep."""
  command_line.run(main, FLAGS)


if __name__ == "__main__":
  cli()
