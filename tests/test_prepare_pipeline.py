"""The prepare job on real Beam runners, real input files, and the StoreClientData it feeds."""

import collections
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedbeam import testing
from fedbeam.format.codec import encode_example
from fedbeam.format.layout import METADATA_FILE, StoreFormatError, client_relative_path
from fedbeam.format.manifest import read_manifest
from fedbeam.format.metadata import data_root, read_metadata
from fedbeam.format.tfrecord import checksum, read_tfrecords
from fedbeam.pipelines.prepare import PrepareError
from fedbeam.runtime.client_data import StoreClientData, load_client_data

MULTI_PROCESSING = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]

TRICKY_IDS = [
  "a/b/c",
  "../escape",
  "with space",
  "naïve/日本語 ü",
  "x" * 300,
  "é" * 76,
  "client_1",
  "client_12",
  "plain",
]


def _tricky_clients():
  rng = np.random.RandomState(0)
  clients = {}
  for i, cid in enumerate(TRICKY_IDS):
    clients[cid] = [
      {
        "label": int(rng.randint(0, 5)),
        "x": rng.uniform(-1, 1, size=2).astype(np.float32),
        "tokens": rng.randint(0, 100, size=1 + (i + j) % 4).astype(np.int64),
        "name": f"{cid}#{j}",
      }
      for j in range(1 + i % 4)
    ]
  return clients


def _fixed_clients():
  """Clients for TFF's SQL format (fixed shapes), four of them without examples."""
  rng = np.random.RandomState(1)
  clients = {}
  for i in range(12):
    n = 0 if i % 3 == 1 else 1 + i % 5
    clients[f"user {i:02d}/ü"] = [
      {
        "label": int(rng.randint(0, 10)),
        "x": rng.uniform(size=2).astype(np.float32),
        "name": f"u{i}-{j}",
      }
      for j in range(n)
    ]
  return clients


FIXED_SPEC = {
  "label": {"dtype": "int64", "shape": []},
  "x": {"dtype": "float32", "shape": [2]},
  "name": {"dtype": "string", "shape": []},
}


def _files(root):
  """{relative path: bytes} of every file under root."""
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _data_root(root):
  """The committed data directory of the store at root."""
  return data_root(str(root), read_metadata(str(root)))


def _client_files(root):
  """{path relative to the data directory: bytes} of every client file."""
  return {k: v for k, v in _files(_data_root(root)).items() if k.endswith(".tfrecord")}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  root = tmp_path_factory.mktemp("prepare")
  tricky = _tricky_clients()
  tfrecord = testing.write_tfrecord_input(root / "in" / "tricky.tfrecord", tricky)
  avro = testing.write_avro_input(root / "in" / "tricky.avro", tricky)
  fixed = _fixed_clients()
  sqlite = testing.write_tff_sqlite_input(root / "in" / "fixed.sqlite", fixed, FIXED_SPEC)
  fixed_tfrecord = testing.write_tfrecord_input(
    root / "in" / "fixed.tfrecord", {k: v for k, v in fixed.items() if v}
  )
  s = {"root": root, "tricky": tricky, "fixed": fixed, "sqlite": sqlite, "tfrecord_input": tfrecord}
  s["tfrecord"] = testing.prepare_store(
    tfrecord, root, output=str(root / "tfrecord"), client_id_key="client_id"
  )
  s["multi"] = testing.prepare_store(
    tfrecord,
    root,
    output=str(root / "multi"),
    client_id_key="client_id",
    beam_args=MULTI_PROCESSING,
  )
  s["avro"] = testing.prepare_store(
    avro, root, output=str(root / "avro"), client_id_key="client_id"
  )
  s["sqlite_store"] = testing.prepare_store(
    sqlite, root, output=str(root / "sqlite"), element_spec=FIXED_SPEC, order_by="@input"
  )
  s["fixed_tfrecord_store"] = testing.prepare_store(
    fixed_tfrecord,
    root,
    output=str(root / "fixed_tfrecord"),
    client_id_key="client_id",
    element_spec=FIXED_SPEC,
    order_by="@input",
  )
  s["by_label"] = testing.prepare_store(
    tfrecord, root, output=str(root / "by_label"), client_id_key="client_id", order_by="label"
  )
  s["sharded"] = testing.prepare_store(
    tfrecord, root, output=str(root / "sharded"), client_id_key="client_id", num_shards=3
  )
  return s


