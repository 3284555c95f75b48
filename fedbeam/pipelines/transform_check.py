"""A transform tried on the input's first record before the prepare job starts.

A transform that does not fit the input (a missing feature, an image
transform on text, a changed dtype) would otherwise fail on the workers,
minutes into the job, with an error about one pseudo-client. Run on the
launcher with one record, it fails at once, naming the feature and the
element spec.
"""

from __future__ import annotations

from typing import Optional, Sequence

from fedbeam.format.spec import ElementSpec
from fedbeam.pipelines import sources
from fedbeam.pipelines.example_records import ExampleBatch, encode_record
from fedbeam.pipelines.expansion import ExpansionError, MakeTransformFn, apply_transform
from fedbeam.pipelines.records import InputRecord
from fedbeam.pipelines.spec_inference import InferElementSpecFn


def first_input_record(
  paths: Sequence[str],
  input_format: str,
  client_id_key: Optional[str],
  sqlite_split: Optional[str] = None,
) -> Optional[InputRecord]:
  """The first record of the first input file that has one, or None (no records).

  Reads with the pipeline's own readers, so the record is what the job sees.

  Raises:
    InputError: as the readers do (an unreadable file, a bad client id...).
  """
  if input_format == "tff-sqlite":
    ranges = sources.sqlite_row_ranges(paths[0], sqlite_split)
    reader = sources._ReadSqliteRange(paths[0], sqlite_split)  # pylint: disable=protected-access
    for row_range in ranges:
      for records in reader.process(row_range):
        if len(records):
          return _first(records)
    return None
  for path in paths:
    if input_format == "tfrecord":
      for records in sources._record_batches(path):  # pylint: disable=protected-access
        return ExampleBatch(path, 0, records, client_id_key).input_record(0)
    else:
      reader = sources._ReadAvroFile(client_id_key)  # pylint: disable=protected-access
      for records in reader.process(path):
        if len(records):
          return _first(records)
  return None


def _first(records) -> InputRecord:
  # Readers hand on ExampleBatches (TFRecord, TFF SQLite) or lists of records.
  return records.input_record(0) if isinstance(records, ExampleBatch) else records[0]


def describe_spec(spec: ElementSpec) -> str:
  """`name: dtype[shape], ...`, as `fedbeam inspect` prints a spec."""
  return ", ".join(
    f"{f.name}: {f.dtype}{list(f.shape)}".replace("None", "null") for f in spec.features
  )


def check_transform_on_first_record(
  make_transform_fn: MakeTransformFn,
  record: InputRecord,
  spec: Optional[ElementSpec],
  num_transformed_clients: Optional[int],
  transform_name: str,
) -> None:
  """Runs the transform of pseudo-clients 0 and 1 of `record`'s client on `record` alone.

  `spec` is the declared element spec, or None: then it is inferred from the
  record alone (a feature holding n values is [n], as inference over the
  whole input would find if every record holds n). Index 1 is tried only
  with `num_transformed_clients`, since only then can it exist. The record
  goes through the pipeline's own `apply_transform`, batch form included.

  Raises:
    ExpansionError: the transform raised or changed the element; the message
      names the transform, the record and the element spec (and the feature,
      as the transform's own error does).
    InputError: the record does not fit the declared spec.
  """
  if spec is None:
    infer = InferElementSpecFn()
    spec = infer.extract_output(infer.add_input(infer.create_accumulator(), record))
  encoded = encode_record(record, spec)
  indices = (0,) if num_transformed_clients is None else (0, 1)
  for index in indices:
    try:
      apply_transform(make_transform_fn, record.client_id, index, [encoded], spec)
    except ExpansionError as e:
      raise ExpansionError(
        f"{e} (--transform {transform_name} tried on {record.source} before the job "
        f"started; the element spec is {{{describe_spec(spec)}}})"
      ) from None


__all__ = ["check_transform_on_first_record", "describe_spec", "first_input_record"]
