"""Decoded values -> RawFeatures (dims, kinds) and client ids; spec inference over their dims."""

import numpy as np
import pytest

from fedbeam.pipelines.raw_values import client_id_of, json_feature, typed_feature
from fedbeam.pipelines.records import InputError, InputRecord
from fedbeam.pipelines.spec_inference import InferElementSpecFn


def test_client_id_of_stores_integers_as_their_decimal_string():
  assert client_id_of(7, "uid", "f record 0") == "7"
  assert client_id_of(-3, "uid", "f record 0") == "-3"
  assert client_id_of(np.int64(2**62), "uid", "f record 0") == str(2**62)
  assert client_id_of("bob", "uid", "f record 0") == "bob"
  assert client_id_of("é".encode("utf-8"), "uid", "f record 0") == "é"


@pytest.mark.parametrize(
  "value, message",
  [
    (2.5, "client-id field 'uid' is float 2.5"),
    (True, "client-id field 'uid' is bool True"),
    ("", "client id is empty"),
    (b"\xff", "is not valid UTF-8"),
    (None, "is NoneType None"),
  ],
)
def test_client_id_of_refuses_other_values_naming_the_record(value, message):
  with pytest.raises(InputError, match="f record 3") as e:
    client_id_of(value, "uid", "f record 3")
  assert message in str(e.value)


def test_json_feature_infers_kind_and_dims_of_nested_lists():
  f = json_feature([[1, 2, 3], [4, 5, 6]], "m", "src")
  assert (f.kind, f.rank, f.dims, f.widens) == ("int64", "list", (2, 3), True)
  np.testing.assert_array_equal(f.data, [1, 2, 3, 4, 5, 6])
  f = json_feature([1, 0.5], "v", "src")
  assert f.kind == "float32" and f.data.dtype == np.float64 and f.dims == (2,)
  assert json_feature("abc", "s", "src").data.tolist() == [b"abc"]
  assert json_feature(True, "b", "src").kind == "bool"
  empty = json_feature([], "e", "src")
  assert (empty.kind, empty.dims, empty.size) == ("unknown", (0,), 0)


@pytest.mark.parametrize(
  "value, message",
  [
    ([[1, 2], [3]], "is ragged"),
    ([[1], 2], "nested lists must all have the same depth"),
    ([1, "a"], "mixes values of types"),
    (None, "is null"),
    ({"a": 1}, "is an object"),
    ([1, None], "holds a null"),
  ],
)
def test_json_feature_refuses_ragged_mixed_or_null_values(value, message):
  with pytest.raises(InputError, match="src line 4: feature 'm'") as e:
    json_feature(value, "m", "src line 4")
  assert message in str(e.value)


def test_typed_feature_converts_declared_depth():
  f = typed_feature([[1.0, 2.0], [3.0, 4.0]], "float32", 2, "p", "src")
  assert (f.kind, f.dims, f.data.dtype) == ("float32", (2, 2), np.float32)
  f = typed_feature([], "int32", 2, "p", "src")
  assert f.dims == (0, None) and f.size == 0
  assert typed_feature(b"x", "string", 0, "s", "src").data.tolist() == [b"x"]
  with pytest.raises(InputError, match="src: feature 'p' is ragged"):
    typed_feature([[1.0], [2.0, 3.0]], "float32", 2, "p", "src")


def _infer(*values_per_record):
  fn = InferElementSpecFn()
  acc = fn.create_accumulator()
  for i, value in enumerate(values_per_record):
    record = InputRecord(
      "c", {"m": json_feature(value, "m", f"f line {i + 1}")}, ("f", i + 1), unit="line"
    )
    acc = fn.add_input(acc, record)
  return fn.extract_output(fn.merge_accumulators([acc]))


def test_inference_keeps_inner_dims_and_varies_only_the_leading_one():
  assert _infer([[1, 2], [3, 4]], [[5, 6], [7, 8]])["m"].shape == (2, 2)
  assert _infer([[1, 2]], [[5, 6], [7, 8]], [])["m"].shape == (None, 2)
  with pytest.raises(InputError, match="only the leading dimension may vary"):
    _infer([[1, 2]], [[1, 2, 3]])


def test_inference_widens_text_integers_to_float32_and_resolves_empty_lists():
  assert _infer(3, 0.5)["m"].dtype == "float32"
  assert _infer([], [1, 2])["m"].dtype == "int64"
  with pytest.raises(InputError, match="empty list in every record"):
    _infer([], [])
  with pytest.raises(InputError, match="inconsistent types"):
    _infer("a", 1)
