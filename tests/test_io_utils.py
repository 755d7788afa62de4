"""io_utils: a failed write leaves the old file whole and no temporary behind; the time format."""

import json
import os

import pytest

from dimsum_jax import io_utils


def test_write_json_replaces_whole_and_a_failed_write_keeps_the_old_file(tmp_path):
  path = str(tmp_path / 'state.json')
  io_utils.write_json(path, {'step': 1})
  io_utils.write_json(path, {'step': 2, 'tail': [1, 2]})
  with open(path) as f:
    assert json.load(f) == {'step': 2, 'tail': [1, 2]}

  def fails(f):
    f.write(b'{"step": 3, "half')
    raise OSError(28, 'No space left on device')

  with pytest.raises(OSError, match='No space left'):
    io_utils.atomic_write(path, fails)
  with open(path) as f:
    assert json.load(f) == {'step': 2, 'tail': [1, 2]}
  assert os.listdir(tmp_path) == ['state.json']


def test_hms():
  assert io_utils.hms(0) == '0h00m00s'
  assert io_utils.hms(3725.9) == '1h02m05s'  # truncated, as a progress line
  assert io_utils.hms(100 * 3600 + 59) == '100h00m59s'


def test_read_json_names_the_file_and_the_reason(tmp_path):
  good, bad, listed = (str(tmp_path / name) for name in ('good.json', 'bad.json', 'list.json'))
  io_utils.write_json(good, {'a': 1})
  with open(bad, 'w') as f:
    f.write('{"a": ')
  io_utils.write_json(listed, [1, 2])
  assert io_utils.read_json(good) == {'a': 1}
  with pytest.raises(ValueError, match=r'bad\.json cannot be read as JSON \(Expecting value'):
    io_utils.read_json(bad)
  with pytest.raises(ValueError, match=r'list\.json holds no JSON object$'):
    io_utils.read_json(listed)
  with pytest.raises(ValueError, match=r'missing\.json cannot be read as JSON \(\[Errno 2\]'):
    io_utils.read_json(str(tmp_path / 'missing.json'))
