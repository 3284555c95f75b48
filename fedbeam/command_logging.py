"""Logging while one `fedbeam` command runs: quiet Beam, tracebacks after fedbeam's own error.

Without `--verbose`, the console shows WARNING and above, and Beam's own log
records below WARNING are not shown; with it, INFO and above. In both, a
Beam ERROR record that carries a traceback (a failed bundle, logged by the
runner before the failure reaches fedbeam) is held back: `fedbeam` prints
its one-line error first, then shows the held records (`--verbose`) or
names the log file that has them. Everything is undone when the command
ends: the root logger's level, handlers and filters are as they were.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from typing import Optional

__all__ = ["CommandLogging"]

_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
  """Writes to the `sys.stderr` of the moment (so redirections made later apply)."""

  def __init__(self):
    super().__init__(sys.stderr)

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    del value


def _not_noise(record: logging.LogRecord) -> bool:
  # Beam warns at import that crcmod is missing even when google-crc32c,
  # which fedbeam installs and Beam prefers, is present.
  return "crcmod package not found" not in record.getMessage()


def _is_beam_failure(record: logging.LogRecord) -> bool:
  if not record.name.startswith("apache_beam") or record.levelno < logging.ERROR:
    return False
  return bool(record.exc_info) or "Traceback" in record.getMessage()


class CommandLogging:
  """Context manager: the `fedbeam` command's logging, for its run only.

  Args:
    verbose: show INFO records (Beam's included) on the console.
    keep_file: also write WARNING and above to a log file in the temporary
      directory (`path`), kept only when a Beam failure was logged.
  """

  def __init__(self, verbose: bool, keep_file: bool = False):
    self._verbose = verbose
    self._keep_file = keep_file
    self.path: Optional[str] = None
    self.deferred: list[logging.LogRecord] = []
    self._console = _StderrHandler()
    self._console.setFormatter(logging.Formatter(_FORMAT))
    self._console.addFilter(self._console_filter)
    self._file: Optional[logging.FileHandler] = None
    self._saved_level = logging.NOTSET

  def _console_filter(self, record: logging.LogRecord) -> bool:
    if not _not_noise(record):
      return False
    if _is_beam_failure(record):
      self.deferred.append(record)
      return False
    return True

  def __enter__(self) -> "CommandLogging":
    root = logging.getLogger()
    self._saved_level = root.level
    level = logging.INFO if self._verbose else logging.WARNING
    self._console.setLevel(level)
    root.addHandler(self._console)
    if self._keep_file:
      self.path = os.path.join(
        tempfile.gettempdir(), f"fedbeam-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
      )
      self._file = logging.FileHandler(self.path, delay=True, encoding="utf-8")
      self._file.setLevel(logging.WARNING)
      self._file.addFilter(_not_noise)
      self._file.setFormatter(logging.Formatter("%(asctime)s " + _FORMAT))
      root.addHandler(self._file)
    root.setLevel(level)
    return self

  def show_deferred(self) -> None:
    """Prints the held-back Beam failure records on the console, in order."""
    for record in self.deferred:
      print(self._console.format(record), file=sys.stderr)

  def __exit__(self, *exc_info) -> None:
    root = logging.getLogger()
    root.removeHandler(self._console)
    root.setLevel(self._saved_level)
    if self._file is not None:
      root.removeHandler(self._file)
      self._file.close()
      if not self.deferred and self.path and os.path.exists(self.path):
        os.remove(self.path)
