"""Store records: an element as a serialized `tf.train.Example`, and back.

Writing: `encode_example` (one element) and `encode_examples` (elements
stacked on axis 0) give protobuf's deterministic serialization of the
element's Example, written directly. Reading: `decode_examples` (numpy) and
the TensorFlow parsers `make_batch_parser`, `make_record_parser` and
`records_to_elements`, which `tf.function`s and `tf.data` pipelines use.
Tests pin all of them to protobuf and to `tf.io.parse_example`.

`Example` and `Feature` are the protobuf message classes of
tensorflow/core/example/{example,feature}.proto, declared here without
importing TensorFlow (see "Protobuf messages" below).
"""

from __future__ import annotations

import collections
import functools
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
import numpy as np

from fedbeam.format import example_wire
from fedbeam.format.spec import ElementSpec, FeatureSpec, numpy_dtype

if TYPE_CHECKING:
  import tensorflow as tf

__all__ = [
  "Example",
  "Feature",
  "RecordDecodeError",
  "PARSE_BATCH",
  "serialize_example",
  "encode_example",
  "encode_examples",
  "features_field_header",
  "decode_examples",
  "has_variable_length",
  "make_batch_parser",
  "make_record_parser",
  "records_to_elements",
]

# --------------------------------------------------------------------------
# Records: encoding (writer) and parsing (reader)
# --------------------------------------------------------------------------


def _varint(n: int) -> bytes:
  """Protobuf base-128 varint of a non-negative int (negative int64s arrive as uint64)."""
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def features_field_header(size: int) -> bytes:
  """The key and length that open a serialized Example whose `features` field holds `size` bytes."""
  return b"\x0a" + _varint(size)


def _len_field(tag: int, payload: bytes) -> bytes:
  return bytes((tag,)) + _varint(len(payload)) + payload


def _encode_feature(f: FeatureSpec, arr: np.ndarray) -> bytes:
  """Serialized tf.train.Feature of one feature's values (field numbers of feature.proto)."""
  if f.encoding == "bytes":
    body = b"".join(_len_field(0x0A, bytes(v)) for v in arr.tolist())
    return _len_field(0x0A, body)  # bytes_list = 1
  if f.encoding == "float":
    packed = np.ascontiguousarray(arr, dtype="<f4").tobytes()
    return _len_field(0x12, _len_field(0x0A, packed) if packed else b"")  # float_list = 2
  if f.encoding == "int64":
    ints = arr.astype(np.int64)
  else:  # bits64: keep the exact 64-bit pattern of float64/uint64.
    ints = np.ascontiguousarray(arr.astype(f.dtype)).view(np.int64)
  packed = b"".join(_varint(v & 0xFFFFFFFFFFFFFFFF) for v in ints.tolist())
  return _len_field(0x1A, _len_field(0x0A, packed) if packed else b"")  # int64_list = 3


def encode_example(values: Mapping[str, np.ndarray], spec: ElementSpec) -> bytes:
  """Serializes one element as a tf.train.Example, deterministically.

  `values` maps every feature of `spec` to a numpy array (any shape; strings
  as `bytes`) already converted to the feature's dtype; see
  `fedbeam.pipelines.records.conform_record`. The bytes equal protobuf's
  deterministic serialization (map entries sorted by key, packed numbers;
  `serialize_example` of the same message), written directly because
  building the message value by value costs 11 to 15 times as much
  (`bench/bench_codec.py`, row "encode, one element"; `encode_examples` of a
  single row costs 2 to 3 times as much: its framing is made for many).
  """
  entries = [_map_entry(f, np.asarray(values[f.name]).reshape(-1)) for f in _in_key_order(spec)]
  return _len_field(0x0A, b"".join(entries))


def _in_key_order(spec: ElementSpec) -> list[FeatureSpec]:
  # Deterministic serialization sorts map entries by their keys' bytes.
  return sorted(spec.features, key=lambda f: f.name.encode("utf-8"))


