"""What every verb shares: flag parsing into clear errors, --help, and the exit-code-2 contract."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import inspect
import os
import re
import sys
import textwrap
import types

from absl import flags

from llmjax.errors import UserError, print_error


def fail(message: str) -> None:
  """One line on stderr, exit code 2, no traceback."""
  print_error(message)
  sys.exit(2)


HELP_ARGS = ("-h", "-help", "--help")


def parse_flags(argv: list[str], module: types.ModuleType | None = None) -> None:
  """Parse the verb's flags (including --config.a.b overrides); any problem -> fail() naming it.

  `module` (default: the calling verb's module) holds the verb's flags in its own `FLAGS`
  (absl's global FlagValues where it has none). With -h/--help anywhere among the flags, print
  the verb's help instead (`verb_help(module)`) and exit 0.
  """
  if module is None:
    module = sys.modules[sys._getframe(1).f_globals["__name__"]]
  fv = verb_flags(module)
  if wants_help(argv, fv):
    print(verb_help(module))
    sys.exit(0)
  _forget_earlier_parse(fv)
  try:
    with _as_sys_argv(argv):  # ml_collections reads the --config.* overrides from sys.argv
      fv(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no config key
    fail(_unknown_override(argv, e, fv))
  except flags.IllegalFlagValueError as e:
    fail(_bad_value(e, fv))
  except flags.UnrecognizedFlagError as e:
    fail(" ".join(str(e).split())[:500] + "; --help lists this verb's flags")
  except OSError as e:  # a --config file that cannot be read, met by an override
    fail(_unreadable_config(e))
  except (flags.Error, TypeError, ValueError, UserError) as e:
    fail(_last_line(str(e))[:500])
  for flag in _config_flags(fv):  # a --config file that cannot be read, with no override
    error = getattr(flag.value, "_error", None)
    if isinstance(error, OSError):
      fail(_unreadable_config(error))


def verb_flags(module: types.ModuleType) -> flags.FlagValues:
  """The FlagValues a verb's module defines its flags in: its `FLAGS`, else absl's global one."""
  return getattr(module, "FLAGS", flags.FLAGS)


def _forget_earlier_parse(fv: flags.FlagValues) -> None:
  """Flags back to their defaults, and no override flag of an earlier parse: main(argv) can run
  again in one process (absl refuses to define a --config.a.b override twice)."""
  prefixes = tuple(f"{flag.name}." for flag in _config_flags(fv))
  for name in [n for n in fv if prefixes and n.startswith(prefixes)]:
    delattr(fv, name)  # defined by a parse, even one that failed
  if fv.is_parsed():
    fv.unparse_flags()


@contextlib.contextmanager
def _as_sys_argv(argv: list[str]):
  saved, sys.argv = sys.argv, list(argv)
  try:
    yield
  finally:
    sys.argv = saved


def _config_flags(fv: flags.FlagValues) -> list[flags.Flag]:
  return [fv[name] for name in fv if name == fv[name].name and _is_config(fv[name])]


def wants_help(argv: list[str], fv: flags.FlagValues = flags.FLAGS) -> bool:
  """Whether argv[1:] asks for help: -h/-help/--help before any `--`, not as a flag's value
  (of the verb's flags `fv`)."""
  args = iter(argv[1:])
  for arg in args:
    if arg == "--":
      return False
    if arg in HELP_ARGS:
      return True
    name = arg.lstrip("-")
    if arg.startswith("-") and "=" not in arg and name in fv and not fv[name].boolean:
      next(args, None)  # `--flag VALUE`: the next argument is a value, even if it reads -h
  return False


def verb_help(module: types.ModuleType) -> str:
  """The verb's module docstring (its usage) and each flag it defines, with default and help."""
  usage = inspect.cleandoc(module.__doc__ or "") or f"{module.__name__} [--flags]"
  lines = [f"usage: {usage}", "", "flags:"]
  defined = verb_flags(module).get_flags_for_module(module)
  for flag in defined:
    text = flag.help
    if isinstance(flag, flags.EnumFlag):  # absl prefixes "<a|b>: "; the metavar shows them
      text = text.removeprefix(f"<{'|'.join(flag.parser.enum_values)}>: ")
    lines += _flag_lines(f"--[no]{flag.name}" if flag.boolean
                         else f"--{flag.name}={_metavar(flag)}", text, _default(flag))
  for flag in defined:
    if _is_config(flag):
      lines += _flag_lines(f"--{flag.name}.SECTION.KEY=VALUE",
                           f"Override one key of the experiment's config, e.g. "
                           f"--{flag.name}.train.steps=100 (repeatable; the keys and their "
                           "defaults: base_config() in llmjax/config.py).")
  if not defined:
    lines.append("  (none)")
  return "\n".join(lines)


def _flag_lines(spec: str, text: str, suffix: str = "", column: int = 28,
                width: int = 100) -> list[str]:
  """`  --spec  help text...` wrapped under its column; the suffix (a default) is not split."""
  wrapped = textwrap.wrap(" ".join(text.split()), width - column, break_on_hyphens=False,
                          break_long_words=False) or [""]
  if suffix:
    if len(wrapped[-1]) + 1 + len(suffix) <= width - column:
      wrapped[-1] += " " + suffix
    else:
      wrapped.append(suffix)
  indent = " " * column
  if len(spec) + 4 > column:
    return [f"  {spec}"] + [indent + line for line in wrapped]
  return [f"  {spec}".ljust(column) + wrapped[0]] + [indent + line for line in wrapped[1:]]


def _is_config(flag: flags.Flag) -> bool:
  return type(flag).__module__.startswith("ml_collections")


def _metavar(flag: flags.Flag) -> str:
  if type(flag.parser).__name__ == "ConfigFileFlagParser":
    return "FILE[:ARG]"
  if isinstance(flag, flags.EnumFlag):
    return "|".join(flag.parser.enum_values)
  return {"int": "INT", "float": "FLOAT", "string": "TEXT"}.get(flag.flag_type(), "VALUE")


def _default(flag: flags.Flag) -> str:
  if flag.default is None or _is_config(flag):
    return ""
  if isinstance(flag.default, bool):
    value = str(flag.default).lower()
  else:
    value = str(flag.default)
    value = repr(value) if not value or value != value.strip() else value
  return f"(default: {value})"


def _unknown_override(argv: list[str], error: Exception, fv: flags.FlagValues) -> str:
  """`unknown config key config.trian (in --config.trian.steps=5; did you mean config.train?)`."""
  message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  message = str(message)
  quoted = re.findall(r"'([^'\\]+)", message)
  bad = quoted[0] if quoted else ""
  hint = re.search(r'Did you mean "([^"]+)"', message)
  for arg in argv:
    name = arg.lstrip("-").split("=", 1)[0]
    parts = name.split(".")
    if len(parts) > 1 and _is_config_name(parts[0], fv) and bad in parts[1:]:
      at = parts.index(bad, 1)
      key = ".".join(parts[:at + 1])
      where = f" (in --{name})" if key != name else ""
      guess = f"; did you mean {'.'.join(parts[:at] + [hint.group(1)])}?" if hint else ""
      return (f"unknown config key {key}{where}{guess} (the keys and their defaults: the "
              "experiment file and base_config() in llmjax/config.py)")
  return f"unknown config key: {' '.join(message.split())}"


def _is_config_name(name: str, fv: flags.FlagValues) -> bool:
  return name in fv and _is_config(fv[name])


_TYPE_WORDS = {"int": "an int", "float": "a float", "bool": "true or false", "string": "text"}


def _bad_value(error: flags.IllegalFlagValueError, fv: flags.FlagValues) -> str:
  """`config.train.steps must be an int, got 'abc'`: the key and the type it takes."""
  found = re.match(r"flag --([\w.-]+)=(.*?): ", str(error), re.S)
  if not found or found.group(1) not in fv:
    return _last_line(str(error))[:500]
  name, value = found.groups()
  flag = fv[name]
  shown = name if _is_config_name(name.split(".")[0], fv) and "." in name else f"--{name}"
  if type(flag.parser).__name__ == "_ConfigDictParser":
    return (f"{shown} is a section, not a value: set its keys with --{name}.KEY=VALUE "
            f"(got {value!r})")
  if type(flag.parser).__name__ == "ConfigFileFlagParser":
    file, _, arg = value.partition(":")
    return f"experiment file {file}: get_config({arg!r}) raised {_last_line(str(error))[:400]}"
  if isinstance(flag, flags.EnumFlag):
    return f"{shown} must be one of {', '.join(flag.parser.enum_values)}, got {value!r}"
  expected = _TYPE_WORDS.get(flag.flag_type())
  if expected is None:
    return f"{shown}={value!r}: {_last_line(str(error.__context__ or error))[:300]}"
  return f"{shown} must be {expected}, got {value!r}"


def _unreadable_config(error: OSError) -> str:
  """`experiment file experiments/lm/nope.py: No such file or directory` from ml_collections'
  multi-line report (which a later access wraps once more)."""
  while "earlier failure to load" in str(error) and isinstance(error.__cause__, OSError):
    error = error.__cause__
  example = "(--config=FILE[:ARG], e.g. --config=experiments/lm/stdlib_gpt.py:smoke)"
  if error.filename and error.strerror:
    return f"experiment file {error.filename}: {error.strerror} {example}"
  text = str(error)
  found = re.search(r"Attempted \[[^\]]*\]:\s*\n\s*(.+?)\s*\n\s*(?:\[Errno \d+\] )?([^:\n]+)", text)
  if found:
    path, why = found.groups()
    return f"experiment file {path}: {why} {example}"
  if "empty string" in text:
    return "--config= names no experiment file (e.g. --config=experiments/lm/stdlib_gpt.py)"
  return " ".join(text.split())[:500]


def _last_line(text: str) -> str:
  """The message on one line; of a traceback ml_collections folded into it, the last line."""
  if "Traceback (most recent call last)" in text:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()
  return " ".join(text.split())


def check_directory_flag(name: str, path: str) -> None:
  """--NAME=PATH must be a directory or creatable as one: fail() before anything is written."""
  here = os.path.abspath(path)
  while not os.path.exists(here):
    here = os.path.dirname(here)
  if not os.path.isdir(here):
    what = "is" if here == os.path.abspath(path) else f"is inside {here}, which is"
    fail(f"--{name}={path} {what} a file, not a directory; name a new or existing directory")


@contextlib.contextmanager
def user_errors():
  """Turn UserError (bad config, data, mesh, checkpoint) into fail()."""
  try:
    yield
  except UserError as e:
    fail(str(e))
