"""dimsum_jax.command_line: commands whose absl flags are their own, run in-process as the program
runs them, and importable side by side."""

import importlib
import types

from absl import app
from absl import flags
import pytest

from dimsum_jax import command_line
from tests import train_util

# The commands built on command_line (a FlagValues of their own).
COMMANDS = (
  "dimsum_jax.main",
  "dimsum_jax.sample",
  "dimsum_jax.export",
  "dimsum_jax.tools.flops",
  "dimsum_jax.convert",
  "dimsum_jax.vae.convert",
  "dimsum_jax.data.encode",
  "dimsum_jax.tools.parity",
  "dimsum_jax.evaluate.command",
  "dimsum_jax.evaluate.reference",
  "dimsum_jax.evaluate.sweep",
  "dimsum_jax.evaluate.inception",
)


def _command():
  """A command module with a required --name and an --n of default 3; main records both."""
  module = types.ModuleType("toy_command")
  module.FLAGS = flags.FlagValues()
  flags.DEFINE_string("name", None, "A name.", flag_values=module.FLAGS)
  flags.DEFINE_integer("n", 3, "A count.", flag_values=module.FLAGS)
  flags.mark_flag_as_required("name", flag_values=module.FLAGS)
  module.seen = []

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    module.seen.append((module.FLAGS.name, module.FLAGS.n))
    return 7

  module.main = main
  return module


def test_call_parses_afresh_each_time():
  command = _command()
  assert command_line.call(command, ["--name=a", "--n", "5"]) == 7
  assert command_line.call(command, ["--name=b"]) == 7  # --n is back at its default
  assert command.seen == [("a", 5), ("b", 3)]


def test_call_refuses_what_the_program_refuses():
  command = _command()
  with pytest.raises(flags.UnrecognizedFlagError, match="'m'"):
    command_line.call(command, ["--name=a", "--m=1"])
  with pytest.raises(flags.IllegalFlagValueError, match="--name must have a value"):
    command_line.call(command, ["--n=1"])
  with pytest.raises(flags.IllegalFlagValueError, match="--n=x"):
    command_line.call(command, ["--name=a", "--n=x"])
  with pytest.raises(app.UsageError, match="Unexpected arguments: \\['extra'\\]"):
    command_line.call(command, ["--name=a", "extra"])
  assert command.seen == []


def test_defaults_with_overrides():
  command = _command()
  args = command_line.defaults(command.FLAGS, n=9)
  assert (args.name, args.n) == (None, 9)
  with pytest.raises(ValueError, match="Unknown option 'size'"):
    command_line.defaults(command.FLAGS, size=2)


def test_commands_import_together_and_keep_clear_of_absls_flags():
  """Importing every command into one process defines nothing twice, nothing on absl's global
  FLAGS, and no flag of absl's own (what command_line.run adds each command's flags to)."""
  app.define_help_flags()
  absl_own = {
    flag.name
    for module, defined in flags.FLAGS.flags_by_module_dict().items()
    if module.startswith("absl.")
    for flag in defined
  } | {"flagfile", "undefok"}
  assert {"help", "helpshort", "verbosity", "logtostderr", "only_check_args"} <= absl_own
  for name in COMMANDS:
    module = importlib.import_module(name)
    assert isinstance(module.FLAGS, flags.FlagValues) and module.FLAGS is not flags.FLAGS, name
    assert not set(module.FLAGS) & absl_own, name
    assert not [f for f in module.FLAGS if f in flags.FLAGS and flags.FLAGS[f] is module.FLAGS[f]]
    assert all(module.FLAGS[f].help for f in module.FLAGS), name


def test_helpshort_lists_the_flags_of_a_command_imported_by_its_main():
  """python -m dimsum_jax.evaluate (as its console script) runs a command of another module:
  --helpshort still lists that command's flags, with their help."""
  r = train_util.run_python(["-m", "dimsum_jax.evaluate", "--helpshort"], timeout=120)
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "--samples: samples.npz (arr_0 uint8 [N, H, W, C])" in r.stdout, r.stdout
  assert "--split_size: Inception Score split size." in r.stdout, r.stdout
