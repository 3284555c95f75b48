"""Pseudo-client expansion with the semantics of the seed `TransformingClientData`.

"Each client of raw_client_data is expanded into some number of
pseudo-clients. Each pseudo-client id is the original client id with an
integer index appended." With N = `num_transformed_clients` and R raw
clients (reference implementation, exactly):

- N omitted or N == R: ids unchanged; `make_transform_fn(raw_id, 0)` applies.
- N > R: k = N // R pseudo-clients per raw client, indices 0..k-1; the
  remainder g = N - k*R comes from the first g raw clients in sorted id order,
  with index k. Ids are `"{raw_id}_{index}"`, the index zero-padded to the
  number of digits of N - 1; the resulting ids are sorted.
- N < R, which the reference silently ignored, and N <= 0 are errors here.

`make_transform_fn(raw_id, index)` returns `fn(element) -> element` or None
(no transformation). It runs on the workers: pass it as a module-level
function or a picklable callable, or as a 'module:function' reference.
"""

from __future__ import annotations

import collections
import importlib
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import apache_beam as beam
import numpy as np

from fedbeam.batch_form import batch_form_of
from fedbeam.format.codec import (
  RecordDecodeError,
  decode_examples,
  encode_example,
  encode_examples,
  has_variable_length,
  make_record_parser,
)
from fedbeam.format.spec import ElementSpec, FeatureSpec, numpy_dtype
from fedbeam.pipelines.ranking import SmallestN
from fedbeam.pipelines.records import ClientRecords

__all__ = [
  "ExpansionError",
  "load_transform",
  "index_digits",
  "pseudo_client_id",
  "expansion_plan",
  "pseudo_clients_of",
  "PlanPseudoClients",
  "apply_transform",
  "want_shape_ok",
  "ExpandPseudoClients",
  "PseudoClientSizes",
]

MakeTransformFn = Callable[[str, int], Optional[Callable[[Any], Any]]]


class ExpansionError(ValueError):
  """Bad expansion request or a transform that fails; names the raw client and index."""


def load_transform(reference: str) -> MakeTransformFn:
  """Imports 'module:function' (the `--transform` flag).

  Raises:
    ExpansionError: malformed reference, module or attribute not found, or
      not callable.
  """
  if not isinstance(reference, str) or reference.count(":") != 1:
    raise ExpansionError(f"--transform {reference!r}: expected 'module:function'")
  module_name, attr = reference.split(":")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-except
    raise ExpansionError(
      f"--transform {reference!r}: cannot import module {module_name!r}: {type(e).__name__}: {e}"
    ) from None
  fn = getattr(module, attr, None)
  if fn is None:
    raise ExpansionError(
      f"--transform {reference!r}: module {module_name!r} has no attribute {attr!r}"
    )
  if not callable(fn):
    raise ExpansionError(f"--transform {reference!r}: {attr!r} is not callable")
  return fn


def index_digits(num_transformed_clients: int) -> int:
  """Digits of the zero-padded index: len(str(N - 1)), as the reference formats it."""
  return len(str(num_transformed_clients - 1))


def pseudo_client_id(raw_client_id: str, index: int, digits: int) -> str:
  return f"{raw_client_id}_{index:0{digits}d}"


def expansion_plan(num_raw: int, num_transformed_clients: Optional[int]) -> tuple[int, int, int]:
  """(k, g, digits) for N over `num_raw` raw clients; digits 0 means ids unchanged.

  Raises:
    ExpansionError: N <= 0 or N < num_raw, with the numbers.
  """
  if num_raw <= 0:
    raise ExpansionError("the input has no client to expand")
  if num_transformed_clients is None or num_transformed_clients == num_raw:
    return 1, 0, 0
  n = num_transformed_clients
  if n <= 0:
    raise ExpansionError(f"--num-transformed-clients must be positive, got {n}")
  if n < num_raw:
    raise ExpansionError(
      f"--num-transformed-clients {n} is smaller than the number of raw clients "
      f"({num_raw}); expansion cannot drop clients (pass at least {num_raw})"
    )
  k = n // num_raw
  return k, n - k * num_raw, index_digits(n)


