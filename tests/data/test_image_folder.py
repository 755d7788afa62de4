"""Image folders: listing, classes, pixels, corrupt files, splits, resume (prefetch threads)."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from dimsum_jax.data import create_dataset, default_data_config
from dimsum_jax.data.image_folder import BadImageError, list_images

# (relative path, grey value): constant images, so a batch row names its file.
FILES = [
  ("cat/a.png", 10),
  ("cat/b.png", 30),
  ("cat/deep/c.png", 50),
  ("dog/d.png", 70),
  ("dog/e.PNG", 90),
  ("dog/f.png", 110),
  ("dog/g.png", 130),
  ("dog/h.png", 150),
  ("emu/i.png", 170),
  ("emu/j.png", 190),
]
BROKEN = "dog/broken.png"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  for rel, value in FILES:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.full((6, 10, 3), value, np.uint8)
    rgb[..., 1] = value + 1
    Image.fromarray(rgb).save(path, format="PNG")
  (root / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  (root / "dog" / "notes.txt").write_text("ignored")
  return str(root)


def config(root, **kw):
  c = default_data_config()
  c.update(
    name="image_folder",
    data_dir=root,
    image_size=4,
    channels=3,
    global_batch_size=4,
    num_workers=2,
    prefetch=2,
  )
  c.update(kw)
  return c


def value_of(image):
  return int(round((image[0, 0, 0] + 1) * 127.5))


def test_listing_and_classes(folder):
  paths = list_images(folder)
  assert paths == sorted([f for f, _ in FILES] + [BROKEN])
  source = create_dataset(config(folder, on_bad_image="skip"))
  assert source.classes == ["cat", "dog", "emu"]
  assert (source.num_classes, source.num_examples, source.image_shape) == (3, 11, (4, 4, 3))


def test_pixels_labels_and_skip_reports_path(folder, caplog):
  source = create_dataset(
    config(folder, on_bad_image="skip", shuffle=False, global_batch_size=10, num_epochs=1)
  )
  with caplog.at_level(logging.WARNING):
    batch = next(source)
  broken = os.path.join(folder, "dog", "broken.png")
  assert source.skipped == [broken]
  assert broken in caplog.text
  # 6 x 10 -> BICUBIC to 7 x 4 -> centre 4 x 4; a constant image stays constant.
  want = np.stack([np.full((4, 4, 3), v, np.float32) for _, v in FILES])
  want[..., 1] += 1
  np.testing.assert_allclose(batch["image"], want / 127.5 - 1, atol=1e-6)
  np.testing.assert_array_equal(batch["label"], [0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
  assert source.get_state() == {"epoch": 1, "index": 0}


def test_fail_names_the_file(folder):
  source = create_dataset(config(folder, on_bad_image="fail", global_batch_size=11))
  with pytest.raises(BadImageError, match="broken.png"):
    next(source)
  source.close()


def test_resume_with_prefetch_and_skip(folder):
  c = config(folder, on_bad_image="skip", random_flip=True)
  straight = create_dataset(c, seed=9)
  for _ in range(4):
    next(straight)
  state = straight.get_state()
  want = [next(straight) for _ in range(6)]
  resumed = create_dataset(c, seed=9)
  resumed.set_state(state)
  got = [next(resumed) for _ in range(6)]
  for x, y in zip(want, got):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  # Every batch is full although one file per epoch is skipped.
  assert all(len(b["label"]) == 4 for b in want)
  straight.close()
  resumed.close()


def test_two_processes_split_the_files(folder):
  seen = []
  for p in range(2):
    c = config(
      folder,
      on_bad_image="skip",
      class_conditional=False,
      global_batch_size=2,
      num_epochs=1,
      drop_remainder=False,
    )
    source = create_dataset(c, process_index=p, process_count=2, seed=0)
    batches = list(source)
    assert source.num_classes == 0 and not np.concatenate([b["label"] for b in batches]).any()
    seen.append([value_of(x) for b in batches for x in b["image"]])
  assert not set(seen[0]) & set(seen[1])
  # 11 files over 2 processes: 5 each, the last file (emu/j) is the one never read; broken is
  # in process 1's part and skipped.
  assert sorted(seen[0] + seen[1]) == [v for _, v in FILES[:-1]]


def test_folder_errors(folder, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    create_dataset(config(str(tmp_path / "nowhere")))
  (tmp_path / "loose.png").write_bytes(open(os.path.join(folder, "cat", "a.png"), "rb").read())
  with pytest.raises(ValueError, match="one subfolder per class"):
    create_dataset(config(str(tmp_path)))
  source = create_dataset(
    config(str(tmp_path), class_conditional=False, global_batch_size=1, prefetch=0)
  )
  batch = next(source)
  assert source.num_classes == 0 and batch["label"].tolist() == [0]
  assert value_of(batch["image"][0]) == 10