def encode_examples(
  columns: Mapping[str, np.ndarray], spec: ElementSpec, count: int
) -> list[bytes]:
  """`encode_example` of each of `count` elements stacked on axis 0 of `columns`.

  Gives the same bytes element by element. Features whose framing does not
  depend on the values (fixed-size floats) or that take few distinct values
  (one integer, such as a label) are framed once, not once per element:
  `bench/bench_codec.py` (row "encode, a client at once") measures this
  against an `Example` message per element, which costs 17 to 19 times as
  much.
  """
  if not count:
    return []
  per_feature = [
    _map_entries(f, np.asarray(columns[f.name]).reshape(count, -1)) for f in _in_key_order(spec)
  ]
  blocks = [_as_block(entries, count) for entries in per_feature]
  if all(block is not None for block in blocks):
    # Every element has the same size: one matrix of records, split by row.
    body = np.concatenate(blocks, axis=1)
    header = np.frombuffer(features_field_header(body.shape[1]), np.uint8)
    rows = np.concatenate([np.broadcast_to(header, (count, len(header))), body], axis=1)
    return [row.tobytes() for row in rows]
  out = []
  for parts in zip(*(_as_list(entries) for entries in per_feature)):
    body = b"".join(parts)
    out.append(features_field_header(len(body)) + body)
  return out


def _as_block(entries, count: int) -> Optional[np.ndarray]:
  """Map entries as a [count, size] uint8 matrix, or None when their sizes differ."""
  if isinstance(entries, np.ndarray):
    return entries
  size = len(entries[0])
  if any(len(e) != size for e in entries):
    return None
  return np.frombuffer(b"".join(entries), np.uint8).reshape(count, size)


def _as_list(entries) -> list[bytes]:
  return [row.tobytes() for row in entries] if isinstance(entries, np.ndarray) else entries


def _map_entry(f: FeatureSpec, arr: np.ndarray) -> bytes:
  """One `Features.feature` map entry (name -> Feature) as encode_example writes it."""
  key = _len_field(0x0A, f.name.encode("utf-8"))
  return _len_field(0x0A, key + _len_field(0x12, _encode_feature(f, arr)))


@functools.lru_cache(maxsize=4096)
def _single_int_entry(f: FeatureSpec, value: int) -> bytes:
  return _map_entry(f, np.array([value], np.int64))


def _map_entries(f: FeatureSpec, rows: np.ndarray):
  """Each row's map entry: a [rows, size] uint8 matrix for fixed-size floats, else bytes each."""
  width = rows.shape[1]
  if f.encoding == "float" and width:
    # The framing of a fixed number of floats does not depend on them.
    raw = np.ascontiguousarray(rows, dtype="<f4").view(np.uint8)
    prefix = np.frombuffer(_map_entry(f, np.zeros(width, np.float32))[: -4 * width], np.uint8)
    return np.concatenate([np.broadcast_to(prefix, (len(rows), len(prefix))), raw], axis=1)
  if f.encoding == "int64" and width == 1:
    # One integer (a label) takes few distinct values across a whole job.
    return [_single_int_entry(f, v) for v in rows[:, 0].astype(np.int64).tolist()]
  return [_map_entry(f, row) for row in rows]


def _parse_config(f: FeatureSpec):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  wire = {"bytes": tf.string, "float": tf.float32, "int64": tf.int64, "bits64": tf.int64}[
    f.encoding
  ]
  if f.is_variable_length:
    return tf.io.FixedLenSequenceFeature(list(f.shape[1:]), wire, allow_missing=True)
  return tf.io.FixedLenFeature(list(f.shape), wire)


def _restore_dtype(f: FeatureSpec, tensor):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  target = tf.dtypes.as_dtype(f.dtype)
  if f.encoding == "bits64":
    return tf.bitcast(tensor, target)
  if tensor.dtype == target:
    return tensor
  return tf.cast(tensor, target)


def has_variable_length(spec: ElementSpec) -> bool:
  """Whether any feature of `spec` has a variable leading dimension."""
  return any(f.is_variable_length for f in spec.features)


def make_batch_parser(spec: ElementSpec) -> Callable[[Any], "collections.OrderedDict"]:
  """Returns fn(serialized: tf.string[n]) -> OrderedDict of batched tensors.

  Only for specs without variable-length features (a batch would pad them).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  config = {f.name: _parse_config(f) for f in spec.features}

  def parse(serialized):
    parsed = tf.io.parse_example(serialized, config)
    return collections.OrderedDict(
      (f.name, _restore_dtype(f, parsed[f.name])) for f in spec.features
    )

  return parse


class RecordDecodeError(ValueError):
  """A record that does not hold the element spec's features; names the record and feature."""


