"""Which job owns which data directory of a store, and which directories are dead.

A job writes its files to a data directory of its own (`data-<16 hex>`); the
job that commits then removes the data directories that are no longer needed.
It may remove only directories no other job is still writing:

- On local disks each job holds a lease: the file `<data dir>/.lease` (the
  owner's job key, host, pid and start time, for people), locked with
  `flock` by the job's launching process for as long as the job runs. The
  kernel drops the lock when that process ends, however it ends (SIGKILL
  included), so a directory is dead exactly when its lease can be locked.
  No clock or heartbeat is involved: a live job's directory is never removed,
  however long it pauses, and a killed job's is removed by the next commit.
  A dead directory is first renamed (under the lock) to `<name>.removing-<hex>`
  and then deleted, so a job that locks a lease at the same moment sees that
  its path changed and claims another directory.
- Object stores (paths with `://`) have neither locks nor atomic directory
  renames. There a directory is removed only when every file in it is older
  than the oldest file of the committed store's data directory: it stopped
  changing before the committed job started writing. A job still writing has
  newer files and is kept; a killed one goes at a later commit.

`claim_data_dir` picks the job's directory: the one its job key names when
the output holds no committed store (a rerun over an interrupted run's
leftovers then writes the same bytes to the same paths), or a fresh one per
attempt when the output holds a committed store (a job never writes into a
committed store's directory, even with the same job key) or when another live
job holds the key's directory.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from typing import Optional
import uuid

from fedbeam.format import fs
from fedbeam.format.fs import is_remote
from fedbeam.format.layout import DATA_DIR_PREFIX, LEASE_FILE, data_dir_name, join
from fedbeam.format.metadata import metadata_path

__all__ = [
  "LEASE_FILE",
  "REMOVING_MARK",
  "DataDirLease",
  "claim_data_dir",
  "committed_state",
  "is_object_store",
  "remove_dead_data_dirs",
]

# A dead data directory is renamed to '<name><REMOVING_MARK><hex>' before it is deleted.
REMOVING_MARK = ".removing-"
# Attempts at locking a lease whose path keeps changing under it (directories being removed).
_CLAIM_ATTEMPTS = 8


def is_object_store(path: str) -> bool:
  """True for URLs such as gs://: no flock, no atomic rename of a directory."""
  return is_remote(path)


def committed_state(root: str) -> tuple[Optional[str], Optional[str]]:
  """(data_dir, SHA-256 of metadata.json) of the store committed at `root`; (None, None) if none.

  The digest identifies one commit exactly (the metadata names its data
  directory and counts), so a commit can check that the store it replaces is
  still the one that was there when the job started. An unreadable metadata
  file gives (None, digest).
  """
  path = metadata_path(root)
  try:
    with fs.open_read(path) as f:
      data = f.read()
  except Exception:  # pylint: disable=broad-except
    if fs.exists(path):
      raise
    return None, None
  digest = hashlib.sha256(data).hexdigest()
  try:
    data_dir = json.loads(data.decode("utf-8")).get("data_dir")
  except (ValueError, UnicodeDecodeError, AttributeError):
    data_dir = None
  return (data_dir if isinstance(data_dir, str) else None), digest


def _lock(fd: int) -> bool:
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  return True


def _same_file(path: str, fd: int) -> bool:
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return False
  own = os.fstat(fd)
  return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _try_lease(directory: str) -> Optional[int]:
  """Locks `directory/.lease` (creating both); returns the fd, or None if a live job holds it."""
  path = os.path.join(directory, LEASE_FILE)
  for _ in range(_CLAIM_ATTEMPTS):
    os.makedirs(directory, exist_ok=True)
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # The directory was renamed away for removal; try again.
      continue
    if not _lock(fd):
      os.close(fd)
      return None
    if _same_file(path, fd):
      return fd
    os.close(fd)  # Locked a lease that was renamed away meanwhile; try again.
  raise OSError(errno.EAGAIN, f"cannot lock {path}: its directory keeps being removed")


