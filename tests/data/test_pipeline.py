"""create_dataset dispatch, config validation, and the no-TensorFlow guarantee."""

import subprocess
import sys

import pytest

from dimsum_jax.data import create_dataset, default_data_config
from dimsum_jax.data.tfds_images import import_tensorflow


def test_digits_path_never_imports_tensorflow():
  code = (
    "import sys; from dimsum_jax.data import create_dataset, default_data_config; "
    "next(create_dataset(default_data_config())); "
    "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_tensorflow_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(
    ImportError, match="pip install tensorflow-datasets tensorflow-cpu to read imagenet2012"
  ):
    import_tensorflow("imagenet2012")
  c = default_data_config()
  c.name = "imagenet2012"
  with pytest.raises(ImportError, match="tensorflow-cpu"):
    create_dataset(c)


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("name", "cifar10", "choose one of"),
    ("crop", "random", "config.data.crop"),
    ("on_bad_image", "ignore", "on_bad_image"),
    ("channels", 2, "1 or 3 channels"),
  ],
)
def test_config_mistakes_are_named(field, value, match):
  c = default_data_config()
  c[field] = value
  with pytest.raises(ValueError, match=match):
    create_dataset(c)


def test_folder_sets_need_a_directory():
  c = default_data_config()
  c.name = "latents"
  with pytest.raises(ValueError, match="data_dir must name the latents directory"):
    create_dataset(c)
