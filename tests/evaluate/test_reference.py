"""Reference batches: ADM's format read and written, and the chunked writer's resume.

The writer runs with the digits features (no Inception at 299 px on a CPU) over an image folder
of real digits (PNGs, two class folders), a latent set decoded by a tiny random VAE, and the
built-in digits set. Resumed runs must equal uninterrupted ones bit for bit.
"""

import json

import numpy as np
import pytest
from PIL import Image

from dimsum_jax import command_line
from dimsum_jax.evaluate import digits_features
from dimsum_jax.evaluate import metrics
from dimsum_jax.evaluate import reference
from dimsum_jax.evaluate import reference_batch
from tests.data.test_encode import make_vae_dir


def _args(out, **kw):
  return reference.writer_args(
    **{
      "dataset": "image_folder",
      "out": str(out),
      "image_size": 16,
      "channels": 1,
      "chunk_size": 7,
      "pr_images": 10,
      "read_batch": 5,
      **kw,
    }
  )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """33 digits as 16x16 grey PNGs: classes a/ (17) and b/ (16), file order = index order."""
  root = tmp_path_factory.mktemp("digit_pngs")
  images, _ = digits_features.digits_images(16, 1)
  for i in range(33):
    d = root / ("a" if i < 17 else "b")
    d.mkdir(exist_ok=True)
    Image.fromarray(images[i, ..., 0]).save(d / f"{i:03d}.png")
  return str(root), images[:33]


def _same(a, b):
  assert np.array_equal(a.mu, b.mu) and np.array_equal(a.sigma, b.sigma)
  assert np.array_equal(np.asarray(a.images.read()), np.asarray(b.images.read()))


def test_folder_reference_resumes_to_the_same_file(folder, digits_net, tmp_path):
  root, images = folder
  whole = reference.write_reference(_args(tmp_path / "whole.npz", data_dir=root), digits_net)
  out = tmp_path / "resumed.npz"
  assert (
    reference.write_reference(_args(out, data_dir=root), digits_net, stop_after_chunks=2) is None
  )
  state = json.loads((tmp_path / "resumed.npz.partial" / "state.json").read_text())
  assert (state["images"], state["chunks"]) == (14, 2) and not out.exists()
  with pytest.raises(metrics.EvaluationError, match=r"other settings \(pr_images\)"):
    reference.write_reference(_args(out, data_dir=root, pr_images=5), digits_net)
  resumed = reference.write_reference(_args(out, data_dir=root), digits_net)
  assert not (tmp_path / "resumed.npz.partial").exists()
  _same(whole, resumed)
  # The statistics are those of every image; arr_0 holds 10 of them, in order.
  feats = digits_net.apply(digits_net.variables, images)["pool"]
  np.testing.assert_allclose(
    whole.mu, np.mean(np.asarray(feats, np.float64), 0), rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
    whole.sigma, np.cov(np.asarray(feats, np.float64), rowvar=False), rtol=1e-5, atol=1e-6
  )
  arr_0 = whole.images.read()
  assert arr_0.shape == (10, 16, 16, 1) and whole.num_stat_images == 33
  rows = [int(np.flatnonzero((images == a).all(axis=(1, 2, 3)))[0]) for a in arr_0]
  assert rows == sorted(rows)
  assert whole.feature_net == digits_features.NAME and whole.mu_s is None


def test_files_load_without_pickle_and_in_adm_layout(tmp_path, digits_net):
  images, _ = digits_features.digits_images(16, 1)
  ref = reference_batch.reference_from_images(images[:50], digits_net, source="digits:50")
  reference_batch.save_reference(tmp_path / "r.npz", ref)
  with np.load(tmp_path / "r.npz", allow_pickle=False) as z:
    assert set(z.files) == {"mu", "sigma", "arr_0", "feature_net", "num_images", "source"}
    assert z["arr_0"].dtype == np.uint8 and str(z["feature_net"]) == digits_features.NAME
  back = reference_batch.load_reference(tmp_path / "r.npz")
  _same(back, reference_batch.load_reference(tmp_path / "r.npz"))
  np.testing.assert_array_equal(back.images.read(), images[:50])
  # ADM's files: mu, sigma, mu_s, sigma_s, arr_0 and nothing else.
  rng = np.random.default_rng(0)
  np.savez(
    tmp_path / "adm.npz",
    mu=np.zeros(4),
    sigma=np.eye(4),
    mu_s=np.zeros(3),
    sigma_s=np.eye(3),
    arr_0=rng.integers(0, 256, (5, 8, 8, 3), np.uint8),
  )
  adm = reference_batch.load_reference(tmp_path / "adm.npz")
  assert adm.feature_net is None and adm.num_images == 5 and adm.mu_s.shape == (3,)