# ----------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------


def test_multi_processing_runner_writes_a_byte_identical_store(stores):
  single, multi = _files(stores["tfrecord"]), _files(stores["multi"])
  assert sorted(single) == sorted(multi)
  data_dir = read_metadata(stores["tfrecord"])["data_dir"]
  assert len([k for k in single if k.endswith(".tfrecord")]) == len(TRICKY_IDS)
  assert [k for k in single if "/manifest/" in k] == [
    f"{data_dir}/manifest/part-00000-of-00001.avro"
  ]
  assert sorted({k.split("/")[0] for k in single}) == sorted([data_dir, METADATA_FILE])
  different = [k for k in single if single[k] != multi[k]]
  assert not different


def test_rerun_with_overwrite_is_byte_identical(stores):
  # A rerun over a committed store writes to a fresh data directory (it never
  # writes into the committed one); apart from that directory's name, which
  # the manifest's paths and the metadata spell out, every byte is the same.
  old_dir = read_metadata(stores["tfrecord"])["data_dir"]
  before = _files(stores["tfrecord"])
  testing.prepare_store(
    stores["tfrecord_input"],
    stores["root"],
    output=stores["tfrecord"],
    client_id_key="client_id",
    overwrite=True,
  )
  new_dir = read_metadata(stores["tfrecord"])["data_dir"]
  assert new_dir != old_dir and len(new_dir) == len(old_dir)
  before = {
    k.replace(old_dir, new_dir): v.replace(old_dir.encode(), new_dir.encode())
    for k, v in before.items()
  }
  after = _files(stores["tfrecord"])
  assert sorted(after) == sorted(before)
  assert [k for k in before if before[k] != after[k]] == []


def test_input_formats_with_one_spec_write_identical_client_files(stores):
  # Same examples and spec: TFRecord and Avro input give the same client files...
  assert _client_files(stores["tfrecord"]) == _client_files(stores["avro"])
  # ...and so do TFF SQLite and TFRecord for the clients both can hold.
  sqlite_files = _client_files(stores["sqlite_store"])
  tfrecord_files = _client_files(stores["fixed_tfrecord_store"])
  assert len(sqlite_files) == 12 and len(tfrecord_files) == 8
  assert {k: sqlite_files[k] for k in tfrecord_files} == tfrecord_files


# ----------------------------------------------------------------------------
# Content
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("store_key", ["tfrecord", "avro", "multi"])
def test_tricky_ids_round_trip(stores, store_key):
  testing.assert_store_equals(stores[store_key], stores["tricky"], ordered=False)
  data = load_client_data(stores[store_key])
  assert data.client_ids == sorted(TRICKY_IDS)
  assert data.element_type_structure == collections.OrderedDict(
    label=tf.TensorSpec([], tf.int64),
    name=tf.TensorSpec([], tf.string),
    tokens=tf.TensorSpec([None], tf.int64),
    x=tf.TensorSpec([2], tf.float32),
  )


def test_tff_sqlite_input_keeps_declared_empty_clients(stores):
  testing.assert_store_equals(stores["sqlite_store"], stores["fixed"], ordered=True)
  meta = read_metadata(stores["sqlite_store"])
  assert meta["splits"] == [
    {
      "name": "all",
      "num_clients": 12,
      "num_examples": sum(len(v) for v in stores["fixed"].values()),
      "num_bytes": meta["splits"][0]["num_bytes"],
      "num_empty_clients": 4,
    }
  ]
  assert meta["empty_clients"]["found"] == 4
  assert meta["empty_clients"]["sample"] == sorted(k for k, v in stores["fixed"].items() if not v)


