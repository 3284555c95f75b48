"""Values as readers decode them (Python scalars, nested lists) -> `RawFeature`s and client ids.

Avro, JSON Lines and LEAF readers get a record's values as Python objects:
scalars, or lists nested to some depth. `typed_feature` converts a value
whose kind and depth a schema declares (Avro); `json_feature` infers both
from the value (JSON). Nested lists must be rectangular: every list at one
depth has the same length, so the value has a shape (`dims`), e.g. a 28x28
list of lists has dims `(28, 28)` and is stored as its 784 values in row-major
order. `client_id_of` accepts string and integer ids; an integer id is
stored as its decimal string.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import numpy as np

from fedbeam.format.layout import InvalidClientIdError, check_client_id
from fedbeam.pipelines.records import (
  _NUMPY_OF_KIND,
  BOOL,
  FLOAT32,
  INT64,
  LIST,
  SCALAR,
  STRING,
  UNKNOWN,
  InputError,
  RawFeature,
)


def client_id_of(value: Any, key: str, source: str) -> str:
  """The client id a record's `key` field holds: a string, UTF-8 bytes or an integer.

  An integer (not a bool) becomes its decimal string (`7` -> `"7"`, `-3` -> `"-3"`).

  Raises:
    InputError: the value is of another type, empty or not UTF-8; the message
      starts with `source` and names `key`.
  """
  if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
    return str(int(value))
  if not isinstance(value, (str, bytes)):
    raise InputError(
      f"{source}: client-id field {key!r} is {type(value).__name__} {value!r}, "
      "expected a string or an integer"
    )
  try:
    return check_client_id(value, source)
  except InvalidClientIdError as e:
    raise InputError(str(e)) from None


def _flatten(value: Any, depth: int, where: str) -> tuple[list, tuple]:
  """(leaves in row-major order, dims) of `depth` levels of rectangular nested lists.

  A dimension under an empty list is None (not shown by the value).
  """
  dims: list[Optional[int]] = [None] * depth
  leaves: list = []

  def walk(v, level):
    if not isinstance(v, (list, tuple)):
      raise InputError(
        f"{where} is nested {level} deep in places and {depth} in others; "
        "nested lists must all have the same depth"
      )
    n = len(v)
    if dims[level] is None:
      dims[level] = n
    elif dims[level] != n:
      raise InputError(
        f"{where} is ragged: lists at depth {level + 1} have {dims[level]} and "
        f"{n} items; nested lists must be rectangular (only the leading "
        "dimension may vary between records)"
      )
    if level + 1 == depth:
      leaves.extend(v)
    else:
      for item in v:
        walk(item, level + 1)

  if depth:
    walk(value, 0)
  else:
    leaves.append(value)
  return leaves, tuple(dims)


def _as_numpy(leaves: list, kind: str, where: str) -> np.ndarray:
  if kind == STRING:
    out = np.empty(len(leaves), dtype=object)
    try:
      out[:] = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in leaves]
    except TypeError:
      bad = next(v for v in leaves if not isinstance(v, (str, bytes)))
      raise InputError(f"{where} holds {type(bad).__name__} {bad!r} among strings") from None
    return out
  if kind == UNKNOWN:
    return np.empty(0, dtype=object)
  try:
    return np.array(leaves, dtype=_NUMPY_OF_KIND[kind])
  except (OverflowError, ValueError, TypeError) as e:
    raise InputError(f"{where} holds a value that is not {kind} ({e})") from None


def typed_feature(value: Any, kind: str, depth: int, name: str, source: str) -> RawFeature:
  """A value of declared `kind`, `depth` levels of lists (0: a scalar), as a RawFeature.

  Raises:
    InputError: the value is null, ragged, nested unevenly or holds values
      of another kind; the message starts with `source` and names `name`.
  """
  where = f"{source}: feature {name!r}"
  if value is None:
    raise InputError(f"{where} is null; fedbeam needs a value in every record")
  leaves, dims = _flatten(value, depth, where)
  if any(v is None for v in leaves):
    raise InputError(f"{where} holds a null; fedbeam needs a value in every place")
  return RawFeature(_as_numpy(leaves, kind, where), kind, LIST if depth else SCALAR, dims)


def _depth_of(value: Any) -> int:
  depth = 0
  while isinstance(value, (list, tuple)):
    depth += 1
    if not value:
      break
    value = value[0]
  return depth


def _leaf_kind(leaves: list, where: str) -> str:
  types = set(map(type, leaves))
  if not types:
    return UNKNOWN
  if types <= {str}:
    return STRING
  if types <= {bool}:
    return BOOL
  if types <= {int}:
    return INT64
  if types <= {int, float}:
    return FLOAT32
  if type(None) in types:
    raise InputError(f"{where} holds a null; fedbeam needs a value in every place")
  if dict in types:
    raise InputError(
      f"{where} holds an object; nested objects are not supported "
      "(flatten them into features of their own)"
    )
  if list in types:
    raise InputError(f"{where}: nested lists must all have the same depth")
  names = sorted(t.__name__ for t in types)
  raise InputError(f"{where} mixes values of types {names}; a feature holds one type")


def json_feature(value: Any, name: str, source: str) -> RawFeature:
  """A decoded JSON value (number, string, bool or rectangular nested lists) as a RawFeature.

  Kinds: strings -> string, booleans -> bool, integers -> int64, numbers
  with a fraction or exponent (or integers mixed with them) -> float32,
  with the values kept as float64 so a declared float64 spec loses nothing.
  An empty list has no kind until another record shows it.

  Raises:
    InputError: null, an object, ragged or unevenly nested lists, or mixed
      types; the message starts with `source` and names `name`.
  """
  where = f"{source}: feature {name!r}"
  if value is None:
    raise InputError(f"{where} is null; fedbeam needs a value in every record")
  if isinstance(value, dict):
    raise InputError(
      f"{where} is an object; nested objects are not supported "
      "(flatten them into features of their own)"
    )
  depth = _depth_of(value)
  leaves, dims = _flatten(value, depth, where)
  kind = _leaf_kind(leaves, where)
  if kind == FLOAT32:
    data = np.array(leaves, dtype=np.float64)
  else:
    data = _as_numpy(leaves, kind, where)
  return RawFeature(data, kind, LIST if depth else SCALAR, dims, widens=kind in (INT64, FLOAT32))


__all__ = ["client_id_of", "json_feature", "typed_feature"]
