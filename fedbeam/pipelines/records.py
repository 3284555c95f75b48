"""The values that flow between fedbeam's pipeline steps.

`InputRecord`: one input example as read (client id, raw feature values,
where it came from). `ClientRecords`: one client after grouping: its id, the
raw client it came from and its serialized records in store order.
`conform_record` checks an `InputRecord` against the element spec and converts
its values to the spec's dtypes, naming the input file and record on failure.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from fedbeam.format.codec import serialize_example
from fedbeam.format.layout import UNSPLIT
from fedbeam.format.spec import ElementSpec, numpy_dtype

__all__ = [
  "STRING",
  "FLOAT32",
  "FLOAT64",
  "INT32",
  "INT64",
  "BOOL",
  "FLOAT16",
  "INT8",
  "INT16",
  "UINT8",
  "UINT16",
  "UINT32",
  "UINT64",
  "UNKNOWN",
  "SCALAR",
  "LIST",
  "ANY_RANK",
  "InputError",
  "RawFeature",
  "InputRecord",
  "ClientRecords",
  "encode_as_read",
  "conform_record",
]

# Kinds of raw values a reader produces: each names the dtype inference gives it.
STRING, FLOAT32, FLOAT64, INT32, INT64, BOOL = (
  "string",
  "float32",
  "float64",
  "int32",
  "int64",
  "bool",
)
FLOAT16, INT8, INT16, UINT8, UINT16, UINT32, UINT64 = (
  "float16",
  "int8",
  "int16",
  "uint8",
  "uint16",
  "uint32",
  "uint64",
)
# The values of an empty list of a format whose lists carry no item type (JSON).
UNKNOWN = "unknown"
# How a reader knows a feature's rank: Avro tells scalars from arrays;
# tf.train.Example cannot (every feature is a list).
SCALAR, LIST, ANY_RANK = "scalar", "list", "any"


class InputError(ValueError):
  """Bad input data; the message names the file and record at fault."""


_NUMPY_OF_KIND = {
  STRING: object,
  FLOAT32: np.float32,
  FLOAT64: np.float64,
  INT32: np.int32,
  INT64: np.int64,
  BOOL: np.bool_,
  FLOAT16: np.float16,
  INT8: np.int8,
  INT16: np.int16,
  UINT8: np.uint8,
  UINT16: np.uint16,
  UINT32: np.uint32,
  UINT64: np.uint64,
  UNKNOWN: object,
}


@dataclasses.dataclass(frozen=True)
class RawFeature:
  """A feature's values as read, their kind and rank hint.

  `data` is a flat numpy array, or the repeated field of a parsed
  tf.train.Example, converted only when a record cannot be stored as read.
  `dims`: the value's shape when the input shows it (nested lists or
  arrays: `(28, 28)`; a flat list `(n,)`; a scalar `()`), None when it
  cannot (tf.train.Example). An inner entry may be None when the value is
  empty and so does not show that dimension. `widens`: the kind was read
  off a number's text (JSON, CSV), so an int64 feature meets float32 values
  of other records as float32.
  """

  data: Any
  kind: str
  rank: str
  dims: Optional[tuple] = None
  widens: bool = False

  @property
  def size(self) -> int:
    return len(self.data)

  @property
  def values(self) -> np.ndarray:
    if isinstance(self.data, np.ndarray):
      return self.data
    return np.array(list(self.data), dtype=_NUMPY_OF_KIND[self.kind])

  def __reduce__(self):
    # Protobuf repeated fields do not pickle; runners pickle between stages.
    return (RawFeature, (self.values, self.kind, self.rank, self.dims, self.widens))


@dataclasses.dataclass(frozen=True)
class InputRecord:
  """One input example.

  `position` orders records of one input: (file or database path, index);
  `unit` names what the index counts ("record", "line" of a text file,
  "row" of a Parquet file, "example" of a LEAF user).
  `source` is a human-readable location for error messages. `example` is
  the parsed tf.train.Example without its client-id feature when the input
  holds Examples: records that already match the element spec are stored
  as read, without converting their values.
  """

  client_id: str
  features: Mapping[str, RawFeature]
  position: tuple[str, int]
  example: Any = None
  unit: str = "record"

  @property
  def source(self) -> str:
    return f"{self.position[0]} {self.unit} {self.position[1]}"


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


_FLOAT_KINDS = {FLOAT16, FLOAT32, FLOAT64}
_INT_KINDS = {INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64, BOOL}


def _compatible(kind: str, dtype: str) -> bool:
  if kind == UNKNOWN:  # An empty list fits any dtype.
    return True
  if dtype == "string":
    return kind == STRING
  if dtype.startswith("float"):
    return kind in _FLOAT_KINDS or kind in _INT_KINDS
  return kind in _INT_KINDS  # integer and bool dtypes


def _count_fits(f, n: int) -> bool:
  if f.is_variable_length:
    return (n % f.inner_size == 0) if f.inner_size else n == 0
  return n == f.inner_size


# Wire kind of a raw value -> the Example encoding that stores it unchanged.
_AS_READ = {STRING: "bytes", FLOAT32: "float", INT64: "int64"}


def encode_as_read(record: InputRecord, spec: ElementSpec) -> Optional[bytes]:
  """The store record of an Example input that already matches `spec`, else None.

  Matching means: exactly the spec's features, each in the list type the
  spec's dtype is stored as, with a fitting number of values, integers within
  the dtype's range and bools 0 or 1. Such a record re-serializes to the
  bytes `encode_example(conform_record(...))` would produce, without a
  value-by-value conversion. float16 and 64-bit patterns take the slow path,
  which rounds or reinterprets values.
  """
  example = record.example
  if example is None or len(record.features) != len(spec.features):
    return None
  for f in spec.features:
    raw = record.features.get(f.name)
    if raw is None or _AS_READ.get(raw.kind) != f.encoding or f.dtype == "float16":
      return None
    if not _count_fits(f, raw.size):
      return None
    if f.encoding == "int64" and f.dtype != "int64" and raw.size:
      lo, hi = min(raw.data), max(raw.data)
      if f.dtype == "bool":
        if lo < 0 or hi > 1:
          return None
      else:
        info = np.iinfo(np.dtype(f.dtype))
        if lo < info.min or hi > info.max:
          return None
  return serialize_example(example)


def _dims_fit(dims: tuple, shape: tuple) -> bool:
  """Whether nested values of `dims` (None: not shown) are of the spec's `shape`."""
  if len(dims) != len(shape):
    return False
  return all(d is None or s is None or d == s for d, s in zip(dims, shape))


