"""Where a serialized `tf.train.Example` keeps each feature's values, read without TensorFlow.

`feature_lists(record)` walks the protobuf wire format of
tensorflow/core/example/{example,feature}.proto (Example.features = 1;
Features.feature = 1, a map<string, Feature>; Feature.bytes_list = 1,
float_list = 2, int64_list = 3; each list's repeated `value` = 1) and returns,
per feature, which list it holds and the byte ranges of its values, so a
caller can decode all records' values of a feature with one numpy call
instead of materializing a protobuf message per record.

It reads what protobuf serializers write, in any field order, with packed or
unpacked numbers; a later map entry with the same key replaces an earlier
one, and repeated `features` fields merge, as protobuf and TensorFlow's
parser agree. Encodings on which TensorFlow's parser departs from protobuf's
merge rules (a Feature holding more than one list field, an entry holding
its value twice) are refused rather than guessed at.
"""

from __future__ import annotations

from typing import Mapping, Union

import numpy as np

__all__ = [
  "BYTES_LIST",
  "FLOAT_LIST",
  "INT64_LIST",
  "ExampleWireError",
  "message_fields",
  "feature_lists",
  "framed_alike",
]

BYTES_LIST, FLOAT_LIST, INT64_LIST = 1, 2, 3

# Value pieces of a list, in order: (wire type, start, end) into the record.
# Wire type 2 is a length-delimited piece: packed numbers, or one bytes value.
# Wire type 5 is one unpacked float (4 bytes), wire type 0 one unpacked varint.
Piece = tuple[int, int, int]

Buffer = Union[bytes, bytearray, memoryview]


class ExampleWireError(ValueError):
  """A record that is not a well-formed serialized tf.train.Example."""


def _varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
  result = shift = 0
  while pos < end:
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if b < 0x80:
      return result, pos
    shift += 7
    if shift >= 70:
      break
  raise ExampleWireError("truncated or overlong varint")


def _skip(buf: Buffer, wire: int, pos: int, end: int) -> int:
  """Position after a field of wire type `wire` whose value starts at `pos`."""
  if wire == 0:
    return _varint(buf, pos, end)[1]
  if wire == 1:
    pos += 8
  elif wire == 2:
    size, pos = _varint(buf, pos, end)
    pos += size
  elif wire == 5:
    pos += 4
  else:
    raise ExampleWireError(f"unsupported wire type {wire}")
  if pos > end:
    raise ExampleWireError("field runs past the end of its message")
  return pos


def message_fields(buf: Buffer, pos: int, end: int) -> list[tuple[int, int, int, int]]:
  """(field number, wire type, value start, value end) of each field of one message.

  The message is `buf[pos:end]`; a field's key (and length, for wire type 2)
  sit between the previous field's end and its value start. Raises
  ExampleWireError when a field runs past `end`.
  """
  out = []
  while pos < end:
    key = buf[pos]
    if key < 0x80:  # Field numbers below 16: a one-byte key.
      pos += 1
    else:
      key, pos = _varint(buf, pos, end)
    wire = key & 7
    if wire == 2:
      size = buf[pos] if pos < end else 0x80
      if size < 0x80:
        start = pos + 1
      else:
        size, start = _varint(buf, pos, end)
      pos = start + size
      if pos > end:
        raise ExampleWireError(f"field {key >> 3} runs past the end of its message")
    else:
      start = pos
      pos = _skip(buf, wire, pos, end)
    out.append((key >> 3, wire, start, pos))
  return out


def _feature(buf: Buffer, start: int, end: int) -> tuple[int, list[Piece]]:
  """(list kind or 0 when none is set, value pieces) of one serialized Feature."""
  kind, pieces = 0, []
  for number, wire, s, e in message_fields(buf, start, end):
    if number not in (BYTES_LIST, FLOAT_LIST, INT64_LIST) or wire != 2:
      continue
    if kind:
      raise ExampleWireError("a Feature holds more than one list field")
    kind = number
    for value_number, value_wire, vs, ve in message_fields(buf, s, e):
      if value_number == 1:
        pieces.append((value_wire, vs, ve))
  return kind, pieces


def feature_lists(record: Buffer) -> dict[str, tuple[int, list[Piece]]]:
  """Maps each feature name of a serialized Example to (list kind, value pieces).

  List kind is BYTES_LIST, FLOAT_LIST or INT64_LIST (0 for a Feature with no
  list set). Pieces index into `record`.

  Raises:
    ExampleWireError: the bytes are not a well-formed Example.
  """
  out: dict[str, tuple[int, list[Piece]]] = {}
  end = len(record)
  for number, wire, fs, fe in message_fields(record, 0, end):
    if number != 1 or wire != 2:
      continue
    for entry_number, entry_wire, es, ee in message_fields(record, fs, fe):
      if entry_number != 1 or entry_wire != 2:
        continue
      name, value = "", None
      for n, w, s, e in message_fields(record, es, ee):
        if n == 1 and w == 2:
          try:
            name = bytes(record[s:e]).decode("utf-8")
          except UnicodeDecodeError:
            raise ExampleWireError("a feature name is not UTF-8") from None
        elif n == 2 and w == 2:
          if value is not None:
            raise ExampleWireError("a feature map entry holds its value twice")
          value = _feature(record, s, e)
      out[name] = value if value is not None else (0, [])
  return out


def framed_alike(block: np.ndarray, lists: Mapping[str, tuple[int, list[Piece]]]) -> np.ndarray:
  """Which rows of `block` are framed like its first row: a bool per row.

  `block` is a [records, length] uint8 matrix of serialized Examples of one
  length, and `lists` is `feature_lists(block[0])`. A row is framed alike when
  every byte outside the first row's value pieces equals the first row's, and
  every byte of its int64 values continues or ends a varint where the first
  row's does. Such a row holds the same features as the first, with as many
  values each, at the same offsets: only the values differ.
  """
  values = np.zeros(block.shape[1], bool)
  varints = np.zeros(block.shape[1], bool)
  for kind, pieces in lists.values():
    for _, start, end in pieces:
      values[start:end] = True
      if kind == INT64_LIST:
        varints[start:end] = True
  first = block[0]
  alike = (block[:, ~values] == first[~values]).all(axis=1)
  if varints.any():
    alike &= ((block[:, varints] >= 0x80) == (first[varints] >= 0x80)).all(axis=1)
  return alike