_LIST_OF_ENCODING = {
  "bytes": example_wire.BYTES_LIST,
  "float": example_wire.FLOAT_LIST,
  "int64": example_wire.INT64_LIST,
  "bits64": example_wire.INT64_LIST,
}
_LIST_NAMES = {
  example_wire.BYTES_LIST: "bytes_list",
  example_wire.FLOAT_LIST: "float_list",
  example_wire.INT64_LIST: "int64_list",
  0: "no list",
}


# Wire types a list's values may come in: packed (2) or one value per field.
_WIRE_TYPES = {
  example_wire.BYTES_LIST: (2,),
  example_wire.FLOAT_LIST: (2, 5),
  example_wire.INT64_LIST: (2, 0),
}


def _count_values(kind: int, wire: int, piece: bytes) -> int:
  if wire != 2 or kind == example_wire.BYTES_LIST:
    return 1
  if kind == example_wire.FLOAT_LIST:
    return len(piece) // 4
  if len(piece) <= 16:  # A label or a few small numbers: cheaper than a numpy call.
    return sum(1 for byte in piece if byte < 0x80)
  return int(np.count_nonzero(np.frombuffer(piece, np.uint8) < 0x80))


def _decode_varints(data: bytes) -> np.ndarray:
  """All base-128 varints in `data`, decoded at once, as uint64."""
  b = np.frombuffer(data, np.uint8)
  if not b.size:
    return np.zeros(0, np.uint64)
  ends = b < 0x80
  if not ends[-1]:
    raise RecordDecodeError("an int64 list ends inside a varint")
  starts = np.concatenate(([0], np.flatnonzero(ends[:-1]) + 1))
  position = np.arange(b.size) - np.repeat(starts, np.diff(np.append(starts, b.size)))
  if position.max() > 9:
    raise RecordDecodeError("an int64 list holds a varint longer than 10 bytes")
  shifted = (b & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64)
  return np.bitwise_or.reduceat(shifted, starts)


def decode_examples(records: Sequence[bytes], spec: ElementSpec) -> dict[str, np.ndarray]:
  """The elements of serialized Examples, stacked on axis 0, without TensorFlow.

  The numpy twin of `make_batch_parser`: returns `feature name -> array of
  shape [len(records), *feature shape]` in the feature's dtype (strings as
  `bytes` in an object array), the values `tf.io.parse_example` with the
  spec's `FixedLenFeature`s and the same dtype restoration gives (tests pin
  the two). Features of a record that the spec does not name are ignored, as
  parse_example ignores them. Only for specs without variable-length
  features.

  It exists so that a pipeline worker decodes records (for expansion)
  without importing TensorFlow, which costs a process seconds and hundreds
  of MB: `tf.io.parse_example` itself is about twice as fast per record,
  an `Example` message per record three to nine times slower
  (`bench/bench_codec.py`, row "decode, a client at once").

  Raises:
    RecordDecodeError: a record is malformed, lacks a feature, holds it in
      another list type, or holds a number of values that does not fit the
      feature's shape; the message names the record's index and the feature.
    ValueError: the spec has a variable-length feature.
  """
  if has_variable_length(spec):
    raise ValueError("decode_examples needs a spec without variable-length features")
  n = len(records)
  out = {f.name: np.empty((n,) + tuple(f.shape), numpy_dtype(f.dtype)) for f in spec.features}
  lengths = np.fromiter(map(len, records), dtype=np.int64, count=n)
  rest = []
  for length in np.unique(lengths):
    rows = np.flatnonzero(lengths == length)
    rest.extend(_decode_alike(records, rows, spec, out))
  if rest:
    rows = np.array(sorted(rest), dtype=np.int64)
    for name, values in _decode_one_by_one(records, rows, spec).items():
      out[name][rows] = values
  return out


