"""What every verb shares: flag parsing into clear errors, and the exit-code-2 contract."""

from __future__ import annotations

import contextlib
import re
import sys

from absl import flags

from llmjax.errors import UserError


def fail(message: str) -> None:
  """One line on stderr, exit code 2, no traceback."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> None:
  """Parse absl flags (including --config.a.b overrides); any problem -> fail() naming it."""
  try:
    flags.FLAGS(argv)
  except AttributeError as e:  # ml_collections: an override names a key the config lacks
    fail(_unknown_override(argv, str(e)))
  except (flags.Error, KeyError, TypeError, ValueError, OSError, UserError) as e:
    fail(" ".join(str(e).split())[:500])


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