def _shape_text(dims: tuple) -> str:
  return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


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
        f"{where}: feature {f.name!r} holds {raw.kind} values, but the element spec says {f.dtype}"
      )
    n = raw.size
    if raw.dims is not None and len(raw.dims) > 1 and not _dims_fit(raw.dims, f.shape):
      raise InputError(
        f"{where}: feature {f.name!r} has shape {_shape_text(raw.dims)}, which does not fit "
        f"shape {list(f.shape)}"
      )
    if not _count_fits(f, n):
      raise InputError(
        f"{where}: feature {f.name!r} has {n} values, which does not fit shape {list(f.shape)}"
      )
    values = raw.values
    target = numpy_dtype(f.dtype)
    if f.dtype == "bool" and raw.kind != BOOL and n:
      # astype(bool) would turn any non-zero integer into True and lose it.
      bad = values[(values != 0) & (values != 1)]
      if bad.size:
        raise InputError(
          f"{where}: feature {f.name!r} has value {bad[0]}, but the element spec says bool (0 or 1)"
        )
    if f.dtype != "string" and not f.dtype.startswith("float") and f.dtype != "bool" and n:
      info = np.iinfo(target)
      lo, hi = values.min(), values.max()
      if lo < info.min or hi > info.max:
        raise InputError(
          f"{where}: feature {f.name!r} has value {lo if lo < info.min else hi} outside "
          f"the range of {f.dtype}"
        )
    out[f.name] = values if f.dtype == "string" else values.astype(target)
  return out
