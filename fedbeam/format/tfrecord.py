"""TFRecord framing: the length, CRC32C and data of each record, written and read.

A client file is a TFRecord file: each record is a little-endian uint64
length, the masked CRC32C of those 8 bytes, the data, and the masked CRC32C
of the data (TensorFlow's `tensorflow/core/lib/io/record_writer.cc`). The
reader checks every length against the bytes there before reading and every
CRC after, so a damaged or forged file is refused, never followed.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from typing import BinaryIO, Iterable, Optional

__all__ = [
  "CorruptRecordError",
  "tfrecord_frame",
  "tfrecord_frames",
  "read_tfrecords",
  "checksum",
  "masked_crc",
]


def masked_crc(data: bytes) -> int:
  """TFRecord's masked CRC32C of `data` (the value stored after a length and after data)."""
  import google_crc32c  # pylint: disable=g-import-not-at-top

  return _mask(google_crc32c.value(data))


def _mask(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(record: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC32C of the length, data, masked CRC32C of the data."""
  return b"".join(tfrecord_frames([record]))


def tfrecord_frames(records: Iterable[bytes]) -> Iterable[bytes]:
  """The pieces of `tfrecord_frame(r)` for each record, in order, ready to be joined.

  Records of one length share their header and its CRC, computed once: a
  client's records mostly have one or a few lengths.
  """
  import google_crc32c  # pylint: disable=g-import-not-at-top

  crc_of = google_crc32c.value
  pack_crc = struct.Struct("<I").pack
  headers: dict[int, bytes] = {}
  for record in records:
    n = len(record)
    header = headers.get(n)
    if header is None:
      length = struct.pack("<Q", n)
      header = headers[n] = length + pack_crc(masked_crc(length))
    yield header
    yield record
    yield pack_crc(_mask(crc_of(record)))


class CorruptRecordError(ValueError):
  """A TFRecord stream that is truncated or fails its CRC check."""


def read_tfrecords(f: BinaryIO) -> Iterable[bytes]:
  """Yields the records of a TFRecord stream (a binary file object), checking every CRC.

  A record's length is checked against what is left in `f` before it is read
  when `f`'s size is known (an in-memory buffer, a regular file); otherwise it
  is read in pieces, so memory follows the bytes really there. A forged length
  never allocates.

  Raises:
    CorruptRecordError: truncated data, a length beyond the end of the file,
      or a CRC mismatch, with the record index.
  """
  end = _stream_end(f)
  index = 0
  while True:
    header = f.read(12)
    if not header:
      return
    if len(header) < 12:
      raise CorruptRecordError(f"record {index}: truncated length header")
    length, length_crc = struct.unpack("<QI", header)
    if masked_crc(header[:8]) != length_crc:
      raise CorruptRecordError(
        f"record {index}: length CRC mismatch (not a TFRecord file, or damaged)"
      )
    if end is not None and length + 4 > end - f.tell():
      raise CorruptRecordError(
        f"record {index}: truncated data (its length {length} does not "
        f"fit in the {end - f.tell()} bytes left in the file)"
      )
    data = _read_at_most(f, length)
    footer = f.read(4)
    if len(data) < length or len(footer) < 4:
      raise CorruptRecordError(f"record {index}: truncated data")
    if masked_crc(data) != struct.unpack("<I", footer)[0]:
      raise CorruptRecordError(f"record {index}: data CRC mismatch (damaged file)")
    yield data
    index += 1


# Bytes read at a time for a record whose length cannot be checked against
# the file's size.
_READ_PIECE = 64 * 2**20


def _stream_end(f) -> Optional[int]:
  """The size of `f` if it costs nothing to know (a BytesIO, a regular file), else None.

  Not by seeking to the end: on Beam's compressed files that decompresses the
  whole file.
  """
  if isinstance(f, io.BytesIO):
    return f.getbuffer().nbytes
  if not isinstance(f, (io.BufferedReader, io.FileIO)):
    # A wrapper's fileno (gzip.GzipFile's, say) may be a file of another size.
    return None
  try:
    info = os.fstat(f.fileno())
  except (OSError, ValueError):  # io.UnsupportedOperation is both
    return None
  return info.st_size if stat.S_ISREG(info.st_mode) else None


def _read_at_most(f, length: int) -> bytes:
  """Up to `length` bytes of `f`, read in pieces so a forged length allocates nothing."""
  if length <= _READ_PIECE:
    return f.read(length)
  pieces = []
  while length:
    piece = f.read(min(length, _READ_PIECE))
    if not piece:
      break
    pieces.append(piece)
    length -= len(piece)
  return b"".join(pieces)


def checksum(data: bytes) -> int:
  """CRC32C of a client file's bytes, as an unsigned int (the same value GCS reports)."""
  import google_crc32c  # pylint: disable=g-import-not-at-top

  return int.from_bytes(google_crc32c.Checksum(data).digest(), "big")
