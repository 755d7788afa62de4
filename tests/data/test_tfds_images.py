"""The tfds reader on a tiny dataset built locally (no download).

Needs tensorflow-datasets, tensorflow(-cpu) and importlib_resources (tensorflow-datasets 4.9.10
imports it to build any dataset but does not declare it for Python >= 3.9): all three come with the
`test` extra, and a missing one fails here rather than skipping."""

import importlib_resources  # noqa: F401  (tfds needs it to build a dataset)
import numpy as np
import pytest
import tensorflow  # noqa: F401
import tensorflow_datasets as tfds

from dimsum_jax.data import create_dataset, default_data_config  # noqa: E402

N = 23


class DimsumFakeImages(tfds.core.GeneratorBasedBuilder):
  """23 RGB images 8 x (8, 9 or 10): pixel (y, x) = 10 * id + x; label id % 3."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=3),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(N):
      width = 8 + i % 3
      row = (10 * i + np.arange(width)).astype(np.uint8)
      yield i, {"image": np.broadcast_to(row[None, :, None], (8, width, 3)).copy(), "label": i % 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  DimsumFakeImages(data_dir=d).download_and_prepare()
  return d


def config(data_dir, **kw):
  c = default_data_config()
  c.update(
    name="imagenet2012",
    tfds_name="dimsum_fake_images",
    data_dir=data_dir,
    image_size=8,
    channels=3,
    global_batch_size=4,
    shuffle_buffer=8,
    num_workers=2,
  )
  c.update(kw)
  return c


def decode(image):
  """(id, flipped) from one preprocessed image."""
  row = np.round((image[0, :, 0] + 1) * 127.5).astype(int)
  return int(row.min() // 10), bool(row[0] > row[-1])


def test_pixels_labels_metadata(data_dir):
  source = create_dataset(
    config(data_dir, shuffle=False, global_batch_size=N, num_epochs=1, drop_remainder=False)
  )
  assert (source.num_examples, source.num_classes, source.image_shape) == (N, 3, (8, 8, 3))
  (batch,) = list(source)
  ids = [decode(x)[0] for x in batch["image"]]
  assert sorted(ids) == list(range(N))
  np.testing.assert_array_equal(batch["label"], np.asarray(ids) % 3)
  for image, i in zip(batch["image"], ids):
    left = (8 + i % 3 - 8) // 2  # ADM centre crop: no resampling at 8 px high
    want = (10 * i + left + np.arange(8)) / 127.5 - 1
    np.testing.assert_allclose(image, np.broadcast_to(want[None, :, None], (8, 8, 3)), atol=1e-6)


def test_processes_read_disjoint_equal_parts(data_dir):
  parts = []
  for p in range(2):
    source = create_dataset(
      config(data_dir, global_batch_size=2, num_epochs=1, drop_remainder=False),
      process_index=p,
      process_count=2,
      seed=3,
    )
    assert source.examples_per_process == 11
    parts.append([decode(x)[0] for b in source for x in b["image"]])
  assert len(parts[0]) == len(parts[1]) == 11
  assert not set(parts[0]) & set(parts[1])
  assert len(set(parts[0]) | set(parts[1])) == 22


def test_deterministic_and_resumable_across_epochs(data_dir):
  c = config(data_dir, random_flip=True)
  straight = create_dataset(c, seed=5)
  head = [next(straight) for _ in range(4)]
  state = straight.get_state()
  assert state == {"epoch": 0, "index": 16}
  want = [next(straight) for _ in range(6)]  # crosses into epochs 1 and 2
  assert straight.get_state() == {"epoch": 1, "index": 17}
  again = create_dataset(c, seed=5)
  for x in head + want:
    np.testing.assert_array_equal(x["image"], next(again)["image"])
  resumed = create_dataset(c, seed=5)
  resumed.set_state(state)
  for x in want:
    y = next(resumed)
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  decoded = [decode(x) for b in head + want for x in b["image"]]
  first_epoch = [i for i, _ in decoded[:N]]
  assert sorted(first_epoch) == list(range(N)) and first_epoch != list(range(N))
  assert 5 < sum(f for _, f in decoded) < 35  # about half of 40 rows flipped


def test_missing_dataset_is_one_clear_sentence(tmp_path):
  c = default_data_config()
  c.update(name="imagenet2012", data_dir=str(tmp_path), image_size=64, channels=3)
  with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar.*tfds build imagenet2012"):
    create_dataset(c)
