"""The one exception type for bad user input; the CLI turns it into one line and exit code 2."""


import sys


def print_error(message: str) -> None:
  """`error: message` on stderr in ONE write: Python's stderr is unbuffered when redirected, so
  print() writes the text and its newline separately, and the lines of processes that share a log
  (every task of a job step) interleave mid-line."""
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()


class UserError(Exception):
  """Bad input from the user: a config key, a file, a shape, a mesh. The message names it."""


class ConfigError(UserError):
  """An experiment config that cannot run: unknown key, wrong type, impossible combination."""


class DataError(UserError):
  """Missing or unreadable data: corpus files, tfds datasets, tokenizers."""


class TrainingError(Exception):
  """Training cannot go on (e.g. too many consecutive non-finite steps); the message names the step."""


def capped(items, limit: int = 5, sep: str = ", ") -> str:
  """The first `limit` of `items` joined by `sep`, then "(and N more)": an error that lists paths
  or names stays one readable line however many there are."""
  items = [str(item) for item in items]
  more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
  return sep.join(items[:limit]) + more
