"""What the runtime reader checks a client file against: the manifest's figures.

Two halves, one per place a read can be checked (docs/reliability.md, "Reading a client"):

- `check_client_file(path, num_examples, num_bytes)`, in Python, before TensorFlow opens
  the file: a regular file of exactly `num_bytes` bytes whose TFRecord length headers
  frame exactly `num_examples` records, each of which fits in the file. TensorFlow's
  record reader allocates a record's length as read from its header (a forged length of
  2^40 with a valid header CRC aborts the process), so this walk is what bounds it.
- `ManifestFigures`: client id -> (num_examples, num_bytes) in TF ops, for reads traced
  into a graph where the id is a tensor. It holds the 64-bit farmhash fingerprints of
  the ids, sorted, and looks one up with `tf.searchsorted` (24 bytes per client; no
  strings and no hash table in the graph); ids whose fingerprints collide go to a
  small exact table instead.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

# pylint: disable=g-direct-tensorflow-import
from tensorflow.python.eager import context

# pylint: enable=g-direct-tensorflow-import
from fedbeam.format.fs import file_info, is_remote, open_read

__all__ = ["RECORD_OVERHEAD_BYTES", "check_client_file", "ManifestFigures"]

# Bytes a TFRecord adds around its data: 8 length, 4 length CRC, 4 data CRC.
RECORD_OVERHEAD_BYTES = 16
_LENGTH = struct.Struct("<Q")


def _file_size(path: str) -> tuple[Optional[int], Optional[str]]:
  """(size, None) for a regular file, else (None, the reason it cannot be read)."""
  try:
    # Not followed: a symbolic link is refused, not followed out of the store.
    info = file_info(path)
  except FileNotFoundError:
    return None, "is missing"
  except OSError as e:  # a local path (a URL's other errors are raised)
    return None, f"cannot be read ({e.strerror})"
  # A FIFO or device would block or stream without end when opened.
  if info.kind == "symbolic link":
    return None, "is a symbolic link, not a regular file"
  if not info.is_file:
    return None, "is not a regular file"
  return info.size, None


def _count_records(buf, size: int, limit: int) -> tuple[int, Optional[str]]:
  """(records framed by the length headers of `buf[:size]`, reason or None).

  Stops after `limit + 1` records: a file that holds more than the manifest's
  count is wrong whatever follows. Only lengths are walked: TensorFlow checks
  both CRCs of every record as it reads them.
  """
  # Records of a client mostly have one length: when the file is `limit`
  # records of the first one's length, every header is compared at once.
  if size >= 8 and limit > 0:
    first = _LENGTH.unpack_from(buf, 0)[0]
    stride = first + RECORD_OVERHEAD_BYTES
    if stride * limit == size:
      lengths = np.ndarray((limit,), dtype="<u8", buffer=buf, offset=0, strides=(stride,))
      same = bool(np.all(lengths == first))
      del lengths  # the view must go before the buffer closes
      if same:
        return limit, None
  pos = count = 0
  while pos < size and count <= limit:
    if size - pos < 12:
      return count, f"is damaged: record {count} has a truncated length header"
    length = _LENGTH.unpack_from(buf, pos)[0]
    if length > size - pos - RECORD_OVERHEAD_BYTES:
      return count, (
        f"is damaged: record {count} says it is {length} bytes long, more than "
        f"the {size - pos} bytes left in the file"
      )
    pos += length + RECORD_OVERHEAD_BYTES
    count += 1
  return count, None


def check_client_file(path: str, num_examples: int, num_bytes: int) -> Optional[str]:
  """Why the client file at `path` does not match its manifest row, or None if it does.

  The file must be a regular file of `num_bytes` bytes holding `num_examples`
  TFRecords whose lengths fit in it. Local files are mapped into memory and only
  their length headers are touched; a file behind a URL (gs://...) is read whole.

  Returns:
    None, or the reason as a predicate ("is missing", "is 120 bytes, the
    manifest says 140", "holds 4 records, the manifest says 5", "is damaged: ...").
  """
  size, reason = _file_size(path)
  if reason is not None:
    return reason
  if size != num_bytes:
    return f"is {size} bytes, the manifest says {num_bytes}"
  if size == 0:  # mmap refuses empty files
    count, reason = 0, None
  elif is_remote(path):
    with open_read(path) as f:
      count, reason = _count_records(f.read(size), size, num_examples)
  else:
    with open_read(path) as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
      count, reason = _count_records(m, size, num_examples)
  if reason is not None:
    return reason
  if count != num_examples:
    if count > num_examples:  # the walk stops one record past the manifest's count
      return f"holds more than {num_examples} records, the manifest says {num_examples}"
    return f"holds {count} records, the manifest says {num_examples}"
  return None


def _fingerprint_keys(ids) -> tf.Tensor:
  """int64 farmhash64 fingerprints of a tf.string vector (TensorFlow's own op)."""
  return tf.bitcast(tf.fingerprint(ids, method="farmhash64"), tf.int64)


class ManifestFigures:
  """Each client's manifest figures, looked up by id in TF ops.

  Built once per ClientData, in Python; `lookup` puts the arrays into the graph
  being traced as constants, so a TFF computation carries them (24 bytes per
  client; bench/README.md, "Reader checks", gives the build time and memory at
  10^5 and 10^6 clients).
  """

  def __init__(
    self,
    client_ids: Sequence[str],
    num_examples: Sequence[int],
    num_bytes: Sequence[int],
    key_fn: Callable[[tf.Tensor], tf.Tensor] = _fingerprint_keys,
  ):
    """`key_fn`: tf.string vector -> int64 vector, the same in Python and in graphs."""
    self._key_fn = key_fn
    ids = list(client_ids)
    figures = np.stack(
      [np.asarray(num_examples, np.int64).reshape(-1), np.asarray(num_bytes, np.int64).reshape(-1)],
      axis=1,
    )
    # Built in Python even when the first traced read is inside a graph (TFF
    # traces computations into a tf.Graph, where tensors have no value).
    with context.eager_mode():
      keys = key_fn(tf.constant(ids, tf.string)).numpy() if ids else np.zeros([0], np.int64)
    order = np.argsort(keys, kind="stable")
    keys, figures = keys[order], figures[order]
    collide = np.zeros(len(keys), bool)
    if len(keys) > 1:
      same = keys[1:] == keys[:-1]
      collide[1:] |= same
      collide[:-1] |= same
    self._exact_ids = [ids[i] for i in order[collide]]
    self._exact_figures = figures[collide]
    self._keys, self._figures = keys[~collide], figures[~collide]

  @property
  def num_exact(self) -> int:
    """Clients whose fingerprints collide with another's: looked up by their full id."""
    return len(self._exact_ids)

  def lookup(self, client_id: Any) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """scalar tf.string -> (found: bool, num_examples: int64, num_bytes: int64) scalars.

    An id that is not in the manifest gives (False, -1, -1).
    """
    client_id = tf.convert_to_tensor(client_id, tf.string)
    missing = tf.constant([-1, -1], tf.int64)
    value = missing
    if len(self._keys):
      keys = tf.constant(self._keys)
      key = self._key_fn(tf.reshape(client_id, [1]))
      i = tf.minimum(tf.searchsorted(keys, key)[0], len(self._keys) - 1)
      value = tf.where(tf.equal(keys[i], key[0]), tf.constant(self._figures)[i], missing)
    if self._exact_ids:
      table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
          tf.constant(self._exact_ids, tf.string), tf.range(len(self._exact_ids), dtype=tf.int64)
        ),
        default_value=-1,
      )
      j = table.lookup(client_id)
      exact = tf.constant(self._exact_figures)[tf.maximum(j, 0)]
      value = tf.where(j >= 0, exact, value)
    return value[0] >= 0, value[0], value[1]