@pytest.mark.parametrize(
  "content,phrase",
  [
    (dict(sigma=np.eye(2)), "has no `mu`"),
    (dict(mu=np.zeros(2), sigma=np.eye(3)), "not a float mean"),
    (dict(mu=np.zeros(2), sigma=np.eye(2), mu_s=np.zeros(2)), "only one of mu_s and sigma_s"),
    (
      dict(mu=np.zeros(2), sigma=np.eye(2), arr_0=np.zeros((2, 4, 4, 3), np.float32)),
      "not uint8 images",
    ),
    (
      dict(mu=np.zeros(2), sigma=np.eye(2), arr_0=np.array([{"a": 1}], dtype=object)),
      "is never loaded",
    ),
  ],
)
def test_bad_reference_files_are_one_sentence(tmp_path, content, phrase):
  np.savez(tmp_path / "bad.npz", **content)
  with pytest.raises(metrics.EvaluationError) as e:
    reference_batch.load_reference(tmp_path / "bad.npz")
  assert phrase in str(e.value) and "\n" not in str(e.value)


def test_latent_set_is_decoded_without_mirrors(tmp_path, digits_net):
  """A flip-doubled latent set: rows 2k (the images) decoded by the VAE, rows 2k + 1 skipped."""
  from dimsum_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from dimsum_jax.data import LatentShardWriter  # pylint: disable=g-import-not-at-top

  module, params = make_vae_dir(tmp_path / "vae")
  rng = np.random.default_rng(3)
  latents = rng.normal(size=(2 * 9, 8, 8, 4)).astype(np.float32)
  with LatentShardWriter(
    str(tmp_path / "latents"),
    latent_shape=(8, 8, 4),
    flip_doubled=True,
    image_size=16,
    shard_size=4,
  ) as w:
    w.append(latents)
  args = _args(
    tmp_path / "lat.npz",
    dataset="latents",
    data_dir=str(tmp_path / "latents"),
    vae_dir=str(tmp_path / "vae"),
    channels=3,
    pr_images=100,
    chunk_size=4,
  )
  ref = reference.write_reference(args, digits_net)
  want = np.asarray(vae_lib.decode_latents(module, params, latents[0::2]))
  got = ref.images.read()
  assert got.shape == (9, 16, 16, 3) and "mirrors skipped" in ref.source
  # The decoder ran sharded and batched, the reference in one call: a rounding step apart.
  assert np.abs(got.astype(int) - want).max() <= 1, "seed 3"


def test_cli_digits_reference_and_refusals(tmp_path, digits_cache, capsys):
  out = tmp_path / "digits.npz"
  assert (
    command_line.call(
      reference,
      [
        "--dataset=digits",
        "--features=digits",
        f"--cache_dir={digits_cache}",
        "--num_images=200",
        "--pr_images=150",
        f"--out={out}",
      ],
    )
    == 0
  )
  ref = reference_batch.load_reference(out)
  assert ref.num_stat_images == 200 and ref.num_images == 150
  assert ref.images.shape[1:] == (16, 16, 1)
  assert (
    command_line.call(reference, ["--dataset=digits", "--features=digits", f"--out={out}"]) == 1
  )
  assert "exists: choose another --out" in capsys.readouterr().err
  assert (
    command_line.call(
      reference,
      [
        "--dataset=image_folder",
        f"--data_dir={tmp_path / 'none'}",
        "--features=digits",
        f"--cache_dir={digits_cache}",
        f"--out={tmp_path / 'x.npz'}",
      ],
    )
    == 1
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: Image folder") and "does not exist" in err[0]


def test_tfds_reference_resumes_to_the_same_file(tmp_path, digits_net):
  """A tfds set (tests/data/test_tfds_images.py's fake builder, 23 images 8 x 8..10): statistics
  of all 23 after a resume equal an uninterrupted run's; arr_0 holds each image once (in the
  order tfds stored the records, which it shuffles when it writes them)."""
  from tests.data import test_tfds_images as fake  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path / "tfds")
  fake.DimsumFakeImages(data_dir=data_dir).download_and_prepare()
  kw = dict(
    dataset="imagenet2012",
    tfds_name="dimsum_fake_images",
    data_dir=data_dir,
    image_size=8,
    channels=3,
    chunk_size=6,
    pr_images=23,
    read_batch=4,
  )
  whole = reference.write_reference(_args(tmp_path / "whole.npz", **kw), digits_net)
  out = tmp_path / "resumed.npz"
  assert reference.write_reference(_args(out, **kw), digits_net, stop_after_chunks=3) is None
  resumed = reference.write_reference(_args(out, **kw), digits_net)
  _same(whole, resumed)
  arr_0 = whole.images.read()
  assert arr_0.shape == (23, 8, 8, 3) and whole.num_stat_images == 23
  ids = [int(a[0, :, 0].min()) // 10 for a in arr_0]  # pixel (y, x) = 10 id + x
  assert sorted(ids) == list(range(23)), ids
