"""Input pipelines: the offline digits set, image folders, tfds image sets and latent shards.

Every dataset is a `DataSource` built by `create_dataset(config.data, process_index=...,
process_count=..., seed=...)`; see source.py for the batch format, order and resume rules.
Nothing here imports TensorFlow unless a tfds set is built.
"""

from dimsum_jax.data.config import default_data_config
from dimsum_jax.data.latents import LatentSetError, LatentShardWriter, LatentSource, read_meta
from dimsum_jax.data.pipeline import create_dataset
from dimsum_jax.data.source import DataSource

__all__ = [
  "DataSource",
  "LatentSetError",
  "LatentShardWriter",
  "LatentSource",
  "create_dataset",
  "default_data_config",
  "read_meta",
]