def test_default_order_is_by_serialized_content(stores):
  data = load_client_data(stores["tfrecord"])
  spec = data.element_spec
  for cid in data.client_ids:
    with open(
      os.path.join(_data_root(stores["tfrecord"]), client_relative_path(cid, "all", 1)), "rb"
    ) as f:
      records = list(read_tfrecords(f))
    assert records == sorted(records)
    expected = sorted(
      encode_example(
        {
          "label": np.asarray(e["label"]),
          "name": np.array([e["name"].encode()], dtype=object),
          "tokens": e["tokens"],
          "x": e["x"],
        },
        spec,
      )
      for e in stores["tricky"][cid]
    )
    assert records == expected


def test_order_by_feature_sorts_each_client(stores):
  data = load_client_data(stores["by_label"])
  saw_reordering = False
  for cid in data.client_ids:
    labels = [int(e["label"]) for e in data.create_tf_dataset_for_client(cid).as_numpy_iterator()]
    assert labels == sorted(labels), cid
    saw_reordering |= labels != [e["label"] for e in stores["tricky"][cid]]
  assert saw_reordering, "the input was already in label order; the check proves nothing"
  testing.assert_store_equals(stores["by_label"], stores["tricky"], ordered=False)
  assert read_metadata(stores["by_label"])["parameters"]["order_by"] == "label"


def test_num_shards_spreads_clients_over_shard_directories(stores):
  root = stores["sharded"]
  meta = read_metadata(root)
  assert meta["num_shards"] == 3
  files = sorted(_client_files(root))
  expected = sorted(client_relative_path(cid, "all", 3) for cid in TRICKY_IDS)
  assert files == expected
  assert {f.split("/")[1] for f in files} <= {"00000", "00001", "00002"}
  assert len({f.split("/")[1] for f in files}) > 1
  rows = list(read_manifest(root, meta))
  assert {r["client_id"]: r["path"] for r in rows} == {
    cid: f"{meta['data_dir']}/{client_relative_path(cid, 'all', 3)}" for cid in TRICKY_IDS
  }
  testing.assert_store_equals(root, stores["tricky"], ordered=False)
  assert read_metadata(stores["tfrecord"])["num_shards"] == 1


def test_manifest_rows_describe_each_client_file(stores):
  root = stores["tfrecord"]
  meta = read_metadata(root)
  rows = list(read_manifest(root, meta))
  assert [r["client_id"] for r in rows] == sorted(TRICKY_IDS)
  for r in rows:
    assert r["path"] == f"{meta['data_dir']}/{client_relative_path(r['client_id'], 'all', 1)}"
    with open(os.path.join(root, r["path"]), "rb") as f:
      data = f.read()
    assert r["num_bytes"] == len(data)
    assert r["crc32c"] == checksum(data)
    assert r["num_examples"] == len(stores["tricky"][r["client_id"]])
    assert (r["split"], r["raw_client_id"], r["pseudo_index"]) == ("all", r["client_id"], 0)


@pytest.mark.parametrize("fmt", ["tfrecord", "avro"])
def test_empty_client_id_is_rejected(stores, tmp_path, fmt):
  clients = {"ok": [{"v": 1}], "": [{"v": 2}]}
  writer = testing.write_tfrecord_input if fmt == "tfrecord" else testing.write_avro_input
  path = writer(tmp_path / f"in.{fmt}", clients)
  with pytest.raises(PrepareError) as e:
    testing.prepare_store(path, tmp_path, client_id_key="client_id")
  message = str(e.value)
  assert "client id is empty" in message
  assert f"in.{fmt} record 1" in message
  assert not os.path.exists(tmp_path / "store" / METADATA_FILE)
  with pytest.raises(StoreFormatError):
    load_client_data(str(tmp_path / "store"))


# ----------------------------------------------------------------------------
# StoreClientData against TFF's own ClientData over the same data
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(stores):
  store = load_client_data(stores["sqlite_store"])
  tff_sql = tff.simulation.datasets.load_and_parse_sql_client_data(
    stores["sqlite"], store.element_type_structure
  )
  reference = tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
    tff_sql.client_ids, tff_sql.serializable_dataset_fn
  )
  return store, reference, stores["fixed"]


