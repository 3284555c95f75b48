"""TFF client data -> `fedbeam prepare` -> `load_client_data` gives back the same client data."""

import collections
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedbeam import testing
from fedbeam.cli import main
from fedbeam.format.codec import make_record_parser
from fedbeam.format.layout import join
from fedbeam.format.manifest import read_manifest
from fedbeam.format.metadata import read_metadata
from fedbeam.runtime.client_data import StoreClientData, load_client_data

EMNIST_SPEC = {
  "label": {"dtype": "int32", "shape": []},
  "pixels": {"dtype": "float32", "shape": [28, 28]},
}


def _elements(ds):
  return testing.dataset_elements(ds)


def _prepare(*args):
  code = main(["prepare", *args])
  assert code == 0, f"fedbeam prepare {' '.join(args)} exited {code}"


@pytest.fixture(scope="module")
def emnist(tmp_path_factory):
  """TFF's synthetic EMNIST saved with TFF's own SQL writer, and three stores made from it."""
  root = tmp_path_factory.mktemp("emnist")
  synthetic = tff.simulation.datasets.emnist.get_synthetic()
  # A third client with a different example order makes order checks meaningful.
  data = {
    cid: _elements(synthetic.create_tf_dataset_for_client(cid)) for cid in synthetic.client_ids
  }
  data["synthetic3/reversed"] = list(reversed(data["synthetic1"]))[::2]

  def dataset_fn(cid):
    if cid in synthetic.client_ids:
      return synthetic.create_tf_dataset_for_client(cid)
    return tf.data.Dataset.from_tensor_slices(
      collections.OrderedDict(
        label=np.array([e["label"] for e in data[cid]]),
        pixels=np.stack([e["pixels"] for e in data[cid]]),
      )
    )

  sqlite = str(root / "emnist.sqlite")
  tff.simulation.datasets.save_to_sql_client_data(sorted(data), dataset_fn, sqlite)
  spec_file = root / "spec.json"
  spec_file.write_text(json.dumps(EMNIST_SPEC))
  common = ["--input", sqlite, "--input-format", "tff-sqlite"]
  _prepare(*common, "--element-spec", str(spec_file), "--output", str(root / "content_order"))
  _prepare(
    *common,
    "--element-spec",
    str(spec_file),
    "--order-by",
    "@input",
    "--output",
    str(root / "input_order"),
  )
  _prepare(*common, "--output", str(root / "inferred"))
  return {
    "data": data,
    "synthetic": synthetic,
    "sqlite": sqlite,
    "tff": tff.simulation.datasets.load_and_parse_sql_client_data(
      sqlite, synthetic.element_type_structure
    ),
    "content_order": str(root / "content_order"),
    "input_order": str(root / "input_order"),
    "inferred": str(root / "inferred"),
  }


def test_synthetic_emnist_keeps_client_ids_and_element_spec(emnist):
  store = load_client_data(emnist["content_order"])
  assert isinstance(store, StoreClientData)
  assert isinstance(store, tff.simulation.datasets.ClientData)
  assert store.client_ids == emnist["tff"].client_ids == sorted(emnist["data"])
  spec = store.element_type_structure
  assert isinstance(spec, collections.OrderedDict)
  assert spec == emnist["synthetic"].element_type_structure
  assert spec == emnist["tff"].element_type_structure
  assert list(spec) == ["label", "pixels"]
  for cid in store.client_ids:
    assert store.create_tf_dataset_for_client(cid).element_spec == spec


def test_synthetic_emnist_data_equal_as_multisets_in_content_order(emnist):
  store = load_client_data(emnist["content_order"])
  for cid in store.client_ids:
    actual = _elements(store.create_tf_dataset_for_client(cid))
    testing.assert_elements_equal(actual, emnist["data"][cid], ordered=False, where=cid)
    testing.assert_elements_equal(
      actual, _elements(emnist["tff"].create_tf_dataset_for_client(cid)), ordered=False, where=cid
    )
    assert store.num_examples(cid) == len(emnist["data"][cid])


