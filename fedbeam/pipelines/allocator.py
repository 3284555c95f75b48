"""Keeps glibc's malloc from handing large buffers back to the kernel after each use.

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

`tune_allocator()` raises both thresholds in the calling process;
`ALLOCATOR_ENVIRONMENT` holds the same settings as the environment variables
glibc reads when a process starts, for worker processes started later. A
process then keeps up to `TRIM_THRESHOLD_BYTES` of freed heap for reuse
instead of returning it. Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

_LOGGER = logging.getLogger(__name__)

# Blocks below this come from the heap, not from their own mmap.
MMAP_THRESHOLD_BYTES = 32 << 20
# Free memory at the top of the heap kept for reuse before it is returned.
TRIM_THRESHOLD_BYTES = 128 << 20

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

ALLOCATOR_ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD_BYTES),
}

_lock = threading.Lock()
_tuned = None


def tune_allocator() -> bool:
  """Applies the thresholds to this process once; True if glibc accepted them."""
  global _tuned
  with _lock:
    if _tuned is None:
      _tuned = _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and _mallopt(
          _M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return _tuned


def tune_worker_processes() -> None:
  """Sets the thresholds for processes this one starts from now on (the local runner's workers).

  Values already in the environment are kept, so a user's own settings win.
  """
  for name, value in ALLOCATOR_ENVIRONMENT.items():
    os.environ.setdefault(name, value)


def _mallopt(param: int, value: int) -> bool:
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False  # Not glibc: its allocator has its own policy.
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  if mallopt(param, value) != 1:
    _LOGGER.warning("mallopt(%d, %d) was refused; large buffers keep glibc's defaults",
                    param, value)
    return False
  return True
