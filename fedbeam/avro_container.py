"""The block structure of an Avro object container file, checked before a decoder reads it.

An Avro container file is a header (magic, a metadata map, a 16-byte sync
marker) and blocks of (record count, byte size, data, sync marker). The counts
and sizes are plain numbers in the file: forged, they make a decoder allocate
terabytes (a size of 2**40) or silently skip every record (a negative count,
which fastavro reads as an empty block). `check_blocks` walks the blocks of
a file held in memory and checks each number against the bytes that are
really there, so a decoder handed the same bytes never sees a forged one.
See the Avro specification, "Object Container Files".
"""

from __future__ import annotations

__all__ = ["AvroContainerError", "check_blocks"]

MAGIC = b"Obj\x01"
SYNC_SIZE = 16


class AvroContainerError(ValueError):
  """An Avro container file whose header or block framing is malformed."""


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
  """The zig-zag varint at `pos` and the position after it."""
  value = shift = 0
  while True:
    if pos >= len(data):
      raise AvroContainerError(f"truncated number at byte {pos}")
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return (value >> 1) ^ -(value & 1), pos
    shift += 7
    if shift > 63:
      raise AvroContainerError(f"number at byte {pos} is longer than 64 bits")


def _skip_header_map(data: bytes, pos: int) -> int:
  """Skips the header's metadata map (blocks of string -> bytes entries)."""
  while True:
    count, pos = _read_long(data, pos)
    if count == 0:
      return pos
    if count < 0:  # a negative count is followed by the block's byte size
      count = -count
      _, pos = _read_long(data, pos)
    for _ in range(2 * count):  # key, value
      size, pos = _read_long(data, pos)
      if size < 0 or size > len(data) - pos:
        raise AvroContainerError(f"header entry of {size} bytes at byte {pos} does not fit in "
                                 f"the {len(data)}-byte file")
      pos += size


def check_blocks(data: bytes, min_record_bytes: int = 1) -> int:
  """Checks the framing of the Avro container file `data`; returns its number of records.

  Every block's record count must be positive and at most its byte size over
  `min_record_bytes` (a record of the file's schema takes at least that many
  bytes), its byte size must fit in what is left of the file, and its sync
  marker must be the header's.

  Raises:
    AvroContainerError: the first number or marker that does not fit, with
      its byte offset.
  """
  if data[:len(MAGIC)] != MAGIC:
    raise AvroContainerError("not an Avro container file (bad magic)")
  pos = _skip_header_map(data, len(MAGIC))
  sync = data[pos:pos + SYNC_SIZE]
  if len(sync) < SYNC_SIZE:
    raise AvroContainerError("truncated header (no sync marker)")
  pos += SYNC_SIZE
  total = 0
  while pos < len(data):
    start = pos
    count, pos = _read_long(data, pos)
    size, pos = _read_long(data, pos)
    left = len(data) - pos - SYNC_SIZE
    if size < 0 or size > left:
      raise AvroContainerError(f"block at byte {start} claims {size} bytes, {max(left, 0)} are "
                               "left in the file")
    if count <= 0 or count * min_record_bytes > size:
      raise AvroContainerError(f"block at byte {start} claims {count} records in {size} bytes")
    pos += size
    if data[pos:pos + SYNC_SIZE] != sync:
      raise AvroContainerError(f"block at byte {start} does not end with the file's sync marker")
    pos += SYNC_SIZE
    total += count
  return total
