"""`fedbeam.testing`: the documented example works and failures read well."""

import os

import numpy as np
import pytest

from fedbeam import testing
from fedbeam.format.tfrecord import read_tfrecords

CLIENTS = {
  "alice": [
    {"x": np.float32(1.5), "label": 0, "name": "a\x00"},
    {"x": np.float32(2.0), "label": 1, "name": "é"},
  ],
  "bob/2": [{"x": np.float32(0.5), "label": 1, "name": b"\xff"}],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  return testing.prepare_store(CLIENTS, tmp_path_factory.mktemp("testing"), order_by="@input")


def test_documented_example_passes(store):
  testing.assert_store_equals(store, CLIENTS)
  testing.assert_store_equals(
    store, {k: list(reversed(v)) for k, v in CLIENTS.items()}, ordered=False
  )
  # Python floats compare with float32 features after conversion.
  testing.assert_store_equals(
    store,
    {
      "alice": [{"x": 1.5, "label": 0, "name": "a\x00"}, {"x": 2.0, "label": 1, "name": "é"}],
      "bob/2": [{"x": 0.5, "label": 1, "name": b"\xff"}],
    },
  )


def _failure(store, expected, **kwargs):
  with pytest.raises(AssertionError) as e:
    testing.assert_store_equals(store, expected, **kwargs)
  return str(e.value)


def test_missing_and_extra_client_ids_are_listed(store):
  message = _failure(store, {"alice": CLIENTS["alice"], "carol": []})
  assert "client ids missing from the store: ['carol']" in message
  assert "client ids in the store but not expected: ['bob/2']" in message


def test_count_mismatch_names_the_client(store):
  message = _failure(store, {"alice": CLIENTS["alice"][:1], "bob/2": CLIENTS["bob/2"]})
  assert "'alice': 2 examples, expected 1" in message


def test_first_differing_element_and_feature_show_both_values(store):
  changed = {
    "alice": [CLIENTS["alice"][0], dict(CLIENTS["alice"][1], x=2.5)],
    "bob/2": CLIENTS["bob/2"],
  }
  message = _failure(store, changed)
  assert "client 'alice': element 1: feature 'x' differs" in message
  assert "actual:   array(2., dtype=float32)" in message
  assert "expected: array(2.5, dtype=float32)" in message
  message = _failure(
    store,
    {"alice": CLIENTS["alice"], "bob/2": [{"x": 0.5, "label": 1, "name": b"\xfe"}]},
    ordered=False,
  )
  assert "client 'bob/2'" in message and "feature 'name' differs" in message


def test_trailing_nul_bytes_count(store):
  message = _failure(
    store,
    {
      "alice": [dict(CLIENTS["alice"][0], name="a"), CLIENTS["alice"][1]],
      "bob/2": CLIENTS["bob/2"],
    },
  )
  assert "feature 'name' differs" in message


def test_inputs_of_every_format_give_the_same_store(tmp_path, store):
  spec = {
    "x": {"dtype": "float32", "shape": []},
    "label": {"dtype": "int64", "shape": []},
    "name": {"dtype": "string", "shape": []},
  }
  # Avro fields have one type: the names, one of them not UTF-8, go in as bytes.
  as_bytes = {
    cid: [
      dict(e, name=e["name"].encode() if isinstance(e["name"], str) else e["name"])
      for e in elements
    ]
    for cid, elements in CLIENTS.items()
  }
  avro = testing.write_avro_input(tmp_path / "in.avro", as_bytes)
  sqlite = testing.write_tff_sqlite_input(tmp_path / "in.sqlite", CLIENTS, spec)
  for path, flags in [(avro, {"client_id_key": "client_id"}), (sqlite, {})]:
    out = testing.prepare_store(
      path,
      tmp_path,
      output=str(tmp_path / f"store-{path[-4:]}"),
      element_spec=spec,
      order_by="@input",
      **flags,
    )
    testing.assert_store_equals(out, CLIENTS)
    actual, reference = testing.read_store(out), testing.read_store(store)
    assert list(actual) == list(reference) == sorted(CLIENTS)
    for cid in actual:
      testing.assert_elements_equal(actual[cid], reference[cid], where=cid)


def test_client_file_is_each_clients_file_in_the_store(store):
  from fedbeam.format.layout import CLIENT_FILE_SUFFIX  # pylint: disable=g-import-not-at-top

  paths = {cid: testing.client_file(store, cid) for cid in CLIENTS}
  written = {
    os.path.join(d, n)
    for d, _, names in os.walk(store)
    for n in names
    if n.endswith(CLIENT_FILE_SUFFIX)
  }
  assert set(paths.values()) == written
  for cid, path in paths.items():
    with open(path, "rb") as f:
      assert len(list(read_tfrecords(f))) == len(CLIENTS[cid])


def test_unkeyed_tfrecord_input_holds_the_elements_without_a_client_id(tmp_path):
  from fedbeam.format.codec import Example  # pylint: disable=g-import-not-at-top

  elements = [e for client in CLIENTS.values() for e in client]
  path = testing.write_unkeyed_tfrecord_input(tmp_path / "in" / "x.tfrecord", elements)
  with open(path, "rb") as f:
    records = [Example.FromString(r).features.feature for r in read_tfrecords(f)]
  assert [sorted(r.keys()) for r in records] == [["label", "name", "x"]] * 3
  assert [r["label"].int64_list.value[0] for r in records] == [0, 1, 1]
  assert [r["name"].bytes_list.value[0] for r in records] == [b"a\x00", "é".encode(), b"\xff"]


def test_avro_input_without_a_client_id_key_has_no_id_field(tmp_path):
  import fastavro  # pylint: disable=g-import-not-at-top

  clients = {"a": [{"x": np.float32(1.5), "label": 0}], "b": [{"x": np.float32(2.0), "label": 1}]}
  path = testing.write_avro_input(tmp_path / "x.avro", clients, client_id_key=None)
  with open(path, "rb") as f:
    rows = list(fastavro.reader(f))
  assert rows == [{"x": 1.5, "label": 0}, {"x": 2.0, "label": 1}]
