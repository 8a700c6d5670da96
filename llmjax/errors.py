"""The one exception type for bad user input; the CLI turns it into one line and exit code 2."""


class UserError(Exception):
  """Bad input from the user: a config key, a file, a shape, a mesh. The message names it."""


class ConfigError(UserError):
  """An experiment config that cannot run: unknown key, wrong type, impossible combination."""


class DataError(UserError):
  """Missing or unreadable data: corpus files, tfds datasets, tokenizers."""


class TrainingError(Exception):
  """Training cannot go on (e.g. too many consecutive non-finite steps); the message names the step."""
