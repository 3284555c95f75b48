"""Serialized tf.train.Example input records: parsed one at a time, or a batch stored as read.

`parse_example_record` turns one record into an `InputRecord`. The TFRecord
reader emits `ExampleBatch`es (consecutive records of one file) rather than
one element per record, and `encode_batch` turns a batch into store records
without a protobuf message per record.

Most inputs hold records that already match the element spec and differ
only in their values: same features, same value counts, same byte layout
(every record of the benchmark's EMNIST-like input file that was checked
has one length, 3,203 bytes). For such records the store record is the
input record with its client-id map entry cut out and the outer length
fixed; that is exactly what parsing, deleting the entry and serializing
deterministically gives. `encode_batch` proves it on one record of each
length (the template) by doing both, then takes every other record of that
length framed like the template (`example_wire.framed_alike`, which
`codec.decode_examples` uses too), checks what parsing could change
in its values (varints must be the shortest and fit the dtype; client ids
must be UTF-8) with numpy over all of them at once, and cuts them all out
of one matrix. Any other record (a lone length, a different layout, a value
out of range, a bad id) goes the record-by-record way, which also raises
the errors, naming file and record, as before.
`tests/test_example_records.py` holds both ways to the same bytes. The cut
is a hand-written fast path over the record-by-record way (protobuf parse,
delete, `codec.serialize_example`), kept because `bench/bench_codec.py`
(row "store record from an input record") measures that way at two to three
times its cost.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Union

import numpy as np

from fedbeam.format import example_wire
from fedbeam.format.codec import Example, encode_example, features_field_header
from fedbeam.format.layout import InvalidClientIdError, check_client_id
from fedbeam.format.spec import ElementSpec
from fedbeam.pipelines.column_batches import ColumnBatch
from fedbeam.pipelines.records import (
  ANY_RANK,
  FLOAT32,
  INT64,
  STRING,
  InputError,
  InputRecord,
  RawFeature,
  conform_record,
  encode_as_read,
)

# Records of one length needed before they are encoded as a matrix.
MIN_ALIKE = 8
# The longest varint handled as a matrix column: 9 bytes hold values below
# 2**63; longer ones (negative int64) go record by record.
_MAX_VARINT_BYTES = 9


def parse_example_record(
  data: bytes, client_id_key: Optional[str], source: str, position: tuple[str, int]
) -> InputRecord:
  """Turns a serialized tf.train.Example into an InputRecord.

  With `client_id_key` None the caller supplies the id separately (SQLite);
  the returned record then has an empty client id.

  Raises:
    InputError: not an Example, or a missing or malformed client-id feature;
      the message starts with `source`.
  """
  try:
    example = Example.FromString(data)
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f"{source}: not a serialized tf.train.Example ({e})") from None
  features = {}
  client_id = ""
  fmap = example.features.feature
  for name, feature in fmap.items():
    kind = feature.WhichOneof("kind")
    if name == client_id_key:
      client_id = _client_id_feature(feature, kind, name, source)
      continue
    if kind == "bytes_list":
      features[name] = RawFeature(feature.bytes_list.value, STRING, ANY_RANK)
    elif kind == "float_list":
      features[name] = RawFeature(feature.float_list.value, FLOAT32, ANY_RANK)
    elif kind == "int64_list":
      features[name] = RawFeature(feature.int64_list.value, INT64, ANY_RANK)
    else:
      raise InputError(f"{source}: feature {name!r} has no value list (bytes, float or int64)")
  if client_id_key is not None:
    if not client_id:
      raise InputError(
        f"{source}: client-id feature {client_id_key!r} is missing "
        f"(features present: {sorted(fmap.keys())})"
      )
    del fmap[client_id_key]
  return InputRecord(client_id, features, position, example)


def _client_id_feature(feature, kind: Optional[str], name: str, source: str) -> str:
  """The id a client-id feature holds: one UTF-8 bytes value, or one int64 as its decimal string."""
  if kind not in ("bytes_list", "int64_list"):
    raise InputError(
      f"{source}: client-id feature {name!r} is a {kind or 'typeless feature'}, "
      "expected a bytes_list holding one UTF-8 string or an int64_list holding one integer"
    )
  values = getattr(feature, kind).value
  if len(values) != 1:
    raise InputError(
      f"{source}: client-id feature {name!r} has {len(values)} values, expected exactly one"
    )
  if kind == "int64_list":
    return str(values[0])
  try:
    return check_client_id(values[0], source)
  except InvalidClientIdError as e:
    raise InputError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class ExampleBatch:
  """Serialized tf.train.Example records of one input file, with their client ids.

  Either each record holds its client id in the feature
  `client_id_key` (TFRecord input: one bytes value, or one int64 for an
  integer id), or the ids come from outside the records
  (`client_id_key` None, `client_ids[i]` the id of record i: a TFF SQLite
  column, or a partitioner's choice). A batch with neither holds records
  that no client owns yet (the input of `fedbeam.pipelines.partition`); its
  records parse with an empty client id. Record i is record `first_index + i` of
  `path`, or record `indices[i]` when `indices` is given (SQLite rowids, or
  the records a partitioner kept); `index_name` is what error messages call
  the index ("record", "rowid"). The records travel between steps as bytes:
  a batch pickles as one list of bytes, not as a protobuf message per record.
  """

  path: str
  first_index: int
  records: list
  client_id_key: Optional[str]
  client_ids: Optional[tuple] = None
  indices: Optional[tuple] = None
  index_name: str = "record"

  def __post_init__(self):
    if self.client_id_key is not None and self.client_ids is not None:
      raise ValueError("ExampleBatch takes client_id_key or client_ids, not both")
    for name in ("client_ids", "indices"):
      given = getattr(self, name)
      if given is not None and len(given) != len(self.records):
        raise ValueError(f"ExampleBatch: {len(given)} {name} for {len(self.records)} records")

  def __len__(self) -> int:
    return len(self.records)

  def position(self, i: int) -> tuple[str, int]:
    if self.indices is not None:
      return (self.path, self.indices[i])
    return (self.path, self.first_index + i)

  def source(self, i: int) -> str:
    """Where record i is, for error messages: '{path} {index_name} {index}'."""
    path, index = self.position(i)
    return f"{path} {self.index_name} {index}"

  def input_record(self, i: int) -> InputRecord:
    """Record i parsed (see `parse_example_record`, which also lists what raises)."""
    record = parse_example_record(
      self.records[i], self.client_id_key, self.source(i), self.position(i)
    )
    if self.client_ids is not None:
      record = dataclasses.replace(record, client_id=self.client_ids[i])
    return record

  def input_records(self) -> Iterator[InputRecord]:
    return (self.input_record(i) for i in range(len(self.records)))


def as_input_records(
  element: Union[InputRecord, ExampleBatch, ColumnBatch, list[InputRecord]],
) -> Iterator[InputRecord]:
  """An `InputRecord` as itself; an `ExampleBatch` as its records, parsed; a `ColumnBatch` as its
  rows; a list as its items."""
  if isinstance(element, (ExampleBatch, ColumnBatch)):
    return element.input_records()
  if isinstance(element, list):
    return iter(element)
  return iter((element,))


def input_size(element) -> int:
  """The number of input records in a reader's output element (see `as_input_records`)."""
  return len(element) if isinstance(element, (ExampleBatch, ColumnBatch, list)) else 1


def encode_record(record: InputRecord, spec: ElementSpec) -> bytes:
  """The store record of one input record (raises InputError, see `conform_record`)."""
  data = encode_as_read(record, spec)
  if data is None:
    data = encode_example(conform_record(record, spec), spec)
  return data


def encode_batch(
  batch: ExampleBatch, spec: ElementSpec
) -> list[tuple[str, tuple[str, int], bytes]]:
  """(client id, position, store record) of each record of `batch`, in order.

  The store records are those `encode_record(batch.input_record(i), spec)`
  gives.

  Raises:
    InputError: a record is not an Example, lacks a valid client id or does
      not match `spec`; the message names the file and record (the first
      such record of the batch).
  """
  out: list[Any] = [None] * len(batch.records)
  by_length: dict[int, list[int]] = {}
  for i, data in enumerate(batch.records):
    by_length.setdefault(len(data), []).append(i)
  one_by_one: list[int] = []
  for rows in by_length.values():
    if len(rows) < MIN_ALIKE:
      one_by_one.extend(rows)
    else:
      one_by_one.extend(_encode_alike(batch, rows, spec, out))
  for i in sorted(one_by_one):
    record = batch.input_record(i)
    out[i] = (record.client_id, record.position, encode_record(record, spec))
  return out


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where a template record keeps what `_encode_alike` copies and checks."""

  header: bytes  # Opens the store record: the `features` key and its length without the id.
  features: tuple[int, int]  # Payload of the Example's one `features` field.
  id_entry: tuple[int, int]  # The client id's whole map entry, key included.
  id_value: tuple[int, int]  # The client id's bytes.
  lists: dict  # example_wire.feature_lists(template)
  long_varint_ends: np.ndarray  # Offset of the last byte of each varint of 2 or more bytes.
  bounded: tuple  # (start, end, largest value) of each varint whose dtype bounds it.

  def cut(self, record: bytes) -> bytes:
    (fs, fe), (cs, ce) = self.features, self.id_entry
    return self.header + record[fs:cs] + record[ce:fe]


def _varint_ends(data: bytes, start: int, end: int) -> Optional[list[int]]:
  ends = []
  pos = start
  while pos < end:
    first = pos
    while pos < end and data[pos] >= 0x80:
      pos += 1
    pos += 1
    if pos > end or pos - first > _MAX_VARINT_BYTES:
      return None
    ends.append(pos)
  return ends


def _largest(dtype: str) -> Optional[int]:
  """The largest value `dtype` holds, when an int64 varint can exceed it."""
  if dtype == "bool":
    return 1
  if dtype in ("int64", "uint64") or np.dtype(dtype).kind not in "iu":
    return None
  return int(np.iinfo(np.dtype(dtype)).max)


def _layout(template: bytes, client_id_key: Optional[str], spec: ElementSpec) -> Optional[_Layout]:
  """The layout of a template that matches `spec`, or None when `_encode_alike` cannot take it.

  With `client_id_key` None the record holds no id: nothing is cut out
  (`id_entry` and `id_value` are empty ranges at the end of the features).
  """
  try:
    top = example_wire.message_fields(template, 0, len(template))
    if len(top) != 1 or top[0][:2] != (1, 2) or top[0][3] != len(template):
      return None
    fs, fe = top[0][2], top[0][3]
    id_entry = None
    entry_start = fs
    for number, wire, s, e in example_wire.message_fields(template, fs, fe):
      if (number, wire) == (1, 2):
        for n, w, ks, ke in example_wire.message_fields(template, s, e):
          if (
            client_id_key is not None
            and (n, w) == (1, 2)
            and template[ks:ke] == client_id_key.encode("utf-8")
          ):
            if id_entry is not None:
              return None
            id_entry = (entry_start, e)
      entry_start = e
    lists = example_wire.feature_lists(template)
  except example_wire.ExampleWireError:
    return None
  if client_id_key is None:
    id_entry = (fe, fe)
  elif id_entry is None or lists.get(client_id_key, (None,))[0] != example_wire.BYTES_LIST:
    # An integer id (int64_list) is stored as its decimal string: record by record.
    return None
  long_ends, bounded = [], []
  for name, (kind, pieces) in lists.items():
    if kind != example_wire.INT64_LIST:
      continue
    largest = _largest(spec[name].dtype)
    for _, s, e in pieces:
      ends = _varint_ends(template, s, e)
      if ends is None:
        return None
      begin = s
      for end in ends:
        if end - begin > 1:
          long_ends.append(end - 1)
        if largest is not None:
          bounded.append((begin, end, largest))
        begin = end
  if client_id_key is None:
    vs = ve = fe
  else:
    _, [(_, vs, ve)] = lists[client_id_key]
  (cs, ce) = id_entry
  return _Layout(
    features_field_header(fe - fs - (ce - cs)),
    (fs, fe),
    id_entry,
    (vs, ve),
    lists,
    np.array(long_ends, np.intp),
    tuple(bounded),
  )


def _encode_alike(batch: ExampleBatch, rows: list[int], spec: ElementSpec, out: list) -> list[int]:
  """Fills `out[i]` for the rows of `batch` (all one length) it can cut; returns the others."""
  records = batch.records
  template = records[rows[0]]
  try:
    expected = encode_as_read(batch.input_record(rows[0]), spec)
  except InputError:
    return rows
  layout = _layout(template, batch.client_id_key, spec) if expected is not None else None
  if layout is None or layout.cut(template) != expected:
    return rows
  n = len(rows)
  matrix = np.frombuffer(b"".join([records[i] for i in rows]), np.uint8).reshape(n, len(template))
  alike = example_wire.framed_alike(matrix, layout.lists)
  # Protobuf writes the shortest varint: a longer one would not survive parse and serialize.
  alike &= (matrix[:, layout.long_varint_ends] != 0).all(axis=1)
  for start, end, largest in layout.bounded:
    value = np.zeros(n, np.uint64)
    for k in range(end - start):
      value |= (matrix[:, start + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    alike &= value <= np.uint64(largest)
  given_ids = batch.client_ids
  others = []
  if batch.client_id_key is None:
    # No id inside the records: an alike record is its own store record.
    for j, i in enumerate(rows):
      if alike[j]:
        out[i] = (given_ids[i] if given_ids is not None else "", batch.position(i), records[i])
      else:
        others.append(i)
    return others
  (fs, fe), (cs, ce), (vs, ve) = layout.features, layout.id_entry, layout.id_value
  header = np.frombuffer(layout.header, np.uint8)
  cut = np.concatenate(
    [np.broadcast_to(header, (n, header.size)), matrix[:, fs:cs], matrix[:, ce:fe]], axis=1
  )
  width = cut.shape[1]
  blob = cut.tobytes()
  ids = matrix[:, vs:ve].tobytes()
  id_width = ve - vs
  for j, i in enumerate(rows):
    if not alike[j]:
      others.append(i)
      continue
    try:
      client_id = ids[j * id_width : (j + 1) * id_width].decode("utf-8")
    except UnicodeDecodeError:
      others.append(i)  # Decoded again one by one, which names the record.
      continue
    out[i] = (client_id, batch.position(i), blob[j * width : (j + 1) * width])
  return others


__all__ = [
  "ExampleBatch",
  "as_input_records",
  "encode_batch",
  "encode_record",
  "parse_example_record",
  "MIN_ALIKE",
]
