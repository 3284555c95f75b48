"""Store format v1: the one definition used by the writer and the reader.

A store is a directory (local or any Beam/TensorFlow filesystem such as gs://)::

    STORE/
      metadata.json                             commit marker, written last
      data-<job>/manifest/part-SSSSS-of-NNNNN.avro   one row per client
      data-<job>/<split>/<shard:05d>/<name>.tfrecord one file per client, records
                                                are serialized tf.train.Example

`data-<job>` is named by a hash of the job (inputs, their sizes and times, and
parameters): a rerun of the same job writes the same bytes to the same paths,
and two different jobs aimed at one output never write into each other's
files; the metadata names the data directory of the committed job.

`docs/store-format.md` describes every file, field and invariant. The id ->
file mapping below exists twice, in Python (writer) and in TensorFlow ops
(reader, traceable by `tf.function`), and tests pin them to each other.
"""

from __future__ import annotations

import base64
import collections
import errno
import functools
import io
import json
import os
import posixpath
import re
import stat
import struct
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from fedbeam import avro_container
from fedbeam import example_wire
from fedbeam.element_spec import ElementSpec, ElementSpecError, FeatureSpec, numpy_dtype
from fedbeam.fingerprint import fingerprint64, hash_bucket

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
MANIFEST_DIR = "manifest"
DATA_DIR_PREFIX = "data-"
# A writing job's lease inside its data directory (fedbeam/pipelines/data_dir_lease.py).
LEASE_FILE = ".lease"
# Key of the element spec in each manifest file's Avro header (docs/store-format.md).
MANIFEST_SPEC_KEY = "fedbeam.element_spec"
CLIENT_FILE_SUFFIX = ".tfrecord"
ID_ENCODING = "base64url-v1"
UNSPLIT = "all"

# Ids up to this many UTF-8 bytes are named by their full base64url encoding
# (<= 200 characters); longer ids by the encoding of their first
# LONG_ID_PREFIX_BYTES bytes, "~" (never produced by base64url) and their
# farmhash64 fingerprint in hex, which keeps names under 255 bytes.
MAX_PLAIN_ID_BYTES = 150
LONG_ID_PREFIX_BYTES = 96
MAX_FILES_PER_DIRECTORY = 10_000
TARGET_FILES_PER_SHARD = 4_096

# Limits on what is read from a store (docs/store-format.md, "Limits"). Every
# size, count and name in a store is checked against them, and against the
# bytes really there, before anything is allocated or followed.
MAX_METADATA_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 32
MAX_MANIFEST_FILES = 100_000
MAX_MANIFEST_FILE_BYTES = 2**30
# A manifest row has 8 fields of at least one byte each.
MIN_MANIFEST_ROW_BYTES = 8
# Split directory names: what the writer makes ("all", "train", "test") and
# names like them; never ".", "..", a path, or the manifest directory.
SPLIT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

_SCHEMA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")


class StoreFormatError(ValueError):
  """A path that holds no readable fedbeam store, or a store fedbeam cannot read."""


class MissingStoreFileError(StoreFormatError):
  """A file the store needs is not there."""


class InvalidClientIdError(ValueError):
  """A client id that cannot be stored (empty, or not valid UTF-8 text)."""


def check_client_id(client_id: Any, where: str = "") -> str:
  """Returns `client_id` if it is a storable id; raises InvalidClientIdError naming `where`."""
  suffix = f" ({where})" if where else ""
  if isinstance(client_id, bytes):
    try:
      client_id = client_id.decode("utf-8")
    except UnicodeDecodeError:
      raise InvalidClientIdError(f"client id {client_id!r} is not valid UTF-8{suffix}") from None
  if not isinstance(client_id, str):
    raise InvalidClientIdError(
        f"client id must be a string, got {type(client_id).__name__} {client_id!r}{suffix}")
  if not client_id:
    raise InvalidClientIdError(f"client id is empty{suffix}; every client needs a non-empty id")
  return client_id


