"""Encode input records in the store encoding and group them by client.

Order inside a client is deterministic whatever the runner or worker count:
by the `--order-by` feature (ties broken by record bytes), by input position
with `--order-by @input`, or, by default, by the serialized record bytes (a
stable content key).
"""

from __future__ import annotations

from typing import Optional

import apache_beam as beam

from fedbeam.format.spec import ElementSpec, numpy_dtype
from fedbeam.pipelines.column_batches import ColumnBatch, encode_columns
from fedbeam.pipelines.example_records import (
  ExampleBatch,
  as_input_records,
  encode_batch,
  encode_record,
)
from fedbeam.pipelines.records import ClientRecords, InputError, InputRecord

__all__ = [
  "ORDER_BY_INPUT",
  "check_order_by",
  "GroupByClient",
]

ORDER_BY_INPUT = "@input"


def check_order_by(order_by: Optional[str], spec: ElementSpec) -> None:
  """Raises InputError unless `order_by` is None, '@input' or a fixed-size feature of `spec`."""
  if order_by is None or order_by == ORDER_BY_INPUT:
    return
  if order_by not in spec:
    raise InputError(f"--order-by {order_by!r} is not a feature; features are {spec.names}")
  if spec[order_by].is_variable_length:
    raise InputError(f"--order-by {order_by!r} is a variable-length feature; pick a fixed-size one")


def _sort_key(record: InputRecord, spec: ElementSpec, order_by: Optional[str]) -> tuple:
  if order_by is None:
    return ()
  if order_by == ORDER_BY_INPUT:
    return tuple(record.position)
  values = record.features[order_by].values.reshape(-1)
  return tuple(_orderable(v) for v in values.astype(numpy_dtype(spec[order_by].dtype)).tolist())


def _orderable(value) -> tuple:
  # NaN compares false both ways, so records keyed by NaN would stay in the
  # order the shuffle delivered them; NaNs sort last, as equals, and the
  # record bytes break the tie like for any other equal keys.
  if isinstance(value, float) and value != value:
    return (1, 0.0)
  return (0, value)


class _EncodeAndPregroup(beam.DoFn):
  """An input element -> (client id, [(sort key, store record), ...]) per client in it.

  An element is an `ExampleBatch`, a `ColumnBatch`, a list of `InputRecord`s
  (one reader call's batch) or one `InputRecord`. Like a lifted combiner, the records of one
  client in an element leave as one value, so the shuffle moves about one
  value per client and input batch instead of one per record. Everything is
  emitted from `process`: a runner that drops what `finish_bundle` emits
  (Beam 2.72's DaskRunner) then loses nothing, and a value never outlives the
  element it came from.
  """

  def __init__(self, order_by: Optional[str]):
    self._order_by = order_by

  def process(self, element, spec: Optional[ElementSpec]):
    if spec is None:  # Unreachable: an empty input has no record to encode.
      return
    order_by = self._order_by
    groups: dict[str, list] = {}
    encoded = None
    if order_by in (None, ORDER_BY_INPUT):
      # Sort keys that need no feature value: whole batches are encoded at once.
      if isinstance(element, ExampleBatch):
        encoded = encode_batch(element, spec)
      elif isinstance(element, ColumnBatch):
        encoded = encode_columns(element, spec)  # None: row by row, below.
    if encoded is not None:
      by_input = order_by == ORDER_BY_INPUT
      for client_id, position, data in encoded:
        groups.setdefault(client_id, []).append((position if by_input else (), data))
    else:
      for record in as_input_records(element):
        groups.setdefault(record.client_id, []).append(
          (_sort_key(record, spec, order_by), encode_record(record, spec))
        )
    yield from groups.items()


def _record_count(encoded) -> tuple[str, int]:
  client_id, part = encoded
  return client_id, len(part)


def _to_client(element) -> ClientRecords:
  client_id, parts = element
  # An empty part marks a client the input declares (it may have no record).
  keyed = sorted(entry for part in parts for entry in part)
  return ClientRecords(client_id=client_id, records=[data for _, data in keyed])


def _check_spec(spec: Optional[ElementSpec], order_by: Optional[str]) -> ElementSpec:
  if spec is None:
    raise InputError(
      "the input holds no record, so no element spec can be inferred; pass --element-spec FILE"
    )
  check_order_by(order_by, spec)
  return spec


class GroupByClient(beam.PTransform):
  """Encodes records and groups them into one `ClientRecords` per client id.

  Input: a dict with `records` (PCollection of InputRecord or ExampleBatch) and `clients`
  (PCollection[str], ids declared by the input, possibly without records).
  `spec` is a singleton PCollection[ElementSpec].
  Output: a dict with `clients` (PCollection[ClientRecords], records in
  store order) and `record_counts` (PCollection[(client id, count)]: partial
  counts of the records encoded, several per client; their sum per client is
  the client's number of input records). The counts are a Map over the
  encoder's output (not a second output of the encoder: Beam 2.72's
  DaskRunner hands every output of a multi-output ParDo to every consumer),
  so they and the grouped clients come from one step; checks against what
  was read count the reader's output instead (`fedbeam.pipelines.prepare`).
  Raises (at run time) InputError naming the file and record that does not
  match the spec.
  """

  def __init__(
    self,
    spec: beam.PCollection[ElementSpec],
    order_by: Optional[str] = None,
    declared_clients: bool = True,
    after_encode: Optional[beam.PTransform] = None,
  ):
    """`declared_clients` False: `clients` is known to be empty and is not read.

    The local runner buffers a Flatten's output between stages, so the records
    reach the shuffle without one when no client can be declared.
    `after_encode`: for fault-injection tests only, a PTransform applied to
    the encoder's output before anything reads it (e.g. a step that loses
    records, as a faulty runner would).
    """
    super().__init__()
    self._spec = spec
    self._order_by = order_by
    self._declared_clients = declared_clients
    self._after_encode = after_encode

  def expand(self, inputs: dict[str, beam.PCollection]) -> dict[str, beam.PCollection]:
    order_by = self._order_by
    spec = self._spec | "CheckSpec" >> beam.Map(_check_spec, order_by)
    encoded = inputs["records"] | "Encode" >> beam.ParDo(
      _EncodeAndPregroup(order_by), beam.pvalue.AsSingleton(spec)
    )
    if self._after_encode is not None:
      encoded = encoded | "AfterEncode" >> self._after_encode
    record_counts = encoded | "CountEncoded" >> beam.Map(_record_count)
    if self._declared_clients:
      declared = inputs["clients"] | "DeclareClients" >> beam.Map(lambda cid: (cid, []))
      encoded = (encoded, declared) | "Merge" >> beam.Flatten()
    clients = encoded | "GroupByClient" >> beam.GroupByKey() | "SortClient" >> beam.Map(_to_client)
    return {"clients": clients, "record_counts": record_counts}
