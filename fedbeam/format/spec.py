"""The element spec of a store: feature names, dtypes and shapes.

A store holds elements that are flat mappings `feature name -> tensor`, the
structure TFF's SQL client data and most `tff.simulation.datasets` use. The
spec is declared once (from a user's `--element-spec` file, inferred from the
input, or read from a store's metadata) and drives both the writer's encoding
and the reader's in-graph parsing, so a loaded dataset has exactly the
`element_spec` of the input.

The JSON form (the `--element-spec FILE` format and the `element_spec` field of
a store's metadata, minus the list wrapping) is an object mapping each feature
name to `{"dtype": "float32", "shape": [28, 28]}`; `null` marks a
variable-length dimension. Only the leading dimension may be variable, because
a `tf.train.Example` stores every feature as one flat list.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = [
  "ElementSpec",
  "FeatureSpec",
  "ElementSpecError",
  "ENCODINGS",
  "numpy_dtype",
  "MAX_VALUES_PER_EXAMPLE",
  "MAX_RANK",
]

# Bounds on a spec read from a store (docs/store-format.md, "Limits"): a
# forged shape such as [1000000000] would otherwise make the reader allocate
# gigabytes per example and crash. A tf.train.Example is a protobuf message,
# at most 2 GiB, and a value takes at least one byte, so no store can hold
# more values per example than this anyway.
MAX_VALUES_PER_EXAMPLE = 2**28
MAX_RANK = 32

# dtype name -> how it is stored in a tf.train.Example.
#   bytes:  bytes_list
#   float:  float_list (exact for float16 and float32)
#   int64:  int64_list (exact for every integer dtype up to int64/uint32, bool)
#   bits64: int64_list holding the 64-bit pattern, bitcast back on read, so
#           float64 and uint64 round-trip exactly.
ENCODINGS: Mapping[str, str] = {
  "string": "bytes",
  "float16": "float",
  "float32": "float",
  "float64": "bits64",
  "bool": "int64",
  "int8": "int64",
  "int16": "int64",
  "int32": "int64",
  "int64": "int64",
  "uint8": "int64",
  "uint16": "int64",
  "uint32": "int64",
  "uint64": "bits64",
}


# The fewest bytes one value of each encoding takes in a serialized Example:
# packed floats 4, varints 1, a bytes value its tag and length byte.
_MIN_VALUE_BYTES = {"bytes": 2, "float": 4, "int64": 1, "bits64": 1}
# The fewest bytes of a TFRecord besides its data: length, its CRC, data CRC.
_TFRECORD_FRAMING_BYTES = 16


class ElementSpecError(ValueError):
  """An element spec that fedbeam cannot store, or a record that does not match it."""


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """One feature: its name, dtype name (a key of `ENCODINGS`) and shape.

  `shape` is a tuple of ints; its first entry may be `None` (variable length).
  """

  name: str
  dtype: str
  shape: tuple[Optional[int], ...]

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ElementSpecError(f"feature name must be a non-empty string, got {self.name!r}")
    if self.dtype not in ENCODINGS:
      raise ElementSpecError(
        f"feature {self.name!r}: dtype {self.dtype!r} is not supported; "
        f"use one of {sorted(ENCODINGS)}"
      )
    for i, dim in enumerate(self.shape):
      if dim is None:
        if i != 0:
          raise ElementSpecError(
            f"feature {self.name!r}: only the leading dimension may be "
            f"variable (null), got shape {list(self.shape)}"
          )
      elif not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
        raise ElementSpecError(
          f"feature {self.name!r}: dimensions must be non-negative integers "
          f"or null, got shape {list(self.shape)}"
        )

  @property
  def encoding(self) -> str:
    return ENCODINGS[self.dtype]

  @property
  def is_variable_length(self) -> bool:
    return bool(self.shape) and self.shape[0] is None

  @property
  def inner_size(self) -> int:
    """Number of values per step of the leading dimension (all values if fixed)."""
    dims = self.shape[1:] if self.is_variable_length else self.shape
    return math.prod(dims)

  def to_json(self) -> dict[str, Any]:
    return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclasses.dataclass(frozen=True)
class ElementSpec:
  """An ordered sequence of `FeatureSpec`s; the order is the element's key order."""

  features: tuple[FeatureSpec, ...]

  def __post_init__(self):
    if not self.features:
      raise ElementSpecError("an element spec needs at least one feature")
    names = [f.name for f in self.features]
    if len(set(names)) != len(names):
      raise ElementSpecError(f"duplicate feature names in element spec: {names}")

  @property
  def names(self) -> list[str]:
    return [f.name for f in self.features]

  def __getitem__(self, name: str) -> FeatureSpec:
    for f in self.features:
      if f.name == name:
        return f
    raise KeyError(name)

  def __contains__(self, name: str) -> bool:
    return any(f.name == name for f in self.features)

  # JSON: {"name": {"dtype": ..., "shape": [...]}, ...} in element order.
  def to_json(self) -> dict[str, Any]:
    return {f.name: f.to_json() for f in self.features}

  @classmethod
  def from_json(cls, obj: Any, source: str = "element spec") -> "ElementSpec":
    """Parses the JSON form; raises `ElementSpecError` naming `source`."""
    if not isinstance(obj, Mapping) or not obj:
      raise ElementSpecError(
        f"{source}: expected a non-empty JSON object mapping feature names to "
        '{"dtype": ..., "shape": [...]}'
      )
    features = []
    for name, entry in obj.items():
      if not isinstance(entry, Mapping) or "dtype" not in entry or "shape" not in entry:
        raise ElementSpecError(
          f'{source}: feature {name!r} must be {{"dtype": ..., "shape": [...]}}, got {entry!r}'
        )
      shape = entry["shape"]
      if not isinstance(shape, list):
        raise ElementSpecError(f"{source}: feature {name!r}: shape must be a list, got {shape!r}")
      try:
        features.append(FeatureSpec(name, entry["dtype"], tuple(shape)))
      except ElementSpecError as e:
        raise ElementSpecError(f"{source}: {e}") from None
    return cls(tuple(features))

  @classmethod
  def from_json_file(cls, path: str) -> "ElementSpec":
    """Reads an `--element-spec` file (local or any Beam filesystem path)."""
    from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top

    try:
      with FileSystems.open(path) as f:
        text = f.read().decode("utf-8")
    except Exception as e:  # pylint: disable=broad-except
      raise ElementSpecError(f"cannot read element spec file {path}: {e}") from None
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      raise ElementSpecError(f"element spec file {path} is not valid JSON: {e}") from None
    return cls.from_json(obj, source=f"element spec file {path}")

  # The metadata form keeps the order explicit (Avro maps are unordered).
  def to_metadata(self) -> list[dict[str, Any]]:
    return [{"name": f.name, "dtype": f.dtype, "shape": list(f.shape)} for f in self.features]

  @classmethod
  def from_metadata(cls, rows: Sequence[Mapping[str, Any]]) -> "ElementSpec":
    return cls(tuple(FeatureSpec(r["name"], r["dtype"], tuple(r["shape"])) for r in rows))

  def check_size_limits(self, source: str = "element spec") -> None:
    """Checks the spec against MAX_RANK and MAX_VALUES_PER_EXAMPLE.

    The values of an example are those of every fixed-shape feature plus one
    step (the product of the inner dimensions) of each variable-length one.

    Raises:
      ElementSpecError: naming `source` and the feature that crosses a limit.
    """
    total = 0
    for f in self.features:
      if len(f.shape) > MAX_RANK:
        raise ElementSpecError(
          f"{source}: feature {f.name!r} has rank {len(f.shape)}; "
          f"fedbeam reads at most rank {MAX_RANK}"
        )
      total += f.inner_size
      if total > MAX_VALUES_PER_EXAMPLE:
        raise ElementSpecError(
          f"{source}: feature {f.name!r} (shape {list(f.shape)}) brings an example to "
          f"{total} values; fedbeam reads at most {MAX_VALUES_PER_EXAMPLE} per example"
        )

  def min_record_bytes(self) -> int:
    """The fewest bytes one example of this spec takes as a TFRecord in a client file.

    A lower bound: the TFRecord framing and every fixed-shape feature's values
    at their smallest encoding (variable-length features may hold nothing;
    names and protobuf framing are not counted). A client file of n examples
    has at least n times this many bytes.
    """
    return _TFRECORD_FRAMING_BYTES + sum(
      f.inner_size * _MIN_VALUE_BYTES[f.encoding] for f in self.features if not f.is_variable_length
    )

  def to_tensor_specs(self) -> "collections.OrderedDict[str, Any]":
    """The `tf.TensorSpec`s of a loaded element, as TFF's SQL client data builds them."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return collections.OrderedDict(
      (f.name, tf.TensorSpec(shape=f.shape, dtype=tf.dtypes.as_dtype(f.dtype)))
      for f in self.features
    )

  @classmethod
  def from_tensor_specs(cls, specs: Mapping[str, Any]) -> "ElementSpec":
    """Builds a spec from a flat mapping of `tf.TensorSpec` (e.g. a dataset's element_spec)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    features = []
    for name, spec in specs.items():
      if not isinstance(spec, tf.TensorSpec):
        raise ElementSpecError(
          f"feature {name!r}: expected a tf.TensorSpec, got {type(spec).__name__} "
          "(nested or ragged structures are not supported)"
        )
      features.append(FeatureSpec(name, spec.dtype.name, tuple(spec.shape.as_list())))
    return cls(tuple(features))


def numpy_dtype(dtype: str) -> np.dtype:
  """The numpy dtype of a feature's values (`object` for strings)."""
  return np.dtype(object) if dtype == "string" else np.dtype(dtype)
