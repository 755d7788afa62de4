"""What the package's command lines share: absl flags (--snake_case), each command's on a
FlagValues of its own.

A command module defines its flags on `FLAGS = flags.FlagValues()` (flag_values=FLAGS), not on
absl's global flags.FLAGS, so that importing any set of commands into one process (the tests, a
notebook) defines no flag twice. It has

  main(argv)  absl's main: FLAGS are parsed and argv is what is left (the program name alone;
              anything more is `Unexpected arguments`); returns the exit status, and a user's
              mistake ends it with SystemExit("error: <one sentence>"), exit status 1
  cli()       the program, as its `python -m` form and its console script run it:
              `command_line.run(main, FLAGS)`

and `command_line.call(module, argv)` runs it in this process as the program would.
"""

from __future__ import annotations

import re
import sys
import types

from absl import app
from absl import flags


def run(main, flag_values: flags.FlagValues, config_flag: str | None = None) -> None:
  """app.run(main) for a command whose flags are on `flag_values`: they join absl's own flags
  (--helpshort lists them; --flagfile, --verbosity, ... work as for every absl program) and absl
  parses the command line: an unknown flag, a value of the wrong type or a missing required flag
  is one sentence naming the flag on stderr, and exit status 1, before main runs.

  `config_flag` names an ml_collections config-file flag of the command: its file is run once
  before parsing, so that a missing file or one that does not run is one sentence too, and so is
  an override (--config.a.b=v) of a key the config lacks."""

  def parse(argv):
    if config_flag:
      _check_config_file(argv, config_flag)
    flags.FLAGS.append_flag_values(flag_values)
    for defined in flag_values.flags_by_module_dict().values():
      for flag in defined:  # --helpshort shows the flags of the program's main module
        flags.FLAGS.register_flag_by_module(sys.argv[0], flag)
    if config_flag:
      # The config flag defines its override flags (--config.a.b) when it parses the file, on the
      # FlagValues it keeps as `flag_values`: in the program, on absl's, which parses them next.
      flag_values[config_flag].flag_values = flags.FLAGS
    try:
      rest = app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # ml_collections refuses an override's unknown key
      if not config_flag:
        raise
      _exit(_unknown_key(e, argv, config_flag))
    flag_values.mark_as_parsed()
    return rest

  app.run(main, flags_parser=parse)


def _exit(sentence: str) -> None:
  print(f'error: {sentence}', file=sys.stderr)
  sys.exit(1)


def _check_config_file(argv, name: str) -> None:
  """Runs the --NAME file of `argv` (config_utils.load_config_file) and ends the command with one
  sentence when it is missing or does not run (ml_collections would print a traceback, or defer a
  missing file's error to the first use of the config)."""
  spec = None
  for i, arg in enumerate(argv[1:], 1):
    match = re.fullmatch(rf'--?{name}(=(.*))?', arg, re.DOTALL)
    if match:
      spec = (
        match.group(2)
        if match.group(1) is not None
        else (argv[i + 1] if i + 1 < len(argv) else None)
      )
  if spec is None:
    return
  from dimsum_jax import config_utils  # pylint: disable=g-import-not-at-top  (heavy: models)

  try:
    config_utils.load_config_file(spec, f'--{name}')
  except config_utils.ConfigFileError as e:
    _exit(str(e))


def _unknown_key(error: Exception, argv, name: str) -> str:
  """The sentence for an override of a key the config lacks (ml_collections' error, reworded)."""
  text = str(error)
  guess = re.search(r'Did you mean \\?"([\w.]+)\\?" instead of \\?"([\w.]+)', text)
  key = guess.group(2) if guess else (re.findall(r'[A-Za-z_]\w*', text) or ['?'])[0]
  flag = next(
    (
      a
      for a in argv[1:]
      if a.startswith(f'--{name}.') and re.search(rf'\.{re.escape(key)}(\.|=|$)', a)
    ),
    f'--{name}...',
  )
  hint = f': did you mean "{guess.group(1)}"?' if guess else '.'
  return f'{flag}: config key "{key}" does not exist{hint}'


def call(command: types.ModuleType, argv) -> int | None:
  """Runs a command module in this process as its program runs it: `argv` (the flags, without
  the program name) parsed afresh into command.FLAGS (a flag it leaves out takes its default),
  then command.main. Returns main's exit status; a flag error raises flags.Error (the program
  prints it and exits with status 1), a user's mistake SystemExit as in the program."""
  for name in command.FLAGS:
    command.FLAGS[name].unparse()
  rest = command.FLAGS([command.__name__, *(str(a) for a in argv)])
  return command.main(rest)


def defaults(flag_values: flags.FlagValues, **overrides) -> types.SimpleNamespace:
  """A command's settings without its command line: every flag at its default, then `overrides`
  (a name that is not one of its flags is a ValueError)."""
  settings = {name: flag_values[name].default for name in flag_values}
  unknown = sorted(set(overrides) - set(settings))
  if unknown:
    raise ValueError(
      f"Unknown option {unknown[0]!r}: the options are {', '.join(sorted(settings))}."
    )
  return types.SimpleNamespace(**{**settings, **overrides})


def values(flag_values: flags.FlagValues) -> types.SimpleNamespace:
  """A command's parsed flags as a namespace (attributes that may be set, unlike FLAGS's)."""
  return types.SimpleNamespace(**flag_values.flag_values_dict())
