"""Input sources: TFRecord of tf.train.Example, Avro, TFF SQLite client data, and the rest.

Parquet is read by `fedbeam.pipelines.parquet_source`, CSV, JSON Lines and
LEAF's JSON by `fedbeam.pipelines.text_sources`; `ReadClientInput` picks the
reader of a format.

Each source is a `beam.PTransform` applied to the pipeline root that outputs
lists of `InputRecord`s (TFRecord and TFF SQLite: `ExampleBatch`es), plus a PCollection of
client ids the input declares even when they have no example (TFF's SQLite
`client_metadata` can list empty clients).
Files are read whole by one worker each, in a DoFn, so every record keeps
its file and index for error messages and for `--order-by @input`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sqlite3
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from fedbeam.format.layout import InvalidClientIdError, check_client_id
from fedbeam.format.tfrecord import CorruptRecordError, read_tfrecords
from fedbeam.pipelines.example_records import ExampleBatch
from fedbeam.pipelines.raw_values import client_id_of, typed_feature
from fedbeam.pipelines.records import (
  BOOL,
  FLOAT32,
  FLOAT64,
  INT32,
  INT64,
  STRING,
  InputError,
  InputRecord,
)

__all__ = [
  "INPUT_FORMATS",
  "BATCH_RECORDS",
  "BATCH_BYTES",
  "SQLITE_ROWS_PER_RANGE",
  "match_input_files",
  "ReadTFRecordExamples",
  "ReadAvroRecords",
  "sqlite_split_names",
  "kept_split_key",
  "kept_split_client",
  "sqlite_row_ranges",
  "sqlite_splits",
  "sqlite_row_count",
  "ReadTffSqlite",
  "needs_client_id_key",
  "declares_clients",
  "ReadClientInput",
]

INPUT_FORMATS = ("tfrecord", "avro", "tff-sqlite", "parquet", "csv", "jsonl", "leaf")
# Records of a TFRecord file handed on together (see ExampleBatch).
BATCH_RECORDS = 2048
BATCH_BYTES = 8 << 20
# Rows of a TFF SQLite database read by one work item: small enough that the
# ranges spread evenly over the workers (one range of 20,000 rows beside a
# short one left a worker idle for a third of the read), two batches each.
SQLITE_ROWS_PER_RANGE = 2 * BATCH_RECORDS


def match_input_files(pattern: str) -> list[tuple[str, int, float]]:
  """Expands a file pattern (comma-separated patterns allowed).

  A local pattern without a directory (`digits-*.tfrecord`) matches in the
  current directory, as a shell would (Beam's local filesystem lists only
  the directory a pattern names, and such a pattern names none).

  Returns sorted (path, size in bytes, modification time) triples.

  Raises:
    InputError: a pattern matches no file.
  """
  found_all: dict[str, tuple[str, int, float]] = {}
  for part in [p.strip() for p in pattern.split(",") if p.strip()]:
    if "://" not in part and not os.path.dirname(part):
      part_to_match = os.path.join(os.curdir, part)
    else:
      part_to_match = part
    try:
      result = FileSystems.match([part_to_match])[0]
    except Exception as e:  # pylint: disable=broad-except
      raise InputError(f"--input {part!r}: cannot list files: {e}") from None
    if not result.metadata_list:
      raise InputError(f"--input {part!r} matches no file")
    for m in result.metadata_list:
      found_all[m.path] = (
        m.path,
        int(m.size_in_bytes),
        float(getattr(m, "last_updated_in_seconds", 0) or 0),
      )
  return [found_all[p] for p in sorted(found_all)]


# ----------------------------------------------------------------------------
# tf.train.Example
# ----------------------------------------------------------------------------


class _ReadTFRecordFile(beam.DoFn):
  """path -> `ExampleBatch`es of the file's records, in order."""

  def __init__(self, client_id_key: Optional[str]):
    # None: the records hold no client id (a partitioner assigns them).
    self._client_id_key = client_id_key
    self._records = beam.metrics.Metrics.counter("fedbeam", "input_records")

  def process(self, path: str) -> Iterable[ExampleBatch]:
    first = 0
    for records in _record_batches(path):
      yield ExampleBatch(path, first, records, self._client_id_key)
      self._records.inc(len(records))
      first += len(records)


