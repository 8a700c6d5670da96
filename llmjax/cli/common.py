"""What every verb shares: flag parsing into clear errors, --help, and the exit-code-2 contract."""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
import textwrap
import types

from absl import flags

from llmjax.errors import UserError


def fail(message: str) -> None:
  """One line on stderr, exit code 2, no traceback."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


HELP_ARGS = ("-h", "-help", "--help")


def parse_flags(argv: list[str], module: types.ModuleType | None = None) -> None:
  """Parse absl flags (including --config.a.b overrides); any problem -> fail() naming it.

  With -h/--help anywhere among the flags, print the verb's help instead (`verb_help(module)`;
  module defaults to the calling verb's module) and exit 0.
  """
  if wants_help(argv):
    if module is None:
      module = sys.modules[sys._getframe(1).f_globals["__name__"]]
    print(verb_help(module))
    sys.exit(0)
  try:
    flags.FLAGS(argv)
  except AttributeError as e:  # ml_collections: an override names a key the config lacks
    fail(_unknown_override(argv, str(e)))
  except flags.UnrecognizedFlagError as e:
    fail(" ".join(str(e).split())[:500] + "; --help lists this verb's flags")
  except (flags.Error, KeyError, TypeError, ValueError, OSError, UserError) as e:
    fail(" ".join(str(e).split())[:500])


def wants_help(argv: list[str]) -> bool:
  """Whether argv[1:] asks for help: -h/-help/--help before any `--`, not as a flag's value."""
  args = iter(argv[1:])
  for arg in args:
    if arg == "--":
      return False
    if arg in HELP_ARGS:
      return True
    name = arg.lstrip("-")
    if arg.startswith("-") and "=" not in arg and name in flags.FLAGS \
        and not flags.FLAGS[name].boolean:
      next(args, None)  # `--flag VALUE`: the next argument is a value, even if it reads -h
  return False


def verb_help(module: types.ModuleType) -> str:
  """The verb's module docstring (its usage) and each flag it defines, with default and help."""
  usage = inspect.cleandoc(module.__doc__ or "") or f"{module.__name__} [--flags]"
  lines = [f"usage: {usage}", "", "flags:"]
  defined = flags.FLAGS.get_flags_for_module(module)
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


def _unknown_override(argv: list[str], message: str) -> str:
  quoted = re.findall(r"'([^'\\]+)", message)
  bad = quoted[0] if quoted else ""
  for arg in argv:
    name = arg.lstrip("-").split("=", 1)[0]
    if name.startswith("config.") and bad and bad in name.split("."):
      hint = re.search(r'Did you mean "([^"]+)"', message)
      return (f"unknown config key {name}" + (f' (did you mean "{hint.group(1)}"?)' if hint else "")
              + "; see the experiment's base_config() for the allowed keys")
  return f"unknown config key: {' '.join(message.split())}"


@contextlib.contextmanager
def user_errors():
  """Turn UserError (bad config, data, mesh, checkpoint) into fail()."""
  try:
    yield
  except UserError as e:
    fail(str(e))
