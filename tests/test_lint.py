"""The linter of pyproject.toml ([tool.ruff]) finds nothing in the repository: undefined names,
unused imports and syntax errors fail the suite, not a later run."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
  ruff = shutil.which('ruff', path=os.path.dirname(sys.executable)) or shutil.which('ruff')
  if ruff is None:
    pytest.fail('ruff is not installed: pip install -e ".[test]" -c constraints.txt installs it.')
  done = subprocess.run([ruff, 'check', '--output-format', 'concise', '--no-cache', ROOT],
                        capture_output=True, text=True, cwd=ROOT)
  assert done.returncode == 0, done.stdout + done.stderr
