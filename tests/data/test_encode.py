"""The latent-encoding step (dimsum_jax.data.encode) on tiny image folders and a tiny random VAE.

References: the VAE's own posterior moments for images loaded by the image-folder reader (crop.py's
PIL code), their mirrors taken in NumPy, the documented noise rule for sampled latents, float64
NumPy statistics and hashlib for the manifest, and a sequential loop for the resume position.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

from absl import flags
import jax
import numpy as np
import pytest
from PIL import Image

from dimsum_jax import command_line
from dimsum_jax.data import create_dataset, default_data_config, encode, encode_input
from dimsum_jax.data import latent_parts
from dimsum_jax.data.image_folder import load_image
from dimsum_jax.vae import checkpoint, model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 16  # pixels; the tiny VAE halves once, so latents are [8, 8, 4]
TINY_VAE = dict(
  block_out_channels=[8, 16],
  layers_per_block=1,
  norm_num_groups=4,
  latent_channels=4,
  down_block_types=["DownEncoderBlock2D"] * 2,
  up_block_types=["UpDecoderBlock2D"] * 2,
  _name_or_path="tiny-random-vae",
)


def make_vae_dir(directory, seed=0, vae_config=None):
  """A random tiny VAE in this project's checkpoint format; returns (module, params)."""
  vae_config = vae_config or TINY_VAE
  vae = model.vae_from_config(vae_config)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):  # fan-in scaled kernels; norms and biases moved off (1, 0)
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if leaf.ndim > 1:
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return noise * 0.1 + (1.0 if path[-1].key == "scale" else 0.0)

  params = jax.tree_util.tree_map_with_path(draw, model.abstract_params(vae))
  checkpoint.save_vae(str(directory), vae_config, params)
  return vae, params


def make_image_folder(root, names, seed=0, size=SIZE):
  """Random RGB PNGs of random sizes (size..2.5 size px per side) at root/<name>; the paths."""
  rng = np.random.default_rng(seed)
  paths = []
  for name in names:
    path = os.path.join(str(root), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h, w = rng.integers(size, int(2.5 * size) + 1, 2)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  return paths


def read_set(directory):
  """(latents, labels) of a finished set, shards concatenated in meta.json order."""
  with open(os.path.join(directory, "meta.json")) as f:
    meta = json.load(f)
  lat = [np.load(os.path.join(directory, s["latents"])) for s in meta["shards"]]
  lab = [np.load(os.path.join(directory, s["labels"])) for s in meta["shards"]]
  return np.concatenate(lat), np.concatenate(lab), meta


_encode_pair = jax.jit(model.encode, static_argnums=0)  # one image and its mirror: one compile


def expected_latents(vae, params, images, mode="mean", seed=0, ids=None):
  """Rows [image 0, mirror 0, image 1, ...] from the VAE's moments, by the documented rules."""
  moments = [_encode_pair(vae, params, np.stack([x, x[:, ::-1]])) for x in images]
  mean = np.concatenate([np.asarray(m, np.float64) for m, _ in moments])
  logvar = np.concatenate([np.asarray(v, np.float64) for _, v in moments])
  if mode == "mean":
    return mean * 0.18215
  key = jax.random.key(seed)
  noise = np.stack(
    [
      np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), m), (8, 8, 4)))
      for i in ids
      for m in (0, 1)
    ]
  )
  return (mean + np.exp(0.5 * logvar) * noise) * 0.18215


def config(tmp, out, **kw):
  c = dict(
    dataset="image_folder",
    data_dir=str(tmp["images"]),
    vae=str(tmp["vae"]),
    out=str(out),
    image_size=SIZE,
    class_conditional=True,
    mode="mean",
    batch_size=4,
    shard_size=6,
    log_every_s=0.0,
    num_workers=2,
    prefetch=2,
    process_index=0,
    process_count=1,
  )
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  root = tmp_path_factory.mktemp("encode")
  vae, params = make_vae_dir(root / "vae")
  names = [f"cat/{i}.png" for i in range(5)] + [f"dog/{i}.jpg" for i in range(4)]
  paths = make_image_folder(root / "images", names)
  images = np.stack([load_image(p, SIZE, 3, "adm") for p in paths])
  return {
    "root": root,
    "vae": root / "vae",
    "images": root / "images",
    "module": vae,
    "params": params,
    "pixels": images,
    "labels": np.asarray([0] * 5 + [1] * 4),
  }


