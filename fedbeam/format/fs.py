"""The filesystem of a store: local paths through `os`, URLs (gs://...) through `tf.io.gfile`.

Local paths need no TensorFlow, which takes seconds and hundreds of MB to
import in a process (the prepare job's runner and workers) that otherwise
does not use it; TensorFlow is imported only for a path with a scheme.
`read_store_file` is how every byte of a store's metadata and manifest is
read: bounded, regular files only, never through a link out of the store.
`atomic_write` is how every file of a store and of a training run is
written: whole or not at all. `sync_filesystem` is how a store's files become
durable before its commit: one `syncfs(2)` for all of them.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import os
import posixpath
import stat
from typing import Iterable, Optional, Union
import uuid

from fedbeam.format.layout import MissingStoreFileError, StoreFormatError

__all__ = [
  "FileOps",
  "file_ops",
  "is_remote",
  "temp_name",
  "atomic_write",
  "sync_filesystem",
  "read_store_file",
  "file_kind",
  "remote_error_line",
]


def is_remote(path: str) -> bool:
  """Whether `path` is a URL (gs://...), reached through tf.io.gfile, rather than a local path.

  Remote filesystems (object stores) have no locks, no atomic rename of a
  directory and no fsync; callers that need those ask this first.
  """
  return "://" in path


def temp_name(final_path: str) -> str:
  """A fresh temporary name beside `final_path`: `.<name>.tmp-<32 hex digits>`.

  Hidden, and never a name the store gives a file, so sweeps recognize and
  remove what a killed writer left.
  """
  head, tail = posixpath.split(final_path)
  return posixpath.join(head, f".{tail}.tmp-{uuid.uuid4().hex}")


def atomic_write(path: str, data: Union[bytes, Iterable[bytes]], fsync: bool = True) -> int:
  """Writes `data` (bytes, or pieces of it in order) to `path`, whole or not at all.

  The bytes go to `temp_name(path)`, which is then renamed to `path`,
  replacing a file there: a reader sees the old file or the new one, never
  part of one. With `fsync` (local paths; an object store makes an object
  durable when it is closed) the content reaches the disk before the
  rename, so after a power loss `path` holds its bytes or does not exist;
  the directory entry is made durable by the caller, once per directory.
  Local parent directories are created.

  Returns the number of bytes written.

  Raises:
    OSError, or tf.errors.OpError for a remote path: the file could not be
      written. The temporary file is deleted first.
  """
  pieces = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data
  tmp = temp_name(path)
  size = 0
  if is_remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:
      with tf.io.gfile.GFile(tmp, "wb") as f:
        for piece in pieces:
          f.write(piece)
          size += len(piece)
      tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:
      try:
        tf.io.gfile.remove(tmp)
      except Exception:  # pylint: disable=broad-except
        pass  # never created, or already renamed
      raise
    return size
  os.makedirs(os.path.dirname(tmp) or ".", exist_ok=True)
  try:
    with open(tmp, "wb") as f:
      for piece in pieces:
        f.write(piece)
        size += len(piece)
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise
  return size


@functools.cache
def _libc_syncfs():
  # Looked up on first use, not at import: only a commit needs it.
  try:
    return ctypes.CDLL(None, use_errno=True).syncfs
  except (AttributeError, OSError):
    return None  # not Linux (or a libc without syncfs)


def _syncfs(fd: int) -> None:
  syncfs = _libc_syncfs()
  if syncfs is None:
    os.sync()  # flushes every filesystem; POSIX leaves waiting for it open, Linux waits
    return
  if syncfs(fd) != 0:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def sync_filesystem(path: str) -> None:
  """Makes every file and directory entry on the local filesystem that holds `path` durable.

  One `syncfs(2)` call on Linux: it returns once all dirty data and metadata of
  that filesystem, written by any process of this machine (Beam's worker
  processes too), has reached the disk, and (Linux 5.8 and later) reports a
  write-back error that happened since the file descriptor was opened. The store
  writer calls it once, before the commit, instead of fsyncing every client file
  and directory: the kernel writes the files back in the background while the
  job runs, in large batches, instead of the workers waiting for each file
  (`bench/bench_before_after.py`, bench/README.md "Before/after: runner
  portability, format package, durability": 0.96-1.04x of no durability at
  10x, where an fsync per file cost 1.3-1.8x). Elsewhere it falls back to
  `os.sync()`. For a URL (gs://...) it
  does nothing: an object store makes an object durable when it is closed.

  Raises:
    OSError: `path` cannot be opened, or the filesystem reported a write error
      (its message names `path`).
  """
  if is_remote(path):
    return
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
  try:
    _syncfs(fd)
  except OSError as e:
    raise OSError(e.errno, f"cannot make the files under {path} durable: {e.strerror}") from None
  finally:
    os.close(fd)


FileOps = collections.namedtuple("FileOps", "exists isdir listdir makedirs open")


def file_ops(path: str) -> FileOps:
  """Directory and file functions for `path`: the os module's for local paths,
  tf.io.gfile's for URLs such as gs://.

  Local paths need no TensorFlow, which takes seconds and hundreds of MB to
  import in a process (the prepare job's runner and workers) that otherwise
  does not use it. `listdir` names have no trailing '/'.
  """
  if is_remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    gfile = tf.io.gfile
    return FileOps(
      gfile.exists,
      gfile.isdir,
      lambda d: [n.rstrip("/") for n in gfile.listdir(d)],
      gfile.makedirs,
      gfile.GFile,
    )
  return FileOps(
    os.path.exists, os.path.isdir, os.listdir, lambda d: os.makedirs(d, exist_ok=True), open
  )


def read_store_file(root: str, path: str, max_bytes: Optional[int], what: str) -> bytes:
  """The bytes of `path`, a regular file inside the store at `root`.

  On local disks the file is opened with O_NOFOLLOW and O_NONBLOCK and checked
  with fstat before a byte is read, so a symbolic link, FIFO, device or
  directory is refused instead of followed or waited on, and its real
  directory must lie inside the real `root`. On other filesystems (gs://)
  its size comes from tf.io.gfile.stat. `max_bytes` (None: no limit) bounds
  what is read.

  Raises:
    MissingStoreFileError: `path` does not exist.
    StoreFormatError: any other reason not to read it, naming `what` and
      `path` (on one line, also for a remote filesystem's error).
  """
  if is_remote(path):
    return _read_remote_file(path, max_bytes, what)
  inside = os.path.realpath(root)
  if os.path.commonpath([inside, os.path.realpath(os.path.dirname(path))]) != inside:
    raise StoreFormatError(f"{what} {path} is outside the store {root} (through a symbolic link)")
  flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
  try:
    fd = os.open(path, flags)
  except (FileNotFoundError, NotADirectoryError):
    raise MissingStoreFileError(f"{what} {path} is missing") from None
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise StoreFormatError(
        f"{what} {path} is a symbolic link; a store holds only regular files"
      ) from None
    raise StoreFormatError(f"cannot read {what} {path}: {e.strerror}") from None
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      raise StoreFormatError(f"{what} {path} is not a regular file ({file_kind(info.st_mode)})")
    _check_size(info.st_size, max_bytes, what, path)
    with os.fdopen(os.dup(fd), "rb") as f:
      data = f.read(info.st_size + 1)
  except OSError as e:
    raise StoreFormatError(f"cannot read {what} {path}: {e.strerror}") from None
  finally:
    os.close(fd)
  _check_size(len(data), max_bytes, what, path)  # it may have grown since fstat
  return data


def file_kind(mode: int) -> str:
  """'FIFO', 'directory', ... for a file that is not regular (from an lstat/fstat mode)."""
  for test, name in (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISLNK, "symbolic link"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
  ):
    if test(mode):
      return name
  return "special file"


def _check_size(size: int, max_bytes: Optional[int], what: str, path: str) -> None:
  if max_bytes is not None and size > max_bytes:
    raise StoreFormatError(
      f"{what} {path} has {size} bytes or more; fedbeam reads at most {max_bytes}"
    )


def remote_error_line(error: Exception) -> str:
  """A filesystem error (TensorFlow's OpError messages span lines) as one line."""
  return " ".join(str(getattr(error, "message", error)).split())


def _read_remote_file(path: str, max_bytes: Optional[int], what: str) -> bytes:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    info = tf.io.gfile.stat(path)
    if info.is_directory:
      raise StoreFormatError(f"{what} {path} is not a regular file (directory)")
    _check_size(info.length, max_bytes, what, path)
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read(info.length + 1)
  except tf.errors.NotFoundError:
    raise MissingStoreFileError(f"{what} {path} is missing") from None
  except tf.errors.OpError as e:
    raise StoreFormatError(f"cannot read {what} {path}: {remote_error_line(e)}") from None
  _check_size(len(data), max_bytes, what, path)
  return data
