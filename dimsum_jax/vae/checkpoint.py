"""A converted VAE on disk: `config.json` (the diffusers config) and `params/` (Orbax checkpoint).

`load_vae(directory)` rebuilds the module from config.json and restores the parameters straight
into the abstract tree of that module, placed by `sharding` (one device by default).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dimsum_jax.vae import model

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_vae(directory: str, config: dict, params, overwrite: bool = False) -> None:
  """Writes config.json and the Orbax parameter checkpoint under `directory`."""
  directory = os.path.abspath(directory)
  params_dir = os.path.join(directory, PARAMS_DIR)
  if os.path.exists(params_dir) and not overwrite:
    raise FileExistsError(
      f"{directory} already holds a converted VAE: choose another output "
      "directory or pass --overwrite."
    )
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(params_dir, params, force=overwrite)
  checkpointer.wait_until_finished()


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def check_params_match(params_dir: str, abstract) -> None:
  """ValueError in one sentence when the stored tree is not the one config.json describes."""
  try:
    stored = ocp.StandardCheckpointer().metadata(params_dir).item_metadata
  except Exception as e:  # a damaged or foreign folder: Orbax raises many kinds
    raise ValueError(
      f"{params_dir} is not a readable Orbax checkpoint ({type(e).__name__}: {e}); "
      "convert the VAE again with `python -m dimsum_jax.vae.convert`."
    ) from e
  have = {
    _path_name(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]
  }
  want = {
    _path_name(p): tuple(leaf.shape)
    for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
  }
  problems = [f"{k} is missing" for k in sorted(set(want) - set(have))]
  problems += [f"{k} is not expected" for k in sorted(set(have) - set(want))]
  problems += [
    f"{k} is stored {have[k]} but config.json needs {want[k]}"
    for k in sorted(set(want) & set(have))
    if have[k] != want[k]
  ]
  if problems:
    more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
    raise ValueError(
      f"The parameters in {params_dir} are not those of the VAE its config.json "
      f"describes ({'; '.join(problems[:3])}{more}): convert the VAE again with "
      "`python -m dimsum_jax.vae.convert --diffusers=DIR --out=DIR --overwrite`."
    )


def load_vae(directory: str, dtype=jnp.float32, precision=None, sharding=None):
  """(module, params) of a VAE written by `python -m dimsum_jax.vae.convert`.

  dtype is the compute dtype (parameters stay float32). sharding is one jax.sharding.Sharding
  for every leaf (e.g. a replicated NamedSharding) or a tree of them shaped like the params;
  None puts them on the first local device. A missing file, another architecture in config.json
  or parameters of another shape raise FileNotFoundError / ValueError in one sentence.
  """
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, CONFIG_FILE)
  params_dir = os.path.join(directory, PARAMS_DIR)
  for path in (config_path, params_dir):
    if not os.path.exists(path):
      raise FileNotFoundError(
        f"{path} does not exist: convert the diffusers VAE first with "
        "`python -m dimsum_jax.vae.convert --diffusers=DIR "
        f"--out={directory}`."
      )
  try:
    with open(config_path) as f:
      config = json.load(f)
  except ValueError as e:  # not JSON (or not UTF-8)
    raise ValueError(
      f"{config_path} is not valid JSON ({type(e).__name__}: {e}): convert the "
      "VAE again with `python -m dimsum_jax.vae.convert --diffusers=DIR "
      f"--out={directory} --overwrite`."
    ) from e
  if not isinstance(config, dict):
    raise ValueError(
      f"{config_path} holds a JSON {type(config).__name__}, not a VAE config: "
      "convert the VAE again with `python -m dimsum_jax.vae.convert "
      f"--diffusers=DIR --out={directory} --overwrite`."
    )
  vae = model.vae_from_config(config, dtype=dtype, precision=precision)
  abstract = model.abstract_params(vae)
  check_params_match(params_dir, abstract)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, abstract)
  target = jax.tree.map(
    lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), abstract, sharding
  )
  params = ocp.StandardCheckpointer().restore(params_dir, target)
  return vae, params
