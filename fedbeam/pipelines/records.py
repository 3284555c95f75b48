"""The values that flow between fedbeam's pipeline steps.

`InputRecord`: one input example as read (client id, raw feature values,
where it came from). `ClientRecords`: one client after grouping: its id, the
raw client it came from and its serialized records in store order.
`conform_record` checks an `InputRecord` against the element spec and converts
its values to the spec's dtypes, naming the input file and record on failure.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import numpy as np

from fedbeam.element_spec import ElementSpec, ElementSpecError, numpy_dtype
from fedbeam.store_format import UNSPLIT

# Kinds of raw values a reader produces.
STRING, FLOAT32, FLOAT64, INT32, INT64, BOOL = (
    "string", "float32", "float64", "int32", "int64", "bool")
# How a reader knows a feature's rank: Avro tells scalars from arrays;
# tf.train.Example cannot (every feature is a list).
SCALAR, LIST, ANY_RANK = "scalar", "list", "any"


class InputError(ValueError):
  """Bad input data; the message names the file and record at fault."""


@dataclasses.dataclass(frozen=True)
class RawFeature:
  """A feature's values as read: a flat numpy array, their kind and rank hint."""

  values: np.ndarray
  kind: str
  rank: str


@dataclasses.dataclass(frozen=True)
class InputRecord:
  """One input example.

  `position` orders records of one input: (file or database path, index).
  `source` is a human-readable location for error messages.
  """

  client_id: str
  features: Mapping[str, RawFeature]
  position: tuple[str, int]

  @property
  def source(self) -> str:
    return f"{self.position[0]} record {self.position[1]}"


@dataclasses.dataclass
class ClientRecords:
  """One client's serialized tf.train.Example records, in store order."""

  client_id: str
  records: list[bytes]
  raw_client_id: Optional[str] = None
  pseudo_index: int = 0
  split: str = UNSPLIT

  def __post_init__(self):
    if self.raw_client_id is None:
      self.raw_client_id = self.client_id


_FLOAT_KINDS = {FLOAT32, FLOAT64}
_INT_KINDS = {INT32, INT64, BOOL}


def _compatible(kind: str, dtype: str) -> bool:
  if dtype == "string":
    return kind == STRING
  if dtype.startswith("float"):
    return kind in _FLOAT_KINDS or kind in _INT_KINDS
  return kind in _INT_KINDS  # integer and bool dtypes


def conform_record(record: InputRecord, spec: ElementSpec) -> dict[str, np.ndarray]:
  """Returns `feature name -> flat numpy array` in the spec's dtypes.

  Raises:
    InputError: a feature is missing, unexpected, of an incompatible type, has
      a number of values the spec's shape does not allow, or an integer out of
      the dtype's range. The message names the record's file and index, the
      client and the feature.
  """
  where = f"{record.source} (client {record.client_id!r})"
  extra = sorted(set(record.features) - set(spec.names))
  if extra:
    raise InputError(f"{where}: feature(s) {extra} are not in the element spec {spec.names}")
  out = {}
  for f in spec.features:
    raw = record.features.get(f.name)
    if raw is None:
      raise InputError(f"{where}: feature {f.name!r} is missing")
    if not _compatible(raw.kind, f.dtype):
      raise InputError(
          f"{where}: feature {f.name!r} holds {raw.kind} values, but the element spec "
          f"says {f.dtype}")
    n = raw.values.size
    if f.is_variable_length:
      ok = f.inner_size == 0 and n == 0 or f.inner_size > 0 and n % f.inner_size == 0
    else:
      ok = n == f.inner_size
    if not ok:
      raise InputError(
          f"{where}: feature {f.name!r} has {n} values, which does not fit shape "
          f"{list(f.shape)}")
    values = raw.values
    target = numpy_dtype(f.dtype)
    if f.dtype != "string" and not f.dtype.startswith("float") and f.dtype != "bool" and n:
      info = np.iinfo(target)
      lo, hi = values.min(), values.max()
      if lo < info.min or hi > info.max:
        raise InputError(
            f"{where}: feature {f.name!r} has value {lo if lo < info.min else hi} outside "
            f"the range of {f.dtype}")
    out[f.name] = values if f.dtype == "string" else values.astype(target)
  return out
