"""The Flax FID Inception against pytorch-fid's network rebuilt in PyTorch (torch_inception.py).

The released weights cannot be downloaded here, so the check is structural: random weights
(seeded) under the released file's keys and shapes, imported into the Flax tree, and random
uint8 images (seeded) through both networks. Tolerance: float32 rounding, eps = 1.19e-7,
accumulated over K <= 3 * 3 * 448 = 4032 products per output of a layer (sqrt(K) eps relative)
along the 20 layers of the deepest path (Conv2d_1a_3x3 .. Mixed_7c's branch3x3dbl, plus fc):
20 sqrt(4032) eps = 1.5e-4 of the largest value. Measured: 8e-7 (pool), 9e-7 (logits),
4.5e-6 (spatial).
"""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dimsum_jax import command_line
from dimsum_jax.evaluate import inception
from tests import seeds
from tests.evaluate import torch_inception

EPS32 = float(np.finfo(np.float32).eps)
NET_TOL = 20 * np.sqrt(3 * 3 * 448) * EPS32
# A resize output sums 4 products of weights < 1 with values <= 255 (then / 255 or / 128).
RESIZE_TOL = 8 * EPS32


def _torch_net(seed):
  torch.manual_seed(seed)
  model = torch_inception.FIDInception3().eval()
  state = torch_inception.random_state_dict(model, seed)
  return model, state


@pytest.fixture(scope="module")
def torch_net():
  return _torch_net(0)


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def test_expected_keys_are_the_released_files():
  """Our tree's torch names and shapes = the port's state dict (less num_batches_tracked)."""
  model = torch_inception.FIDInception3()
  want = {
    k: tuple(v.shape)
    for k, v in model.state_dict().items()
    if not k.endswith("num_batches_tracked")
  }
  have = {k: v[2] for k, v in inception.expected_keys().items()}
  assert have == want
  assert len(have) == 472 and have["fc.weight"] == (1008, 2048)
  assert not any(k.startswith("AuxLogits") for k in have)


@seeds.each(default=0, many=4)
def test_network_matches_the_torch_port(torch_net, seed):
  """pool, logits (with and without bias) and spatial features of 3 images, float32."""
  model, state = torch_net if seed == 0 else _torch_net(seed)
  images = np.random.default_rng(seed + 1000).integers(0, 256, (3, 96, 128, 3), np.uint8)
  ref = torch_inception.features(model, torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0)
  variables = inception.variables_from_state_dict(state)
  out = jax.jit(inception.InceptionV3().apply)(variables, images)
  for key, dim in (("pool", 2048), ("logits", 1008), ("is_logits", 1008), ("spatial", 2023)):
    want = ref[key].numpy().astype(np.float64)
    assert out[key].shape == (3, dim), key
    err = _rel(out[key], want)
    print(f"{key}: max relative error {err:.2e} (seed {seed})")
    assert err < NET_TOL, (
      f"{key}: relative error {err:.2e} > {NET_TOL:.2e} (weights and images of seed {seed})"
    )


@seeds.each(default=0, many=8)
@pytest.mark.parametrize("size", [(64, 80), (400, 331), (299, 299)])
def test_pytorch_fid_resize_is_torch_interpolate(size, seed):
  """preprocess('pytorch_fid') = 2 interpolate(x / 255, 299, bilinear, align_corners=False) - 1."""
  images = np.random.default_rng(seed).integers(0, 256, (2, *size, 3), np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
  want = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
  got = np.asarray(inception.preprocess(images, "pytorch_fid"))
  np.testing.assert_allclose(
    got,
    want.permute(0, 2, 3, 1).numpy(),
    rtol=0,
    atol=RESIZE_TOL * 2,
    err_msg=f"seed {seed}, size {size}",
  )


@seeds.each(default=0, many=8)
def test_tf_input_is_the_legacy_tensorflow_resize(seed):
  """preprocess('tf') = (tf.compat.v1.image.resize_bilinear(x, 299) - 128) / 128.

  TensorFlow forms the source coordinate dst * (in / out) in float32: off by up to in * eps, times
  a slope of up to 255 per pixel, on top of the rounding of the 4-term sum."""
  tf = pytest.importorskip("tensorflow")
  images = np.random.default_rng(seed).integers(0, 256, (2, 64, 100, 3), np.uint8)
  want = tf.compat.v1.image.resize_bilinear(
    images.astype(np.float32), [299, 299], align_corners=False, half_pixel_centers=False
  )
  want = (want.numpy().astype(np.float64) - 128.0) / 128.0
  got = np.asarray(inception.preprocess(images, "tf"))
  tol = (100 * 255 * EPS32 + RESIZE_TOL * 255) / 128
  np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=f"seed {seed}")


