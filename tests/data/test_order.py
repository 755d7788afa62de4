"""The DataSource contract on the digits set: splits, determinism, epochs, resume."""

import numpy as np
import pytest

from dimsum_jax.data import create_dataset, default_data_config
from dimsum_jax.data.source import process_split


def config(**kw):
  c = default_data_config()
  c.image_size = 8
  c.resize = "nearest"
  c.update(kw)
  return c


def test_process_split_is_disjoint_and_covers():
  parts = [process_split(1797, p, 4) for p in range(4)]
  assert {len(p) for p in parts} == {449}
  every = np.concatenate(parts)
  assert len(set(every.tolist())) == 4 * 449
  assert set(range(1797)) - set(every.tolist()) == {1796}  # only the last n mod P are never read


def test_processes_read_disjoint_parts_covering_an_epoch():
  seen = []
  for p in range(3):
    c = config(global_batch_size=3 * 599, shuffle=True)
    source = create_dataset(c, process_index=p, process_count=3, seed=5)
    assert source.local_batch_size == 599
    batch = next(source)
    assert source.get_state() == {"epoch": 1, "index": 0}
    # Labels and pixels must be those of the process's own ids.
    ids = source.epoch_order(0)[0]
    assert set(ids.tolist()) == set(range(p, 1797, 3))
    np.testing.assert_array_equal(batch["label"], source_labels()[ids])
    seen.append(ids)
  assert sorted(np.concatenate(seen).tolist()) == list(range(1797))


def source_labels():
  return next(create_dataset(config(global_batch_size=1797, shuffle=False)))["label"]


def take(source, k):
  return [next(source) for _ in range(k)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_same_seed_same_batches_other_seed_differs():
  c = config(global_batch_size=100, random_flip=True)
  a = take(create_dataset(c, seed=3), 40)  # 40 * 100 > 2 epochs
  b = take(create_dataset(c, seed=3), 40)
  assert_same(a, b)
  other = take(create_dataset(c, seed=4), 1)
  assert not np.array_equal(a[0]["label"], other[0]["label"])


def test_every_example_once_per_epoch_and_batches_straddle_epochs():
  c = config(global_batch_size=1000, shuffle=True)
  source = create_dataset(c, seed=1)
  first, second = take(source, 2)
  assert source.get_state() == {"epoch": 1, "index": 203}
  labels = np.concatenate([first["label"], second["label"]])
  # The first 1797 labels are one full epoch: the label histogram of the whole set.
  np.testing.assert_array_equal(
    np.bincount(labels[:1797], minlength=10), np.bincount(source_labels(), minlength=10)
  )
  order0, order1 = source.epoch_order(0)[0], source.epoch_order(1)[0]
  assert not np.array_equal(order0, order1)


@pytest.mark.parametrize("k", [0, 3, 17, 18])
def test_resume_continues_exactly(k):
  c = config(global_batch_size=100, random_flip=True)
  straight = create_dataset(c, seed=7)
  head = take(straight, k)
  del head
  state = straight.get_state()
  assert set(state) == {"epoch", "index"} and all(isinstance(v, int) for v in state.values())
  resumed = create_dataset(c, seed=7)
  resumed.set_state(dict(state))
  assert_same(take(straight, 5), take(resumed, 5))


def test_flip_is_a_mirror_of_the_unflipped_example():
  plain = next(create_dataset(config(global_batch_size=1797, random_flip=False), seed=2))
  flipped = next(create_dataset(config(global_batch_size=1797, random_flip=True), seed=2))
  np.testing.assert_array_equal(plain["label"], flipped["label"])
  same = [np.array_equal(a, b) for a, b in zip(plain["image"], flipped["image"])]
  mirrored = [np.array_equal(a[:, ::-1], b) for a, b in zip(plain["image"], flipped["image"])]
  assert all(s or m for s, m in zip(same, mirrored))
  assert 700 < sum(not s for s in same) < 1100


def test_finite_epochs_and_remainder():
  c = config(global_batch_size=1000, num_epochs=1, drop_remainder=False, shuffle=False)
  sizes = [len(b["label"]) for b in create_dataset(c)]
  assert sizes == [1000, 797]
  c.drop_remainder = True
  assert [len(b["label"]) for b in create_dataset(c)] == [1000]


def test_bad_state_and_batch_are_refused():
  source = create_dataset(config(global_batch_size=64))
  with pytest.raises(ValueError, match="past this process"):
    source.set_state({"epoch": 0, "index": 5000})
  with pytest.raises(ValueError, match="integer 'epoch' and 'index'"):
    source.set_state({"step": 3})
  with pytest.raises(ValueError, match="not divisible"):
    create_dataset(config(global_batch_size=65), process_count=2)
