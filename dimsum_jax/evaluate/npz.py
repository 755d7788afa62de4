""".npz files read and written a batch at a time (samples.npz and reference batches hold GBs).

`NpzArray(path, name)` opens one member of an .npz (stored or deflated) and reads its .npy header
only: `shape`, `dtype`; `batches(n)` then yields [<= n, ...] arrays in order, `read()` the whole
array. Object arrays (pickles) are refused, as np.load(allow_pickle=False) would.
`write_npz(path, arrays, streamed)` writes small arrays plus members streamed from iterators
({name: (shape, dtype, iterator of row blocks)}) into a stored zip, renamed into place when whole.
`write_json(path, obj)` replaces a JSON file atomically (temp file in the same directory, fsync,
os.replace), so a reader never sees half a result and a failed run leaves the old one.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Iterable

import numpy as np


class NpzError(ValueError):
  """A file that is not the .npz it should be."""


class NpzArray:
  """One array of an .npz file, read lazily (see the module docstring)."""

  def __init__(self, path: str, name: str):
    self.path, self.name = os.fspath(path), name
    try:
      with zipfile.ZipFile(self.path) as z:
        if f"{name}.npy" not in z.namelist():
          raise NpzError(
            f"{self.path} has no `{name}` array (it holds "
            f"{sorted(n[:-4] for n in z.namelist() if n.endswith('.npy'))})."
          )
        with z.open(f"{name}.npy") as f:
          self.shape, self.dtype, self._offset = _read_header(f, self.path, name)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise NpzError(f"{self.path} is not a readable .npz file ({type(e).__name__}: {e}).") from e

  def __len__(self):
    return self.shape[0]

  def batches(self, size: int, start: int = 0) -> Iterable[np.ndarray]:
    """Rows [start, N) in arrays of `size` rows (the last shorter)."""
    row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
    with zipfile.ZipFile(self.path) as z, z.open(f"{self.name}.npy") as f:
      f.seek(self._offset + start * row_bytes)
      for first in range(start, self.shape[0], size):
        n = min(size, self.shape[0] - first)
        data = f.read(n * row_bytes)
        if len(data) != n * row_bytes:
          raise NpzError(
            f"{self.path}: `{self.name}` ends after {first} of {self.shape[0]} "
            "rows; the file is truncated, write it again."
          )
        yield np.frombuffer(data, self.dtype).reshape((n, *self.shape[1:]))

  def read(self) -> np.ndarray:
    if self.shape[0] == 0:
      return np.zeros(self.shape, self.dtype)
    return np.concatenate(list(self.batches(max(1, self.shape[0]))))


def _read_header(f, path, name):
  try:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
  except ValueError as e:
    raise NpzError(f"{path}: `{name}` is not a .npy array ({e}).") from e
  if dtype.hasobject:
    raise NpzError(
      f"{path}: `{name}` is an object array (a pickle), which is never loaded: "
      "store plain numeric arrays."
    )
  if fortran and len(shape) > 1:
    raise NpzError(
      f"{path}: `{name}` is stored in Fortran order: save it C-ordered "
      "(np.ascontiguousarray) with numpy.savez."
    )
  return tuple(shape), dtype, f.tell()


def write_npz(path: str, arrays: dict, streamed: dict | None = None) -> None:
  """Small `arrays` and `streamed` {name: (shape, dtype, row blocks)} into `path`, atomically."""
  path = os.fspath(path)
  tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
  try:
    with (
      open(tmp, "wb") as raw,
      zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as z,
    ):
      for name, (shape, dtype, blocks) in (streamed or {}).items():
        dtype = np.dtype(dtype)
        header = {
          "descr": np.lib.format.dtype_to_descr(dtype),
          "fortran_order": False,
          "shape": tuple(int(s) for s in shape),
        }
        with z.open(f"{name}.npy", "w", force_zip64=True) as member:
          np.lib.format.write_array_header_2_0(member, header)
          rows = 0
          for block in blocks:
            block = np.ascontiguousarray(block, dtype)
            member.write(block.tobytes())
            rows += block.shape[0]
          if rows != shape[0]:
            raise ValueError(f"{name}: {rows} rows streamed, {shape[0]} announced")
      for name, value in arrays.items():
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
        z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
      raw.flush()
      os.fsync(raw.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj) -> None:
  path = os.fspath(path)
  tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
