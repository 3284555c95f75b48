"""fedbeam.format.example_wire: fields and feature values located in serialized Examples."""

import numpy as np
import pytest

from fedbeam.format import example_wire
from fedbeam.format.codec import Example


def _example() -> bytes:
  example = Example()
  fmap = example.features.feature
  fmap["id"].bytes_list.value.append(b"client-7")
  fmap["label"].int64_list.value.extend([3, 300])
  fmap["pixels"].float_list.value.extend([0.5, -1.0])
  return example.SerializeToString(deterministic=True)


def test_message_fields_cover_the_message_end_to_end():
  data = _example()
  top = example_wire.message_fields(data, 0, len(data))
  assert [(n, w) for n, w, _, _ in top] == [(1, 2)]
  _, _, start, end = top[0]
  assert end == len(data)
  entries = example_wire.message_fields(data, start, end)
  assert len(entries) == 3 and entries[-1][3] == end
  # An entry's key (1) is its feature name.
  names = [
    bytes(data[s:e])
    for _, _, es, ee in entries
    for n, _, s, e in example_wire.message_fields(data, es, ee)
    if n == 1
  ]
  assert names == [b"id", b"label", b"pixels"]


def test_feature_lists_locate_every_value():
  data = _example()
  lists = example_wire.feature_lists(data)
  kind, [(wire, s, e)] = lists["id"]
  assert (kind, wire, data[s:e]) == (example_wire.BYTES_LIST, 2, b"client-7")
  kind, [(wire, s, e)] = lists["pixels"]
  assert kind == example_wire.FLOAT_LIST and wire == 2
  assert np.frombuffer(data[s:e], "<f4").tolist() == [0.5, -1.0]
  kind, [(wire, s, e)] = lists["label"]
  assert (kind, wire, data[s:e]) == (example_wire.INT64_LIST, 2, b"\x03\xac\x02")


def test_a_field_running_past_its_message_is_refused():
  data = _example()
  with pytest.raises(example_wire.ExampleWireError, match="runs past the end"):
    example_wire.message_fields(data, 0, len(data) - 1)
  with pytest.raises(example_wire.ExampleWireError):
    example_wire.feature_lists(data[:-3])


def test_framed_alike_takes_rows_that_differ_only_in_their_values():
  def record(client: bytes, labels: list[int], pixels: list[float]) -> bytes:
    example = Example()
    fmap = example.features.feature
    fmap["id"].bytes_list.value.append(client)
    fmap["label"].int64_list.value.extend(labels)
    fmap["pixels"].float_list.value.extend(pixels)
    return example.SerializeToString(deterministic=True)

  rows = [
    record(b"client-7", [3, 300], [0.5, -1.0]),
    record(b"client-8", [9, 129], [2.0, 7.5]),  # other values: alike
    record(b"client-9", [300, 3], [0.5, -1.0]),  # varints end elsewhere
    record(b"client-7", [3, 300], [0.5, -1.0]).replace(b"pixels", b"pixelz"),
  ]  # framing
  assert len({len(r) for r in rows}) == 1
  block = np.frombuffer(b"".join(rows), np.uint8).reshape(len(rows), -1)
  alike = example_wire.framed_alike(block, example_wire.feature_lists(rows[0]))
  assert alike.tolist() == [True, True, False, False]
