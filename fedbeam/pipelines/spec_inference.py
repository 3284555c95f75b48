"""Infers the element spec from the input when no `--element-spec` is given.

Rules (docs/store-format.md): a feature's dtype follows its value kind
(bytes -> string, float_list -> float32, int64_list -> int64, Avro types map
one to one); its shape is `[]` when it always holds one value and the input
cannot say it is an array (tf.train.Example, Avro scalars), `[n]` when every
record holds n values, `[null]` when the counts differ. Features are sorted
by name. Records with different feature sets or kinds fail the job with both
records named.
"""

from __future__ import annotations

from typing import Any, Optional

import apache_beam as beam

from fedbeam.format.spec import ElementSpec, FeatureSpec
from fedbeam.pipelines.example_records import as_input_records
from fedbeam.pipelines.records import ANY_RANK, LIST, SCALAR, InputError, InputRecord

_DTYPE_OF_KIND = {"string": "string", "float32": "float32", "float64": "float64",
                  "int32": "int32", "int64": "int64", "bool": "bool"}


class _Stats:
  """Accumulator: per feature [kind, rank, min count, max count, first source]; feature sets seen."""

  def __init__(self):
    self.features: dict[str, list[Any]] = {}
    self.feature_sets: dict[frozenset, str] = {}
    self.records = 0


class InferElementSpecFn(beam.CombineFn):
  """CombineFn: InputRecord -> ElementSpec (raises InputError on conflicts or no input)."""

  def create_accumulator(self) -> _Stats:
    return _Stats()

  def _add_feature(self, acc: _Stats, name, kind, rank, lo, hi, source):
    cur = acc.features.get(name)
    if cur is None:
      acc.features[name] = [kind, rank, lo, hi, source]
      return
    if cur[0] != kind:
      raise InputError(
          f"feature {name!r} has inconsistent types across records: {cur[0]} in {cur[4]}, "
          f"{kind} in {source}")
    if cur[1] != rank:
      raise InputError(
          f"feature {name!r} is a scalar in some records and an array in others "
          f"({cur[4]}, {source})")
    cur[2] = min(cur[2], lo)
    cur[3] = max(cur[3], hi)

  def _add_feature_set(self, acc: _Stats, names: frozenset, source: str):
    if names in acc.feature_sets:
      return
    if acc.feature_sets:
      other, other_source = next(iter(acc.feature_sets.items()))
      raise InputError(
          f"records have different features: {other_source} has {sorted(other)}, "
          f"{source} has {sorted(names)}")
    acc.feature_sets[names] = source

  def add_input(self, acc: _Stats, record: InputRecord) -> _Stats:
    source = record.source
    self._add_feature_set(acc, frozenset(record.features), source)
    for name, raw in record.features.items():
      n = int(raw.size)
      self._add_feature(acc, name, raw.kind, raw.rank, n, n, source)
    acc.records += 1
    return acc

  def merge_accumulators(self, accumulators) -> _Stats:
    out = _Stats()
    for acc in accumulators:
      for names, source in acc.feature_sets.items():
        self._add_feature_set(out, names, source)
      for name, (kind, rank, lo, hi, source) in acc.features.items():
        self._add_feature(out, name, kind, rank, lo, hi, source)
      out.records += acc.records
    return out

  def extract_output(self, acc: _Stats) -> Optional[ElementSpec]:
    if not acc.records:
      return None
    features = []
    for name in sorted(acc.features):
      kind, rank, lo, hi, _ = acc.features[name]
      if rank == SCALAR or (rank == ANY_RANK and lo == hi == 1):
        shape: tuple = ()
      elif lo == hi:
        shape = (lo,)
      else:
        shape = (None,)
      features.append(FeatureSpec(name, _DTYPE_OF_KIND[kind], shape))
    if not features:
      raise InputError("the input records hold no feature besides the client id")
    return ElementSpec(tuple(features))


class InferElementSpec(beam.PTransform):
  """PCollection[InputRecord or ExampleBatch] -> singleton PCollection[ElementSpec | None].

  None: no records.
  """

  def expand(self, records):
    return (records
            | "AsInputRecords" >> beam.FlatMap(as_input_records)
            | "Infer" >> beam.CombineGlobally(InferElementSpecFn()))


__all__ = ["InferElementSpec", "InferElementSpecFn", "LIST", "SCALAR"]