def pseudo_clients_of(
  raw_client_id: str,
  num_raw: int,
  remainder_last: Optional[str],
  num_transformed_clients: Optional[int],
) -> list[tuple[str, int]]:
  """(pseudo-client id, index) of one raw client, in index order.

  `remainder_last` is the largest of the g smallest raw ids (None when g is
  0): raw clients at or below it get the extra index k.
  """
  k, g, digits = expansion_plan(num_raw, num_transformed_clients)
  count = k + (1 if g and remainder_last is not None and raw_client_id <= remainder_last else 0)
  return [
    (raw_client_id if digits == 0 else pseudo_client_id(raw_client_id, index, digits), index)
    for index in range(count)
  ]


class PlanPseudoClients(beam.PTransform):
  """Raw client ids -> what naming the pseudo-clients needs, from the ids alone.

  Input: PCollection[str] of the raw client ids. Output: a dict of
  PCollections: `num_raw` (singleton: the number of raw clients) and
  `remainder_last` (the largest of the g smallest raw ids; empty when g is 0,
  read as a side input with default None), the side inputs of
  `pseudo_clients_of`. Computed once, it serves both `ExpandPseudoClients`
  and `PseudoClientSizes`.
  """

  def __init__(self, num_transformed_clients: Optional[int]):
    super().__init__()
    self._n = num_transformed_clients

  def expand(self, ids: beam.PCollection[str]) -> dict[str, beam.PCollection]:
    n = self._n
    num_raw = ids | "CountRaw" >> beam.combiners.Count.Globally()

    def remainder_ids(count):
      # No raw client: nothing is named, and the job's record accounting
      # says why (an empty input, or records a faulty runner lost).
      if not count:
        return 0
      _, g, _ = expansion_plan(count, n)
      return g

    g = num_raw | "RemainderSize" >> beam.Map(remainder_ids)
    smallest = ids | "TagWithG" >> beam.FlatMap(
      lambda cid, gg: [(gg, cid)] if gg else [], beam.pvalue.AsSingleton(g)
    )
    # Without defaults: with no remainder (g = 0) TopG has no input, and the
    # side inputs' default (None) is remainder_last, at one stage less.
    remainder_last = (
      smallest
      | "TopG" >> beam.CombineGlobally(SmallestN()).without_defaults()
      | "LastOfTopG"
      >> beam.Map(
        lambda top, gg: top[gg - 1] if gg and len(top) >= gg else None, beam.pvalue.AsSingleton(g)
      )
    )
    return {"num_raw": num_raw, "remainder_last": remainder_last}


class _ExpandClient(beam.DoFn):
  """ClientRecords (raw) -> ClientRecords per pseudo-client, transformed."""

  def __init__(
    self, make_transform_fn: Union[str, MakeTransformFn], num_transformed_clients: Optional[int]
  ):
    self._make = make_transform_fn
    self._n = num_transformed_clients
    self._pseudo = beam.metrics.Metrics.counter("fedbeam", "pseudo_clients")

  def setup(self):
    self._fn = load_transform(self._make) if isinstance(self._make, str) else self._make

  def process(
    self, client: ClientRecords, num_raw: int, remainder_last: Optional[str], spec: ElementSpec
  ) -> Iterable[ClientRecords]:
    raw_id = client.client_id
    elements = _ParsedClient(client.records, spec)
    for cid, index in pseudo_clients_of(raw_id, num_raw, remainder_last, self._n):
      records = apply_transform(self._fn, raw_id, index, client.records, spec, elements)
      self._pseudo.inc()
      yield ClientRecords(client_id=cid, records=records, raw_client_id=raw_id, pseudo_index=index)


class _ParsedClient:
  """A raw client's records decoded once, stacked on axis 0, shared by its pseudo-clients.

  `arrays()` is None for specs with variable-length features (stacking would
  pad them). Decoding is numpy (`codec.decode_examples`), so a worker
  whose transforms have a numpy batch form never loads TensorFlow.
  """

  def __init__(self, records: list[bytes], spec: ElementSpec):
    self._records = records
    self._spec = spec
    self._arrays = None

  def arrays(self) -> Optional["collections.OrderedDict"]:
    if self._arrays is None and self._records and not has_variable_length(self._spec):
      try:
        self._arrays = decode_examples(self._records, self._spec)
      except RecordDecodeError as e:
        raise ExpansionError(f"a stored record of the raw client cannot be decoded: {e}") from None
    return self._arrays


