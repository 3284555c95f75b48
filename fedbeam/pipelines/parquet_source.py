"""Parquet input: files of rows with a client-id column, read with pyarrow in record batches.

Hugging Face `datasets` and Flower Datasets export Parquet (Arrow). One
worker reads a whole file (so every row keeps its file and row number for
error messages and `--order-by @input`), in record batches of
`sources.BATCH_RECORDS` rows. Each column of a batch is converted once, with
Arrow and numpy (values, list offsets, null and shape checks); a row's
features are then slices of those arrays.

The batches travel as `ColumnBatch`es, which the encoder turns into store
records a column at a time (`column_batches.encode_columns`).

Columns: the client-id column holds strings, binary (UTF-8) or integers (an
integer id is stored as its decimal string). Every other column is a
feature: booleans, integers and floats of any width (the dtype is the
column's), strings and binary (string), timestamps, dates, times and
durations (their integer count in the column's unit: int64, date32 and
time32 int32), decimals (float64), dictionary-encoded columns as their
values, and lists of these nested to any depth (`list`, `large_list`,
`fixed_size_list`), which must be rectangular in each row: a list of 28
lists of 28 floats is a `[28, 28]` value. Structs, maps and nulls are
refused, naming the file, row and column.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
import numpy as np

from fedbeam.format.layout import InvalidClientIdError, check_client_id
from fedbeam.pipelines import sources
from fedbeam.pipelines.column_batches import Column, ColumnBatch
from fedbeam.pipelines.records import BOOL, STRING, InputError

_INT_KINDS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_FLOAT_KINDS = ("float16", "float32", "float64")


def _leaf_kind(t, pa) -> tuple[str, Optional[object]]:
  """(kind, Arrow type to cast to first or None) of a non-list Arrow type; (None, None): refused."""
  types = pa.types
  if types.is_boolean(t):
    return BOOL, None
  for kind in _INT_KINDS + _FLOAT_KINDS:
    if t == pa.type_for_alias(kind):
      return kind, None
  if types.is_string(t):
    return STRING, pa.binary()
  if types.is_large_string(t):
    return STRING, pa.large_binary()
  if types.is_binary(t) or types.is_large_binary(t) or types.is_fixed_size_binary(t):
    return STRING, None
  if types.is_date32(t) or types.is_time32(t):
    return "int32", pa.int32()
  if types.is_timestamp(t) or types.is_date64(t) or types.is_time64(t) or types.is_duration(t):
    return "int64", pa.int64()
  if types.is_decimal(t):
    return "float64", pa.float64()
  return None, None


def _is_list(t, pa) -> bool:
  return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


@dataclasses.dataclass(frozen=True)
class _ColumnType:
  kind: str
  depth: int
  cast: Optional[object]


def _column_type(t, name: str, path: str, pa) -> _ColumnType:
  """How a feature column of Arrow type `t` is read; raises InputError if it cannot be."""
  depth = 0
  inner = t
  while True:
    if pa.types.is_dictionary(inner):
      inner = inner.value_type
    if not _is_list(inner, pa):
      break
    depth += 1
    inner = inner.value_type
  kind, cast = _leaf_kind(inner, pa)
  if kind is None:
    hint = " (flatten it into columns of their own)" if pa.types.is_struct(inner) else ""
    raise InputError(
      f"{path}: column {name!r} has Arrow type {t}, which fedbeam cannot store"
      f"{hint}; use booleans, numbers, strings, binary, temporal types or "
      "lists of them"
    )
  return _ColumnType(kind, depth, cast)


def _first_null(arr, lo: int, hi: int) -> Optional[int]:
  """Index of the first null of `arr` in [lo, hi), or None."""
  if arr.null_count == 0 or hi <= lo:
    return None
  nulls = np.flatnonzero(np.asarray(arr.slice(lo, hi - lo).is_null()))
  return lo + int(nulls[0]) if nulls.size else None


def _list_offsets(arr, pa) -> np.ndarray:
  """Offsets of a list array's rows into `arr.values` (which ignores slicing)."""
  if pa.types.is_fixed_size_list(arr.type):
    size = arr.type.list_size
    return (arr.offset + np.arange(len(arr) + 1, dtype=np.int64)) * size
  return np.asarray(arr.offsets, dtype=np.int64)