def test_order_by_input_keeps_tff_example_order(emnist):
  store = load_client_data(emnist["input_order"])
  for cid in store.client_ids:
    actual = _elements(store.create_tf_dataset_for_client(cid))
    testing.assert_elements_equal(actual, emnist["data"][cid], ordered=True, where=cid)
    testing.assert_elements_equal(
      actual, _elements(emnist["tff"].create_tf_dataset_for_client(cid)), ordered=True, where=cid
    )
  # The reversed client really is out of label order, so the check above has teeth.
  labels = [
    int(e["label"]) for e in _elements(store.create_tf_dataset_for_client("synthetic3/reversed"))
  ]
  assert labels == [9, 7, 5, 3, 1]


def test_default_order_is_by_content_and_differs_from_input_order(emnist):
  content = load_client_data(emnist["content_order"])
  labels = [
    int(e["label"]) for e in _elements(content.create_tf_dataset_for_client("synthetic3/reversed"))
  ]
  assert sorted(labels) == [1, 3, 5, 7, 9]
  # Content order is a pure function of the examples: the two identical
  # clients come out identical.
  one = _elements(content.create_tf_dataset_for_client("synthetic1"))
  two = _elements(content.create_tf_dataset_for_client("synthetic2"))
  testing.assert_elements_equal(one, two, ordered=True)


def test_dataset_computation_runs_in_tff_default_context(emnist):
  store = load_client_data(emnist["input_order"])
  comp = store.dataset_computation
  assert str(comp.type_signature) == "(str -> <label=int32,pixels=float32[28,28]>*)"
  for cid in store.client_ids:
    result = comp(cid)
    testing.assert_elements_equal(_elements(result), emnist["data"][cid], ordered=True, where=cid)


def test_serializable_dataset_fn_traces_in_a_tf_function(emnist):
  store = load_client_data(emnist["input_order"])

  @tf.function
  def label_sum(client_id):
    return store.serializable_dataset_fn(client_id).reduce(
      tf.constant(0, tf.int32), lambda acc, e: acc + e["label"]
    )

  for cid in store.client_ids:
    assert int(label_sum(tf.constant(cid))) == sum(int(e["label"]) for e in emnist["data"][cid])
  graph = label_sum.get_concrete_function(tf.TensorSpec([], tf.string)).graph
  assert not [op for op in graph.get_operations() if "PyFunc" in op.type]


def test_inferred_spec_from_sqlite_is_flat(emnist):
  store = load_client_data(emnist["inferred"])
  assert store.element_type_structure == collections.OrderedDict(
    label=tf.TensorSpec([], tf.int64), pixels=tf.TensorSpec([784], tf.float32)
  )
  for cid in store.client_ids:
    expected = [
      {"label": e["label"], "pixels": e["pixels"].reshape(-1)} for e in emnist["data"][cid]
    ]
    testing.assert_elements_equal(
      _elements(store.create_tf_dataset_for_client(cid)), expected, ordered=False, where=cid
    )


# ----------------------------------------------------------------------------
# Variable-length features
# ----------------------------------------------------------------------------

SNIPPETS = {
  "THE_TRAGEDY_OF_KING_LEAR_KING": [
    "",
    "Nothing will come of nothing: speak again.",
    "How sharper than a serpent's tooth it is",
  ],
  "ROMEO AND JULIET/ROMEO": ["But, soft!", "What light through yonder window breaks?" * 20],
  "Ophélie — 日本語": ["ö", "\x00nul inside\x00"],
}