def _elements(ds):
  return testing.dataset_elements(ds)


def test_client_ids_are_sorted_and_counts_come_from_the_manifest(api):
  store, reference, fixed = api
  assert store.client_ids == sorted(fixed) == reference.client_ids
  assert len(store) == 12
  for cid, elements in fixed.items():
    assert store.num_examples(cid) == len(elements)
    assert cid in store
  assert "nobody" not in store


def test_unknown_client_id_raises_value_error_naming_it(api):
  store, _, _ = api
  for call in (store.num_examples, store.create_tf_dataset_for_client, store.split_of):
    with pytest.raises(ValueError, match="'nobody/ü'"):
      call("nobody/ü")


@pytest.mark.parametrize("limit_count,seed", [(None, 0), (3, 5), (5, [1, 2])])
def test_datasets_follow_tff_order(api, limit_count, seed):
  store, reference, _ = api
  ours = [_elements(ds) for ds in store.datasets(limit_count=limit_count, seed=seed)]
  theirs = [_elements(ds) for ds in reference.datasets(limit_count=limit_count, seed=seed)]
  assert len(ours) == len(theirs) == (limit_count or 12)
  for i, (a, b) in enumerate(zip(ours, theirs)):
    testing.assert_elements_equal(a, b, where=f"dataset {i}")


@pytest.mark.parametrize("seed", [0, 7, 123456, [3, 4]])
def test_create_tf_dataset_from_all_clients_equals_tff_order(api, seed):
  store, reference, fixed = api
  ours = store.create_tf_dataset_from_all_clients(seed=seed)
  theirs = reference.create_tf_dataset_from_all_clients(seed=seed)
  assert ours.element_spec == theirs.element_spec
  a, b = _elements(ours), _elements(theirs)
  assert len(a) == sum(len(v) for v in fixed.values())
  testing.assert_elements_equal(a, b)


def test_preprocess_applies_to_every_client(api):
  store, _, fixed = api
  doubled = store.preprocess(lambda ds: ds.map(lambda e: {"twice": e["label"] * 2}))
  assert isinstance(doubled, tff.simulation.datasets.ClientData)
  assert doubled.client_ids == store.client_ids
  assert doubled.element_type_structure == {"twice": tf.TensorSpec([], tf.int64)}
  for cid, elements in fixed.items():
    got = [int(e["twice"]) for e in doubled.create_tf_dataset_for_client(cid).as_numpy_iterator()]
    assert got == [2 * e["label"] for e in elements]


@pytest.fixture(scope="module")
def store_without_client_files(stores, tmp_path_factory):
  """A copy of the SQLite-made store with every client file deleted: opening any dataset fails."""
  root = tmp_path_factory.mktemp("no_client_files") / "store"
  shutil.copytree(stores["sqlite_store"], root)
  removed = 0
  for dirpath, _, names in os.walk(root / read_metadata(str(root))["data_dir"] / "all"):
    for name in names:
      os.remove(os.path.join(dirpath, name))
      removed += 1
  assert removed == len(stores["fixed"])
  data = load_client_data(str(root))
  with pytest.raises(Exception):  # noqa: B017 (any read error; the file is gone)
    next(iter(data.create_tf_dataset_for_client(data.client_ids[0])))
  return data


@pytest.mark.parametrize(
  "num_test_clients,seed", [(1, 0), (2, 1), (3, 2), (4, 99), (2, [5, 6]), (6, 3)]
)
def test_train_test_client_split_matches_tff_without_opening_datasets(
  api, store_without_client_files, num_test_clients, seed
):
  store, reference, fixed = api
  train, test = StoreClientData.train_test_client_split(
    store_without_client_files, num_test_clients, seed=seed
  )
  tff_train, tff_test = tff.simulation.datasets.ClientData.train_test_client_split(
    reference, num_test_clients, seed=seed
  )
  assert isinstance(train, StoreClientData) and isinstance(test, StoreClientData)
  assert test.client_ids == tff_test.client_ids
  assert train.client_ids == tff_train.client_ids
  assert all(fixed[cid] for cid in test.client_ids)
  # The same call on the intact store gives the same split, and its data loads.
  train2, test2 = store.train_test_client_split(store, num_test_clients, seed=seed)
  assert test2.client_ids == test.client_ids and train2.client_ids == train.client_ids
  for cid in test2.client_ids:
    testing.assert_elements_equal(_elements(test2.create_tf_dataset_for_client(cid)), fixed[cid])


