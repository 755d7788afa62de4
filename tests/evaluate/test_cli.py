"""python -m dimsum_jax.evaluate: the metrics it prints and writes, and one sentence per bad input.

The happy paths: real held-out digits with the digits features (in a subprocess, as a user runs
it), and the Inception path with seeded random weights saved as a .pth, whose FID, sFID and IS
must equal the float64 metrics of the torch port's features (tests/evaluate/torch_inception.py).
The refusals run main() in this process (the same code as the command, without a JAX start-up
each): exit status 1, one line on stderr, and an earlier result left as it was.
"""

import json
import os

import numpy as np
import pytest
import torch

from dimsum_jax import command_line
from dimsum_jax.evaluate import command as cli
from dimsum_jax.evaluate import digits_features
from dimsum_jax.evaluate import metrics
from dimsum_jax.evaluate import reference_batch
from tests import train_util
from tests.evaluate import torch_inception

SEED = 11


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluate_cli")
  rng = np.random.default_rng(SEED)
  images, labels = digits_features.digits_images(16, 1)
  pick = rng.choice(np.flatnonzero(np.arange(len(labels)) % 5 == 0), 200)
  f = {"root": root, "samples": root / "run" / "samples.npz"}
  f["samples"].parent.mkdir()
  np.savez(f["samples"], arr_0=images[pick], labels=labels[pick].astype(np.int32))
  f["few"] = root / "few.npz"
  np.savez(f["few"], arr_0=images[pick[:10]], labels=labels[pick[:10]].astype(np.int32))
  f["float"] = root / "float.npz"
  np.savez(f["float"], arr_0=images[pick].astype(np.float32) / 255, labels=labels[pick])
  f["flat"] = root / "flat.npz"
  np.savez(f["flat"], arr_0=images[pick, ..., 0], labels=labels[pick])
  f["junk"] = root / "junk.npz"
  f["junk"].write_bytes(b"this is not a zip file")
  small, _ = digits_features.digits_images(8, 1)
  f["small"] = root / "small.npz"
  np.savez(f["small"], arr_0=small[pick], labels=labels[pick].astype(np.int32))
  f["wide_ref"] = root / "wide_ref.npz"  # statistics of 2048-dimensional features
  np.savez(f["wide_ref"], mu=np.zeros(2048), sigma=np.eye(2048))
  model = torch_inception.FIDInception3()
  state = torch_inception.random_state_dict(model, 0)
  state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
  f["other_net"] = root / "inception_v3_google.pth"
  torch.save(state, f["other_net"])
  return f


def _run(capsys, *argv):
  code = command_line.call(cli, [str(a) for a in argv])
  captured = capsys.readouterr()
  return code, captured.out, captured.err.strip().splitlines()


