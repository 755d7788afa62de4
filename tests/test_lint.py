"""The linter and formatter of pyproject.toml ([tool.ruff]) find nothing to change: undefined
names, unused imports, syntax errors and unformatted files fail the suite, not a later run."""

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
  done = subprocess.run(
    [ruff, 'check', '--output-format', 'concise', '--no-cache', ROOT],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_changes_nothing():
  """Every file is as `ruff format` (pyproject.toml [tool.ruff.format]) writes it: run
  `ruff format .` before committing."""
  ruff = shutil.which('ruff', path=os.path.dirname(sys.executable)) or shutil.which('ruff')
  if ruff is None:
    pytest.fail('ruff is not installed: pip install -e ".[test]" -c constraints.txt installs it.')
  done = subprocess.run(
    [ruff, 'format', '--check', '--no-cache', ROOT], capture_output=True, text=True, cwd=ROOT
  )
  assert done.returncode == 0, done.stdout + done.stderr


def test_console_scripts_name_the_module_entry_points():
  """Every [project.scripts] entry names a top-level function of the module that its
  `python -m` form runs (the scripts are what `pip install` puts on PATH). Read from the source:
  importing them all would load every model and data module."""
  import ast
  import tomllib

  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as fh:
    scripts = tomllib.load(fh)['project']['scripts']
  assert {'dimsum-train', 'dimsum-sample', 'dimsum-evaluate', 'dimsum-export'} <= set(scripts)
  for name, target in scripts.items():
    module, _, attr = target.partition(':')
    path = os.path.join(ROOT, *module.split('.')) + '.py'
    with open(path) as fh:
      tree = ast.parse(fh.read())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert attr in functions, f'{name}: {module} has no function {attr}'
