"""`create_dataset`: config.data -> the DataSource for this process."""

from __future__ import annotations

from dimsum_jax.data.config import validate
from dimsum_jax.data.source import DataSource


def create_dataset(
  config, *, process_index: int = 0, process_count: int = 1, seed: int = 0
) -> DataSource:
  """The stream of this process's share of each global batch (see source.DataSource).

  Pass jax.process_index() / jax.process_count() on multi-host runs; every process must use the
  same config and seed. TensorFlow is imported only for the tfds sets.
  """
  validate(config)
  kwargs = dict(process_index=process_index, process_count=process_count, seed=seed)
  if config.name == "digits":
    from dimsum_jax.data.digits import DigitsSource

    return DigitsSource(config, **kwargs)
  if config.name == "image_folder":
    from dimsum_jax.data.image_folder import ImageFolderSource

    return ImageFolderSource(config, **kwargs)
  if config.name == "latents":
    from dimsum_jax.data.latents import LatentSource

    return LatentSource(config, **kwargs)
  from dimsum_jax.data.tfds_images import TfdsSource

  return TfdsSource(config, **kwargs)