def _feature_pieces(record, i: int, lists, spec: ElementSpec) -> dict[str, list]:
  """Checks one record's features against the spec; name -> [(wire, start, end), ...]."""
  pieces_of = {}
  for f in spec.features:
    want = _LIST_OF_ENCODING[f.encoding]
    kind, pieces = lists.get(f.name, (None, ()))
    if kind is None:
      raise RecordDecodeError(f"record {i}: feature {f.name!r} is missing")
    if kind != want and (pieces or kind):
      raise RecordDecodeError(
        f"record {i}: feature {f.name!r} holds a {_LIST_NAMES[kind]}, "
        f"the element spec ({f.dtype}) needs a {_LIST_NAMES[want]}"
      )
    if want != example_wire.BYTES_LIST and len(pieces) > 1 and any(w == 2 for w, _, _ in pieces):
      # TensorFlow's parser would read only part of such a list.
      raise RecordDecodeError(
        f"record {i}: feature {f.name!r} holds its packed values in more than one piece"
      )
    count = 0
    for wire, s, e in pieces:
      if wire not in _WIRE_TYPES[want] or (
        wire == 2 and want == example_wire.FLOAT_LIST and (e - s) % 4
      ):
        raise RecordDecodeError(f"record {i}: feature {f.name!r} holds malformed values")
      count += _count_values(want, wire, record[s:e])
    if count != f.inner_size:
      raise RecordDecodeError(
        f"record {i}: feature {f.name!r} has {count} values, which "
        f"does not fit shape {list(f.shape)}"
      )
    pieces_of[f.name] = pieces
  return pieces_of


def _locate(record, i: int):
  try:
    return example_wire.feature_lists(record)
  except example_wire.ExampleWireError as e:
    raise RecordDecodeError(f"record {i}: {e}") from None


def _values(f: FeatureSpec, chunks: list, count: int) -> np.ndarray:
  """Stacked values of `count` elements of feature `f` from its value bytes, in order."""
  shape = (count,) + tuple(f.shape)
  if f.encoding == "bytes":
    values = np.empty(count * f.inner_size, dtype=object)
    values[:] = [bytes(c) for c in chunks]
    return values.reshape(shape)
  if f.encoding == "float":
    data = np.frombuffer(b"".join(chunks), "<f4")
  else:
    data = _decode_varints(b"".join(chunks)).view(np.int64)
    if f.encoding == "bits64":
      data = data.view(f.dtype)
  return data.astype(numpy_dtype(f.dtype), copy=False).reshape(shape)


def _decode_one_by_one(records, rows, spec: ElementSpec) -> dict[str, np.ndarray]:
  """Decodes records[rows], walking each record's wire format."""
  chunks = {f.name: [] for f in spec.features}
  for i in rows.tolist():
    record = records[i]
    for name, pieces in _feature_pieces(record, i, _locate(record, i), spec).items():
      chunks[name].extend(record[s:e] for _, s, e in pieces)
  return {f.name: _values(f, chunks[f.name], len(rows)) for f in spec.features}


def _decode_alike(records, rows, spec: ElementSpec, out: dict[str, np.ndarray]) -> list[int]:
  """Decodes the records[rows] (all of one length) framed like the first one.

  Records written by one encoder differ only in their values: the bytes that
  frame them (tags, lengths, names) are the same, at the same offsets. The
  first record is walked; every record framed like it
  (`example_wire.framed_alike`) has its values at the same offsets, read for
  all such records at once. Fills `out` at those rows; returns the rows left
  for the record-by-record walk.
  """
  first = int(rows[0])
  record = records[first]
  lists = _locate(record, first)
  pieces_of = _feature_pieces(record, first, lists, spec)
  block = np.frombuffer(b"".join(records[i] for i in rows.tolist()), np.uint8)
  block = block.reshape(len(rows), len(record))
  alike = example_wire.framed_alike(block, lists)
  done = rows[alike]
  if len(done):
    sub = block[alike]
    for f in spec.features:
      spans = [(s, e) for _, s, e in pieces_of[f.name]]
      if f.encoding == "bytes":
        chunks = [bytes(row[s:e]) for row in sub for s, e in spans]
      else:
        chunks = [
          np.ascontiguousarray(
            np.concatenate([sub[:, s:e] for s, e in spans], axis=1) if spans else sub[:, :0]
          ).tobytes()
        ]
      out[f.name][done] = _values(f, chunks, len(done))
  return rows[~alike].tolist()