@pytest.fixture(scope="module")
def mean_set(tmp):
  out = tmp["root"] / "mean_set"
  meta = encode.encode_dataset(config(tmp, out))
  return out, meta


def test_mean_latents_are_the_moments_of_images_and_mirrors(tmp, mean_set):
  out, meta = mean_set
  latents, labels, on_disk = read_set(out)
  assert on_disk == meta
  want = expected_latents(tmp["module"], tmp["params"], tmp["pixels"])
  assert latents.shape == (18, 8, 8, 4) and latents.dtype == np.float32
  np.testing.assert_allclose(latents, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels, np.repeat(tmp["labels"], 2))
  assert np.abs(latents[0::2] - latents[1::2]).max() > 1e-3  # the mirrors are other images
  assert (meta["num_examples"], meta["num_classes"], meta["flip_doubled"], meta["scaled"]) == (
    18,
    2,
    True,
    True,
  )
  assert (meta["latent_shape"], meta["image_size"], meta["vae"]) == (
    [8, 8, 4],
    SIZE,
    "tiny-random-vae",
  )
  assert [s["num_examples"] for s in meta["shards"]] == [6, 6, 6]

  # The manifest: float64 statistics over every value, hashes of the files, counts.
  with open(out / "manifest.json") as f:
    manifest = json.load(f)
  assert (manifest["num_examples"], manifest["num_images"], manifest["num_skipped"]) == (18, 9, 0)
  values = latents.astype(np.float64).reshape(-1, 4)
  np.testing.assert_allclose(manifest["channel_mean"], values.mean(0), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(manifest["channel_std"], values.std(0), rtol=1e-6)
  for shard in manifest["shards"]:
    with open(out / shard["latents"], "rb") as f:
      assert shard["sha256_latents"] == hashlib.sha256(f.read()).hexdigest()

  # Training reads it as it is: rows in order with shuffle off.
  c = default_data_config()
  c.update(
    name="latents",
    data_dir=str(out),
    image_size=8,
    channels=4,
    global_batch_size=18,
    shuffle=False,
    num_epochs=1,
    prefetch=0,
  )
  (batch,) = list(create_dataset(c))
  np.testing.assert_array_equal(batch["image"], latents)
  np.testing.assert_array_equal(batch["label"], labels)


def test_sampled_latents_over_two_processes_resume_after_a_crash(tmp, monkeypatch):
  out = tmp["root"] / "sampled"
  c = config(
    tmp,
    out,
    mode="sample",
    seed=3,
    batch_size=2,
    shard_size=4,
    prefetch=1,
    class_conditional=False,
    process_count=2,
  )
  calls = []
  real_decode = encode_input.decode_image

  def crashing_decode(*args):
    calls.append(args[-1])
    if len(calls) == 5:
      raise RuntimeError("simulated crash")
    return real_decode(*args)

  monkeypatch.setattr(encode_input, "decode_image", crashing_decode)
  with pytest.raises(RuntimeError, match="simulated crash"):
    encode.encode_dataset(c)
  part0 = out / "part-00000-of-00002"
  with open(part0 / "progress.json") as f:
    durable = sum(s["num_examples"] for s in json.load(f)["shards"])
  assert durable == 4 and not (part0 / "meta.json").exists()  # images 0, 1 and their mirrors

  calls.clear()
  monkeypatch.setattr(
    encode_input, "decode_image", lambda *args: calls.append(args[-1]) or real_decode(*args)
  )
  assert encode.encode_dataset(c) is None  # part 1 is still missing
  assert len(calls) == 5 - durable // 2  # only images 2, 3, 4 again
  assert not (out / "meta.json").exists()
  meta = encode.encode_dataset(dict(c, process_index=1))  # the last part finalizes
  assert [s["latents"].split("/")[0] for s in meta["shards"]] == (
    ["part-00000-of-00002"] * 3 + ["part-00001-of-00002"] * 2
  )
  latents, labels, _ = read_set(out)
  want = expected_latents(
    tmp["module"], tmp["params"], tmp["pixels"], mode="sample", seed=3, ids=range(9)
  )
  np.testing.assert_allclose(latents, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels, 0)
  assert meta["num_classes"] == 0 and meta["extra"]["mode"] == "sample"


def test_resume_position_steps_over_known_bad_images():
  assert latent_parts.resume_position(3, [0, 2, 7]) == 5
  assert latent_parts.resume_position(2, [3, 0, 1, 2]) == 6
  assert latent_parts.resume_position(0, [0]) == 0
  rng = np.random.default_rng(0)
  for _ in range(50):
    bad = set(rng.choice(30, rng.integers(0, 10), replace=False).tolist())
    good = int(rng.integers(0, 30 - len(bad)))
    position, seen = 0, 0  # sequential reference: walk the stream
    while seen < good:
      seen += position not in bad
      position += 1
    assert latent_parts.resume_position(good, sorted(bad)) == position


def test_bad_images_fail_or_are_skipped_by_name_and_resume_exactly(tmp, monkeypatch, caplog):
  root = tmp["root"] / "with_bad"
  paths = make_image_folder(root, ["a0.png", "a1.png", "c0.png", "c1.png", "c2.png"], seed=1)
  (root / "b_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  c = config(
    tmp,
    tmp["root"] / "bad_fail",
    data_dir=str(root),
    class_conditional=False,
    batch_size=1,
    shard_size=2,
    prefetch=1,
  )
  with pytest.raises(latent_parts.EncodeError, match=r"b_bad\.png.*--on_bad_image=skip"):
    encode.encode_dataset(c)

  c = dict(c, out=str(tmp["root"] / "bad_skip"), on_bad_image="skip")
  real_decode, calls = encode_input.decode_image, []

  def crashing_decode(*args):
    calls.append(os.path.basename(args[-1]))
    if calls[-1] == "c2.png":
      raise RuntimeError("simulated crash")
    return real_decode(*args)

  monkeypatch.setattr(encode_input, "decode_image", crashing_decode)
  with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="simulated crash"):
    encode.encode_dataset(c)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any(str(root / "b_bad.png") in w and "--on_bad_image=skip" in w for w in warnings)
  with pytest.raises(latent_parts.EncodeError, match="was started with flip=True"):
    encode.encode_dataset(dict(c, flip=False, shard_size=1))
  calls.clear()
  monkeypatch.setattr(
    encode_input,
    "decode_image",
    lambda *args: calls.append(os.path.basename(args[-1])) or real_decode(*args),
  )
  meta = encode.encode_dataset(c)
  assert calls == ["c1.png", "c2.png"]  # a0, a1, c0 were durable; b_bad was known to be bad
  latents, _, _ = read_set(tmp["root"] / "bad_skip")
  pixels = np.stack([load_image(p, SIZE, 3, "adm") for p in paths])
  np.testing.assert_allclose(
    latents, expected_latents(tmp["module"], tmp["params"], pixels), rtol=1e-5, atol=1e-6
  )
  with open(tmp["root"] / "bad_skip" / "manifest.json") as f:
    manifest = json.load(f)
  assert (manifest["num_images"], manifest["num_skipped"], meta["num_examples"]) == (6, 1, 10)
  assert manifest["skipped"] == [str(root / "b_bad.png")]


