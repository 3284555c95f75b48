"""Parquet, CSV, JSON Lines and LEAF input, integer client ids, nested values and Avro's types.

Each new format is held to TFRecord input: the same examples and ids give
the same client files and the same manifest rows (apart from the data
directory's name, which the job key picks). Bad input names the file and the
row, line or example, and leaves no committed store.
"""

import csv
import datetime
import decimal
import json
import os
import uuid

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedbeam import testing
from fedbeam.cli import main
from fedbeam.format.layout import METADATA_FILE
from fedbeam.format.manifest import read_manifest
from fedbeam.format.metadata import data_root, read_metadata
from fedbeam.format.tfrecord import tfrecord_frame

MULTI_PROCESSING = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
IDS = ["alice", "bob/ü", "with space", "x" * 200, "7"]


def _clients():
  """Clients of scalars, a flat list, a 2x3 nested list and a string; floats exact in float32."""
  rng = np.random.RandomState(3)
  clients = {}
  for i, cid in enumerate(IDS):
    clients[cid] = [
      {
        "label": int(rng.randint(0, 10)),
        "x": (rng.randint(-8, 8, size=3) / 8).tolist(),
        "img": (rng.randint(0, 16, size=(2, 3)) / 4).tolist(),
        "name": f"{cid}#{j}",
      }
      for j in range(1 + i % 3)
    ]
  return clients


SPEC = {
  "img": {"dtype": "float32", "shape": [2, 3]},
  "label": {"dtype": "int64", "shape": []},
  "name": {"dtype": "string", "shape": []},
  "x": {"dtype": "float32", "shape": [3]},
}


def _files(root):
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _client_files(store):
  data = data_root(store, read_metadata(store))
  return {k: v for k, v in _files(data).items() if k.endswith(".tfrecord")}


def _manifest_rows(store):
  metadata = read_metadata(store)
  rows = []
  for row in read_manifest(store, metadata):
    row = dict(row)
    row["path"] = row["path"].replace(metadata["data_dir"], "DATA")
    rows.append(row)
  return sorted(rows, key=lambda r: r["client_id"])


def _spec_of(store):
  return read_metadata(store)["element_spec"]


def _assert_same_store(store, reference):
  assert _spec_of(store) == _spec_of(reference)
  files = _client_files(store)
  assert len(files) == len(_client_files(reference)) > 0
  assert files == _client_files(reference)
  assert _manifest_rows(store) == _manifest_rows(reference)


def _write_parquet(path, clients, key="client_id", id_type=None):
  id_type = pa.string() if id_type is None else id_type
  rows = [(cid, e) for cid, elements in clients.items() for e in elements]
  table = pa.table(
    {
      key: pa.array([cid if id_type != pa.int64() else int(cid) for cid, _ in rows], id_type),
      "label": pa.array([e["label"] for _, e in rows], pa.int64()),
      "x": pa.array([e["x"] for _, e in rows], pa.list_(pa.float32())),
      "img": pa.array([e["img"] for _, e in rows], pa.list_(pa.list_(pa.float32(), 3))),
      "name": pa.array([e["name"] for _, e in rows], pa.string()),
    }
  )
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(table, path, row_group_size=4)
  return str(path)