def test_train_test_client_split_fails_like_tff_when_too_few_clients_have_data(
  api, store_without_client_files
):
  _, reference, _ = api
  for n in (9, 12, 0):
    with pytest.raises(ValueError) as ours:
      StoreClientData.train_test_client_split(store_without_client_files, n, seed=0)
    with pytest.raises(ValueError) as theirs:
      tff.simulation.datasets.ClientData.train_test_client_split(reference, n, seed=0)
    assert str(ours.value) == str(theirs.value)


def test_metadata_records_the_job_parameters(stores):
  meta = read_metadata(stores["sqlite_store"])
  params = meta["parameters"]
  assert params["input"] == stores["sqlite"]
  assert params["input_format"] == "tff-sqlite"
  assert params["order_by"] == "@input"
  assert [f["name"] for f in meta["element_spec"]] == list(FIXED_SPEC)
  assert json.loads(json.dumps(meta)) == meta


def test_order_by_a_float_feature_with_nan_does_not_depend_on_input_order(tmp_path):
  # NaN keys compare false both ways; unless they are ordered explicitly the
  # records keep the order they arrived in, which follows the input.
  values = [np.nan, 1.0, np.nan, -0.0, 0.0, np.nan, 2.0]
  elements = [{"v": np.float32(v), "i": i} for i, v in enumerate(values)]
  stores = []
  for name, order in [("forward", elements), ("backward", elements[::-1])]:
    path = testing.write_tfrecord_input(tmp_path / f"{name}.tfrecord", {"c": order})
    stores.append(
      testing.prepare_store(
        path, tmp_path, output=str(tmp_path / name), client_id_key="client_id", order_by="v"
      )
    )
  forward, backward = (_client_files(s) for s in stores)
  assert forward == backward
  stored = [float(e["v"]) for e in testing.read_store(stores[0])["c"]]
  assert stored[:4] == [-0.0, 0.0, 1.0, 2.0] and np.isnan(stored[4:]).all()


def test_group_by_client_counts_every_clients_records():
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.testing.test_pipeline import TestPipeline  # pylint: disable=g-import-not-at-top
  from apache_beam.testing.util import assert_that, equal_to  # pylint: disable=g-import-not-at-top

  from fedbeam.format.spec import ElementSpec  # pylint: disable=g-import-not-at-top
  from fedbeam.pipelines.grouping import GroupByClient  # pylint: disable=g-import-not-at-top
  from fedbeam.pipelines.records import InputRecord, RawFeature  # pylint: disable=g-import-not-at-top

  spec = ElementSpec.from_json({"v": {"dtype": "int64", "shape": []}})
  sizes = {"a": 5, "b": 1, "c": 12}
  records = [
    InputRecord(cid, {"v": RawFeature(np.array([i], np.int64), "int64", "list")}, ("mem", i))
    for cid, n in sizes.items()
    for i in range(n)
  ]
  with TestPipeline() as p:
    inputs = {
      "records": p | "Records" >> beam.Create(records, reshuffle=True),
      "clients": p | "NoIds" >> beam.Create([]),
    }
    grouped = inputs | GroupByClient(p | "Spec" >> beam.Create([spec]), declared_clients=False)
    counted = grouped["record_counts"] | beam.CombinePerKey(sum)
    assert_that(counted, equal_to(list(sizes.items())), label="Counts")
    assert_that(
      grouped["clients"] | beam.Map(lambda c: (c.client_id, len(c.records))),
      equal_to(list(sizes.items())),
      label="Clients",
    )