def test_grey_images_are_repeated_to_rgb():
  images = np.random.default_rng(0).integers(0, 256, (2, 20, 20, 1), np.uint8)
  np.testing.assert_array_equal(
    np.asarray(inception.preprocess(images)),
    np.asarray(inception.preprocess(np.repeat(images, 3, -1))),
  )


# ------------------------------------------------------------------------------------------------
# The importer


def _one_sentence(e):
  text = str(e.value)
  assert "\n" not in text and text.endswith(".") and text.count(". ") == 0, text
  return text


def test_refuses_missing_unexpected_and_misshapen_keys(torch_net):
  _, state = torch_net
  missing = {k: v for k, v in state.items() if k != "Mixed_6d.branch1x1.conv.weight"}
  with pytest.raises(inception.WeightsError) as e:
    inception.variables_from_state_dict(missing, source="f.pth")
  assert "1 missing (Mixed_6d.branch1x1.conv.weight)" in _one_sentence(e)
  # torchvision's own Inception weights: 1000 classes and an auxiliary classifier.
  other = dict(
    state,
    **{
      "fc.weight": torch.zeros(1000, 2048),
      "fc.bias": torch.zeros(1000),
      "AuxLogits.fc.weight": torch.zeros(1000, 768),
    },
  )
  with pytest.raises(inception.WeightsError) as e:
    inception.variables_from_state_dict(other, source="inception_v3_google.pth")
  text = _one_sentence(e)
  assert "1 unexpected (AuxLogits.fc.weight)" in text
  assert "fc.bias is [1000], not [1008]" in text and "fc.weight is [1000, 2048]" in text
  assert text.startswith("inception_v3_google.pth is not the FID Inception's weights")


def test_num_batches_tracked_is_ignored(torch_net):
  _, state = torch_net
  without = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
  a = inception.variables_from_state_dict(state)
  b = inception.variables_from_state_dict(without)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  conv = a["params"]["Mixed_5b"]["branch5x5_2"]["conv"]["kernel"]
  np.testing.assert_array_equal(
    conv, state["Mixed_5b.branch5x5_2.conv.weight"].numpy().transpose(2, 3, 1, 0)
  )
  bn = a["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"]
  np.testing.assert_array_equal(bn, state["Conv2d_1a_3x3.bn.running_var"].numpy())


class _NotATensor:
  pass


def test_weight_files(torch_net, tmp_path):
  """A .pth loads with weights_only; its .npz conversion loads the same; other files refused."""
  _, state = torch_net
  pth = tmp_path / "pt_inception.pth"
  torch.save(state, pth)
  v = inception.load_variables(str(pth))
  assert command_line.call(inception, ["--convert", pth, "--out", tmp_path / "w.npz"]) == 0
  w = inception.load_variables(str(tmp_path / "w.npz"))
  leaves = jax.tree.leaves
  assert all(np.array_equal(x, y) for x, y in zip(leaves(v), leaves(w)))
  torch.save({"model": _NotATensor()}, tmp_path / "pickle.pth")
  torch.save(torch.zeros(3), tmp_path / "tensor.pth")
  (tmp_path / "junk.pth").write_bytes(b"not a torch file")
  for name, phrase in (
    ("pickle.pth", "weights_only=True"),
    ("tensor.pth", "not a state dict"),
    ("junk.pth", "weights_only=True"),
    ("absent.pth", "do not exist"),
  ):
    with pytest.raises(inception.WeightsError) as e:
      inception.load_variables(str(tmp_path / name))
    assert phrase in _one_sentence(e), name
