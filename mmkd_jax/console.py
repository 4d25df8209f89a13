"""The console: the job's own lines by default, the full log one flag away.

By default (absl's `--verbosity` 0) the console shows the project's INFO lines without absl's
prefix, warnings as `warning: ...`, and other libraries' records only from ERROR up: no backend
probes, no TFDS progress bars. `--verbosity=1` (or `-v 1`) keeps absl's format and every
library's log, for debugging.
"""
import contextlib
import io
import logging
import os
import time
from typing import Iterator

from absl import logging as absl_logging

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def format_eta(seconds: float) -> str:
  """h:mm:ss of a remaining time."""
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Progress:
  """A job's own lines before each of its `total` parts: '<kind> i/n: <name> | <scope> ETA h:mm:ss'.

  The ETA is the mean wall time of the parts done so far times the parts left ('-' before the first
  ends): rough, since parts differ (a teacher, a population of students), but it says when to come back.
  """

  def __init__(self, total: int, kind: str, scope: str):
    self.total, self.kind, self.scope = total, kind, scope
    self.started = 0
    self.start = time.perf_counter()

  def next(self, name: str) -> None:
    """Logs the line of the next part, `name`."""
    done, self.started = self.started, self.started + 1
    eta = format_eta((time.perf_counter() - self.start) / done * (self.total - done)) if done else '-'
    absl_logging.info('%s %d/%d: %s | %s ETA %s', self.kind, self.started, self.total, name, self.scope, eta)


def _is_quiet() -> bool:
  return absl_logging.get_verbosity() <= absl_logging.INFO


class _ProjectRecords(logging.Filter):
  """Passes the project's own records, and other libraries' errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or record.pathname.startswith(PACKAGE_DIR + os.sep)


class _PlainFormatter(logging.Formatter):
  """The message alone; warnings and errors prefixed with their level."""

  def format(self, record: logging.LogRecord) -> str:
    message = record.getMessage()
    return message if record.levelno < logging.WARNING else f'{record.levelname.lower()}: {message}'


def configure() -> None:
  """Sets up the console for the verbosity absl parsed from the command line (call in main)."""
  if not _is_quiet():
    return
  handler = absl_logging.get_absl_handler()
  handler.setFormatter(_PlainFormatter())
  handler.addFilter(_ProjectRecords())


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
  """Swallows what a library prints to stdout (TFDS's preparation banners and progress bars) unless
  the full log was asked for."""
  if not _is_quiet():
    yield
    return
  with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    yield