def _record_batches(path: str) -> Iterable[list[bytes]]:
  """The records of a TFRecord file in lists of at most BATCH_RECORDS records or about BATCH_BYTES."""
  batch: list[bytes] = []
  size = 0
  try:
    with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as f:
      for data in read_tfrecords(f):
        batch.append(data)
        size += len(data)
        if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES:
          yield batch
          batch, size = [], 0
  except CorruptRecordError as e:
    raise InputError(f"{path}: unreadable TFRecord file: {e}") from None
  except (OSError, IOError) as e:
    raise InputError(f"{path}: cannot read: {e}") from None
  if batch:
    yield batch


def _in_lists(records: Iterable[InputRecord]) -> Iterable[list[InputRecord]]:
  """`records` in lists of at most BATCH_RECORDS, so one reader output element holds many."""
  batch: list[InputRecord] = []
  for record in records:
    batch.append(record)
    if len(batch) >= BATCH_RECORDS:
      yield batch
      batch = []
  if batch:
    yield batch


class _ReadFiles(beam.PTransform):
  """Spreads a list of files over the workers and reads each whole with `reader_cls`."""

  reader_cls: type = None

  def __init__(self, paths: Sequence[str], client_id_key: Optional[str]):
    super().__init__()
    self._paths = list(paths)
    self._client_id_key = client_id_key

  def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
    return (
      pbegin
      | "ListFiles" >> beam.Create(self._paths)
      | "SpreadFiles" >> beam.Reshuffle()
      | "ReadFiles" >> beam.ParDo(self.reader_cls(self._client_id_key))
    )


class ReadTFRecordExamples(_ReadFiles):
  """Reads TFRecord files of serialized tf.train.Example.

  Input: the pipeline root. Output: `ExampleBatch`es (`as_input_records`
  gives their `InputRecord`s); the bytes feature `client_id_key` (one UTF-8
  string) is the client id and is not a feature.
  """

  reader_cls = _ReadTFRecordFile


# ----------------------------------------------------------------------------
# Avro
# ----------------------------------------------------------------------------

_AVRO_KINDS = {
  "string": STRING,
  "bytes": STRING,
  "enum": STRING,
  "fixed": STRING,
  "int": INT32,
  "long": INT64,
  "float": FLOAT32,
  "double": FLOAT64,
  "boolean": BOOL,
}
_EPOCH_DATE = datetime.date(1970, 1, 1)
_EPOCH = datetime.datetime(1970, 1, 1)
_EPOCH_UTC = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _micros_since_epoch(value: datetime.datetime) -> int:
  delta = value - (_EPOCH if value.tzinfo is None else _EPOCH_UTC)
  return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _micros_of_day(value: datetime.time) -> int:
  return ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + value.microsecond


def _as_int(convert):
  # fastavro hands the underlying int on when it cannot decode a value.
  return lambda v: v if isinstance(v, int) else convert(v)