def make_record_parser(spec: ElementSpec) -> Callable[[Any], "collections.OrderedDict"]:
  """Returns fn(serialized: scalar tf.string) -> OrderedDict element of the spec's dtypes."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  config = {f.name: _parse_config(f) for f in spec.features}

  def parse(serialized):
    parsed = tf.io.parse_single_example(serialized, config)
    return collections.OrderedDict(
      (f.name, _restore_dtype(f, parsed[f.name])) for f in spec.features
    )

  return parse


# Records parsed per vectorized parse_example call when a spec has no
# variable-length feature.
PARSE_BATCH = 256


def records_to_elements(records: tf.data.Dataset, spec: ElementSpec) -> tf.data.Dataset:
  """Maps a dataset of serialized records to a dataset of elements with the spec's element_spec."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if has_variable_length(spec):
    return records.map(make_record_parser(spec), num_parallel_calls=tf.data.AUTOTUNE)
  return (
    records.batch(PARSE_BATCH)
    .map(make_batch_parser(spec), num_parallel_calls=tf.data.AUTOTUNE)
    .unbatch()
  )


# --------------------------------------------------------------------------
# Protobuf messages
# --------------------------------------------------------------------------
#
# The `tf.train.Example` message class, without importing TensorFlow.
#
# `from tensorflow.core.example import example_pb2` runs TensorFlow's package
# initializer (seconds of CPU and hundreds of MB per process), which every
# Beam worker that reads Examples would pay. The messages are declared here
# from the same definition (tensorflow/core/example/{example,feature}.proto)
# in a private descriptor pool, so they parse and serialize the same bytes and
# do not clash with TensorFlow's classes when both are loaded.


_F = descriptor_pb2.FieldDescriptorProto


def _message(name: str, *fields: tuple) -> descriptor_pb2.DescriptorProto:
  message = descriptor_pb2.DescriptorProto(name=name)
  for field_name, number, kind, label, type_name, packed in fields:
    field = message.field.add(name=field_name, number=number, type=kind, label=label)
    if type_name:
      field.type_name = type_name
    if packed:
      field.options.packed = True
  return message


def _file() -> descriptor_pb2.FileDescriptorProto:
  pkg = ".fedbeam.example"
  f = descriptor_pb2.FileDescriptorProto(
    name="fedbeam/example.proto", package="fedbeam.example", syntax="proto3"
  )
  f.message_type.extend(
    [
      _message("BytesList", ("value", 1, _F.TYPE_BYTES, _F.LABEL_REPEATED, None, False)),
      _message("FloatList", ("value", 1, _F.TYPE_FLOAT, _F.LABEL_REPEATED, None, True)),
      _message("Int64List", ("value", 1, _F.TYPE_INT64, _F.LABEL_REPEATED, None, True)),
    ]
  )
  message = (_F.TYPE_MESSAGE, _F.LABEL_OPTIONAL)
  feature = _message(
    "Feature",
    ("bytes_list", 1, *message, f"{pkg}.BytesList", False),
    ("float_list", 2, *message, f"{pkg}.FloatList", False),
    ("int64_list", 3, *message, f"{pkg}.Int64List", False),
  )
  feature.oneof_decl.add(name="kind")
  for field in feature.field:
    field.oneof_index = 0
  features = _message(
    "Features",
    ("feature", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, f"{pkg}.Features.FeatureEntry", False),
  )
  entry = _message(
    "FeatureEntry",
    ("key", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None, False),
    ("value", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, f"{pkg}.Feature", False),
  )
  entry.options.map_entry = True
  features.nested_type.append(entry)
  example = _message(
    "Example", ("features", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, f"{pkg}.Features", False)
  )
  f.message_type.extend([feature, features, example])
  return f


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())

Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("fedbeam.example.Example"))
Feature = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("fedbeam.example.Feature"))


def serialize_example(example: Any) -> bytes:
  """A store record from an `Example` message (ours or TensorFlow's): the per-record protobuf path.

  Deterministic serialization (map entries sorted by key), so equal
  examples give equal bytes, which are `encode_example`'s for the same
  values (tests pin the two).
  """
  return example.SerializeToString(deterministic=True)
