"""The deterministic weight fill of the golden `l2.npz` file (its README, "l2.npz").

Each upstream parameter key gets values from a SplitMix64 stream seeded by crc32(key), shaped by a
rule on the key's name. Used to regenerate the published-size DiMSUM-L/2 weights without storing them.
"""

from __future__ import annotations

import zlib

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def uniform_stream(key: str, n: int, seed: int = 0) -> np.ndarray:
  """n values in (-1, 1), float64: u = (2 r + 1 - 2^24) / 2^24 with r the top 24 bits."""
  base = np.uint64(((seed << 32) ^ zlib.crc32(key.encode("utf-8"))) & (2**64 - 1))
  with np.errstate(over="ignore"):
    z = base + np.arange(1, n + 1, dtype=np.uint64) * _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    z = z ^ (z >> np.uint64(31))
  r = (z >> np.uint64(40)).astype(np.float64)
  return (2 * r + 1 - 2.0**24) / 2.0**24


def fill_value(key: str, shape, seed: int = 0) -> np.ndarray:
  """The float32 value of one parameter."""
  n = int(np.prod(shape)) if len(shape) else 1
  u = uniform_stream(key, n, seed).reshape(shape)
  if key.endswith("A_log"):
    v = np.arange(shape[-1], dtype=np.float64) / 8 + 0.25 * u
  elif key.endswith("mixer.D"):
    v = 1 + 0.5 * u
  elif key.endswith("dt_proj.bias"):
    v = -4 + 2 * u
  elif key.endswith("norm.weight") or key.endswith("norm_2.weight"):
    v = 1 + 0.25 * u
  elif key.endswith("embedding_table.weight"):
    v = u
  elif key == "pos_embed":
    v = 0.5 * u
  elif len(shape) >= 2:
    v = np.sqrt(3.0 / np.prod(shape[1:])) * u
  else:
    v = 0.1 * u
  return v.astype(np.float32)


def fill_state_dict(keys_and_shapes, seed: int = 0) -> dict[str, np.ndarray]:
  """{key: float32 array} for (key, shape) pairs; Haar buffers are skipped (fixed values)."""
  out = {}
  for key, shape in keys_and_shapes:
    if ".dwt." in key or ".idwt." in key:
      continue
    out[key] = fill_value(key, tuple(shape), seed)
  return out