def test_digits_command_line(files, digits_cache, digits_net):
  r = train_util.run_python(
    [
      "-m",
      "dimsum_jax.evaluate",
      f"--samples={files['samples']}",
      "--features=digits",
      f"--cache_dir={digits_cache}",
    ],
    timeout=300,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
  out = files["samples"].parent / "evaluation-digits.json"
  result = json.loads(out.read_text())
  with np.load(files["samples"]) as z:
    want = metrics.evaluate_images(
      z["arr_0"], z["labels"], digits_features.digits_reference(digits_net), digits_net
    )
  for key, label in (
    ("fid", "FID"),
    ("inception_score", "Inception Score"),
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("accuracy", "Accuracy"),
  ):
    assert float(lines[label]) == pytest.approx(result[key], rel=1e-5), (key, f"seed {SEED}")
    assert result[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (key, f"seed {SEED}")
  assert result["num_samples"] == 200 and result["reference_images"] == 1797
  assert result["accuracy"] > 0.95 and result["precision"] > 0.9, (result, f"seed {SEED}")


def test_a_sample_folder_is_its_samples_npz(files, digits_cache, capsys, tmp_path):
  results = []
  for samples in (files["samples"].parent, files["samples"]):
    out = tmp_path / f"{len(results)}.json"
    code, _, err = _run(
      capsys,
      f"--samples={samples}",
      "--features=digits",
      f"--cache_dir={digits_cache}",
      f"--out={out}",
    )
    assert code == 0, err
    results.append(json.loads(out.read_text()))
  assert results[0]["samples"] == results[1]["samples"] == str(files["samples"])
  assert results[0]["fid"] == results[1]["fid"] and results[0]["recall"] == results[1]["recall"]


@pytest.mark.parametrize(
  "case,argv,phrase",
  [
    ("float samples", ["--samples={float}", "--features=digits"], "dtype float32, not uint8"),
    ("flat samples", ["--samples={flat}", "--features=digits"], "not images [N, H, W, C]"),
    ("not an npz", ["--samples={junk}", "--features=digits"], "is not a readable .npz"),
    ("no such samples", ["--samples={root}/absent.npz", "--features=digits"], "do not exist"),
    (
      "resolution",
      ["--samples={small}", "--features=digits", "--reference={ref16}"],
      "holds 16x16 images but the samples are 8x8",
    ),
    (
      "feature size",
      ["--samples={samples}", "--features=digits", "--reference={wide_ref}"],
      "holds 2048-dimensional pool statistics but digits-mlp-v1 gives 64",
    ),
    (
      "weights",
      ["--samples={samples}", "--reference={wide_ref}", "--inception={other_net}"],
      "is not the FID Inception's weights",
    ),
    ("too few", ["--samples={few}", "--features=digits"], "precision needs at least 100 samples"),
    ("no reference", ["--samples={samples}", "--inception={other_net}"], "need a --reference"),
    (
      "unknown metric",
      ["--samples={samples}", "--features=digits", "--metrics=fid,kid"],
      "Unknown metric",
    ),
  ],
)
def test_bad_input_is_one_sentence(
  files, digits_cache, digits_net, capsys, tmp_path, case, argv, phrase
):
  ref16 = tmp_path / "ref16.npz"
  reference_batch.save_reference(ref16, digits_features.digits_reference(digits_net))
  names = {k: str(v) for k, v in files.items()}
  out = tmp_path / "result.json"
  out.write_text('{"fid": 1.0}\n')
  code, stdout, err = _run(
    capsys,
    *[a.format(ref16=ref16, **names) for a in argv],
    f"--cache_dir={digits_cache}",
    f"--out={out}",
  )
  assert code == 1 and not stdout, (case, stdout)
  assert len(err) == 1 and err[0].startswith("error: ") and phrase in err[0], (case, err)
  assert err[0].endswith(".") and "Traceback" not in err[0], err
  assert out.read_text() == '{"fid": 1.0}\n', f"{case} overwrote the earlier result"
  assert sorted(os.listdir(tmp_path)) == ["ref16.npz", "result.json"], case


def test_a_bad_input_exits_1_without_traceback(files, tmp_path):
  """The same refusal from the real process: exit status 1, one line, nothing written."""
  r = train_util.run_python(
    [
      "-m",
      "dimsum_jax.evaluate",
      f"--samples={files['float']}",
      "--features=digits",
      f"--out={tmp_path / 'r.json'}",
    ],
    timeout=300,
  )
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1].startswith(f"error: {files['float']} holds arr_0")
  assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("metric_list", ["is", pytest.param("fid,sfid,is", marks=pytest.mark.slow)])
def test_inception_command_line_matches_the_torch_port(tmp_path, capsys, metric_list):
  """FID, sFID and IS of 6 random 40x48 images against a reference of 5 others, with seeded
  random weights: the CLI (Flax) against float64 metrics of the torch port's features. (FID and
  sFID cost two 2048 x 2048 eigendecompositions, about 20 s on 2 CPU cores: -m slow.)"""
  model = torch_inception.FIDInception3().eval()
  state = torch_inception.random_state_dict(model, SEED)
  torch.save(state, tmp_path / "weights.pth")
  rng = np.random.default_rng(SEED)
  samples = rng.integers(0, 256, (6, 40, 48, 3), np.uint8)
  ref_images = rng.integers(0, 256, (5, 40, 48, 3), np.uint8)
  feats = {
    name: torch_inception.features(model, torch.from_numpy(x).permute(0, 3, 1, 2) / 255.0)
    for name, x in (("samples", samples), ("ref", ref_images))
  }
  f64 = {n: {k: v.numpy().astype(np.float64) for k, v in f.items()} for n, f in feats.items()}
  ref = reference_batch.Reference(
    *metrics.statistics(f64["ref"]["pool"]), *metrics.statistics(f64["ref"]["spatial"])
  )
  reference_batch.save_reference(tmp_path / "ref.npz", ref)
  np.savez(tmp_path / "samples.npz", arr_0=samples)
  code, stdout, err = _run(
    capsys,
    f"--samples={tmp_path / 'samples.npz'}",
    f"--reference={tmp_path / 'ref.npz'}",
    f"--inception={tmp_path / 'weights.pth'}",
    "--split_size=3",
    "--batch_size=3",
    f"--metrics={metric_list}",
  )
  assert code == 0, err
  got = json.loads((tmp_path / "evaluation-ref.json").read_text())
  want = {"inception_score": metrics.inception_score(f64["samples"]["is_logits"], 3)}
  if "fid" in metric_list:
    want["fid"] = metrics.frechet_distance(
      *metrics.statistics(f64["samples"]["pool"]), ref.mu, ref.sigma
    )
    want["sfid"] = metrics.frechet_distance(
      *metrics.statistics(f64["samples"]["spatial"]), ref.mu_s, ref.sigma_s
    )
  # Features agree to ~1e-6 relative (test_inception.py); FID and IS are smooth in them.
  for key, value in want.items():
    assert got[key] == pytest.approx(value, rel=1e-4), (key, got[key], value, f"seed {SEED}")
  assert got["metrics"] == metric_list.split(",") and "Inception Score: " in stdout


def test_prepare_checks_before_any_sample_exists(digits_cache):
  """What `sample --evaluate` would call first: the same refusals, from a shape and a count."""
  args = cli.eval_args(features="digits", cache_dir=digits_cache)
  net, ref, chosen = cli.prepare(args, (8, 8, 1), 500)
  assert chosen == ("fid", "is", "precision", "recall", "accuracy")
  assert ref.image_shape == (8, 8, 1) and net.name == digits_features.NAME
  with pytest.raises(metrics.EvaluationError, match="precision needs at least 100 samples"):
    cli.prepare(args, (8, 8, 1), 10)
  with pytest.raises(metrics.EvaluationError, match="no labels"):
    cli.prepare(
      cli.eval_args(features="digits", cache_dir=digits_cache, metrics="accuracy"),
      (8, 8, 1),
      500,
      has_labels=False,
    )
  with pytest.raises(ValueError, match="Unknown evaluation option 'refrence'"):
    cli.eval_args(refrence="x.npz")