def _check_structure(where: str, got, spec: ElementSpec) -> None:
  """Raises ExpansionError unless `got` (TensorSpecs of one element) fits the spec."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  expected = spec.to_tensor_specs()
  if not isinstance(got, dict) or set(got) != set(expected):
    raise ExpansionError(
      f"{where} changed the element structure: expected features {list(expected)}, got {got}"
    )
  for name, want in expected.items():
    have = got[name]
    if not isinstance(have, tf.TensorSpec) or have.dtype != want.dtype:
      raise ExpansionError(f"{where} changed feature {name!r} from {want} to {have}")
    if not want.shape.is_compatible_with(have.shape):
      raise ExpansionError(
        f"{where} changed the shape of feature {name!r} from {want.shape} to {have.shape}"
      )


def _stacked_columns(where: str, out, count: int, spec: ElementSpec) -> dict[str, np.ndarray]:
  """A batch form's output as numpy columns; raises ExpansionError unless it fits the spec."""
  if not isinstance(out, Mapping) or set(out) != set(spec.names):
    keys = sorted(out) if isinstance(out, Mapping) else type(out).__name__
    raise ExpansionError(
      f"{where} changed the element structure: expected features {spec.names}, got {keys}"
    )
  columns = {}
  for f in spec.features:
    try:
      column = np.asarray(out[f.name])
    except Exception as e:  # pylint: disable=broad-except
      raise ExpansionError(
        f"{where} returned feature {f.name!r} that is not an array: {type(e).__name__}: {e}"
      ) from None
    want = numpy_dtype(f.dtype)
    ok_dtype = column.dtype.kind in "OS" if f.dtype == "string" else column.dtype == want
    if not ok_dtype:
      raise ExpansionError(f"{where} changed feature {f.name!r} from {f.dtype} to {column.dtype}")
    if column.shape[:1] != (count,):
      raise ExpansionError(
        f"{where} returned {column.shape[:1]} values of feature {f.name!r} for {count} elements"
      )
    if not want_shape_ok(f, column.shape[1:]):
      raise ExpansionError(
        f"{where} changed the shape of feature {f.name!r} from "
        f"{list(f.shape)} to {list(column.shape[1:])}"
      )
    columns[f.name] = column
  return columns


def apply_transform(
  make_transform_fn: MakeTransformFn,
  raw_client_id: str,
  index: int,
  records: list[bytes],
  spec: ElementSpec,
  parsed: Optional[_ParsedClient] = None,
) -> list[bytes]:
  """Runs `make_transform_fn(raw_client_id, index)` over serialized records.

  Returns the re-encoded records in the same order (the input list itself when
  the transform is None). The transform maps elements as `tf.data.Dataset.map`
  would; when the returned fn declares a batch form (`fedbeam.batch_form`:
  its `fedbeam_batch_fn`), that is called once on all elements stacked on
  axis 0 as numpy arrays instead, which must give the same elements (then no
  TensorFlow is needed).

  Raises:
    ExpansionError: the factory or the transform raises, or the transform
      changes the element's structure, dtypes or shapes; names the raw client
      and index.
  """
  where = f"transform for raw client {raw_client_id!r}, index {index}"
  try:
    fn = make_transform_fn(raw_client_id, index)
  except Exception as e:  # pylint: disable=broad-except
    raise ExpansionError(
      f"make_transform_fn({raw_client_id!r}, {index}) raised {type(e).__name__}: {e}"
    ) from None
  if fn is None:
    return records
  if not callable(fn):
    raise ExpansionError(
      f"make_transform_fn({raw_client_id!r}, {index}) returned "
      f"{type(fn).__name__}, expected a callable or None"
    )
  if not records:
    return records
  parsed = parsed or _ParsedClient(records, spec)
  arrays = parsed.arrays()
  try:
    batch_fn = batch_form_of(fn)
  except TypeError as e:
    raise ExpansionError(f"{where}: {e}") from None
  if arrays is not None and batch_fn is not None:
    try:
      out = batch_fn(collections.OrderedDict(arrays))
    except Exception as e:  # pylint: disable=broad-except
      raise ExpansionError(f"{where} raised {type(e).__name__}: {e}") from None
    return encode_examples(_stacked_columns(where, out, len(records), spec), spec, len(records))

  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    if arrays is not None:
      dataset = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(arrays))
    else:
      dataset = tf.data.Dataset.from_tensor_slices(tf.constant(records, tf.string)).map(
        make_record_parser(spec)
      )
    dataset = dataset.map(fn)
  except Exception as e:  # pylint: disable=broad-except
    raise ExpansionError(f"{where} raised {type(e).__name__}: {e}") from None
  _check_structure(where, dataset.element_spec, spec)
  out = []
  try:
    for element in dataset.as_numpy_iterator():
      values = {}
      for f in spec.features:
        v = np.asarray(element[f.name])
        if not want_shape_ok(f, v.shape):
          raise ExpansionError(
            f"{where} produced feature {f.name!r} of shape {v.shape}, "
            f"which does not fit {list(f.shape)}"
          )
        values[f.name] = v.reshape(-1)
      out.append(encode_example(values, spec))
  except ExpansionError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ExpansionError(f"{where} raised {type(e).__name__}: {e}") from None
  return out