def test_cli_on_four_devices_matches_one_device(tmp, mean_set):
  out = tmp["root"] / "cli_four_devices"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "dimsum_jax.data.encode",
      "--dataset=image_folder",
      f"--data_dir={tmp['images']}",
      f"--vae={tmp['vae']}",
      f"--out={out}",
      f"--image_size={SIZE}",
      "--class_conditional",
      "--mode=mean",
      "--batch_size=4",
      "--shard_size=8",
      "--num_workers=2",
    ],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "4 local devices" in result.stderr and "ETA" in result.stderr
  latents, labels, meta = read_set(out)
  reference, reference_labels, _ = read_set(mean_set[0])
  np.testing.assert_allclose(latents, reference, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels, reference_labels)
  assert [s["num_examples"] for s in meta["shards"]] == [8, 8, 2]


def test_verification_names_the_bad_shard(tmp, mean_set, tmp_path):
  out = tmp_path / "copy"
  shutil.copytree(mean_set[0], out)
  for name in ("meta.json", "manifest.json"):
    os.remove(out / name)
  shard = out / "part-00000-of-00001" / "latents-00001-of-00003.npy"
  good = np.load(shard)
  bad = good.copy()
  bad[3, 1, 2, 0] = np.nan
  np.save(shard, bad)
  with pytest.raises(
    latent_parts.EncodeError, match=r"latents-00001-of-00003\.npy row 3 is not finite"
  ):
    latent_parts.finish(str(out))
  np.save(shard, good[:5])
  with pytest.raises(latent_parts.EncodeError, match=r"not 6 rows of \[8, 8, 4\]"):
    latent_parts.finish(str(out))
  np.save(shard, good)
  os.remove(out / "part-00000-of-00001" / "meta.json")
  assert latent_parts.finish(str(out)) is None  # a part is unfinished: not yet
  assert not (out / "meta.json").exists()


