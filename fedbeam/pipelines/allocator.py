"""Keeps glibc's malloc from handing large buffers back to the kernel, for one local run.

A prepare job allocates and frees buffers of hundreds of KB to a few MB per
client all the time: a client's joined records, decoded columns, warped
images, pieces of a file being written. glibc serves blocks above
`M_MMAP_THRESHOLD` (128 KB until it adapts) with a fresh `mmap` and returns
them with `munmap`, and gives freed memory at the top of the heap back
above `M_TRIM_THRESHOLD`, so the next block of that size faults every page
in again. On the virtual machines measured here a page fault costs about as
much as the work done on the page: the numpy warp of a 90-image client took
1.45 ms with glibc's defaults and 0.30 ms with the settings below (600 page
faults per call fell to 19; `bench/README.md`, pipeline section).

`tuned_allocator()` is a context manager that applies the settings for as
long as it is entered, and nothing outside it:

- in this process (where the in-memory and multi-threading local runners run
  the DoFns), with `mallopt`; on exit it sets glibc's default values again
  (128 KiB for both thresholds). glibc has no call that turns its dynamic
  adjustment of the mmap threshold back on once `mallopt` set it, so after
  the first scope the thresholds stay at those defaults instead of adapting;
- in worker processes started inside the scope (the multi-processing local
  runner's SDK workers, which Beam starts with a copy of `os.environ`), as
  the environment variables glibc reads when a process starts
  (`ALLOCATOR_ENVIRONMENT`). The scope adds the ones the environment does not
  already hold (a user's own settings win) and removes what it added on exit,
  so processes started afterwards get glibc's defaults.

Remote workers (Dataflow, Dask) are never touched: no DoFn changes an
allocator setting. Elsewhere than glibc `mallopt` is not called.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import threading
from typing import Iterator

__all__ = [
  "ALLOCATOR_ENVIRONMENT",
  "GLIBC_DEFAULT_THRESHOLD_BYTES",
  "MMAP_THRESHOLD_BYTES",
  "TRIM_THRESHOLD_BYTES",
  "is_tuned",
  "tuned_allocator",
]

_LOGGER = logging.getLogger(__name__)

# Blocks below this come from the heap, not from their own mmap.
MMAP_THRESHOLD_BYTES = 32 << 20
# Free memory at the top of the heap kept for reuse before it is returned.
TRIM_THRESHOLD_BYTES = 128 << 20
# glibc's initial value of both thresholds (DEFAULT_MMAP_THRESHOLD_MIN, DEFAULT_TRIM_THRESHOLD).
GLIBC_DEFAULT_THRESHOLD_BYTES = 128 << 10

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

ALLOCATOR_ENVIRONMENT = {
  "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES),
  "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD_BYTES),
}

_lock = threading.Lock()
_depth = 0
_added_environment: dict[str, str] = {}
_tuned_here = False


@contextlib.contextmanager
def tuned_allocator() -> Iterator[bool]:
  """Applies the thresholds to this process and to processes it starts, until the block ends.

  Yields True when glibc accepted the settings for this process. Re-entrant
  and thread-safe: nested or concurrent scopes share one setting, applied
  when the first is entered and undone when the last exits (also when the
  block raises). While a scope is open the settings are process-wide, so
  other code running in this process at that time sees them too.
  """
  global _depth, _tuned_here
  with _lock:
    if _depth == 0:
      _tuned_here = _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and _mallopt(
        _M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES
      )
      _added_environment.clear()
      for name, value in ALLOCATOR_ENVIRONMENT.items():
        if name not in os.environ:
          os.environ[name] = value
          _added_environment[name] = value
    _depth += 1
    tuned = _tuned_here
  try:
    yield tuned
  finally:
    with _lock:
      _depth -= 1
      if _depth == 0:
        for name, value in _added_environment.items():
          if os.environ.get(name) == value:  # Not changed by someone else meanwhile.
            del os.environ[name]
        _added_environment.clear()
        if _tuned_here:
          _mallopt(_M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD_BYTES)
          _mallopt(_M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD_BYTES)
        _tuned_here = False


def is_tuned() -> bool:
  """Whether a `tuned_allocator()` scope is open in this process."""
  return _depth > 0


def _mallopt(param: int, value: int) -> bool:
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False  # Not glibc: its allocator has its own policy.
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  if mallopt(param, value) != 1:
    _LOGGER.warning(
      "mallopt(%d, %d) was refused; large buffers keep glibc's defaults", param, value
    )
    return False
  return True