def want_shape_ok(feature: FeatureSpec, shape: tuple) -> bool:
  """Whether a produced value's shape fits the feature's declared shape."""
  if len(shape) != len(feature.shape):
    return False
  return all(d is None or d == s for d, s in zip(feature.shape, shape))


class ExpandPseudoClients(beam.PTransform):
  """Raw clients -> pseudo-clients (see the module docstring for the exact scheme).

  Input: PCollection[ClientRecords] of raw clients. `spec`: singleton
  PCollection[ElementSpec]. Output: PCollection[ClientRecords] with
  `raw_client_id` and `pseudo_index` set. Only raw ids and their count are
  combined globally (the remainder clients are the g smallest raw ids).
  Raises (at run time) ExpansionError.
  """

  def __init__(
    self,
    make_transform_fn: Union[str, MakeTransformFn],
    num_transformed_clients: Optional[int],
    spec: beam.PCollection[ElementSpec],
    plan: Optional[dict[str, beam.PCollection]] = None,
  ):
    """`plan`: optional output of `PlanPseudoClients` over the raw ids (else made from `clients`)."""
    super().__init__()
    self._plan = plan
    if num_transformed_clients is not None and num_transformed_clients <= 0:
      raise ExpansionError(
        f"--num-transformed-clients must be positive, got {num_transformed_clients}"
      )
    if isinstance(make_transform_fn, str):
      load_transform(make_transform_fn)  # Fail at construction, not on a worker.
    elif not callable(make_transform_fn):
      raise ExpansionError(
        f"make_transform_fn must be callable or 'module:function', got {make_transform_fn!r}"
      )
    self._make = make_transform_fn
    self._n = num_transformed_clients
    self._spec = spec

  def expand(self, clients: beam.PCollection[ClientRecords]) -> beam.PCollection[ClientRecords]:
    plan = self._plan
    if plan is None:
      plan = (
        clients | "RawIds" >> beam.Map(lambda c: c.client_id) | "Plan" >> PlanPseudoClients(self._n)
      )
    return clients | "Expand" >> beam.ParDo(
      _ExpandClient(self._make, self._n),
      beam.pvalue.AsSingleton(plan["num_raw"]),
      beam.pvalue.AsSingleton(plan["remainder_last"], default_value=None),
      beam.pvalue.AsSingleton(self._spec),
    )


class PseudoClientSizes(beam.PTransform):
  """The size every pseudo-client will have, from the raw clients' sizes alone.

  Input: PCollection[(raw client id, number of examples)], one per raw
  client. Output: PCollection[(client id, raw client id, number of examples)],
  one per pseudo-client `ExpandPseudoClients` makes with the same
  `num_transformed_clients`: expansion maps examples one to one, so a
  pseudo-client has its raw client's count. Lets later steps decide on ids
  and counts before the expanded examples exist. `plan`: optional output of
  `PlanPseudoClients` over the same raw ids (else made here). Raises (at run
  time) ExpansionError as `ExpandPseudoClients` does.
  """

  def __init__(
    self,
    num_transformed_clients: Optional[int],
    plan: Optional[dict[str, beam.PCollection]] = None,
  ):
    super().__init__()
    self._n = num_transformed_clients
    self._plan = plan

  def expand(
    self, raw_sizes: beam.PCollection[tuple[str, int]]
  ) -> beam.PCollection[tuple[str, str, int]]:
    n = self._n
    plan = self._plan
    if plan is None:
      plan = raw_sizes | "RawIds" >> beam.Keys() | "Plan" >> PlanPseudoClients(n)
    return raw_sizes | "Sizes" >> beam.FlatMap(
      lambda raw, num, last: [
        (cid, raw[0], raw[1]) for cid, _ in pseudo_clients_of(raw[0], num, last, n)
      ],
      beam.pvalue.AsSingleton(plan["num_raw"]),
      beam.pvalue.AsSingleton(plan["remainder_last"], default_value=None),
    )