# --------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------

def load_schema(name: str) -> dict[str, Any]:
  """Returns the parsed Avro schema `schemas/<name>.avsc`."""
  with open(os.path.join(_SCHEMA_DIR, f"{name}.avsc"), encoding="utf-8") as f:
    return json.load(f)


def parsed_schema(name: str):
  import fastavro  # pylint: disable=g-import-not-at-top
  return fastavro.parse_schema(load_schema(name))


# --------------------------------------------------------------------------
# Client id -> file (Python side, used by the writer)
# --------------------------------------------------------------------------

def _b64(data: bytes) -> str:
  return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _fingerprint_hex(client_id: str) -> str:
  """`tf.fingerprint(id, "farmhash64")` as hex (its bytes are little-endian)."""
  return fingerprint64(client_id.encode("utf-8")).to_bytes(8, "little").hex()


def client_file_name(client_id: str) -> str:
  """The file name of a client: base64url of the id, or prefix~fingerprint for long ids."""
  raw = check_client_id(client_id).encode("utf-8")
  if len(raw) <= MAX_PLAIN_ID_BYTES:
    return _b64(raw) + CLIENT_FILE_SUFFIX
  return _b64(raw[:LONG_ID_PREFIX_BYTES]) + "~" + _fingerprint_hex(client_id) + CLIENT_FILE_SUFFIX


def shard_of(client_id: str, num_shards: int) -> int:
  """The shard directory of a client: `tf.strings.to_hash_bucket_fast(id, num_shards)`."""
  return hash_bucket(check_client_id(client_id).encode("utf-8"), num_shards)


def shard_dir_name(shard: int) -> str:
  return f"{shard:05d}"


def data_dir_name(job_key: str) -> str:
  """The data directory of a job: 'data-' and 16 hex digits of the job key."""
  return DATA_DIR_PREFIX + job_key[:16]


def client_relative_path(client_id: str, split: str, num_shards: int) -> str:
  """`<split>/<shard>/<name>.tfrecord`, relative to the data directory, '/'-separated."""
  return posixpath.join(split, shard_dir_name(shard_of(client_id, num_shards)),
                        client_file_name(client_id))


