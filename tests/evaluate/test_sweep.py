"""The FID-versus-NFE / guidance sweep on CPU with the digits features.

Two models: a tiny random DiT (configs/digits.py:smoke_dit, depth 1, 8x8 digits) for the
mechanics (shared noises, NFE, resume), and the exact velocity field of the 8x8 digits
themselves (the Linear path's E[x1 - x0 | x_t] under the empirical distribution of each class),
whose samples must approach real digits as the NFE grows: the features' FID must fall (from
62 at one Euler step, every sample its class mean, to 12-13 at 4 and 16 steps).
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimsum_jax import command_line
from dimsum_jax import models
from dimsum_jax import sampling
from dimsum_jax.data import digits as digits_data
from dimsum_jax.evaluate import digits_features
from dimsum_jax.evaluate import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED = 5


def _tiny_dit_parts():
  """(config, module, params) of configs/digits.py:smoke_dit at depth 1, randomly initialised."""
  spec = importlib.util.spec_from_file_location(
    "digits_cfg", os.path.join(ROOT, "configs", "digits.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke_dit")
  config.model.depth = 1
  model = models.create_model(config.model)
  rngs = {"params": jax.random.PRNGKey(SEED), "dropout": jax.random.PRNGKey(1)}
  params = jax.jit(model.init)(
    rngs, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
  )["params"]
  return config, model, params


def _tiny_dit():
  config, model, params = _tiny_dit_parts()
  return sweep.SweepModel(
    model_fn=lambda p, x, t, y: model.apply({"params": p}, x, t, y),
    params=params,
    image_shape=(8, 8, 1),
    num_classes=10,
    path_type=config.transport.path_type,
    prediction=config.transport.prediction,
  )


def test_sweep_shares_noises_counts_nfe_and_resumes(tmp_path, digits_net, monkeypatch):
  sm = _tiny_dit()
  ref = digits_features.digits_reference(digits_net, 8, 1)
  settings = [
    {"solver": "euler", "num_steps": 1, "cfg_scale": 1.0},
    {"solver": "heun", "num_steps": 2, "cfg_scale": 2.0},
  ]
  kw = dict(
    reference=ref,
    feature_net=digits_net,
    num_samples=12,
    seed=SEED,
    metrics="fid,accuracy",
    batch_size=8,
    out=str(tmp_path),
  )
  rows = sweep.run_sweep(sm, settings, keep_images=True, **kw)
  assert [r["nfe"] for r in rows] == [1.0, 4.0]
  assert all(r["num_samples"] == 12 and np.isfinite(r["fid"]) for r in rows)
  # Sample i starts from the noise `python -m dimsum_jax.sample` gives it.
  key = jax.random.split(jax.random.PRNGKey(SEED))[0]
  noise = np.stack(
    [np.asarray(jax.random.normal(jax.random.fold_in(key, i), (8, 8, 1))) for i in range(12)]
  )
  np.testing.assert_array_equal(np.load(tmp_path / "noise-seed5-12x8x8x1.npy"), noise)
  # The guided Heun setting equals a direct solve from those noises.
  labels = np.arange(12) % 10
  velocity = sampling.make_sampling_velocity_fn(
    lambda x, t, y: sm.model_fn(sm.params, x, t, y),
    path_type=sm.path_type,
    prediction=sm.prediction,
    cfg_scale=2.0,
    null_label=10,
  )
  x1 = jax.jit(
    lambda x0, y: sampling.solve_ode(velocity, x0, solver="heun", num_steps=2, args=y).x1
  )(jnp.asarray(noise), labels)
  want = np.asarray(jnp.clip(127.5 * x1 + 128.0, 0, 255).astype(jnp.uint8))
  assert np.abs(rows[1]["images"].astype(int) - want).max() <= 1, f"seed {SEED}"
  # A rerun reads the finished settings; one whose row is gone is sampled again, alone, and
  # gives the same row (the same noises; its compiled sampler is kept by the SweepModel).
  monkeypatch.setattr(sweep, "sample_setting", lambda *a, **k: pytest.fail("sampled again"))
  again = sweep.run_sweep(sm, settings, **kw)
  strip = lambda r: {k: v for k, v in r.items() if k not in ("images", "seconds", "sample_seconds")}
  assert [strip(r) for r in rows] == [strip(r) for r in again]
  monkeypatch.undo()
  written = json.loads((tmp_path / "sweep.json").read_text())
  (tmp_path / "sweep.json").write_text(json.dumps(written[:1]))
  calls, real = [], sweep.sample_setting
  monkeypatch.setattr(sweep, "sample_setting", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
  extended = sweep.run_sweep(sm, settings, **kw)
  assert calls == [settings[1]] and strip(extended[1]) == strip(rows[1])
  assert len(json.loads((tmp_path / "sweep.json").read_text())) == 2
  assert "euler       1  1.0      1.0" in sweep.format_table(extended).splitlines()[1]


def _oracle():
  """The exact velocity of the Linear path from N(0, I) to the 8x8 digits of class y (the
  null label 10: all digits), as a 'model' of velocity prediction."""
  images, labels = digits_data.load_digits_images(8, 1)
  data = jnp.asarray(images.reshape(len(images), -1))
  onehot = jnp.asarray(np.eye(11)[labels])
  onehot = onehot.at[:, 10].set(1.0)

  def model_fn(params, x, t, y):
    del params
    flat = x.reshape(x.shape[0], -1)
    tt = t[:, None]
    d2 = jnp.sum((flat[:, None, :] - tt[:, :, None] * data[None]) ** 2, -1)  # [B, N]
    logw = -d2 / (2 * (1 - tt) ** 2) + jnp.log(onehot[:, y].T + 1e-30)
    w = jax.nn.softmax(logw, axis=1)
    x1 = w @ data
    return ((x1 - flat) / (1 - tt)).reshape(x.shape)

  return sweep.SweepModel(
    model_fn=model_fn,
    params={},
    image_shape=(8, 8, 1),
    num_classes=10,
    path_type="Linear",
    prediction="velocity",
  )


def test_fid_falls_with_nfe_for_the_exact_field(tmp_path, digits_net):
  ref = digits_features.digits_reference(digits_net, 8, 1)
  settings = sweep.settings_grid(["euler"], [1, 4, 16], [1.0])
  rows = sweep.run_sweep(
    _oracle(),
    settings,
    reference=ref,
    feature_net=digits_net,
    num_samples=120,
    seed=SEED,
    metrics="fid,accuracy",
    batch_size=40,
  )
  fid = [r["fid"] for r in rows]
  msg = f"seed {SEED}: {[(r['setting']['num_steps'], r['fid'], r['accuracy']) for r in rows]}"
  # One step lands every sample on its class mean; 4 and 16 steps reach digits, down to the
  # floor that 120 samples leave (about 10 here), so only the first drop is asserted.
  assert fid[0] > 3 * max(fid[1], fid[2]), msg
  assert rows[2]["accuracy"] > 0.9, msg


@pytest.mark.parametrize(
  "argv,phrase",
  [
    (["--checkpoint={root}/absent", "--features=digits"], "no such directory"),
    (["--checkpoint={root}", "--features=inception"], "Pass --reference=REF.npz"),
    (["--checkpoint={root}", "--features=digits", "--solver=rk4"], "unknown ODE solver"),
    (
      ["--checkpoint={root}", "--features=digits", "--num_steps=8,2.5"],
      "--num_steps=8,2.5 is not a comma list of integers",
    ),
  ],
)
def test_command_line_refusals(tmp_path, digits_cache, capsys, argv, phrase):
  code = command_line.call(
    sweep,
    [a.format(root=tmp_path) for a in argv]
    + [f"--out={tmp_path / 'out'}", f"--cache_dir={digits_cache}"],
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and phrase in err[0], err
  assert not (tmp_path / "out").exists()


def test_command_line_on_a_converted_checkpoint(tmp_path, digits_cache, capsys):
  """The CLI end to end: sample.load_model reads a checkpoint (the `convert` layout:
  model_config.json + params/), SweepModel.from_loaded wraps it, one setting is swept."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  config, _, params = _tiny_dit_parts()
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / "model_config.json").write_text(json.dumps(config.model.to_dict()))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(ckpt / "params"), params)
  checkpointer.wait_until_finished()
  code = command_line.call(
    sweep,
    [
      f"--checkpoint={ckpt}",
      "--features=digits",
      f"--cache_dir={digits_cache}",
      "--num_samples=12",
      "--batch_size=8",
      "--num_steps=2",
      "--cfg_scale=1.5",
      f"--seed={SEED}",
      "--metrics=fid,accuracy",
      f"--out={tmp_path / 'out'}",
    ],
  )
  out, err = capsys.readouterr()
  assert code == 0, err
  rows = json.loads((tmp_path / "out" / "sweep.json").read_text())
  assert len(rows) == 1 and rows[0]["nfe"] == 2.0 and rows[0]["num_samples"] == 12, rows
  assert rows[0]["setting"] == {"solver": "euler", "num_steps": 2, "cfg_scale": 1.5}
  assert "euler" in out and "written to" in out
