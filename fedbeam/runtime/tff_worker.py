"""Stops the TFF C++ `worker_binary` processes this process started.

TFF starts a `worker_binary` child on the first computation that runs and
relies on `ServiceManager.__del__` to stop it; that hook fails at interpreter
exit, so the child is orphaned and keeps the parent's stdout/stderr open (a
pipe such as `fedbeam ... | tail` then never ends). Every process that may run
a TFF computation calls `register_worker_cleanup()` (idempotent) before it
does: `StoreClientData` when a store is loaded, `fedbeam train`, and
`fedbeam.testing`'s TFF helpers. Importing a module registers nothing.
"""

import atexit
import os
import signal
import time

import psutil

__all__ = ["register_worker_cleanup", "stop_tff_workers", "tff_worker_pids"]

_WORKER_NAME = "worker_binary"
_registered = False


def _is_tff_worker(proc: psutil.Process) -> bool:
  try:
    cmdline = proc.cmdline()
  except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
    return False
  return bool(cmdline) and os.path.basename(cmdline[0]) == _WORKER_NAME


def tff_worker_pids() -> list[int]:
  """Returns the pids of `worker_binary` processes that are children of this process."""
  try:
    children = psutil.Process(os.getpid()).children(recursive=False)
  except psutil.NoSuchProcess:
    return []
  return [p.pid for p in children if _is_tff_worker(p)]


def stop_tff_workers(timeout: float = 5.0) -> int:
  """Stops this process's TFF workers (SIGINT, then SIGKILL); returns how many."""
  pids = tff_worker_pids()
  for pid in pids:
    try:
      os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
      pass
  deadline = time.monotonic() + timeout
  procs = []
  for pid in pids:
    try:
      procs.append(psutil.Process(pid))
    except psutil.NoSuchProcess:
      pass
  _, alive = psutil.wait_procs(procs, timeout=max(0.0, deadline - time.monotonic()))
  for proc in alive:
    try:
      proc.kill()
    except psutil.NoSuchProcess:
      pass
  psutil.wait_procs(alive, timeout=timeout)
  return len(pids)


def register_worker_cleanup() -> None:
  """Registers `stop_tff_workers` to run at interpreter exit (idempotent)."""
  global _registered
  if not _registered:
    atexit.register(stop_tff_workers)
    _registered = True
