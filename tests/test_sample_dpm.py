"""`python -m dimsum_jax.sample --mode=dpm`: DiM's DPM-Solver through the sampling command.

The model: a small pixel-space DiM (D = 32, 3 blocks, 8x8x3 inputs, 10 classes) whose weights
are the golden README's formula under the official key set (every parameter non-zero), written
in the layout `python -m dimsum_jax.convert` writes for DiM's released weights. The reference
(`dpm_reference`) calls the model directly, conditional and null label in separate calls, with
U-ViT guidance eps_c + s (eps_c - eps_u) at DiM's network time 1000 t_cont, through
`dpm_solver.sample_dpm_solver` (itself checked against closed forms and diffrax in
tests/test_sampling.py); it shares no loading, noise or guidance code with the command.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax import config_utils, convert, dpm_solver, models, sample, sampling
from dimsum_jax.models import dim_convert
from dimsum_jax.tools import parity_dim
from tests import seeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6  # DPM-Solver model evaluations: orders 3, 2, 1 over the grid
U_VIT_SCALE = 0.4  # DiM's ImageNet-256 guidance, --cfg_scale = 1 + 0.4
FAST = {"xla_backend_optimization_level": 0}  # values, not speed, are checked


def _model_config():
  mc = models.default_model_config()
  mc.update(
    name="DiM-S/2",
    depth=3,
    hidden_size=32,
    input_size=8,
    in_channels=3,
    num_classes=10,
    label_dropout=0.1,
    scan_impl="reference",
  )
  return mc


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(directory, model, params) of the converted-layout DiM, written once."""
  mc = _model_config()
  model = models.create_model(mc)
  state = parity_dim.fill_state_dict(dim_convert.upstream_shapes(model), seed=3)
  params = dim_convert.from_upstream(state, model)
  out = tmp_path_factory.mktemp("dpm") / "converted"
  convert.save_params(str(out), params, mc)
  return out, model, params


def dpm_reference(model, params, indices, labels, *, seed, steps, scale):
  """Sample i from the documented noise fold_in(split(PRNGKey(seed))[0], i), then DPM-Solver on
  the guided noise prediction, the two labels in separate calls; float64 result."""
  noise_key = jax.random.split(jax.random.PRNGKey(seed))[0]
  x = jnp.stack(
    [jax.random.normal(jax.random.fold_in(noise_key, int(i)), (8, 8, 3)) for i in indices]
  )
  y = jnp.asarray(labels, jnp.int32)
  null = jnp.full_like(y, 10)

  def noise(x, t_cont):
    cond = model.apply({"params": params}, x, 1000.0 * t_cont, y)
    if not scale:
      return cond
    return cond + scale * (cond - model.apply({"params": params}, x, 1000.0 * t_cont, null))

  out, nfe = jax.jit(
    lambda x: dpm_solver.sample_dpm_solver(noise, x, steps=steps), compiler_options=FAST
  )(x)
  assert int(nfe) == steps
  return np.asarray(out, np.float64)