def _token_clients():
  """Snippets plus a variable-length int feature (one token id per byte, possibly none)."""
  return {
    cid: [{"snippets": s, "tokens": np.array(list(s.encode()), dtype=np.int64)} for s in snippets]
    for cid, snippets in SNIPPETS.items()
  }


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
  root = tmp_path_factory.mktemp("shakespeare")
  sqlite = testing.write_tff_sqlite_input(
    root / "snippets.sqlite",
    {cid: [{"snippets": s} for s in v] for cid, v in SNIPPETS.items()},
    collections.OrderedDict(snippets=tf.TensorSpec([], tf.string)),
  )
  spec_file = root / "snippets.json"
  spec_file.write_text(json.dumps({"snippets": {"dtype": "string", "shape": []}}))
  _prepare(
    "--input",
    sqlite,
    "--input-format",
    "tff-sqlite",
    "--element-spec",
    str(spec_file),
    "--order-by",
    "@input",
    "--output",
    str(root / "sqlite_store"),
  )
  tfrecord = testing.write_tfrecord_input(root / "tokens.tfrecord", _token_clients(), "speaker")
  _prepare(
    "--input",
    tfrecord,
    "--input-format",
    "tfrecord",
    "--client-id-key",
    "speaker",
    "--order-by",
    "@input",
    "--output",
    str(root / "tfrecord_store"),
  )
  avro = testing.write_avro_input(root / "tokens.avro", _token_clients(), "speaker")
  _prepare(
    "--input",
    avro,
    "--input-format",
    "avro",
    "--client-id-key",
    "speaker",
    "--order-by",
    "@input",
    "--output",
    str(root / "avro_store"),
  )
  return {
    "sqlite": sqlite,
    "sqlite_store": str(root / "sqlite_store"),
    "tfrecord_store": str(root / "tfrecord_store"),
    "avro_store": str(root / "avro_store"),
  }


def test_variable_length_strings_round_trip_from_tff_sqlite(shakespeare):
  store = load_client_data(shakespeare["sqlite_store"])
  spec = collections.OrderedDict(snippets=tf.TensorSpec([], tf.string))
  tff_data = tff.simulation.datasets.load_and_parse_sql_client_data(shakespeare["sqlite"], spec)
  assert store.element_type_structure == spec == tff_data.element_type_structure
  assert store.client_ids == tff_data.client_ids == sorted(SNIPPETS)
  for cid in store.client_ids:
    actual = _elements(store.create_tf_dataset_for_client(cid))
    assert [e["snippets"].item() for e in actual] == [s.encode() for s in SNIPPETS[cid]]
    testing.assert_elements_equal(actual, _elements(tff_data.create_tf_dataset_for_client(cid)))


@pytest.mark.parametrize("store_key", ["tfrecord_store", "avro_store"])
def test_variable_length_int_feature_round_trips_with_null_shape(shakespeare, store_key):
  store = load_client_data(shakespeare[store_key])
  # Inferred: one string per record -> [], token counts differ -> [None].
  assert store.element_type_structure == collections.OrderedDict(
    snippets=tf.TensorSpec([], tf.string), tokens=tf.TensorSpec([None], tf.int64)
  )
  assert store.metadata["element_spec"][1] == {"name": "tokens", "dtype": "int64", "shape": [None]}
  testing.assert_store_equals(shakespeare[store_key], _token_clients(), ordered=True)
  empty = _elements(store.create_tf_dataset_for_client("THE_TRAGEDY_OF_KING_LEAR_KING"))[0]
  assert empty["tokens"].shape == (0,) and empty["snippets"] == b""
  # Through TFF's default context too (the id as UTF-8 bytes: TFF's value
  # serializer encodes Python str ids as ASCII).
  cid = "Ophélie — 日本語"
  via_tff = _elements(store.dataset_computation(cid.encode("utf-8")))
  testing.assert_elements_equal(via_tff, _token_clients()[cid], ordered=True, where=cid)


# ----------------------------------------------------------------------------
# Per-client dataset paths against references
# ----------------------------------------------------------------------------


def _record_by_record(store_path):
  """{client id: its elements} read with public TF ops only: every record parsed on its own."""
  metadata = read_metadata(store_path)
  spec = load_client_data(store_path).element_spec
  parse = make_record_parser(spec)
  return {
    row["client_id"]: _elements(tf.data.TFRecordDataset(join(store_path, row["path"])).map(parse))
    for row in read_manifest(store_path, metadata)
  }


def _graph_built(store, client_id):
  """The client's dataset as `serializable_dataset_fn` builds it inside a tf.function."""
  return tf.function(store.serializable_dataset_fn, autograph=False)(tf.constant(client_id))