def _convert_column(arr, ctype: _ColumnType, name: str, path: str, first: int, pa) -> Column:
  """Converts one batch column; raises InputError naming the row of a null or ragged value."""
  n = len(arr)

  def fail(row: int, what: str):
    raise InputError(f"{path} row {first + row}: column {name!r} {what}")

  if pa.types.is_dictionary(arr.type):
    arr = arr.dictionary_decode()
  null = _first_null(arr, 0, n)
  if null is not None:
    fail(null, "is null; fedbeam needs a value in every row")
  if not n:
    return Column(
      ctype.kind,
      ctype.depth,
      np.empty(0),
      np.empty(0, np.int64),
      np.empty(0, np.int64),
      np.zeros((0, ctype.depth), np.int64),
    )
  # Row r's elements at the current level are level[starts[r]:ends[r]]
  # (at the top, row r itself); they are contiguous over the batch.
  starts, ends = np.arange(n, dtype=np.int64), np.arange(1, n + 1, dtype=np.int64)
  dims = np.zeros((n, ctype.depth), dtype=np.int64)
  level = arr
  for k in range(ctype.depth):
    offsets = _list_offsets(level, pa)
    lo, hi = int(starts[0]), int(ends[-1])
    lengths = np.diff(offsets[lo : hi + 1])
    # Every list at this depth within a row has the length of the row's first one.
    parent = np.repeat(np.arange(n), ends - starts)
    first_len = np.full(n, -1, dtype=np.int64)
    has = ends > starts
    first_len[has] = lengths[starts[has] - lo]
    bad = np.flatnonzero(lengths != first_len[parent])
    if bad.size:
      row = int(parent[bad[0]])
      fail(
        row,
        f"is ragged: lists at depth {k + 1} have {first_len[row]} and "
        f"{lengths[bad[0]]} items; nested lists must be rectangular (only the "
        "leading dimension may vary between rows)",
      )
    dims[:, k] = first_len
    starts, ends = offsets[starts], offsets[ends]
    level = level.values
    if pa.types.is_dictionary(level.type):
      level = level.dictionary_decode()
    null = _first_null(level, int(starts[0]), int(ends[-1]))
    if null is not None:
      fail(int(np.searchsorted(ends, null, side="right")), "holds a null inside a list")
  if ctype.cast is not None:
    level = level.cast(ctype.cast)
  leaves = level.to_numpy(zero_copy_only=False)
  if ctype.kind == STRING and leaves.dtype != object:
    leaves = leaves.astype(object)
  return Column(ctype.kind, ctype.depth, leaves, starts, ends, dims)


def _client_ids(arr, key: str, path: str, first: int, pa) -> list[str]:
  """The ids of a batch's client-id column: strings, UTF-8 binary, or integers as decimals."""
  if pa.types.is_dictionary(arr.type):
    arr = arr.dictionary_decode()
  null = _first_null(arr, 0, len(arr))
  if null is not None:
    raise InputError(f"{path} row {first + null}: client-id column {key!r} is null")
  if pa.types.is_integer(arr.type):
    return arr.cast(pa.string()).to_pylist()
  out = arr.to_pylist()
  for i, value in enumerate(out):
    try:
      out[i] = check_client_id(value, f"{path} row {first + i}")
    except InvalidClientIdError as e:
      raise InputError(str(e)) from None
  return out


class _ReadParquetFile(beam.DoFn):
  """path -> a `ColumnBatch` of each record batch, in order."""

  def __init__(self, client_id_key: str):
    self._client_id_key = client_id_key
    self._records = beam.metrics.Metrics.counter("fedbeam", "input_records")

  def process(self, path: str) -> Iterable[ColumnBatch]:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    key = self._client_id_key
    first = 0
    try:
      with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        parquet = pq.ParquetFile(f)
        schema = parquet.schema_arrow
        if key not in schema.names:
          raise InputError(f"{path}: client-id column {key!r} is missing (columns: {schema.names})")
        id_type = schema.field(key).type
        if pa.types.is_dictionary(id_type):
          id_type = id_type.value_type
        if not (
          pa.types.is_integer(id_type)
          or pa.types.is_string(id_type)
          or pa.types.is_large_string(id_type)
          or pa.types.is_binary(id_type)
          or pa.types.is_large_binary(id_type)
        ):
          raise InputError(
            f"{path}: client-id column {key!r} has Arrow type {id_type}, "
            "expected strings or integers"
          )
        names = [name for name in schema.names if name != key]
        if len(set(schema.names)) != len(schema.names):
          raise InputError(f"{path}: columns {schema.names} repeat a name")
        ctypes = {name: _column_type(schema.field(name).type, name, path, pa) for name in names}
        for batch in parquet.iter_batches(batch_size=sources.BATCH_RECORDS):
          yield self._batch_records(batch, ctypes, path, first, pa)
          first += batch.num_rows
    except InputError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise InputError(f"{path}: unreadable Parquet file at row {first}: {e}") from None

  def _batch_records(self, batch, ctypes, path: str, first: int, pa) -> ColumnBatch:
    ids = _client_ids(batch.column(self._client_id_key), self._client_id_key, path, first, pa)
    columns = {
      name: _convert_column(batch.column(name), ctype, name, path, first, pa)
      for name, ctype in ctypes.items()
    }
    self._records.inc(len(ids))
    return ColumnBatch(path, first, ids, columns)


class ReadParquetRecords(sources._ReadFiles):  # pylint: disable=protected-access
  """Reads Parquet files (see the module docstring for the columns it takes).

  Input: the pipeline root. Output: a `ColumnBatch` per record batch, in file
  order (`ColumnBatch.input_records` gives its `InputRecord`s); positions are
  (file, row number from 0).
  """

  reader_cls = _ReadParquetFile


__all__ = ["ReadParquetRecords"]