def test_bad_settings_are_one_sentence(tmp, tmp_path):
  base = [
    f"--data_dir={tmp['images']}",
    f"--out={tmp_path / 'out'}",
    "--image_size=16",
    "--process_index=0",
    "--process_count=1",
  ]
  vae = f"--vae={tmp['vae']}"
  cases = [
    (["--dataset=coco", vae], "--dataset is 'coco'; choose one of"),
    (["--dataset=image_folder", vae, "--shard_size=5"], "even when mirrors are encoded"),
    (["--dataset=image_folder", vae, "--image_size=15"], "not a multiple of the VAE's"),
    (
      ["--dataset=image_folder", f"--vae={tmp_path / 'none'}"],
      "does not exist: convert the diffusers VAE first",
    ),
    (
      ["--dataset=image_folder", vae, f"--data_dir={tmp_path / 'no_images'}"],
      "does not exist; point --data_dir at",
    ),
    (["--dataset=image_folder", vae, "--mode=median"], "--mode is 'median'"),
  ]
  other = tmp_path / "unet"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
  (other / "params").mkdir()
  cases.append((["--dataset=image_folder", f"--vae={other}"], "'UNet2DModel', not 'AutoencoderKL'"))
  for args, message in cases:
    with pytest.raises(SystemExit) as error:
      command_line.call(encode, base + args)
    text = str(error.value)
    assert text.startswith("error: ") and message in text, text
    assert text.count("\n") == 0


def test_the_flags_are_the_settings():
  """One flag per setting of default_config, by its name and with its default, each with a help
  string; a flag that is not a setting is absl's error, before anything runs."""
  defaults = encode.default_config()
  assert sorted(encode.FLAGS) == sorted(defaults)
  for name, value in defaults.items():
    assert encode.FLAGS[name].default == value, name
    assert encode.FLAGS[name].help, name
  with pytest.raises(flags.UnrecognizedFlagError, match="image_sise"):
    command_line.call(encode, ["--image_sise=16"])