def default_num_shards(num_clients: int) -> int:
  """Enough shard directories that each holds about TARGET_FILES_PER_SHARD files."""
  return max(1, -(-num_clients // TARGET_FILES_PER_SHARD))


def join(root: str, *parts: str) -> str:
  """Joins store paths with '/', which every Beam and TF filesystem accepts."""
  return posixpath.join(root.rstrip("/") if root != "/" else root, *parts)


# --------------------------------------------------------------------------
# Client id -> file (TensorFlow side, traceable, used by the reader)
# --------------------------------------------------------------------------

_HEX_BYTES = [f"{i:02x}" for i in range(256)]


def client_relative_path_tf(client_id, split, num_shards: int):
  """In-graph twin of `client_relative_path`: a scalar tf.string path.

  `client_id` and `split` are scalar tf.string tensors; O(1) per lookup, no
  table of ids.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  client_id = tf.convert_to_tensor(client_id, tf.string)
  shard = tf.strings.to_hash_bucket_fast(client_id, num_shards)
  shard_dir = tf.strings.as_string(shard, width=5, fill="0")

  def plain_name():
    return tf.io.encode_base64(client_id, pad=False)

  def long_name():
    prefix = tf.io.encode_base64(
        tf.strings.substr(client_id, 0, LONG_ID_PREFIX_BYTES, unit="BYTE"), pad=False)
    fp = tf.fingerprint(tf.reshape(client_id, [1]), method="farmhash64")[0]
    hex_digits = tf.gather(tf.constant(_HEX_BYTES), tf.cast(fp, tf.int32))
    return tf.strings.join([prefix, "~", tf.strings.reduce_join(hex_digits)])

  name = tf.cond(
      tf.strings.length(client_id, unit="BYTE") <= MAX_PLAIN_ID_BYTES, plain_name, long_name)
  return tf.strings.join([split, "/", shard_dir, "/", name, CLIENT_FILE_SUFFIX])


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
  deterministic serialization (map entries sorted by key, packed numbers),
  written directly because building the message value by value is the
  pipeline's slowest step.
  """
  entries = [_map_entry(f, np.asarray(values[f.name]).reshape(-1)) for f in _in_key_order(spec)]
  return _len_field(0x0A, b"".join(entries))


def _in_key_order(spec: ElementSpec) -> list[FeatureSpec]:
  # Deterministic serialization sorts map entries by their keys' bytes.
  return sorted(spec.features, key=lambda f: f.name.encode("utf-8"))


def encode_examples(columns: Mapping[str, np.ndarray], spec: ElementSpec,
                    count: int) -> list[bytes]:
  """`encode_example` of each of `count` elements stacked on axis 0 of `columns`.

  Gives the same bytes element by element. Features whose framing does not
  depend on the values (fixed-size floats) or that take few distinct values
  (one integer, such as a label) are framed once, not once per element.
  """
  if not count:
    return []
  per_feature = [_map_entries(f, np.asarray(columns[f.name]).reshape(count, -1))
                 for f in _in_key_order(spec)]
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
  """Each row's map entry: a [rows, size] uint8 matrix for fixed-size floats, else a list of bytes."""
  width = rows.shape[1]
  if f.encoding == "float" and width:
    # The framing of a fixed number of floats does not depend on them.
    raw = np.ascontiguousarray(rows, dtype="<f4").view(np.uint8)
    prefix = np.frombuffer(_map_entry(f, np.zeros(width, np.float32))[:-4 * width], np.uint8)
    return np.concatenate([np.broadcast_to(prefix, (len(rows), len(prefix))), raw], axis=1)
  if f.encoding == "int64" and width == 1:
    # One integer (a label) takes few distinct values across a whole job.
    return [_single_int_entry(f, v) for v in rows[:, 0].astype(np.int64).tolist()]
  return [_map_entry(f, row) for row in rows]


def _parse_config(f: FeatureSpec):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  wire = {"bytes": tf.string, "float": tf.float32, "int64": tf.int64, "bits64": tf.int64}[f.encoding]
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
  return any(f.is_variable_length for f in spec.features)


def make_batch_parser(spec: ElementSpec) -> Callable[[Any], "collections.OrderedDict"]:
  """Returns fn(serialized: tf.string[n]) -> OrderedDict of batched tensors.

  Only for specs without variable-length features (a batch would pad them).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  config = {f.name: _parse_config(f) for f in spec.features}

  def parse(serialized):
    parsed = tf.io.parse_example(serialized, config)
    return collections.OrderedDict((f.name, _restore_dtype(f, parsed[f.name])) for f in spec.features)

  return parse


class RecordDecodeError(ValueError):
  """A record that does not hold the element spec's features; names the record and feature."""


_LIST_OF_ENCODING = {"bytes": example_wire.BYTES_LIST, "float": example_wire.FLOAT_LIST,
                     "int64": example_wire.INT64_LIST, "bits64": example_wire.INT64_LIST}
_LIST_NAMES = {example_wire.BYTES_LIST: "bytes_list", example_wire.FLOAT_LIST: "float_list",
               example_wire.INT64_LIST: "int64_list", 0: "no list"}


# Wire types a list's values may come in: packed (2) or one value per field.
_WIRE_TYPES = {example_wire.BYTES_LIST: (2,), example_wire.FLOAT_LIST: (2, 5),
               example_wire.INT64_LIST: (2, 0)}


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


def decode_examples(records, spec: ElementSpec) -> dict[str, np.ndarray]:
  """The elements of serialized Examples, stacked on axis 0, without TensorFlow.

  The numpy twin of `make_batch_parser`: returns `feature name -> array of
  shape [len(records), *feature shape]` in the feature's dtype (strings as
  `bytes` in an object array), the values `tf.io.parse_example` with the
  spec's `FixedLenFeature`s and the same dtype restoration gives (tests pin
  the two). Features of a record that the spec does not name are ignored, as
  parse_example ignores them. Only for specs without variable-length
  features.

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
      raise RecordDecodeError(f"record {i}: feature {f.name!r} holds a {_LIST_NAMES[kind]}, "
                              f"the element spec ({f.dtype}) needs a {_LIST_NAMES[want]}")
    if want != example_wire.BYTES_LIST and len(pieces) > 1 and any(w == 2 for w, _, _ in pieces):
      # TensorFlow's parser would read only part of such a list.
      raise RecordDecodeError(f"record {i}: feature {f.name!r} holds its packed values in "
                              "more than one piece")
    count = 0
    for wire, s, e in pieces:
      if wire not in _WIRE_TYPES[want] or (wire == 2 and want == example_wire.FLOAT_LIST
                                            and (e - s) % 4):
        raise RecordDecodeError(f"record {i}: feature {f.name!r} holds malformed values")
      count += _count_values(want, wire, record[s:e])
    if count != f.inner_size:
      raise RecordDecodeError(f"record {i}: feature {f.name!r} has {count} values, which "
                              f"does not fit shape {list(f.shape)}")
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
        chunks = [np.ascontiguousarray(np.concatenate([sub[:, s:e] for s, e in spans], axis=1)
                                       if spans else sub[:, :0]).tobytes()]
      out[f.name][done] = _values(f, chunks, len(done))
  return rows[~alike].tolist()


def make_record_parser(spec: ElementSpec) -> Callable[[Any], "collections.OrderedDict"]:
  """Returns fn(serialized: scalar tf.string) -> OrderedDict element with the spec's dtypes/shapes."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  config = {f.name: _parse_config(f) for f in spec.features}

  def parse(serialized):
    parsed = tf.io.parse_single_example(serialized, config)
    return collections.OrderedDict((f.name, _restore_dtype(f, parsed[f.name])) for f in spec.features)

  return parse


# Records parsed per vectorized parse_example call when a spec has no
# variable-length feature.
PARSE_BATCH = 256


def records_to_elements(records, spec: ElementSpec):
  """Maps a dataset of serialized records to a dataset of elements with the spec's element_spec."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if has_variable_length(spec):
    return records.map(make_record_parser(spec), num_parallel_calls=tf.data.AUTOTUNE)
  return records.batch(PARSE_BATCH).map(
      make_batch_parser(spec), num_parallel_calls=tf.data.AUTOTUNE).unbatch()


# --------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------

def metadata_path(root: str) -> str:
  return join(root, METADATA_FILE)


def validate_metadata(metadata: Mapping[str, Any], where: str) -> None:
  """Checks a metadata document against schemas/metadata.avsc; raises StoreFormatError."""
  from fastavro.validation import validate  # pylint: disable=g-import-not-at-top
  from fastavro._validate_common import ValidationError  # pylint: disable=g-import-not-at-top
  try:
    validate(dict(metadata), parsed_schema("metadata"), raise_errors=True)
  except ValidationError as e:
    raise StoreFormatError(f"{where}: metadata does not match schemas/metadata.avsc: {e}") from None


FileOps = collections.namedtuple("FileOps", "exists isdir listdir makedirs open")


def file_ops(path: str) -> FileOps:
  """Directory and file functions for `path`: the os module's for local paths,
  tf.io.gfile's for URLs such as gs://.

  Local paths need no TensorFlow, which takes seconds and hundreds of MB to
  import in a process (the prepare job's runner and workers) that otherwise
  does not use it. `listdir` names have no trailing '/'.
  """
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    gfile = tf.io.gfile
    return FileOps(gfile.exists, gfile.isdir,
                   lambda d: [n.rstrip("/") for n in gfile.listdir(d)], gfile.makedirs,
                   gfile.GFile)
  return FileOps(os.path.exists, os.path.isdir, os.listdir,
                 lambda d: os.makedirs(d, exist_ok=True), open)


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
  if "://" in path:
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
      raise StoreFormatError(f"{what} {path} is a symbolic link; a store holds only regular "
                             "files") from None
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
  for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                     (stat.S_ISLNK, "symbolic link"), (stat.S_ISSOCK, "socket"),
                     (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
    if test(mode):
      return name
  return "special file"


def _check_size(size: int, max_bytes: Optional[int], what: str, path: str) -> None:
  if max_bytes is not None and size > max_bytes:
    raise StoreFormatError(f"{what} {path} has {size} bytes or more; fedbeam reads at most "
                           f"{max_bytes}")


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


def _json_depth(text: bytes) -> int:
  """How deeply the arrays and objects of a JSON text nest (brackets inside strings not counted)."""
  unquoted = re.sub(rb'"(?:[^"\\]|\\.)*"', b"", text)
  steps = np.frombuffer(unquoted, np.uint8)
  change = np.isin(steps, (ord("["), ord("{"))).astype(np.int64)
  change -= np.isin(steps, (ord("]"), ord("}")))
  return int(np.cumsum(change).max(initial=0))


@functools.lru_cache(maxsize=64)  # every manifest row names one of a store's few splits
def _is_split_name(name: str) -> bool:
  return bool(SPLIT_NAME_RE.fullmatch(name)) and name != MANIFEST_DIR


def check_split_name(name: Any, where: str) -> str:
  """Returns `name` if it is a valid split name (SPLIT_NAME_RE, not 'manifest').

  Raises:
    StoreFormatError: naming `where` and the pattern.
  """
  if not isinstance(name, str) or not _is_split_name(name):
    raise StoreFormatError(
        f"{where}: split name {name!r} is not a split directory name (letters, digits, '_' "
        f"and '-', starting with a letter or digit, at most 64 characters, not {MANIFEST_DIR!r})")
  return name


def read_metadata(root: str) -> dict[str, Any]:
  """Reads and checks `STORE/metadata.json`.

  Beyond its schema, the document is bounded (MAX_METADATA_BYTES,
  MAX_JSON_DEPTH) and its values must make sense: a supported dtype and a
  shape within `ElementSpec.check_size_limits` for every feature, valid and
  distinct split names, num_shards >= 1 and 1 <= manifest.num_files <=
  min(MAX_MANIFEST_FILES, max(1, number of clients)).

  Raises:
    StoreFormatError: no committed store at `root`, unreadable or malformed
      metadata, or a format version this fedbeam cannot read.
  """
  path = metadata_path(root)
  try:
    data = read_store_file(root, path, MAX_METADATA_BYTES, "metadata")
  except MissingStoreFileError:
    if _holds_data_dirs(root):
      raise StoreFormatError(
          f"{root} is not a committed fedbeam store: a write into it did not finish "
          f"({METADATA_FILE} is missing); rerun the job") from None
    raise StoreFormatError(f"{root} holds no committed fedbeam store ({path} not found)") from None
  if _json_depth(data) > MAX_JSON_DEPTH:
    raise StoreFormatError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
  try:
    metadata = json.loads(data.decode("utf-8"))
  except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
    raise StoreFormatError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(metadata, dict):
    raise StoreFormatError(f"{path}: expected a JSON object")
  version = metadata.get("format_version")
  if version != FORMAT_VERSION:
    raise StoreFormatError(
        f"{root}: store format version {version!r} is not supported by this fedbeam "
        f"(it reads version {FORMAT_VERSION}); use a fedbeam release that writes it")
  validate_metadata(metadata, path)
  data_dir = metadata["data_dir"]
  if (not data_dir.startswith(DATA_DIR_PREFIX) or "/" in data_dir or "\\" in data_dir
      or data_dir in (".", "..")):
    raise StoreFormatError(f"{path}: data_dir {data_dir!r} is not a data directory of the store")
  _check_metadata_values(metadata, path)
  return metadata


def _holds_data_dirs(root: str) -> bool:
  """Whether `root` is a directory holding data-* directories (False if it cannot be listed)."""
  fs = file_ops(root)
  try:
    return fs.isdir(root) and any(n.startswith(DATA_DIR_PREFIX) for n in fs.listdir(root))
  except Exception:  # pylint: disable=broad-except
    # OSError locally, tf.errors.OpError remotely: either way no store is there to read.
    return False


def _check_metadata_values(metadata: Mapping[str, Any], path: str) -> None:
  """The bounds of `read_metadata` that the schema cannot express."""
  try:
    ElementSpec.from_metadata(metadata["element_spec"]).check_size_limits(f"{path}: element_spec")
  except ElementSpecError as e:
    raise StoreFormatError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
  names = [check_split_name(s["name"], path) for s in metadata["splits"]]
  if len(set(names)) != len(names):
    raise StoreFormatError(f"{path}: split names {names} are not distinct")
  for s in metadata["splits"]:
    for field in ("num_clients", "num_examples", "num_bytes", "num_empty_clients"):
      if s[field] < 0:
        raise StoreFormatError(f"{path}: split {s['name']!r}: {field} is {s[field]}")
  if metadata["num_shards"] < 1:
    raise StoreFormatError(f"{path}: num_shards is {metadata['num_shards']}; it must be at least 1")
  num_clients = sum(s["num_clients"] for s in metadata["splits"])
  num_files = metadata["manifest"]["num_files"]
  most = min(MAX_MANIFEST_FILES, max(1, num_clients))
  if not 1 <= num_files <= most:
    raise StoreFormatError(
        f"{path}: manifest.num_files is {num_files}; a store of {num_clients} clients has "
        f"1 to {most} manifest files")


def data_root(root: str, metadata: Mapping[str, Any]) -> str:
  """The committed data directory of the store at `root`."""
  return join(root, metadata["data_dir"])


def metadata_to_json(metadata: Mapping[str, Any]) -> bytes:
  return (json.dumps(metadata, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode("utf-8")


# --------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------

def manifest_file_name(index: int, count: int) -> str:
  return f"part-{index:05d}-of-{count:05d}.avro"


def manifest_sync_marker(job_key: str, index: int) -> bytes:
  """A 16-byte Avro sync marker derived from the job and the file, so reruns are byte-identical."""
  import hashlib  # pylint: disable=g-import-not-at-top
  return hashlib.sha256(f"fedbeam-manifest:{job_key}:{index}".encode("utf-8")).digest()[:16]


def manifest_path(root: str, metadata: Mapping[str, Any], index: int) -> str:
  """The path of manifest file `index` of the store at `root`."""
  count = metadata["manifest"]["num_files"]
  return join(root, metadata["data_dir"], MANIFEST_DIR, manifest_file_name(index, count))


def manifest_spec_value(spec: ElementSpec) -> str:
  """The element spec as the writer puts it in a manifest file's header (MANIFEST_SPEC_KEY)."""
  return json.dumps(spec.to_metadata(), sort_keys=True, separators=(",", ":"))


def _check_manifest_spec(header: Mapping[str, Any], element_spec: Any, path: str) -> None:
  """Raises StoreFormatError if the manifest header's element spec differs from the metadata's.

  Manifest files written before the header carried the spec have none; they
  are not checked.
  """
  value = header.get(MANIFEST_SPEC_KEY)
  if value is None:
    return
  if isinstance(value, bytes):
    value = value.decode("utf-8", "replace")
  try:
    written = ElementSpec.from_metadata(json.loads(value))
  except (ValueError, TypeError, KeyError, ElementSpecError) as e:
    raise StoreFormatError(f"manifest file {path}: its element spec is unreadable: {e}") from None
  if written != ElementSpec.from_metadata(element_spec):
    raise StoreFormatError(
        f"manifest file {path} was written for element spec {written.to_json()}, but "
        f"metadata.json says {ElementSpec.from_metadata(element_spec).to_json()}: the metadata "
        "was edited or belongs to another store")


def check_manifest_spec(data: bytes, element_spec: Any, path: str) -> None:
  """Checks that the manifest file `data` was written for the metadata's `element_spec`.

  Raises:
    StoreFormatError: the file's header names another element spec (or is
      unreadable), naming `path`.
  """
  import fastavro  # pylint: disable=g-import-not-at-top
  try:
    header = fastavro.reader(io.BytesIO(data)).metadata
  except Exception as e:  # pylint: disable=broad-except
    raise StoreFormatError(f"manifest file {path} is damaged: {e}") from None
  _check_manifest_spec(header, element_spec, path)


def parse_manifest_file(data: bytes, path: str,
                        element_spec: Optional[Any] = None) -> list[dict[str, Any]]:
  """The rows of a manifest file's bytes, after `avro_container.check_blocks`.

  `element_spec`: the metadata's `element_spec`; when given, it must equal the
  spec the writer put in the file's header (`MANIFEST_SPEC_KEY`).

  Raises:
    StoreFormatError: the file is not a readable manifest, or its element spec
      differs from `element_spec`, naming `path`.
  """
  import fastavro  # pylint: disable=g-import-not-at-top
  try:
    count = avro_container.check_blocks(data, MIN_MANIFEST_ROW_BYTES)
    reader = fastavro.reader(io.BytesIO(data))
    # The file's own schema must be the manifest's, field for field, so every
    # row has exactly its fields and types. (Decoding with reader_schema would
    # check the same per row, at 2.5x the cost.)
    if _fields(reader.writer_schema) != _fields(load_schema("manifest")):
      raise StoreFormatError(f"manifest file {path} was not written with schemas/manifest.avsc "
                             f"(its fields: {_fields(reader.writer_schema)})")
    if element_spec is not None:
      _check_manifest_spec(reader.metadata, element_spec, path)
    rows = list(reader)
  except StoreFormatError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise StoreFormatError(f"manifest file {path} is damaged: {e}") from None
  if len(rows) != count:
    raise StoreFormatError(f"manifest file {path} is damaged: its blocks hold {count} rows, "
                           f"{len(rows)} were decoded")
  return rows


def _fields(schema: Any) -> list:
  """[(name, type)] of a record schema's fields; [] for anything else."""
  if not isinstance(schema, dict) or not isinstance(schema.get("fields"), list):
    return []
  return [(f.get("name"), f.get("type")) for f in schema["fields"] if isinstance(f, dict)]


def check_manifest_row(row: Mapping[str, Any], min_record_bytes: int, where: str) -> None:
  """Checks the values of one manifest row that fastavro's types do not bound.

  The client id must be storable, the split a valid name, the counts
  non-negative, and the file big enough for its examples: num_examples *
  `min_record_bytes` (`ElementSpec.min_record_bytes()` of the store's spec)
  <= num_bytes.

  Raises:
    StoreFormatError: naming `where` and the client.
  """
  try:
    cid = check_client_id(row["client_id"])
  except InvalidClientIdError as e:
    raise StoreFormatError(f"{where}: {e}") from None
  who = f"{where}: client {cid!r}"
  check_split_name(row["split"], who)
  n, size = row["num_examples"], row["num_bytes"]
  if n < 0 or size < 0:
    raise StoreFormatError(f"{who}: num_examples {n} and num_bytes {size} must not be negative")
  if n * min_record_bytes > size:
    raise StoreFormatError(
        f"{who}: {n} examples of the element spec take at least {n * min_record_bytes} bytes, "
        f"the manifest says the file has {size}")


def check_manifest_rows(rows: list[Mapping[str, Any]], min_record_bytes: int, where: str) -> None:
  """`check_manifest_row` for every row, at a fraction of its cost per row.

  One pass over the rows finds the first that breaks a bound (each split
  name is checked once); that row goes through `check_manifest_row` for the
  message.

  Raises:
    StoreFormatError: as `check_manifest_row`, for the first row at fault.
  """
  bad_splits = {r["split"] for r in rows if not isinstance(r["split"], str) or not
                _is_split_name(r["split"])}
  bad = next((r for r in rows
              if not isinstance(r["client_id"], str) or not r["client_id"]
              or r["split"] in bad_splits or r["num_examples"] < 0 or r["num_bytes"] < 0
              or r["num_examples"] * min_record_bytes > r["num_bytes"]), None)
  if bad is not None:
    check_manifest_row(bad, min_record_bytes, where)


def read_manifest(root: str, metadata: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
  """Yields every manifest row of the store (all splits), file by file.

  Each file is read whole (at most MAX_MANIFEST_FILE_BYTES, regular files
  only; see `read_store_file`), its Avro framing checked, and every row
  checked with `check_manifest_rows`. `metadata` is what `read_metadata`
  returned.

  Raises:
    StoreFormatError: a manifest file is missing, damaged or holds a row out
      of bounds, naming the file (and the client).
  """
  count = metadata["manifest"]["num_files"]
  least = ElementSpec.from_metadata(metadata["element_spec"]).min_record_bytes()
  for i in range(count):
    path = manifest_path(root, metadata, i)
    try:
      data = read_store_file(root, path, MAX_MANIFEST_FILE_BYTES, "manifest file")
    except MissingStoreFileError:
      raise StoreFormatError(
          f"manifest file {path} is missing (metadata lists {count} files)") from None
    rows = parse_manifest_file(data, path, metadata["element_spec"])
    check_manifest_rows(rows, least, f"manifest file {path}")
    yield from rows


# --------------------------------------------------------------------------
# TFRecord framing
# --------------------------------------------------------------------------

def _masked_crc(data: bytes) -> int:
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
      header = headers[n] = length + pack_crc(_masked_crc(length))
    yield header
    yield record
    yield pack_crc(_mask(crc_of(record)))


class CorruptRecordError(ValueError):
  """A TFRecord stream that is truncated or fails its CRC check."""


def read_tfrecords(f) -> Iterable[bytes]:
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
    if _masked_crc(header[:8]) != length_crc:
      raise CorruptRecordError(f"record {index}: length CRC mismatch (not a TFRecord file, or "
                               "damaged)")
    if end is not None and length + 4 > end - f.tell():
      raise CorruptRecordError(f"record {index}: truncated data (its length {length} does not "
                               f"fit in the {end - f.tell()} bytes left in the file)")
    data = _read_at_most(f, length)
    footer = f.read(4)
    if len(data) < length or len(footer) < 4:
      raise CorruptRecordError(f"record {index}: truncated data")
    if _masked_crc(data) != struct.unpack("<I", footer)[0]:
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


__all__ = [
    "FORMAT_VERSION", "METADATA_FILE", "MANIFEST_DIR", "DATA_DIR_PREFIX", "LEASE_FILE", "UNSPLIT",
    "data_dir_name", "data_root",
    "ElementSpec", "ElementSpecError", "StoreFormatError", "InvalidClientIdError",
    "check_client_id", "client_file_name", "shard_of", "client_relative_path",
    "client_relative_path_tf", "default_num_shards", "encode_example", "encode_examples",
    "features_field_header",
    "make_record_parser", "make_batch_parser", "records_to_elements", "read_metadata",
    "read_manifest", "checksum", "manifest_sync_marker", "manifest_file_name",
    "MissingStoreFileError", "read_store_file", "file_kind", "remote_error_line",
    "check_split_name", "check_manifest_row", "check_manifest_rows", "parse_manifest_file",
    "MANIFEST_SPEC_KEY", "manifest_spec_value", "check_manifest_spec",
    "manifest_path",
    "read_tfrecords", "CorruptRecordError",
]
