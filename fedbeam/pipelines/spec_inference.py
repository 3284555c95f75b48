"""Infers the element spec from the input when no `--element-spec` is given.

Rules (docs/store-format.md): a feature's dtype follows its value kind
(bytes -> string, float_list -> float32, int64_list -> int64, Avro types map
one to one); its shape is `[]` when it always holds one value and the input
cannot say it is an array (tf.train.Example, Avro scalars), `[n]` when every
record holds n values, `[null]` when the counts differ. Values the input
shows nested (Avro arrays of arrays, Parquet lists of lists, JSON lists of
lists) keep their inner dimensions, which must agree across records: a
28x28 list of lists gives `[28, 28]`, lists of 28-value rows whose number
varies `[null, 28]`. Features are sorted by name. Records with different
feature sets or kinds fail the job with both records named; text numbers
(JSON, CSV) that are integers in some records and not in others are
float32.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import apache_beam as beam

from fedbeam.format.spec import ElementSpec, FeatureSpec
from fedbeam.pipelines.column_batches import ColumnBatch
from fedbeam.pipelines.example_records import ExampleBatch, as_input_records
from fedbeam.pipelines.records import (
  _NUMPY_OF_KIND,
  ANY_RANK,
  FLOAT32,
  INT64,
  LIST,
  SCALAR,
  UNKNOWN,
  InputError,
  InputRecord,
)

# Every kind but UNKNOWN is named after the dtype it infers.
_DTYPE_OF_KIND = {kind: kind for kind in _NUMPY_OF_KIND if kind != UNKNOWN}
_WIDENED = {frozenset((INT64, FLOAT32)): FLOAT32}


def _merge_inner(a: Optional[tuple], b: Optional[tuple]) -> Optional[tuple]:
  """Inner dims seen in two records (None entries: unknown); raises ValueError if they differ."""
  if a is None or b is None:
    return a if b is None else b
  if len(a) != len(b):
    raise ValueError
  out = []
  for x, y in zip(a, b):
    if x is not None and y is not None and x != y:
      raise ValueError
    out.append(x if y is None else y)
  return tuple(out)


def _shape_text(inner: Optional[tuple], leading: int) -> str:
  dims = (leading,) + tuple(inner or ())
  return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


class _Stats:
  """Accumulator: per feature [kind, rank, min count, max count, first source, inner dims, widens];

  feature sets seen. Counts are of the leading dimension; inner dims are
  those of nested values after the leading one (None: a flat or unshaped
  input).
  """

  def __init__(self):
    self.features: dict[str, list[Any]] = {}
    self.feature_sets: dict[frozenset, str] = {}
    self.records = 0


class InferElementSpecFn(beam.CombineFn):
  """CombineFn: InputRecord or ColumnBatch -> ElementSpec (raises InputError on conflicts or no
  input)."""

  def create_accumulator(self) -> _Stats:
    return _Stats()

  def _add_feature(self, acc: _Stats, name, kind, rank, lo, hi, source, inner=None, widens=False):
    cur = acc.features.get(name)
    if cur is None:
      acc.features[name] = [kind, rank, lo, hi, source, inner, widens]
      return
    # An empty list of unknown kind takes the other records' kind and widening.
    if kind == UNKNOWN:
      kind, widens = cur[0], cur[6]
    elif cur[0] == UNKNOWN:
      cur[0], cur[6] = kind, widens
    if cur[0] != kind:
      if cur[6] and widens and frozenset((cur[0], kind)) in _WIDENED:
        cur[0] = _WIDENED[frozenset((cur[0], kind))]
      else:
        raise InputError(
          f"feature {name!r} has inconsistent types across records: {cur[0]} in {cur[4]}, "
          f"{kind} in {source}"
        )
    if cur[1] != rank:
      raise InputError(
        f"feature {name!r} is a scalar in some records and an array in others ({cur[4]}, {source})"
      )
    try:
      merged = _merge_inner(cur[5], inner)
    except ValueError:
      raise InputError(
        f"feature {name!r} has shape {_shape_text(cur[5], cur[2])} in {cur[4]} and "
        f"{_shape_text(inner, lo)} in {source}; only the leading dimension may vary"
      ) from None
    cur[2] = min(cur[2], lo)
    cur[3] = max(cur[3], hi)
    cur[5] = merged
    cur[6] = cur[6] and widens

  def _add_feature_set(self, acc: _Stats, names: frozenset, source: str):
    if names in acc.feature_sets:
      return
    if acc.feature_sets:
      other, other_source = next(iter(acc.feature_sets.items()))
      raise InputError(
        f"records have different features: {other_source} has {sorted(other)}, "
        f"{source} has {sorted(names)}"
      )
    acc.feature_sets[names] = source

  def _add_columns(self, acc: _Stats, batch: ColumnBatch) -> _Stats:
    """Adds a whole batch from its columns' dims; row by row when rows disagree (to name them)."""
    n = len(batch)
    if not n:
      return acc
    last = batch.first_index + n - 1
    source = f"{batch.path} {batch.unit}s {batch.first_index}-{last}"
    summaries = {}
    for name, column in batch.columns.items():
      if column.depth == 0:
        summaries[name] = (column.kind, SCALAR, 1, 1, None)
        continue
      lead = column.dims[:, 0]
      inner = []
      for k in range(1, column.depth):
        known = column.dims[:, k][column.dims[:, k] >= 0]
        if known.size and (known != known[0]).any():
          for record in batch.input_records():
            self.add_input(acc, record)
          return acc
        inner.append(int(known[0]) if known.size else None)
      summaries[name] = (column.kind, LIST, int(lead.min()), int(lead.max()), tuple(inner) or None)
    self._add_feature_set(acc, frozenset(batch.columns), source)
    for name, (kind, rank, lo, hi, inner) in summaries.items():
      self._add_feature(acc, name, kind, rank, lo, hi, source, inner)
    acc.records += n
    return acc

  def add_input(self, acc: _Stats, record: Union[InputRecord, ColumnBatch]) -> _Stats:
    """Adds an `InputRecord`, or a `ColumnBatch` at once."""
    if isinstance(record, ColumnBatch):
      return self._add_columns(acc, record)
    source = record.source
    self._add_feature_set(acc, frozenset(record.features), source)
    for name, raw in record.features.items():
      dims = raw.dims
      if dims is None or raw.rank == SCALAR:
        n, inner = int(raw.size), None
      else:
        n, inner = int(dims[0]), tuple(dims[1:]) or None
      self._add_feature(acc, name, raw.kind, raw.rank, n, n, source, inner, raw.widens)
    acc.records += 1
    return acc

  def merge_accumulators(self, accumulators: Iterable[_Stats]) -> _Stats:
    out = _Stats()
    for acc in accumulators:
      for names, source in acc.feature_sets.items():
        self._add_feature_set(out, names, source)
      for name, (kind, rank, lo, hi, source, inner, widens) in acc.features.items():
        self._add_feature(out, name, kind, rank, lo, hi, source, inner, widens)
      out.records += acc.records
    return out

  def extract_output(self, acc: _Stats) -> Optional[ElementSpec]:
    if not acc.records:
      return None
    features = []
    for name in sorted(acc.features):
      kind, rank, lo, hi, source, inner, _ = acc.features[name]
      if kind == UNKNOWN:
        raise InputError(
          f"feature {name!r} is an empty list in every record (e.g. {source}), "
          "so its type cannot be inferred; pass --element-spec FILE"
        )
      if inner is not None and None in inner:
        raise InputError(
          f"feature {name!r} is empty in every record, so its inner dimensions "
          f"cannot be inferred (e.g. {source}); pass --element-spec FILE"
        )
      if rank == SCALAR or (rank == ANY_RANK and lo == hi == 1):
        shape: tuple = ()
      elif lo == hi:
        shape = (lo,) + (inner or ())
      else:
        shape = (None,) + (inner or ())
      features.append(FeatureSpec(name, _DTYPE_OF_KIND[kind], shape))
    if not features:
      raise InputError("the input records hold no feature besides the client id")
    return ElementSpec(tuple(features))


class InferElementSpec(beam.PTransform):
  """PCollection[InputRecord, ExampleBatch or ColumnBatch] -> singleton
  PCollection[ElementSpec | None].

  None: no records.
  """

  def expand(
    self, records: beam.PCollection[Union[InputRecord, ExampleBatch, ColumnBatch]]
  ) -> beam.PCollection[Optional[ElementSpec]]:
    return (
      records
      | "AsInputRecords" >> beam.FlatMap(_inference_inputs)
      | "Infer" >> beam.CombineGlobally(InferElementSpecFn())
    )


def _inference_inputs(element):
  """What `InferElementSpecFn` adds: a `ColumnBatch` whole, any other element's records."""
  return (element,) if isinstance(element, ColumnBatch) else as_input_records(element)


__all__ = ["InferElementSpec", "InferElementSpecFn", "LIST", "SCALAR"]