@seeds.each(default=5)
def test_dpm_samples_match_a_direct_solve(converted, tmp_path, seed):
  """The command with --mode=dpm on a converted DiM (its discrete noise-prediction transport set
  by the loader), guided with class 9 (the last real row) and 0: the float samples of `generate`
  against the direct solve (whose unguided samples differ: guidance is not inert), and the
  files, NFE and manifest of `run` (the random model's samples are mostly clipped in uint8)."""
  out_dir, model, params = converted
  loaded = sample.load_model(checkpoint_dir=str(out_dir))
  assert (loaded.config.transport.path_type, loaded.config.transport.prediction) == (
    "ScaledLinear",
    "noise",
  )
  labels = [9, 0, 9]
  settings = dict(
    classes=[9, 0], batch_size=4, mode="dpm", dpm_steps=STEPS, cfg_scale=1 + U_VIT_SCALE, seed=seed
  )
  opts = sample.sampling_options(
    **{k: v for k, v in settings.items() if k not in ("classes", "batch_size")}
  )
  ours, got_labels, nfes = sample.generate(
    loaded, 3, classes=[9, 0], batch_size=4, opts=opts, output="latents"
  )
  assert list(got_labels) == labels and nfes == [STEPS], f"seed {seed}"
  ref = dpm_reference(model, params, range(3), labels, seed=seed, steps=STEPS, scale=U_VIT_SCALE)
  rel = np.abs(ours - ref).max() / np.abs(ref).max()
  assert rel < 1e-4, (rel, f"seed {seed}")
  unguided = dpm_reference(model, params, range(3), labels, seed=seed, steps=STEPS, scale=0.0)
  assert np.abs(unguided - ref).max() > 0.05 * np.abs(ref).max(), f"seed {seed}"

  summary = sample.run(
    checkpoint=str(out_dir), out=str(tmp_path / "out"), num_samples=3, pngs=False, **settings
  )
  assert summary["nfe_per_batch"] == [STEPS] and summary["mode"] == "dpm"
  assert summary["dpm_steps"] == STEPS and "solver" not in summary
  with np.load(tmp_path / "out" / "samples.npz") as z:
    images = z["arr_0"]
  expected = np.clip(127.5 * ref + 128.0, 0, 255).astype(np.uint8)
  diff = np.abs(images.astype(int) - expected.astype(int))
  assert images.shape == (3, 8, 8, 3) and diff.max() <= 1, f"seed {seed}"
  # Resuming into OUT with other steps is refused, as any other setting.
  with pytest.raises(sample.SampleError, match=r"other settings \(dpm_steps was 6, now 7\)"):
    sample.run(
      checkpoint=str(out_dir),
      out=str(tmp_path / "out"),
      num_samples=3,
      pngs=False,
      **dict(settings, dpm_steps=STEPS + 1),
    )


def test_dpm_is_refused_for_other_objectives(converted, tmp_path):
  """A model trained on a flow-matching path (an export whose config keeps the default
  transport) and too few steps: one sentence each, nothing written."""
  out_dir, _, _ = converted
  export = tmp_path / "export"
  os.makedirs(export)
  config = config_utils.base_config()
  config.model.update(_model_config())
  (export / "config.json").write_text(config.to_json())
  os.symlink(out_dir / "params", export / "ema_params")
  out = tmp_path / "out"
  with pytest.raises(sample.SampleError) as e:
    sample.run(checkpoint=str(export), out=str(out), num_samples=2, mode="dpm")
  path = config.transport.path_type
  assert str(e.value) == (
    "--mode=dpm (DPM-Solver) samples models of DiM's discrete noise-prediction objective "
    f"(transport path ScaledLinear), and this one was trained on path {path}: use "
    "--mode=ode or --mode=sde."
  )
  with pytest.raises(
    sample.SampleError,
    match=r"^--dpm_steps=2 is too few for DPM-Solver of "
    r"order 3: use at least 3 \(DiM uses 50\)\.$",
  ):
    sample.run(checkpoint=str(out_dir), out=str(out), num_samples=2, mode="dpm", dpm_steps=2)
  assert not out.exists()


def test_dpm_flags_of_the_command(converted, tmp_path):
  """The real command: --dpm_steps defaults to sampling's (DiM's 50) and reaches the options; a
  bad value ends in one sentence, exit status 1, no traceback."""
  assert sample.sampling_options(mode="dpm").dpm_steps == sampling.DPM_STEPS == 50
  out_dir, _, _ = converted
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "dimsum_jax.sample",
      f"--checkpoint={out_dir}",
      f"--out={tmp_path / 'out'}",
      "--mode=dpm",
      "--dpm_steps=1",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
  assert "error: --dpm_steps=1 is too few for DPM-Solver of order 3" in r.stderr
  assert not (tmp_path / "out").exists()
