"""Consecutive records of one file held as columns (`ColumnBatch`), and their columnar encoding.

The Parquet reader converts each column of a record batch once, into a
flat numpy array of leaf values with the start, end and shape of every
row's value. `ColumnBatch.input_records` gives the batch's `InputRecord`s
(for spec inference and the record-by-record encoder); `encode_columns`
turns a batch whose columns match the element spec with fixed sizes into
store records at once (`fedbeam.format.codec.encode_examples` over the stacked
columns), the bytes `encode_record` gives row by row, after the checks
`conform_record` makes, done with numpy over whole columns.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import numpy as np

from fedbeam.format.codec import encode_examples
from fedbeam.format.spec import ElementSpec, numpy_dtype
from fedbeam.pipelines.records import BOOL, LIST, SCALAR, InputRecord, RawFeature, _compatible


@dataclasses.dataclass
class Column:
  """One feature of a batch: row i's values are `leaves[starts[i]:ends[i]]`, of shape `dims[i]`.

  `dims` is an int matrix [rows, depth] (depth 0: scalars), -1 where a
  row's value does not show that dimension (under an empty list).
  """

  kind: str
  depth: int
  leaves: np.ndarray
  starts: np.ndarray
  ends: np.ndarray
  dims: np.ndarray

  def feature(self, i: int) -> RawFeature:
    dims = tuple(None if d < 0 else d for d in self.dims[i].tolist())
    return RawFeature(
      self.leaves[self.starts[i] : self.ends[i]], self.kind, LIST if self.depth else SCALAR, dims
    )


@dataclasses.dataclass
class ColumnBatch:
  """Rows `first_index`... of `path`: their client ids and feature columns.

  `unit` names what the index counts in error messages ("row").
  """

  path: str
  first_index: int
  client_ids: list
  columns: dict
  unit: str = "row"

  def __len__(self) -> int:
    return len(self.client_ids)

  def input_records(self) -> Iterator[InputRecord]:
    """The rows as `InputRecord`s, in order."""
    for i, client_id in enumerate(self.client_ids):
      features = {name: column.feature(i) for name, column in self.columns.items()}
      yield InputRecord(client_id, features, (self.path, self.first_index + i), unit=self.unit)


def _stacked(column: Column, f, n: int) -> Optional[np.ndarray]:
  """`column` as [n, values per row] in the dtype of feature spec `f`, or None.

  None when a row does not hold exactly the values `conform_record` would
  take without an error (then the caller goes row by row, which names the
  row at fault), or a row's values are not laid out one after the other.
  """
  if f.is_variable_length or not _compatible(column.kind, f.dtype):
    return None
  size = f.inner_size
  if not np.array_equal(column.ends - column.starts, np.full(n, size)):
    return None
  if column.depth > 1:
    if column.depth != len(f.shape):
      return None
    known = column.dims >= 0
    if not (known <= (column.dims == np.array(f.shape, dtype=np.int64))).all():
      return None
  first = int(column.starts[0])
  if not np.array_equal(column.starts, first + size * np.arange(n)):
    return None
  values = column.leaves[first : first + n * size].reshape(n, size)
  if f.dtype == "string":
    return values
  if values.size and f.dtype == "bool" and column.kind != BOOL:
    if ((values != 0) & (values != 1)).any():
      return None
  elif values.size and np.dtype(numpy_dtype(f.dtype)).kind in "iu":
    info = np.iinfo(numpy_dtype(f.dtype))
    if values.min() < info.min or values.max() > info.max:
      return None
  return values.astype(numpy_dtype(f.dtype))


def encode_columns(batch: ColumnBatch, spec: ElementSpec) -> Optional[list]:
  """(client id, position, store record) of each row, or None to encode the batch row by row.

  The records are those `encode_record` gives for `batch.input_records()`;
  None when some feature is variable-length or some row's values need
  `conform_record`'s checks to fail or its per-row shapes.
  """
  n = len(batch)
  if not n or set(batch.columns) != set(spec.names):
    return None
  stacked = {}
  for f in spec.features:
    values = _stacked(batch.columns[f.name], f, n)
    if values is None:
      return None
    stacked[f.name] = values
  records = encode_examples(stacked, spec, n)
  path, first = batch.path, batch.first_index
  return [
    (client_id, (path, first + i), records[i]) for i, client_id in enumerate(batch.client_ids)
  ]


__all__ = ["Column", "ColumnBatch", "encode_columns"]
