"""Latent shards: write, resume a partial write, read back (split, shuffle, resume), validation."""

import json
import os

import numpy as np
import pytest

from dimsum_jax.data import (
  LatentSetError,
  LatentShardWriter,
  create_dataset,
  default_data_config,
  read_meta,
)

SHAPE = (4, 4, 2)


def make(n, start=0):
  """Latent rows whose first value is their id; labels id % 5."""
  ids = np.arange(start, start + n)
  lat = (np.zeros((n, *SHAPE)) + (ids[:, None, None, None] % 7) * 0.01).astype(np.float32)
  lat[:, 0, 0, 0] = ids
  return lat, ids % 5


def writer(d, **kw):
  args = dict(
    latent_shape=SHAPE,
    num_classes=5,
    source="test:train",
    image_size=32,
    flip_doubled=False,
    vae="test-vae",
    shard_size=8,
  )
  args.update(kw)
  return LatentShardWriter(str(d), **args)


def config(d, **kw):
  c = default_data_config()
  c.update(name="latents", data_dir=str(d), image_size=4, channels=2, global_batch_size=6)
  c.update(kw)
  return c


def test_round_trip_files_and_meta(tmp_path):
  with writer(tmp_path) as w:
    for start in range(0, 20, 3):
      w.append(*make(min(3, 20 - start), start))
  assert sorted(os.listdir(tmp_path)) == [
    "labels-00000-of-00003.npy",
    "labels-00001-of-00003.npy",
    "labels-00002-of-00003.npy",
    "latents-00000-of-00003.npy",
    "latents-00001-of-00003.npy",
    "latents-00002-of-00003.npy",
    "meta.json",
  ]
  meta = read_meta(str(tmp_path))
  assert meta["num_examples"] == 20 and meta["latent_shape"] == [4, 4, 2]
  assert meta["scaled"] is True and meta["scaling_factor"] == 0.18215
  assert [s["num_examples"] for s in meta["shards"]] == [8, 8, 4]
  assert np.load(tmp_path / "latents-00002-of-00003.npy").shape == (4, 4, 4, 2)
  source = create_dataset(config(tmp_path, shuffle=False, global_batch_size=20))
  assert (source.num_classes, source.image_shape, source.num_examples) == (5, SHAPE, 20)
  batch = next(source)
  lat, lab = make(20)
  np.testing.assert_array_equal(batch["image"], lat)
  np.testing.assert_array_equal(batch["label"], lab)


def test_resume_partial_write(tmp_path):
  w = writer(tmp_path)
  w.append(*make(19))  # two complete shards (16 rows), 3 rows buffered
  assert w.num_written == 16 and w.num_appended == 19
  del w  # "crash": no finalize
  assert not os.path.exists(tmp_path / "meta.json")
  with pytest.raises(LatentSetError, match="incomplete \\(16 examples written"):
    read_meta(str(tmp_path))
  with pytest.raises(LatentSetError, match="started with num_classes=5"):
    writer(tmp_path, num_classes=7)
  w = writer(tmp_path)
  assert w.resumed_from == 16
  w.append(*make(25 - 16, start=16))
  w.finalize()
  source = create_dataset(config(tmp_path, shuffle=False, global_batch_size=25))
  batch = next(source)
  np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], np.arange(25))
  np.testing.assert_array_equal(batch["label"], np.arange(25) % 5)
  with pytest.raises(LatentSetError, match="already complete"):
    writer(tmp_path)


def test_split_shuffle_resume(tmp_path):
  with writer(tmp_path) as w:
    w.append(*make(30))
  seen = []
  for p in range(3):
    source = create_dataset(
      config(tmp_path, global_batch_size=6, prefetch=2), process_index=p, process_count=3, seed=4
    )
    rows = [next(source) for _ in range(5)]  # 5 * 2 = one epoch of 10
    ids = np.concatenate([r["image"][:, 0, 0, 0] for r in rows]).astype(int)
    assert sorted(ids.tolist()) == list(range(p, 30, 3))
    np.testing.assert_array_equal(np.concatenate([r["label"] for r in rows]), ids % 5)
    seen.append(ids)
    state = source.get_state()
    assert state == {"epoch": 1, "index": 0}
    source.close()
  assert not np.array_equal(np.sort(seen[0]), seen[0])  # shuffled
  c = config(tmp_path, global_batch_size=4)
  straight = create_dataset(c, seed=1)
  for _ in range(9):
    next(straight)
  state = straight.get_state()
  resumed = create_dataset(c, seed=1)
  resumed.set_state(state)
  for _ in range(10):
    np.testing.assert_array_equal(next(straight)["image"], next(resumed)["image"])


def test_unscaled_sets_are_scaled_on_read(tmp_path):
  with writer(tmp_path, scaled=False, num_classes=0, dtype="float16") as w:
    w.append(np.ones((8, *SHAPE), np.float32))
  source = create_dataset(config(tmp_path, class_conditional=False, global_batch_size=8))
  batch = next(source)
  assert batch["image"].dtype == np.float32
  np.testing.assert_allclose(batch["image"], np.float32(0.18215))
  assert source.num_classes == 0 and not batch["label"].any()


def test_shape_and_config_mismatch(tmp_path):
  with writer(tmp_path) as w:
    w.append(*make(8))
  with pytest.raises(LatentSetError, match=r"holds latents of shape \[4, 4, 2\].*image_size=8"):
    create_dataset(config(tmp_path, image_size=8))
  with pytest.raises(LatentSetError, match="random_flip"):
    create_dataset(config(tmp_path, random_flip=True))
  with pytest.raises(LatentSetError, match=r"do not match this set's \[n, 4, 4, 2\]"):
    writer(tmp_path / "other").append(np.zeros((2, 2, 4, 4)), [0, 1])
  with pytest.raises(LatentSetError, match="No latent set at"):
    create_dataset(config(tmp_path / "missing"))
  meta = json.loads((tmp_path / "meta.json").read_text())
  meta["num_classes"] = 0
  (tmp_path / "meta.json").write_text(json.dumps(meta))
  with pytest.raises(LatentSetError, match="unconditional"):
    create_dataset(config(tmp_path))


def test_resume_after_a_crash_inside_finalize(tmp_path):
  w = writer(tmp_path)
  w.append(*make(16))
  # A finalize that died after renaming shard 0 and before writing meta.json.
  os.replace(tmp_path / "latents-00000.npy", tmp_path / "latents-00000-of-00002.npy")
  os.replace(tmp_path / "labels-00000.npy", tmp_path / "labels-00000-of-00002.npy")
  w = writer(tmp_path)
  assert w.num_written == 16
  w.append(*make(4, start=16))
  meta = w.finalize()
  assert [s["latents"] for s in meta["shards"]] == [
    "latents-00000-of-00003.npy",
    "latents-00001-of-00003.npy",
    "latents-00002-of-00003.npy",
  ]
  batch = next(create_dataset(config(tmp_path, shuffle=False, global_batch_size=20)))
  np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], np.arange(20))
