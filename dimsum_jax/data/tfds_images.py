"""Image sets read through TensorFlow Datasets: imagenet2012, celeb_a_hq, lsun/church_outdoor.

TensorFlow is imported only when one of these is built (GPU hosts have none; they train on latent
shards). Each process reads its own `tfds.split_for_jax_process(..., drop_remainder=True)` part,
so all parts have the same size.

Order and resume (deterministic order + skip count). Epoch e of process p is one tf.data pipeline
with fixed seeds drawn from (seed, e, p): tfds file order (ReadConfig.shuffle_seed), a shuffle
buffer of config.shuffle_buffer records, and a stateless flip decision per position; tf.data runs
with options.deterministic = True. The state {"epoch", "index"} counts examples consumed in the
epoch; restoring it rebuilds epoch e and skips `index` records BEFORE image decoding (the bytes are
still read, so a resume costs one read through at most one epoch of this process's part, with no
decoding). Batches run on across epoch boundaries as in source.IndexedSource.

Preprocessing: decode (tf.io.decode_image, 1 or 3 channels), crop to image_size with
crop.crop_array (ADM centre crop by default: the exact PIL code, run through tf.numpy_function),
optional flip, x / 127.5 - 1.
"""

from __future__ import annotations

import numpy as np

from dimsum_jax.data.crop import crop_array
from dimsum_jax.data.source import DataSource, _check_state, local_batch_size

TFDS_NAMES = {
  "imagenet2012": "imagenet2012",
  "celeb_a_hq": "celeb_a_hq/{image_size}",
  "lsun_church": "lsun/church_outdoor",
}

HOW_TO_PREPARE = {
  "imagenet2012": (
    "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) "
    "in {data_dir}/downloads/manual and run `tfds build imagenet2012 "
    "--data_dir={data_dir}` once (about 150 GB)"
  ),
  "celeb_a_hq": (
    "make the CelebA-HQ tar files (data2x2.tar .. data1024x1024.tar, see "
    "github.com/tkarras/progressive_growing_of_gans), put them in "
    "{data_dir}/downloads/manual and run `tfds build {tfds_name} "
    "--data_dir={data_dir}` once"
  ),
  "lsun_church": (
    "run `tfds build lsun/church_outdoor --data_dir={data_dir}` once (needs "
    "tensorflow-io; it downloads church_outdoor_train_lmdb.zip from the LSUN "
    "site), or export the images to a folder and use name='image_folder'"
  ),
}


def import_tensorflow(dataset: str):
  """(tf, tfds), or an ImportError that says what to install."""
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
      f"pip install tensorflow-datasets tensorflow-cpu to read {dataset} "
      "(GPU training hosts use pre-encoded latent shards instead)."
    ) from e
  tf.config.set_visible_devices([], "GPU")  # TF must not take accelerator memory from JAX
  return tf, tfds


def tfds_name(config) -> str:
  if config.tfds_name:
    return config.tfds_name
  return TFDS_NAMES[config.name].format(image_size=config.image_size)


def epoch_seeds(seed: int, epoch: int, process_index: int) -> tuple[int, int, int]:
  """(file order, shuffle buffer, flip) seeds for one epoch of one process, each < 2**31."""
  s = np.random.SeedSequence([int(seed), int(epoch), int(process_index)]).generate_state(3)
  return tuple(int(x) & 0x7FFFFFFF for x in s)