@dataclasses.dataclass
class DataDirLease:
  """A job's claim on `root/data_dir`: held (on local disks) until `release`.

  `replaces` is the SHA-256 of the metadata.json the job found (None: no
  store was committed), which the commit checks is still there.
  """

  root: str
  data_dir: str
  replaces: Optional[str]
  fd: Optional[int] = None

  @property
  def path(self) -> str:
    return join(self.root, self.data_dir)

  def committed(self) -> bool:
    """True if the store committed at `root` is this job's."""
    try:
      return committed_state(self.root)[0] == self.data_dir
    except Exception:  # pylint: disable=broad-except
      return False

  def remove_data_dir(self) -> None:
    """Deletes the job's data directory (a failed job's partial files); never a committed one."""
    if self.committed():
      return
    if fs.exists(self.path):
      fs.remove_tree(self.path)

  def release(self) -> None:
    """Ends the claim: removes the lease file (and the directory if nothing else is in it)."""
    if self.fd is None:
      return
    try:
      lease = os.path.join(self.path, LEASE_FILE)
      if _same_file(lease, self.fd):
        os.unlink(lease)
        try:
          os.rmdir(self.path)
        except OSError:
          pass  # Not empty: the job wrote files.
    finally:
      os.close(self.fd)
      self.fd = None

  def __enter__(self) -> "DataDirLease":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _fresh_name(job_key: str) -> str:
  return data_dir_name(hashlib.sha256(f"{job_key}:{uuid.uuid4().hex}".encode()).hexdigest())


def claim_data_dir(root: str, job_key: str) -> DataDirLease:
  """Chooses and (on local disks) leases the data directory of a job writing to `root`.

  `root` must exist (see `prepare.prepare_output_dir`). The key's own
  directory (`data_dir_name(job_key)`) is used when `root` holds no
  committed store and no live job holds it; otherwise a fresh directory for
  this attempt. The Avro sync markers stay derived from `job_key`, so an
  attempt's manifest differs from another's only in the data directory its
  paths name.

  Raises:
    OSError: the lease file cannot be created or locked.
  """
  data_dir, replaces = committed_state(root)
  own = data_dir_name(job_key)
  if is_object_store(root):
    return DataDirLease(root, own if replaces is None else _fresh_name(job_key), replaces)
  candidates = [] if replaces is not None else [own]
  while True:
    name = candidates.pop(0) if candidates else _fresh_name(job_key)
    fd = _try_lease(os.path.join(root, name))
    if fd is None:
      continue  # Another live job holds it.
    lease = DataDirLease(root, name, replaces, fd)
    # A job with the same key may have committed into `own` just before
    # releasing it: look again now that nobody else can start writing here.
    data_dir, replaces_now = committed_state(root)
    if data_dir == name or replaces_now != replaces:
      lease.release()
      replaces, candidates = replaces_now, []
      continue
    info = {
      "job_key": job_key,
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": time.time(),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info, sort_keys=True).encode("utf-8"), 0)
    return lease


def _is_data_dir(name: str) -> bool:
  return name.startswith(DATA_DIR_PREFIX)


def _remove_if_dead_local(root: str, name: str) -> bool:
  directory = os.path.join(root, name)
  if not os.path.isdir(directory):
    return False
  try:
    fd = os.open(os.path.join(directory, LEASE_FILE), os.O_RDWR)
  except FileNotFoundError:
    fd = None  # No lease: a finished job's directory, or one from before leases.
  try:
    if fd is not None and not _lock(fd):
      return False  # A live job holds it.
    # Rename under the lock: a job locking this lease now sees its path change.
    doomed = (
      directory if REMOVING_MARK in name else (f"{directory}{REMOVING_MARK}{uuid.uuid4().hex[:8]}")
    )
    if doomed != directory:
      os.rename(directory, doomed)
  finally:
    if fd is not None:
      os.close(fd)
  fs.remove_tree(doomed)
  return True


def _file_times(directory: str) -> list[float]:
  try:
    return [info.mtime for _, info in fs.walk_files(directory)]
  except Exception:  # pylint: disable=broad-except
    return []


def remove_dead_data_dirs(root: str, keep: str, object_store: Optional[bool] = None) -> list[str]:
  """Deletes the data directories of `root` that no job needs; returns their names.

  Never deletes `keep` (the committing job's), nor the directory the
  metadata names now. Local disks: the directories whose lease is not held
  by a live job. Object stores (`object_store`, default: `root` has '://'):
  the directories whose every file is older than the oldest file of `keep`.

  Raises:
    OSError, or tf.errors.OpError on an object store: a directory could not be deleted.
  """
  if object_store is None:
    object_store = is_object_store(root)
  protected = {keep, committed_state(root)[0]}
  names = [
    n for n in fs.list_dir(root) if _is_data_dir(n.rstrip("/")) and n.rstrip("/") not in protected
  ]
  removed = []
  if object_store:
    kept_times = _file_times(join(root, keep))
    if not kept_times:
      return removed
    start = min(kept_times)
    for name in names:
      name = name.rstrip("/")
      times = _file_times(join(root, name))
      if times and max(times) < start:
        fs.remove_tree(join(root, name))
        removed.append(name)
    return removed
  for name in names:
    if _remove_if_dead_local(root, name):
      removed.append(name)
  return removed
