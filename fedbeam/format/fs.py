"""The filesystem of a store: local paths through `os`, URLs (gs://...) through `tf.io.gfile`.

Local paths need no TensorFlow, which takes seconds and hundreds of MB to
import in a process (the prepare job's runner and workers) that otherwise
does not use it; TensorFlow is imported only for a path with a scheme.
`read_store_file` is how every byte of a store's metadata and manifest is
read: bounded, regular files only, never through a link out of the store.
`atomic_write` is how every file of a store and of a training run is
written: whole or not at all. `sync_filesystem` is how a store's files become
durable before its commit: one `syncfs(2)` for all of them. `exists`, `isdir`,
`list_dir`, `list_files`, `walk_files`, `file_info`, `open_read`, `makedirs`,
`remove` and `remove_tree` are every other filesystem operation of the store's
writer, commit, reader, validation and training run.

The store and the training run go through this module; input files are read
by Beam's `FileSystems` inside Beam sources (its compression handling and all
of its schemes are what a source wants).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import posixpath
import shutil
import stat
from typing import IO, Callable, Iterable, Iterator, NamedTuple, Optional, Union
import uuid

from fedbeam.format.layout import MissingStoreFileError, StoreFormatError

__all__ = [
  "FileInfo",
  "is_remote",
  "exists",
  "isdir",
  "list_dir",
  "list_files",
  "walk_files",
  "file_info",
  "open_read",
  "makedirs",
  "remove",
  "remove_tree",
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


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf


def _not_found(path: str) -> FileNotFoundError:
  return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


class FileInfo(NamedTuple):
  """What `file_info` and `walk_files` tell of a file.

  `kind` is 'file' for a regular file (every object of an object store),
  'directory', or what `file_kind` names ('symbolic link', 'FIFO', ...;
  local paths only). `mtime` is the last modification in seconds since the
  epoch (0 where the filesystem keeps none, e.g. ram://). `target` is a
  symbolic link's target, else None.
  """

  size: int
  kind: str
  mtime: float
  target: Optional[str] = None

  @property
  def is_file(self) -> bool:
    """Whether it is a regular file."""
    return self.kind == "file"


def _local_info(path: str, mode: int, size: int, mtime: float) -> FileInfo:
  if stat.S_ISREG(mode):
    return FileInfo(size, "file", mtime)
  target = os.readlink(path) if stat.S_ISLNK(mode) else None
  return FileInfo(size, file_kind(mode), mtime, target)


def exists(path: str) -> bool:
  """Whether a file or directory is at `path` (on an object store: an object or a prefix).

  A local symbolic link counts by its target (`os.path.exists`). Never raises
  for a local path; a URL raises tf.errors.OpError when it cannot be asked.
  """
  if is_remote(path):
    return _gfile().io.gfile.exists(path)
  return os.path.exists(path)


def isdir(path: str) -> bool:
  """Whether `path` is a directory (on an object store: a prefix of objects).

  Never raises for a local path; a URL raises tf.errors.OpError when it
  cannot be asked.
  """
  if is_remote(path):
    return _gfile().io.gfile.isdir(path)
  return os.path.isdir(path)


def list_dir(path: str) -> list[str]:
  """The names (sorted, without a trailing '/') of the files and directories in `path`.

  Raises:
    FileNotFoundError: `path` is not there (also for a URL).
    OSError: a local directory cannot be listed (NotADirectoryError for a file).
    tf.errors.OpError: a URL cannot be listed for another reason.
  """
  if not is_remote(path):
    return sorted(os.listdir(path))
  tf = _gfile()
  try:
    return sorted({n.rstrip("/") for n in tf.io.gfile.listdir(path)})
  except tf.errors.NotFoundError:
    raise _not_found(path) from None


def file_info(path: str, follow_links: bool = False) -> FileInfo:
  """The size, kind and modification time of `path`.

  A local symbolic link is described itself (kind 'symbolic link', with its
  target), not followed, unless `follow_links`. An object store knows only
  files and directories.

  Raises:
    FileNotFoundError: nothing is at `path` (also for a URL).
    OSError: a local path cannot be examined.
    tf.errors.OpError: a URL cannot be examined for another reason.
  """
  if not is_remote(path):
    st = os.stat(path) if follow_links else os.lstat(path)
    return _local_info(path, st.st_mode, st.st_size, st.st_mtime)
  tf = _gfile()
  try:
    info = tf.io.gfile.stat(path)
  except tf.errors.NotFoundError:
    raise _not_found(path) from None
  kind = "directory" if info.is_directory else "file"
  return FileInfo(int(info.length), kind, info.mtime_nsec / 1e9)


def walk_files(
  path: str,
  prune: Optional[Callable[[str], bool]] = None,
  onerror: Optional[Callable[[str, Exception], None]] = None,
) -> Iterator[tuple[str, FileInfo]]:
  """Every file under the directory `path`, at any depth: ('/'-separated relative name, info).

  Yields each entry that is not a directory: regular files, and on local
  disks symbolic links and special files, which are described (`file_info`),
  never followed. Directories whose relative name `prune` accepts are not
  entered (nor listed). A missing `path` yields nothing. On an object store
  every entry costs one request (its `stat`).

  Raises (unless `onerror`, which is then called with the directory that
  could not be listed and the error, and the walk goes on):
    OSError: a local directory cannot be listed, or an entry vanished
      before it was examined.
    tf.errors.OpError: a URL cannot be listed.
  """
  base = path.rstrip("/") or "/"
  if is_remote(path):
    yield from _walk_remote(_gfile(), base, "", prune, onerror)
    return
  if not os.path.lexists(base):
    return
  report = _raise if onerror is None else (lambda e: onerror(e.filename, e))
  for dirpath, dirnames, filenames in os.walk(base, onerror=report):
    rel_dir = dirpath[len(base) :].lstrip(os.sep).replace(os.sep, "/")

    def rel(name, rel_dir=rel_dir):
      return posixpath.join(rel_dir, name) if rel_dir else name

    if prune is not None:
      dirnames[:] = [d for d in dirnames if not prune(rel(d))]
    entries = []
    for name in filenames + dirnames:
      st = os.lstat(os.path.join(dirpath, name))
      if not stat.S_ISDIR(st.st_mode):  # directories are walked, links to them are not
        entries.append((rel(name), os.path.join(dirpath, name), st))
    for name, full, st in sorted(entries):
      yield name, _local_info(full, st.st_mode, st.st_size, st.st_mtime)


def _raise(error: OSError) -> None:
  raise error


def _walk_remote(tf, base, rel_dir, prune, onerror) -> Iterator[tuple[str, FileInfo]]:
  directory = f"{base}/{rel_dir}" if rel_dir else base
  try:
    names = sorted({n.rstrip("/") for n in tf.io.gfile.listdir(directory)})
  except tf.errors.NotFoundError:
    return  # a prefix with no object under it any more
  except tf.errors.OpError as e:
    if onerror is None:
      raise
    onerror(directory, e)
    return
  for name in names:
    rel = f"{rel_dir}/{name}" if rel_dir else name
    try:
      info = file_info(f"{base}/{rel}")
    except FileNotFoundError:
      continue  # removed since the listing
    if info.kind == "directory":
      if prune is None or not prune(rel):
        yield from _walk_remote(tf, base, rel, prune, onerror)
    else:
      yield rel, info


def list_files(path: str, prune: Optional[Callable[[str], bool]] = None) -> list[str]:
  """The sorted '/'-separated relative names of the regular files under `path`, at any depth.

  See `walk_files` (which also yields links and special files, with their
  kind): a missing `path` gives [], and the same errors are raised.
  """
  return sorted(rel for rel, info in walk_files(path, prune) if info.is_file)


def open_read(path: str, encoding: Optional[str] = None) -> IO:
  """`path` opened for reading: binary, or text in `encoding` (e.g. 'utf-8').

  The caller closes it (a `with` block). A local path is opened with
  `open`, so it follows symbolic links and waits on a FIFO; check it with
  `file_info` first where that matters.

  Raises:
    FileNotFoundError: nothing is at `path` (also for a URL).
    OSError: a local file cannot be opened (IsADirectoryError...).
    tf.errors.OpError: a URL cannot be read (raised by the reads).
  """
  if not is_remote(path):
    return open(path, "rb") if encoding is None else open(path, encoding=encoding)
  tf = _gfile()
  try:
    tf.io.gfile.stat(path)  # GFile opens lazily: a missing file would fail at the first read.
  except tf.errors.NotFoundError:
    raise _not_found(path) from None
  return tf.io.gfile.GFile(path, "rb" if encoding is None else "r")


def makedirs(path: str) -> None:
  """Creates the directory `path` and its parents; nothing if it exists.

  Raises:
    OSError: a local directory cannot be created (FileExistsError: a file is
      in the way).
    tf.errors.OpError: a URL's directory cannot be created.
  """
  if is_remote(path):
    _gfile().io.gfile.makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  """Deletes the file `path` (not a directory: see `remove_tree`).

  Raises:
    FileNotFoundError: nothing is at `path` (also for a URL).
    OSError: a local file cannot be deleted (IsADirectoryError for a directory).
    tf.errors.OpError: a URL cannot be deleted for another reason.
  """
  if not is_remote(path):
    os.remove(path)
    return
  tf = _gfile()
  try:
    tf.io.gfile.remove(path)
  except tf.errors.NotFoundError:
    raise _not_found(path) from None


def remove_tree(path: str) -> None:
  """Deletes the directory `path` and everything in it, at any depth.

  On an object store a directory is a prefix: every object whose name starts
  with `path/` is deleted (TensorFlow's recursive delete lists them all, also
  under "directories" no object marks), then the marker of `path` if any.

  Raises:
    FileNotFoundError: nothing is at `path` (also for a URL).
    NotADirectoryError: `path` is a file.
    OSError: a local directory could not be deleted whole (`shutil.rmtree`
      stops at the first entry it cannot delete).
    tf.errors.OpError: part of a URL's directory could not be deleted.
  """
  if not is_remote(path):
    shutil.rmtree(path)
    return
  tf = _gfile()
  if not tf.io.gfile.exists(path):
    raise _not_found(path)
  if not tf.io.gfile.isdir(path):
    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
  try:
    tf.io.gfile.rmtree(path)
  except tf.errors.NotFoundError:
    # A listing that misses directories no object marks (ram://) makes the
    # recursive delete fail on them.
    _remove_remote_leftovers(tf, path)


def _remove_remote_leftovers(tf, path: str) -> None:
  # The objects matched level by level instead (a level may hold only
  # directories), as deep as a store goes and more.
  pattern = path.rstrip("/")
  for _ in range(_LEFTOVER_DEPTH):
    pattern += "/*"
    for match in tf.io.gfile.glob(pattern):
      if not tf.io.gfile.isdir(match):
        tf.io.gfile.remove(match)
  try:
    tf.io.gfile.rmtree(path)  # directory markers
  except tf.errors.NotFoundError:
    pass  # none left


# Levels below a directory `remove_tree` looks for objects its recursive delete missed.
_LEFTOVER_DEPTH = 16


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