# Avro logical type -> (kind, convert what fastavro decodes into the underlying
# value: days, milliseconds or microseconds as Avro stores them).
_AVRO_LOGICAL = {
  "date": (INT32, _as_int(lambda v: (v - _EPOCH_DATE).days)),
  "time-millis": (INT32, _as_int(lambda v: _micros_of_day(v) // 1000)),
  "time-micros": (INT64, _as_int(_micros_of_day)),
  "timestamp-millis": (INT64, _as_int(lambda v: _micros_since_epoch(v) // 1000)),
  "timestamp-micros": (INT64, _as_int(_micros_since_epoch)),
  "local-timestamp-millis": (INT64, _as_int(lambda v: _micros_since_epoch(v) // 1000)),
  "local-timestamp-micros": (INT64, _as_int(_micros_since_epoch)),
  "uuid": (STRING, str),
  "decimal": (FLOAT64, float),
}


@dataclasses.dataclass(frozen=True)
class _AvroField:
  """How to read one Avro field: kind, array depth, and a converter of each leaf value."""

  kind: str
  depth: int
  convert: Optional[Callable[[Any], Any]] = None


def _avro_field(schema, field: str, path: str) -> _AvroField:
  """How to read an Avro field; unions with null are allowed (null is an error later)."""
  if isinstance(schema, list):
    branches = [s for s in schema if s != "null"]
    if len(branches) != 1:
      raise InputError(
        f'{path}: Avro field {field!r} is a union {schema}; only ["null", T] is supported'
      )
    schema = branches[0]
  if isinstance(schema, dict):
    t = schema.get("type")
    if t == "array":
      inner = _avro_field(schema["items"], field, path)
      return _AvroField(inner.kind, inner.depth + 1, inner.convert)
    logical = schema.get("logicalType")
    if logical in _AVRO_LOGICAL:
      kind, convert = _AVRO_LOGICAL[logical]
      return _AvroField(kind, 0, convert)
    if t in ("enum", "fixed"):
      return _AvroField(STRING, 0)
    if isinstance(t, str) and t in _AVRO_KINDS:
      # A logical type fastavro does not know is read as its underlying type.
      return _AvroField(_AVRO_KINDS[t], 0)
    raise InputError(f"{path}: Avro field {field!r} has unsupported type {schema}")
  if schema in _AVRO_KINDS:
    return _AvroField(_AVRO_KINDS[schema], 0)
  raise InputError(f"{path}: Avro field {field!r} has unsupported type {schema!r}")


def _converted(value, depth: int, convert):
  if value is None:
    return None
  if depth == 0:
    return convert(value)
  if not isinstance(value, list):
    return value
  return [_converted(v, depth - 1, convert) for v in value]


class _ReadAvroFile(beam.DoFn):
  def __init__(self, client_id_key: Optional[str]):
    self._client_id_key = client_id_key
    self._records = beam.metrics.Metrics.counter("fedbeam", "input_records")

  def process(self, path: str) -> Iterable[list[InputRecord]]:
    import fastavro  # pylint: disable=g-import-not-at-top

    read = [0]  # Records read so far, for the error message.
    try:
      with FileSystems.open(path) as f:
        reader = fastavro.reader(f)
        schema = reader.writer_schema
        if not isinstance(schema, dict) or schema.get("type") != "record":
          raise InputError(f"{path}: Avro file does not hold records")
        fields = {}
        for field in schema["fields"]:
          if field["name"] != self._client_id_key:
            fields[field["name"]] = _avro_field(field["type"], field["name"], path)
        yield from _in_lists(self._records_of(reader, fields, path, read))
    except InputError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise InputError(f"{path}: unreadable Avro file at record {read[0]}: {e}") from None

  def _records_of(self, reader, fields, path: str, read: list) -> Iterable[InputRecord]:
    for row in reader:
      index = read[0]
      yield self._to_record(row, fields, f"{path} record {index}", (path, index))
      self._records.inc()
      read[0] += 1

  def _to_record(self, row, fields, source, position) -> InputRecord:
    if self._client_id_key is None:
      client_id = ""  # A partitioner assigns it.
    elif self._client_id_key not in row:
      raise InputError(
        f"{source}: client-id field {self._client_id_key!r} is missing "
        f"(fields present: {sorted(row)})"
      )
    else:
      client_id = client_id_of(row[self._client_id_key], self._client_id_key, source)
    features = {}
    for name, field in fields.items():
      value = row.get(name)
      if field.convert is not None:
        try:
          value = _converted(value, field.depth, field.convert)
        except (TypeError, ValueError, AttributeError) as e:
          raise InputError(f"{source}: field {name!r}: cannot convert {value!r} ({e})") from None
      features[name] = typed_feature(value, field.kind, field.depth, name, source)
    return InputRecord(client_id, features, position)


class ReadAvroRecords(_ReadFiles):
  """Reads Avro container files of flat records.

  Input: the pipeline root. Output: lists of `InputRecord`s (up to BATCH_RECORDS, in
  file order); the string or integer field `client_id_key` is the client id
  (an integer as its decimal string); every other field is a feature:
  scalars of string/bytes/enum/fixed/int/long/float/double/boolean or of
  a logical type (date -> int32 days, time-millis -> int32 ms, time-micros
  -> int64 us, [local-]timestamp-millis/micros -> int64 since the epoch in
  that unit, uuid -> string, decimal -> float64), and arrays of them nested
  to any depth (rectangular: an array of arrays is a dimension each).
  """

  reader_cls = _ReadAvroFile


# ----------------------------------------------------------------------------
# TFF SQLite client data
# ----------------------------------------------------------------------------


def _connect_readonly(path: str) -> sqlite3.Connection:
  return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def sqlite_split_names(split: Optional[Union[str, Sequence[str]]]) -> Optional[tuple[str, ...]]:
  """`--sqlite-split` as a tuple of names (one name may be given as a string), or None."""
  if split is None:
    return None
  return (split,) if isinstance(split, str) else tuple(split)


def _split_filter(split: Optional[Union[str, Sequence[str]]]) -> tuple[str, list]:
  """SQL condition on `split_name` (or "1" for every row) and its parameters."""
  names = sqlite_split_names(split)
  if names is None:
    return "1", []
  return f"split_name IN ({', '.join('?' * len(names))})", list(names)


# Between the reader and `kept_split_client`, a client of a TFF split kept as a
# store split is keyed by split and id: TFF's databases hold the same id in
# several splits (EMNIST's writers are in train and test). Split names hold no
# '/' (fedbeam.format.layout.SPLIT_NAME_RE), so the first '/' ends the split.
def kept_split_key(split_name: str, client_id: str) -> str:
  """The grouping key of `client_id` in TFF split `split_name` (`--keep-sqlite-splits`)."""
  return f"{split_name}/{client_id}"


def kept_split_client(key: str) -> tuple[str, str]:
  """(split name, client id) of a `kept_split_key`."""
  split_name, _, client_id = key.partition("/")
  return split_name, client_id


def sqlite_row_ranges(
  path: str, split_name: Optional[Union[str, Sequence[str]]]
) -> list[tuple[int, int]]:
  """Splits the `examples` table of a TFF SQLite database into rowid ranges.

  Raises:
    InputError: not a local file, not SQLite, not TFF's layout, or a split
      name (`--sqlite-split`) the database does not hold; the message lists
      the split names it holds.
  """
  if "://" in path:
    raise InputError(
      f"--input {path}: TFF SQLite databases must be local files (copy it to the machine first)"
    )
  if not os.path.isfile(path):
    raise InputError(f"--input {path}: no such file")
  try:
    with _connect_readonly(path) as con:
      tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
      missing = {"examples", "client_metadata"} - tables
      if missing:
        raise InputError(
          f"{path}: not a TFF client-data database (missing table(s) "
          f"{sorted(missing)}; found {sorted(tables)})"
        )
      names = sqlite_split_names(split_name)
      if names is not None:
        present = _splits_in(con)
        absent = [n for n in names if n not in present]
        if absent:
          raise InputError(
            f"--sqlite-split {absent[0]!r}: {path} has no such split; its splits are "
            + (", ".join(repr(n) for n in sorted(present, key=str)) or "none")
          )
      lo, hi = con.execute("SELECT min(rowid), max(rowid) FROM examples").fetchone()
  except sqlite3.DatabaseError as e:
    raise InputError(f"{path}: not a readable SQLite database ({e})") from None
  if lo is None:
    return []
  return [
    (start, min(start + SQLITE_ROWS_PER_RANGE - 1, hi))
    for start in range(lo, hi + 1, SQLITE_ROWS_PER_RANGE)
  ]


def _splits_in(con: sqlite3.Connection) -> set:
  return {
    r[0]
    for r in con.execute(
      "SELECT DISTINCT split_name FROM client_metadata UNION "
      "SELECT DISTINCT split_name FROM examples"
    )
  }


def sqlite_splits(path: str) -> list[str]:
  """The split names a TFF SQLite database holds (in either table), sorted.

  Raises InputError as `sqlite_row_ranges` does (call that first).
  """
  try:
    with _connect_readonly(path) as con:
      return sorted(_splits_in(con), key=str)
  except sqlite3.DatabaseError as e:
    raise InputError(f"{path}: not a readable SQLite database ({e})") from None


def sqlite_row_count(path: str, split_name: Optional[Union[str, Sequence[str]]]) -> int:
  """The rows of the `examples` table of a TFF SQLite database (of `split_name`, if given).

  The records the readers must deliver, declared by the input itself. Raises
  InputError as `sqlite_row_ranges` does (call that first).
  """
  condition, params = _split_filter(split_name)
  try:
    with _connect_readonly(path) as con:
      return int(
        con.execute(f"SELECT count(*) FROM examples WHERE {condition}", params).fetchone()[0]
      )
  except sqlite3.DatabaseError as e:
    raise InputError(f"{path}: not a readable SQLite database ({e})") from None


class _ReadSqliteRange(beam.DoFn):
  """A rowid range -> `ExampleBatch`es of its rows (ids from the `client_id` column).

  The rows leave as bytes, parsed only by the steps that need their values:
  a parsed message per row would be pickled between steps, which cost most
  of the job's time. With `keep_splits` the ids are `kept_split_key`s.
  """

  def __init__(self, path: str, split_name: Optional[Sequence[str]], keep_splits: bool = False):
    self._path = path
    self._split_name = split_name
    self._keep_splits = keep_splits
    self._records = beam.metrics.Metrics.counter("fedbeam", "input_records")

  def process(self, row_range: tuple[int, int]) -> Iterable[ExampleBatch]:
    condition, params = _split_filter(self._split_name)
    query = (
      "SELECT rowid, client_id, serialized_example_proto, split_name FROM examples "
      f"WHERE rowid BETWEEN ? AND ? AND {condition}"
    )
    path = self._path
    with _connect_readonly(path) as con:
      cursor = con.execute(query, list(row_range) + params)
      while True:
        rows = cursor.fetchmany(BATCH_RECORDS)
        if not rows:
          break
        ids = []
        for rowid, raw_id, _, split in rows:
          try:
            client_id = check_client_id(raw_id, f"{path} rowid {rowid}")
          except InvalidClientIdError as e:
            raise InputError(str(e)) from None
          ids.append(kept_split_key(split, client_id) if self._keep_splits else client_id)
        rowids = tuple(row[0] for row in rows)
        yield ExampleBatch(
          path,
          rowids[0],
          [bytes(row[2]) for row in rows],
          None,
          client_ids=tuple(ids),
          indices=rowids,
          index_name="rowid",
        )
        self._records.inc(len(rows))


def _sqlite_declared_clients(
  path: str, split_name: Optional[Sequence[str]], keep_splits: bool = False
) -> Iterable[str]:
  condition, params = _split_filter(split_name)
  query = f"SELECT DISTINCT client_id, split_name FROM client_metadata WHERE {condition}"
  seen = set()
  with _connect_readonly(path) as con:
    for raw_id, split in con.execute(query, params):
      try:
        client_id = check_client_id(raw_id, f"{path} table client_metadata")
      except InvalidClientIdError as e:
        raise InputError(str(e)) from None
      key = kept_split_key(split, client_id) if keep_splits else client_id
      if key not in seen:  # An id of several splits is one client unless they are kept.
        seen.add(key)
        yield key


class ReadTffSqlite(beam.PTransform):
  """Reads a database written by `tff.simulation.datasets.save_to_sql_client_data`.

  Input: the pipeline root. Output: a dict with `records` (`ExampleBatch`es of
  the `examples` table's rows, ids given by its `client_id` column) and
  `clients` (every id in `client_metadata`, so clients without examples are
  kept). `split_name` (one name or several) filters both tables like TFF's
  `load_and_parse_sql_client_data(..., split_name=...)`, for each name.
  With `keep_splits`, ids are `kept_split_key(split_name, id)`, so a client
  of several splits stays one client per split.
  """

  def __init__(
    self,
    path: str,
    split_name: Optional[Union[str, Sequence[str]]] = None,
    keep_splits: bool = False,
  ):
    super().__init__()
    self._path = path
    self._split_name = sqlite_split_names(split_name)
    self._keep_splits = keep_splits

  def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.PCollection]:
    ranges = sqlite_row_ranges(self._path, self._split_name)
    path, split, keep = self._path, self._split_name, self._keep_splits
    records = (
      pbegin
      | "RowRanges" >> beam.Create(ranges)
      | "SpreadRanges" >> beam.Reshuffle()
      | "ReadRows" >> beam.ParDo(_ReadSqliteRange(path, split, keep))
    )
    clients = (
      pbegin
      | "Database" >> beam.Create([path])
      | "ReadClientMetadata" >> beam.FlatMap(lambda p: _sqlite_declared_clients(p, split, keep))
    )
    return {"records": records, "clients": clients}


def needs_client_id_key(input_format: str) -> bool:
  """Whether records of the format name their client in a field (`--client-id-key`).

  TFF SQLite has a client_id column and LEAF files are keyed by user.
  """
  return input_format not in ("tff-sqlite", "leaf")


def declares_clients(input_format: str) -> bool:
  """Whether the format can list clients that have no record (TFF SQLite's client_metadata)."""
  return input_format == "tff-sqlite"


class ReadClientInput(beam.PTransform):
  """Reads any supported input. Output: {"records": ExampleBatch | list[InputRecord], "clients": str}.

  `clients` is empty unless `declares_clients(input_format)`. With `unkeyed`,
  the records have no client id yet (`ExampleBatch`es without ids, records
  with an empty id): `fedbeam.pipelines.partition` assigns them.
  """

  def __init__(
    self,
    paths: Sequence[str],
    input_format: str,
    client_id_key: Optional[str] = None,
    sqlite_split: Optional[Union[str, Sequence[str]]] = None,
    unkeyed: bool = False,
    keep_sqlite_splits: bool = False,
  ):
    """`unkeyed`: the input has no client id (TFRecord, Avro); a partitioner assigns them.

    `keep_sqlite_splits`: TFF SQLite ids are `kept_split_key`s (see `ReadTffSqlite`).
    """
    super().__init__()
    if input_format not in INPUT_FORMATS:
      raise InputError(f"--input-format {input_format!r}: use one of {list(INPUT_FORMATS)}")
    if unkeyed and (client_id_key or input_format not in ("tfrecord", "avro")):
      raise InputError(
        f"--partition takes --input-format tfrecord or avro without "
        f"--client-id-key (got {input_format}"
        + (f" with --client-id-key {client_id_key})" if client_id_key else ")")
      )
    if needs_client_id_key(input_format) and not client_id_key and not unkeyed:
      raise InputError(f"--client-id-key is required with --input-format {input_format}")
    if input_format == "tff-sqlite" and len(paths) != 1:
      raise InputError(f"--input-format tff-sqlite reads one database, got {len(paths)} files")
    self._paths = list(paths)
    self._format = input_format
    self._key = client_id_key
    self._sqlite_split = sqlite_split
    self._keep_sqlite_splits = keep_sqlite_splits

  def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.PCollection]:
    if self._format == "tff-sqlite":
      return pbegin | "TffSqlite" >> ReadTffSqlite(
        self._paths[0], self._sqlite_split, self._keep_sqlite_splits
      )
    # The other readers import this module, so they are imported here.
    # pylint: disable-next=g-import-not-at-top
    from fedbeam.pipelines import parquet_source, text_sources

    reader_cls, label = {
      "tfrecord": (ReadTFRecordExamples, "TFRecord"),
      "avro": (ReadAvroRecords, "Avro"),
      "parquet": (parquet_source.ReadParquetRecords, "Parquet"),
      "csv": (text_sources.ReadCsvRecords, "Csv"),
      "jsonl": (text_sources.ReadJsonLinesRecords, "JsonLines"),
      "leaf": (text_sources.ReadLeafRecords, "Leaf"),
    }[self._format]
    records = pbegin | label >> reader_cls(self._paths, self._key)
    clients = pbegin | "NoDeclaredClients" >> beam.Create([])
    return {"records": records, "clients": clients}
