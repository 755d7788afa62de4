"""Feature extraction split over 8 devices equals extraction on 1 (8 fake CPU devices, in a
subprocess: XLA_FLAGS=--xla_force_host_platform_device_count=8, as tests/train_util.py runs them).

The digits features in the default run (203 images: the last global batch is padded), the
Inception with seeded random weights under -m slow. Tolerance: the two runs multiply the same
rows by the same weights in batches of other sizes, so only the blocking of the float32 sums may
differ: K eps of the largest feature for the longest sum, K = 2048 (the Inception's fc; measured:
pool and spatial bit for bit, the fc 2e-6).
"""

import json

import numpy as np
import pytest

from tests import train_util
from tests.evaluate import torch_inception

SEED = 3
TOL = 2048 * float(np.finfo(np.float32).eps)
SCRIPT = """
import json, sys
import jax, numpy as np
from dimsum_jax.evaluate import digits_features, features, inception, metrics
kind, where, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert jax.device_count() == 8, jax.devices()
rng = np.random.default_rng(seed)
if kind == "digits":
  net = digits_features.digits_feature_net(where)
  images, labels = digits_features.digits_images(16, 1)
  pick = rng.choice(len(images), 203)
  x, y = images[pick], labels[pick]
else:
  module = inception.InceptionV3()
  net = features.FeatureNet("inception", module.apply, inception.load_variables(where),
                            {"pool": 2048, "spatial": 2023, "is_logits": 1008}, batch_size=1)
  x, y = rng.integers(0, 256, (11, 40, 40, 3), np.uint8), None
eight = features.Extractor(net)
net.batch_size = net.batch_size * 8
one = features.Extractor(net, devices=jax.devices()[:1])
assert eight.mesh.devices.size == 8 and one.mesh.devices.size == 1
assert eight.global_batch == one.global_batch
a, b = eight(x), one(x)
out = {"rel": {k: float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in a},
       "rows": {k: a[k].shape[0] for k in a}}
if kind == "digits":
  ref = digits_features.digits_reference(net, 16, 1, extractor=one)
  s8 = metrics.evaluate_images(x, y, ref, net, extractor=eight)
  s1 = metrics.evaluate_images(x, y, ref, net, extractor=one)
  out["scores"] = [s8, s1]
print("RESULT " + json.dumps(out))
"""


def _run(kind, where):
  r = train_util.run_python(["-c", SCRIPT, kind, str(where), str(SEED)], devices=8, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])


def test_digits_features_on_8_devices_equal_1(digits_cache):
  out = _run("digits", digits_cache)
  assert out["rows"] == {"pool": 203, "logits": 203, "is_logits": 203}
  assert max(out["rel"].values()) <= TOL, f"seed {SEED}: {out['rel']}"
  s8, s1 = out["scores"]
  for key in ("precision", "recall", "accuracy", "num_samples"):
    assert s8[key] == s1[key], (key, s8, s1)
  for key in ("fid", "inception_score"):
    assert s8[key] == pytest.approx(s1[key], rel=1e-5), (key, s8, s1)


@pytest.mark.slow
def test_inception_features_on_8_devices_equal_1(tmp_path):
  model = torch_inception.FIDInception3()
  state = torch_inception.random_state_dict(model, SEED)
  np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in state.items()})
  out = _run("inception", tmp_path / "w.npz")
  assert out["rows"] == {"pool": 11, "spatial": 11, "is_logits": 11}
  assert max(out["rel"].values()) <= TOL, f"seed {SEED}: {out['rel']}"