class TfdsSource(DataSource):
  """One tfds image split as the common DataSource."""

  def __init__(self, config, *, process_index: int, process_count: int, seed: int):
    self.name = tfds_name(config)
    tf, tfds = import_tensorflow(self.name)
    self._tf, self._tfds = tf, tfds
    self.builder = tfds.builder(self.name, data_dir=config.data_dir or None)
    if not self.builder.is_prepared():
      how = HOW_TO_PREPARE.get(config.name, "run `tfds build {tfds_name} --data_dir={data_dir}`")
      where = config.data_dir or "the tfds default data_dir (~/tensorflow_datasets)"
      how = how.format(data_dir=config.data_dir or "~/tensorflow_datasets", tfds_name=self.name)
      raise FileNotFoundError(f"tfds dataset {self.name} is not prepared under {where}: {how}.")
    features = self.builder.info.features
    has_labels = "label" in features
    if config.class_conditional and not has_labels:
      raise ValueError(
        f"tfds dataset {self.name} has no labels but config.data.class_conditional "
        "is True; set it to False."
      )
    self.conditional = config.class_conditional and has_labels
    self.num_classes = int(features["label"].num_classes) if self.conditional else 0
    self.image_shape = (config.image_size, config.image_size, config.channels)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.local_batch_size = local_batch_size(config.global_batch_size, process_count)
    self.split = tfds.split_for_jax_process(
      config.split, process_index=process_index, process_count=process_count, drop_remainder=True
    )
    self.num_examples = int(self.builder.info.splits[config.split].num_examples)
    self._local = int(self.builder.info.splits[self.split].num_examples)
    self.seed = int(seed)
    self.config = config
    self._state = (0, 0)
    self._producer = None

  @property
  def examples_per_process(self) -> int:
    return self._local

  # ---- one epoch as a tf.data pipeline ------------------------------------------------------
  def _preprocess(self, flip_seed: int):
    tf, c = self._tf, self.config
    size, channels, crop = c.image_size, c.channels, c.crop

    def crop_np(image):
      return crop_array(image, size, crop)

    def fn(position, example):
      image = tf.io.decode_image(example["image"], channels=channels, expand_animations=False)
      image = tf.numpy_function(crop_np, [image], tf.uint8, stateful=False)
      image = tf.ensure_shape(image, (size, size, channels))
      image = tf.cast(image, tf.float32) / 127.5 - 1.0
      if c.random_flip:
        u = tf.random.stateless_uniform(
          [], seed=tf.stack([tf.constant(flip_seed, tf.int64), position])
        )
        image = tf.cond(u < 0.5, lambda: tf.reverse(image, axis=[1]), lambda: image)
      label = tf.cast(example["label"], tf.int32) if self.conditional else tf.constant(0, tf.int32)
      return image, label

    return fn

  def epoch_dataset(self, epoch: int, skip: int = 0, pad: int = 0):
    """Batches of epoch `epoch` from position `skip`, after `pad` zero rows (the caller fills
    them with the previous epoch's short last batch)."""
    tf, tfds, c = self._tf, self._tfds, self.config
    file_seed, shuffle_seed, flip_seed = epoch_seeds(self.seed, epoch, self.process_index)
    options = tf.data.Options()
    options.deterministic = True
    read_config = tfds.ReadConfig(
      options=options,
      shuffle_seed=file_seed,
      shuffle_reshuffle_each_iteration=False,
      try_autocache=False,
    )
    ds = self.builder.as_dataset(
      split=self.split,
      shuffle_files=c.shuffle,
      read_config=read_config,
      decoders={"image": tfds.decode.SkipDecoding()},
    )
    if c.shuffle and c.shuffle_buffer > 1:
      ds = ds.shuffle(c.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = ds.enumerate().skip(skip)
    ds = ds.map(
      self._preprocess(flip_seed), num_parallel_calls=max(1, c.num_workers), deterministic=True
    )
    if pad:
      zeros = (tf.zeros(self.image_shape, tf.float32), tf.constant(0, tf.int32))
      ds = tf.data.Dataset.from_tensors(zeros).repeat(pad).concatenate(ds)
    ds = ds.batch(self.local_batch_size, drop_remainder=False)
    ds = ds.prefetch(max(1, c.prefetch)).with_options(options)
    return ds

  def _batches(self, epoch: int, index: int):
    """Python glue over epochs: the short last batch of an epoch is completed by the next one."""
    b, n, c = self.local_batch_size, self._local, self.config
    tail = None
    while not (c.num_epochs and epoch >= c.num_epochs):
      pad = 0 if tail is None else len(tail[1])
      for images, labels in self.epoch_dataset(epoch, skip=index, pad=pad).as_numpy_iterator():
        index += len(labels) - pad
        if pad:
          images = np.concatenate([tail[0], images[pad:]])
          labels = np.concatenate([tail[1], labels[pad:]])
          pad, tail = 0, None
        if len(labels) < b:  # only at the end of the epoch
          tail = (images, labels)
          break
        if index == n:
          yield {"image": images, "label": labels}, (epoch + 1, 0)
        else:
          yield {"image": images, "label": labels}, (epoch, index)
      epoch, index = epoch + 1, 0
    if tail is not None and not c.drop_remainder:
      yield {"image": tail[0], "label": tail[1]}, (epoch, 0)

  # ---- the DataSource contract --------------------------------------------------------------
  def __next__(self):
    if self._producer is None:
      self._producer = self._batches(*self._state)
    batch, self._state = next(self._producer)
    return batch

  def get_state(self) -> dict[str, int]:
    return {"epoch": self._state[0], "index": self._state[1]}

  def set_state(self, state: dict[str, int]) -> None:
    epoch, index = _check_state(state)
    if index >= self._local:
      raise ValueError(
        f"Data state index {index} is past this process's {self._local} examples; "
        "was it saved with another split or process count?"
      )
    self._producer = None
    self._state = (epoch, index)

  def close(self) -> None:
    self._producer = None
