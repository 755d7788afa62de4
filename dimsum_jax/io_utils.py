"""Small file helpers every reader and writer shares: whole-file replacement, JSON objects and a
time format.

A file written with `atomic_write` is either its old content or its new one, never a cut-off
mixture: the bytes go to a hidden temporary name beside it (unique per process), are flushed and
fsynced, and os.replace renames them into place. A kill or a full disk leaves the old file (and at
most a stray temporary name) behind.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, IO


def temporary_name(path: str) -> str:
  """A hidden name beside `path`, unique to this process (several processes may write siblings)."""
  directory, base = os.path.split(path)
  return os.path.join(directory, f'.{base}.tmp-{os.getpid()}')


def atomic_write(path: str, write: Callable[[IO], Any], binary: bool = True) -> None:
  """write(f) into a temporary file, then rename it over `path` (see the module docstring)."""
  tmp = temporary_name(path)
  try:
    with open(tmp, 'wb' if binary else 'w', **({} if binary else {'encoding': 'utf-8'})) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any, **dump_args) -> None:
  """obj as JSON (indent 1 unless given), replacing `path` whole."""
  dump_args.setdefault('indent', 1)
  atomic_write(path, lambda f: json.dump(obj, f, **dump_args), binary=False)


def read_json(path: str) -> dict:
  """The JSON object in `path`. ValueError when the file cannot be read, is not JSON or holds no
  object; its message names the file and the reason, without a full stop, for the caller to add
  what to do."""
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} cannot be read as JSON ({e})') from e
  if not isinstance(value, dict):
    raise ValueError(f'{path} holds no JSON object')
  return value


def hms(seconds: float) -> str:
  """3725.4 -> '1h02m05s'."""
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'
