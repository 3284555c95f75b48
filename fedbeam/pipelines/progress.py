"""Progress of a running prepare job on the local runner, from the job's own counts.

Beam's local FnApiRunner reports metrics only once the job is done, so the
job counts for itself: `CountProgress` steps (a branch off the records read
and off the manifest rows of the client files written) keep a running count
per DoFn instance in a small file of a directory the launcher made
(`ProgressChannel`), rewritten whole (temporary name, then rename) at most
once a second and at the end of every bundle. `ProgressMonitor`, a thread of
the launching process, adds the files up and reports a line every
`interval` seconds. This works with worker threads and worker processes
alike, since they share the launcher's disk; it is not used on remote
runners. The counts are a progress report, not an accounting: a retried
bundle may count twice (the commit's checks use other figures).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Optional
import uuid

import apache_beam as beam

__all__ = [
  "CLIENTS_WRITTEN",
  "CountProgress",
  "EXAMPLES_READ",
  "PROGRESS_INTERVAL_SECONDS",
  "ProgressChannel",
  "ProgressMonitor",
  "format_progress",
]

# How often `ProgressMonitor` reports by default (read when a monitor is made).
PROGRESS_INTERVAL_SECONDS = 10.0
EXAMPLES_READ = "examples_read"
CLIENTS_WRITTEN = "clients_written"
_SUFFIX = ".count"


class ProgressChannel:
  """A local directory where `CountProgress` steps leave their counts; picklable (its path).

  Use as a context manager: the directory is created on construction and
  removed on exit.
  """

  def __init__(self, directory: Optional[str] = None):
    self.directory = directory or tempfile.mkdtemp(prefix="fedbeam-progress-")

  def __enter__(self) -> "ProgressChannel":
    return self

  def __exit__(self, *exc_info) -> None:
    shutil.rmtree(self.directory, ignore_errors=True)

  def totals(self) -> dict[str, int]:
    """The counts so far, by name (missing names are 0)."""
    totals = {EXAMPLES_READ: 0, CLIENTS_WRITTEN: 0}
    try:
      names = os.listdir(self.directory)
    except OSError:
      return totals
    for name in names:
      if not name.endswith(_SUFFIX):
        continue
      counter = name.split("-", 1)[0]
      try:
        with open(os.path.join(self.directory, name), encoding="ascii") as f:
          totals[counter] = totals.get(counter, 0) + int(f.read() or 0)
      except (OSError, ValueError):
        continue  # Removed or being replaced: the next poll reads it.
    return totals


class CountProgress(beam.DoFn):
  """Counts `size(element)` of each element into a `ProgressChannel`; outputs nothing."""

  def __init__(
    self, channel: ProgressChannel, counter: str, size: Callable[[Any], int] = lambda _: 1
  ):
    self._directory = channel.directory
    self._counter = counter
    self._size = size

  def setup(self) -> None:
    self._path = os.path.join(self._directory, f"{self._counter}-{uuid.uuid4().hex}{_SUFFIX}")
    self._count = 0
    self._written = 0
    self._last = 0.0

  def process(self, element: Any) -> tuple[()]:
    self._count += self._size(element)
    if time.monotonic() - self._last >= 1.0:
      self._flush()
    return ()

  def finish_bundle(self) -> None:
    self._flush()

  def _flush(self) -> None:
    self._last = time.monotonic()
    if self._count == self._written:
      return
    tmp = f"{self._path}.tmp"
    try:
      with open(tmp, "w", encoding="ascii") as f:
        f.write(str(self._count))
      os.replace(tmp, self._path)
      self._written = self._count
    except OSError:
      pass  # The launcher removed the channel (the job is ending); nothing to report to.


def format_progress(totals: dict[str, int], seconds: float) -> str:
  """One progress line: the stage, examples read, clients written, elapsed time."""
  read, written = totals.get(EXAMPLES_READ, 0), totals.get(CLIENTS_WRITTEN, 0)
  stage = "writing clients" if written else "reading and grouping"
  return (
    f"fedbeam prepare: {stage}: {read:,} examples read, {written:,} clients written, "
    f"{seconds:.0f} s"
  )


class ProgressMonitor:
  """A thread passing `format_progress` of a channel to `report` every `interval` seconds.

  `interval` defaults to `PROGRESS_INTERVAL_SECONDS`.

  Use as a context manager around the pipeline's run; the thread stops on
  exit (it is a daemon, so it never keeps the process alive).
  """

  def __init__(
    self, channel: ProgressChannel, report: Callable[[str], None], interval: Optional[float] = None
  ):
    self._channel = channel
    self._report = report
    self._interval = PROGRESS_INTERVAL_SECONDS if interval is None else interval
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="fedbeam-progress", daemon=True)
    self._start = 0.0

  def __enter__(self) -> "ProgressMonitor":
    self._start = time.monotonic()
    self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop.set()
    self._thread.join()

  def _run(self) -> None:
    while not self._stop.wait(self._interval):
      self._report(format_progress(self._channel.totals(), time.monotonic() - self._start))
