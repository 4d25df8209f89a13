"""The one error type the command line shows as a single line.

Configuration, command-line and data-file validation raise `ConfigError`: the user fixes the
input, and a traceback would only hide the message. Every other exception is a bug or an
environment fault and keeps its traceback.
"""


class ConfigError(ValueError):
  """A bad configuration value, flag or input file; the message names the value and the valid choices."""