def _all_store_paths(emnist, shakespeare):
  return [emnist[k] for k in ("content_order", "input_order", "inferred")] + [
    shakespeare[k] for k in ("sqlite_store", "tfrecord_store", "avro_store")
  ]


def test_every_per_client_path_gives_the_records_in_file_order(emnist, shakespeare):
  """create_tf_dataset_for_client, serializable_dataset_fn (eager and traced) and datasets()
  give each client's records in file order, parsed as a record-by-record reader does."""
  for path in _all_store_paths(emnist, shakespeare):
    store = load_client_data(path)
    reference = _record_by_record(path)
    assert sorted(reference) == store.client_ids
    spec = store.element_type_structure
    for cid in store.client_ids:
      where = f"{path}: {cid}"
      for ds in (
        store.create_tf_dataset_for_client(cid),
        store.serializable_dataset_fn(cid),
        store.serializable_dataset_fn(tf.constant(cid)),
        _graph_built(store, cid),
      ):
        assert ds.element_spec == spec, where
        testing.assert_elements_equal(_elements(ds), reference[cid], ordered=True, where=where)
    walked = list(store.datasets(seed=3))
    order = list(store.client_ids)
    np.random.RandomState(3).shuffle(order)
    assert len(walked) == len(order)
    for cid, ds in zip(order, walked):
      testing.assert_elements_equal(_elements(ds), reference[cid], ordered=True, where=cid)


def test_client_datasets_equal_tff_sql_client_data_in_order(emnist):
  store = load_client_data(emnist["input_order"])
  oracle = emnist["tff"]
  for cid in store.client_ids:
    ours = store.create_tf_dataset_for_client(cid)
    theirs = oracle.create_tf_dataset_for_client(cid)
    assert ours.element_spec == theirs.element_spec
    testing.assert_elements_equal(_elements(ours), _elements(theirs), ordered=True, where=cid)
    # A dataset is read anew each time it is iterated.
    testing.assert_elements_equal(_elements(ours), _elements(theirs), ordered=True, where=cid)


@pytest.mark.parametrize("limit_count,seed", [(None, 0), (2, 7), (10, [3, 1]), (0, 1)])
def test_datasets_walk_clients_like_tff_sql_client_data(emnist, limit_count, seed):
  store = load_client_data(emnist["input_order"])
  oracle = emnist["tff"]
  assert store.client_ids == oracle.client_ids
  ours = [_elements(ds) for ds in store.datasets(limit_count=limit_count, seed=seed)]
  theirs = [_elements(ds) for ds in oracle.datasets(limit_count=limit_count, seed=seed)]
  expected = (
    len(store.client_ids) if limit_count is None else min(limit_count, len(store.client_ids))
  )
  assert len(ours) == len(theirs) == expected
  for i, (a, b) in enumerate(zip(ours, theirs)):
    testing.assert_elements_equal(a, b, ordered=True, where=f"dataset {i}")


def test_unseeded_datasets_give_every_client_once(emnist):
  store = load_client_data(emnist["input_order"])
  walked = [_elements(ds) for ds in store.datasets()]
  assert sorted(len(e) for e in walked) == sorted(len(emnist["data"][c]) for c in store.client_ids)


def test_datasets_checks_the_seed_like_tff(emnist):
  store = load_client_data(emnist["input_order"])
  walk = store.datasets(seed=-1)  # a generator: nothing is checked before the first dataset
  with pytest.raises(Exception) as ours:
    next(walk)
  with pytest.raises(Exception) as theirs:
    next(emnist["tff"].datasets(seed=-1))
  assert type(ours.value) is type(theirs.value)


def test_unknown_ids_fail_as_before(emnist):
  store = load_client_data(emnist["input_order"])
  with pytest.raises(ValueError, match="'synthetic9'"):
    store.create_tf_dataset_for_client("synthetic9")
  # serializable_dataset_fn maps any id to a path in TF ops: an unknown id's
  # file does not exist, which the read reports.
  with pytest.raises(tf.errors.NotFoundError):
    _elements(store.serializable_dataset_fn("synthetic9"))
  with pytest.raises(tf.errors.NotFoundError):
    _elements(_graph_built(store, "synthetic9"))