def _write_jsonl(path, clients, key="client_id", int_ids=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for cid, elements in clients.items():
      for e in elements:
        f.write(json.dumps({key: int(cid) if int_ids else cid, **e}, ensure_ascii=False) + "\n")
      f.write("\n")  # Blank lines are skipped.
  return str(path)


def _write_leaf(path, clients):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  users = list(clients)
  data = {
    "users": users,
    "num_samples": [len(clients[u]) for u in users],
    "user_data": {
      u: {"x": [e["x"] for e in clients[u]], "y": [e["y"] for e in clients[u]]} for u in users
    },
  }
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)
  return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The clients written as TFRecord and prepared with the spec the other formats infer."""
  root = tmp_path_factory.mktemp("reference")
  clients = _clients()
  tfrecord = testing.write_tfrecord_input(root / "in.tfrecord", clients)
  store = testing.prepare_store(
    tfrecord, root, output=str(root / "store"), client_id_key="client_id", element_spec=SPEC
  )
  return {"root": root, "clients": clients, "store": store}


# ----------------------------------------------------------------------------
# Same store as TFRecord input
# ----------------------------------------------------------------------------


def test_parquet_input_writes_the_store_tfrecord_input_writes(reference, tmp_path):
  path = _write_parquet(tmp_path / "in" / "clients.parquet", reference["clients"])
  store = testing.prepare_store(path, tmp_path, client_id_key="client_id")
  assert _spec_of(store)[0] == {"name": "img", "dtype": "float32", "shape": [2, 3]}
  _assert_same_store(store, reference["store"])
  testing.assert_store_equals(store, reference["clients"], ordered=False)


def test_parquet_input_is_byte_identical_on_two_worker_processes(reference, tmp_path):
  path = _write_parquet(tmp_path / "in" / "clients.parquet", reference["clients"])
  one = testing.prepare_store(
    path, tmp_path, output=str(tmp_path / "one"), client_id_key="client_id"
  )
  two = testing.prepare_store(
    path,
    tmp_path,
    output=str(tmp_path / "two"),
    client_id_key="client_id",
    beam_args=MULTI_PROCESSING,
  )
  assert _files(one) == _files(two)


def test_jsonl_input_writes_the_store_tfrecord_input_writes(reference, tmp_path):
  path = _write_jsonl(tmp_path / "in" / "clients.jsonl", reference["clients"])
  store = testing.prepare_store(path, tmp_path, client_id_key="client_id")
  _assert_same_store(store, reference["store"])


def test_csv_input_writes_the_store_tfrecord_input_writes(tmp_path):
  clients = {
    cid: [
      {"label": i + j, "v": (i - j) / 4, "w": 3 if j == 0 else 0.5, "name": f"{cid}, #{j}"}
      for j in range(1 + i % 3)
    ]
    for i, cid in enumerate(IDS)
  }
  path = tmp_path / "in" / "clients.csv"
  os.makedirs(path.parent)
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["name", "client_id", "label", "v", "w"])
    for cid, elements in clients.items():
      for e in elements:
        writer.writerow([e["name"], cid, e["label"], repr(float(e["v"])), e["w"]])
  store = testing.prepare_store(
    str(path), tmp_path, output=str(tmp_path / "csv"), client_id_key="client_id"
  )
  # "w" holds 3 in some rows and 0.5 in others: float32, like TFRecord's float_list.
  as_floats = {
    cid: [{**e, "v": float(e["v"]), "w": float(e["w"])} for e in elements]
    for cid, elements in clients.items()
  }
  tfrecord = testing.write_tfrecord_input(tmp_path / "in.tfrecord", as_floats)
  ref = testing.prepare_store(
    tfrecord, tmp_path, output=str(tmp_path / "tfrecord"), client_id_key="client_id"
  )
  assert {r["name"]: r["dtype"] for r in _spec_of(store)} == {
    "label": "int64",
    "name": "string",
    "v": "float32",
    "w": "float32",
  }
  _assert_same_store(store, ref)


def test_leaf_input_writes_the_store_tfrecord_input_writes(tmp_path):
  rng = np.random.RandomState(5)
  clients = {
    f"f{i:04d}_{i % 3}": [
      {"x": (rng.randint(0, 8, size=4) / 8).tolist(), "y": int(rng.randint(0, 62))}
      for _ in range(1 + i % 4)
    ]
    for i in range(6)
  }
  half = list(clients)[:3]
  _write_leaf(tmp_path / "in" / "a.json", {u: clients[u] for u in half})
  _write_leaf(tmp_path / "in" / "b.json", {u: clients[u] for u in clients if u not in half})
  store = testing.prepare_store(
    str(tmp_path / "in" / "*.json"), tmp_path, output=str(tmp_path / "leaf"), input_format="leaf"
  )
  tfrecord = testing.write_tfrecord_input(tmp_path / "in.tfrecord", clients)
  ref = testing.prepare_store(
    tfrecord, tmp_path, output=str(tmp_path / "tfrecord"), client_id_key="client_id"
  )
  assert _spec_of(store) == [
    {"name": "x", "dtype": "float32", "shape": [4]},
    {"name": "y", "dtype": "int64", "shape": []},
  ]
  _assert_same_store(store, ref)


# ----------------------------------------------------------------------------
# Integer client ids
# ----------------------------------------------------------------------------


def _int_id_clients():
  return {"7": [{"v": 1.0}, {"v": 2.0}], "-3": [{"v": 3.0}], "12345678901": [{"v": 4.0}]}


def _int_id_example(cid, v):
  from tensorflow.core.example import example_pb2

  ex = example_pb2.Example()
  ex.features.feature["client_id"].int64_list.value.append(int(cid))
  ex.features.feature["v"].float_list.value.append(v)
  return ex.SerializeToString()


def test_integer_client_ids_are_stored_as_their_decimal_string_in_every_format(tmp_path):
  clients = _int_id_clients()
  ref = testing.prepare_store(clients, tmp_path / "ref")
  stores = {}
  # TFRecord: an int64_list id; enough records of one layout for the batch encoder.
  many = {cid: elements * 10 for cid, elements in clients.items()}
  ref_many = testing.prepare_store(many, tmp_path / "ref_many")
  path = tmp_path / "ids.tfrecord"
  with open(path, "wb") as f:
    for cid, elements in many.items():
      for e in elements:
        f.write(tfrecord_frame(_int_id_example(cid, e["v"])))
  stores["tfrecord"] = (
    testing.prepare_store(str(path), tmp_path / "tfrecord", client_id_key="client_id"),
    ref_many,
  )
  avro = tmp_path / "ids.avro"
  schema = {
    "type": "record",
    "name": "R",
    "fields": [{"name": "client_id", "type": "long"}, {"name": "v", "type": "float"}],
  }
  with open(avro, "wb") as f:
    fastavro.writer(
      f,
      fastavro.parse_schema(schema),
      [{"client_id": int(cid), "v": e["v"]} for cid, es in clients.items() for e in es],
    )
  stores["avro"] = (
    testing.prepare_store(str(avro), tmp_path / "avro", client_id_key="client_id"),
    ref,
  )
  table = pa.table(
    {
      "client_id": pa.array([int(c) for c, es in clients.items() for _ in es]),
      "v": pa.array([e["v"] for es in clients.values() for e in es], pa.float32()),
    }
  )
  pq.write_table(table, tmp_path / "ids.parquet")
  stores["parquet"] = (
    testing.prepare_store(
      str(tmp_path / "ids.parquet"), tmp_path / "parquet", client_id_key="client_id"
    ),
    ref,
  )
  jsonl = _write_jsonl(tmp_path / "ids.jsonl", clients, int_ids=True)
  stores["jsonl"] = (
    testing.prepare_store(jsonl, tmp_path / "jsonl", client_id_key="client_id"),
    ref,
  )
  for fmt, (store, expected) in stores.items():
    assert [r["client_id"] for r in _manifest_rows(store)] == ["-3", "12345678901", "7"], fmt
    _assert_same_store(store, expected)


# ----------------------------------------------------------------------------
# Nested values and Avro types
# ----------------------------------------------------------------------------


def test_nested_lists_infer_fixed_and_variable_dimensions(tmp_path):
  rng = np.random.RandomState(0)
  clients = {
    f"c{i}": [
      {
        "pixels": rng.randint(0, 255, size=(28, 28)).tolist(),
        "tokens": rng.randint(0, 9, size=(1 + j, 2)).tolist(),
      }
      for j in range(3)
    ]
    for i in range(2)
  }
  path = _write_jsonl(tmp_path / "in.jsonl", clients)
  store = testing.prepare_store(path, tmp_path, client_id_key="client_id")
  assert _spec_of(store) == [
    {"name": "pixels", "dtype": "int64", "shape": [28, 28]},
    {"name": "tokens", "dtype": "int64", "shape": [None, 2]},
  ]
  testing.assert_store_equals(store, clients, ordered=False)


def test_avro_nested_arrays_and_logical_types_are_read(tmp_path):
  schema = {
    "type": "record",
    "name": "R",
    "fields": [
      {"name": "uid", "type": "string"},
      {"name": "pixels", "type": {"type": "array", "items": {"type": "array", "items": "float"}}},
      {"name": "day", "type": {"type": "int", "logicalType": "date"}},
      {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
      {"name": "at_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
      {
        "name": "price",
        "type": {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2},
      },
      {"name": "key", "type": {"type": "string", "logicalType": "uuid"}},
    ],
  }
  at = datetime.datetime(2024, 3, 1, 12, 30, 15, 250000, tzinfo=datetime.timezone.utc)
  key = uuid.UUID(int=12345)
  rows = [
    {
      "uid": f"u{i}",
      "pixels": [[float(i), 0.5], [1.0, -2.0]],
      "day": datetime.date(2024, 1, 1) + datetime.timedelta(days=i),
      "at": at,
      "at_us": at + datetime.timedelta(microseconds=i),
      "price": decimal.Decimal("12.34"),
      "key": key,
    }
    for i in range(3)
  ]
  path = tmp_path / "in.avro"
  with open(path, "wb") as f:
    fastavro.writer(f, fastavro.parse_schema(schema), rows)
  store = testing.prepare_store(str(path), tmp_path, client_id_key="uid")
  assert {r["name"]: (r["dtype"], r["shape"]) for r in _spec_of(store)} == {
    "pixels": ("float32", [2, 2]),
    "day": ("int32", []),
    "at": ("int64", []),
    "at_us": ("int64", []),
    "price": ("float64", []),
    "key": ("string", []),
  }
  millis = 1709296215250
  expected = {
    f"u{i}": [
      {
        "pixels": [[float(i), 0.5], [1.0, -2.0]],
        "day": np.int32(19723 + i),
        "at": millis,
        "at_us": millis * 1000 + i,
        "price": 12.34,
        "key": str(key),
      }
    ]
    for i in range(3)
  }
  testing.assert_store_equals(store, expected)


# ----------------------------------------------------------------------------
# Bad input: the file and record named, no store committed
# ----------------------------------------------------------------------------


def _fails(capsys, tmp_path, path, fmt, *culprits, key="client_id", extra=()):
  out = tmp_path / "out"
  args = ["prepare", "--input", str(path), "--input-format", fmt, "--output", str(out)]
  if key:
    args += ["--client-id-key", key]
  capsys.readouterr()
  code = main(args + list(extra))
  err = capsys.readouterr().err
  assert code == 1, err
  for culprit in culprits:
    assert culprit in err, f"{culprit!r} not in:\n{err}"
  assert "no store was committed" in err
  assert not os.path.exists(out / METADATA_FILE)
  return err


def test_parquet_null_value_names_the_file_row_and_column(tmp_path, capsys):
  path = tmp_path / "in.parquet"
  pq.write_table(
    pa.table({"client_id": ["a", "b", "c", "d"], "v": [1.0, 2.0, None, 4.0]}),
    path,
    row_group_size=2,
  )
  _fails(capsys, tmp_path, path, "parquet", f"{path} row 2", "column 'v' is null")


def test_parquet_ragged_nested_list_names_the_row(tmp_path, capsys):
  path = tmp_path / "in.parquet"
  pq.write_table(
    pa.table({"client_id": ["a", "b"], "m": pa.array([[[1, 2], [3, 4]], [[1, 2], [3]]])}), path
  )
  _fails(capsys, tmp_path, path, "parquet", f"{path} row 1", "column 'm' is ragged")


def test_parquet_struct_column_and_garbage_file_are_named(tmp_path, capsys):
  path = tmp_path / "in.parquet"
  pq.write_table(pa.table({"client_id": ["a"], "s": [{"p": 1}]}), path)
  _fails(capsys, tmp_path, path, "parquet", f"{path}: column 's' has Arrow type struct")
  garbage = tmp_path / "garbage.parquet"
  garbage.write_bytes(np.random.RandomState(0).bytes(300))
  _fails(capsys, tmp_path, garbage, "parquet", f"{garbage}: unreadable Parquet file")


def test_csv_row_with_missing_field_names_the_line(tmp_path, capsys):
  path = tmp_path / "in.csv"
  path.write_text("client_id,v\na,1\nb,2\nc\n", encoding="utf-8")
  _fails(capsys, tmp_path, path, "csv", f"{path} line 4: 1 fields, but the header has 2")


def test_csv_without_the_client_id_column_is_named(tmp_path, capsys):
  path = tmp_path / "in.csv"
  path.write_text("user,v\na,1\n", encoding="utf-8")
  _fails(capsys, tmp_path, path, "csv", f"{path}: client-id column 'client_id' is not in")


def test_jsonl_malformed_line_names_the_line(tmp_path, capsys):
  path = tmp_path / "in.jsonl"
  path.write_text('{"client_id": "a", "v": 1}\n{"client_id": "b", "v": \n', encoding="utf-8")
  _fails(capsys, tmp_path, path, "jsonl", f"{path} line 2: not valid JSON")


def test_jsonl_ragged_list_and_float_id_name_the_line(tmp_path, capsys):
  path = tmp_path / "in.jsonl"
  path.write_text('{"client_id": "a", "m": [[1, 2], [3]]}\n', encoding="utf-8")
  _fails(capsys, tmp_path, path, "jsonl", f"{path} line 1: feature 'm' is ragged")
  path.write_text('{"client_id": "a", "v": 1}\n{"client_id": 2.5, "v": 1}\n', encoding="utf-8")
  _fails(
    capsys, tmp_path, path, "jsonl", f"{path} line 2: client-id field 'client_id' is float 2.5"
  )


def test_leaf_file_whose_counts_disagree_names_the_user(tmp_path, capsys):
  path = tmp_path / "in.json"
  path.write_text(
    json.dumps(
      {
        "users": ["u1", "u2"],
        "num_samples": [1, 3],
        "user_data": {"u1": {"x": [[0.5]], "y": [1]}, "u2": {"x": [[0.5], [0.25]], "y": [1, 2]}},
      }
    )
  )
  _fails(capsys, tmp_path, path, "leaf", f"{path}: user 'u2': num_samples says 3", key=None)


def test_leaf_example_of_another_type_names_the_user_and_example(tmp_path, capsys):
  path = tmp_path / "in.json"
  path.write_text(
    json.dumps({"users": ["u1"], "user_data": {"u1": {"x": [[0.5, 1.0], [0.5, "a"]], "y": [1, 2]}}})
  )
  _fails(capsys, tmp_path, path, "leaf", f"{path} user 'u1' example 1: feature 'x' mixes", key=None)


def test_leaf_refuses_a_client_id_key(tmp_path, capsys):
  path = _write_leaf(tmp_path / "in.json", {"u": [{"x": [0.5], "y": 1}]})
  capsys.readouterr()
  code = main(
    [
      "prepare",
      "--input",
      path,
      "--input-format",
      "leaf",
      "--output",
      str(tmp_path / "out"),
      "--client-id-key",
      "user",
    ]
  )
  assert code == 1
  assert "--client-id-key does not apply to --input-format leaf" in capsys.readouterr().err


def test_value_that_does_not_fit_a_declared_shape_names_the_record(tmp_path, capsys):
  path = tmp_path / "in.jsonl"
  path.write_text(
    '{"client_id": "a", "m": [[1, 2], [3, 4]]}\n{"client_id": "a", "m": [[1, 2, 3, 4]]}\n',
    encoding="utf-8",
  )
  spec = tmp_path / "spec.json"
  spec.write_text(json.dumps({"m": {"dtype": "int64", "shape": [2, 2]}}))
  _fails(
    capsys,
    tmp_path,
    path,
    "jsonl",
    f"{path} line 2",
    "feature 'm' has shape [1, 4]",
    extra=["--element-spec", str(spec)],
  )


def test_inner_dimensions_that_differ_between_records_name_both(tmp_path, capsys):
  path = tmp_path / "in.jsonl"
  path.write_text(
    '{"client_id": "a", "m": [[1, 2]]}\n{"client_id": "b", "m": [[1, 2, 3]]}\n', encoding="utf-8"
  )
  _fails(
    capsys,
    tmp_path,
    path,
    "jsonl",
    "only the leading dimension may vary",
    f"{path} line 1",
    f"{path} line 2",
  )


def test_gzipped_text_inputs_are_read_like_plain_ones(tmp_path):
  import gzip  # pylint: disable=import-outside-toplevel

  from fedbeam.pipelines.text_sources import _ReadCsvFile, _ReadJsonLinesFile  # pylint: disable=import-outside-toplevel

  text = {
    "csv": "client_id,v\r\na,1\r\nb,2.5\r\n",
    "jsonl": '{"client_id": 3, "v": [1, 2]}\n{"client_id": "c", "v": [0.5, 1]}\n',
  }
  readers = {"csv": _ReadCsvFile, "jsonl": _ReadJsonLinesFile}
  for fmt, content in text.items():
    plain, zipped = tmp_path / f"in.{fmt}", tmp_path / f"in.{fmt}.gz"
    plain.write_text(content, encoding="utf-8", newline="")
    with gzip.open(zipped, "wt", encoding="utf-8", newline="") as f:
      f.write(content)
    read = [
      [
        (r.client_id, r.features["v"].data.tolist(), r.position[1])
        for batch in readers[fmt]("client_id").process(str(path))
        for r in batch
      ]
      for path in (plain, zipped)
    ]
    assert read[0] == read[1] and len(read[0]) == 2, (fmt, read)