@pytest.fixture(scope="module")
def fake_tfds(tmp_path_factory):
  """A 7-image tfds set built locally: pixel (y, x) of image i is 10 * i + x, width 8 + i % 3,
  label i % 3, with file names. Needs tensorflow-datasets and tensorflow(-cpu)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class DimsumEncodeFakeImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=3),
            "file_name": tfds.features.Text(),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(7):
        row = (10 * i + np.arange(8 + i % 3)).astype(np.uint8)
        yield (
          i,
          {
            "image": np.broadcast_to(row[None, :, None], (8, len(row), 3)).copy(),
            "label": i % 3,
            "file_name": f"img_{i}.JPEG",
          },
        )

  directory = str(tmp_path_factory.mktemp("tfds"))
  DimsumEncodeFakeImages(data_dir=directory).download_and_prepare()
  return directory


def test_tfds_set_over_two_processes(tmp, fake_tfds):
  out = tmp["root"] / "tfds_set"
  c = config(
    tmp,
    out,
    dataset="imagenet2012",
    tfds_name="dimsum_encode_fake_images",
    data_dir=fake_tfds,
    image_size=8,
    class_conditional=None,
    batch_size=2,
    shard_size=4,
    process_count=2,
  )
  assert encode.encode_dataset(c) is None
  meta = encode.encode_dataset(dict(c, process_index=1))
  assert (meta["num_examples"], meta["num_classes"], meta["latent_shape"]) == (14, 3, [4, 4, 4])
  assert meta["source"] == "dimsum_encode_fake_images:train"
  latents, labels, _ = read_set(out)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  stored = tfds.builder("dimsum_encode_fake_images", data_dir=fake_tfds).as_dataset(
    split="train", shuffle_files=False
  )  # tfds's own record order defines the set's order
  order = [int(x["file_name"].decode()[4:-5]) for x in stored.as_numpy_iterator()]
  assert sorted(order) == list(range(7))
  np.testing.assert_array_equal(labels, np.repeat(np.asarray(order) % 3, 2))
  # ADM crop of an 8-high image to 8 px: no resampling, the centre 8 columns.
  pixels = np.stack(
    [
      np.broadcast_to(
        ((10 * i + (i % 3) // 2 + np.arange(8)) / 127.5 - 1)[None, :, None], (8, 8, 3)
      )
      for i in order
    ]
  ).astype(np.float32)
  both = np.stack([pixels, pixels[:, :, ::-1]], axis=1).reshape(-1, 8, 8, 3)
  mean, _ = jax.jit(model.encode, static_argnums=0)(tmp["module"], tmp["params"], both)
  np.testing.assert_allclose(latents, np.asarray(mean) * 0.18215, rtol=1e-5, atol=1e-6)
  with pytest.raises(latent_parts.EncodeError, match="has no split 'validation'"):
    encode.encode_dataset(dict(c, split="validation", out=str(tmp["root"] / "tfds_val")))


@pytest.mark.slow
def test_two_processes_of_the_distributed_runtime(tmp, mean_set):
  """Two CLI processes joined by JAX's distributed runtime (CPU, gloo): each writes its part,
  they meet at a barrier and process 0 verifies and finalizes."""
  import socket  # pylint: disable=g-import-not-at-top

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = tmp["root"] / "distributed"
  procs = []
  for i in range(2):
    env = dict(
      os.environ,
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(i),
      JAX_PLATFORMS="cpu",
    )
    procs.append(
      subprocess.Popen(
        [
          sys.executable,
          "-m",
          "dimsum_jax.data.encode",
          "--dataset=image_folder",
          f"--data_dir={tmp['images']}",
          f"--vae={tmp['vae']}",
          f"--out={out}",
          f"--image_size={SIZE}",
          "--class_conditional",
          "--mode=mean",
          "--batch_size=2",
          "--shard_size=4",
          "--num_workers=1",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-4000:]
  assert "Process 1 of 2: images 5..8 of 9" in logs[1] and "Verified 18 latents" in logs[0]
  latents, labels, meta = read_set(out)
  reference, reference_labels, _ = read_set(mean_set[0])
  np.testing.assert_allclose(latents, reference, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels, reference_labels)
  assert [s["latents"].split("/")[0] for s in meta["shards"]] == (
    ["part-00000-of-00002"] * 3 + ["part-00001-of-00002"] * 2
  )
