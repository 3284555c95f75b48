"""Per-client datasets of a store: exact elements across parse batches, read errors that
name the client, and the shape of the pipeline that keeps them cheap to build and iterate."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from fedbeam import testing as fbt
from fedbeam.format.codec import PARSE_BATCH
from fedbeam.runtime import store_reader as reader_module
from fedbeam.runtime.client_data import ClientFileError, load_client_data

SPEC = {"label": {"dtype": "int32", "shape": []}, "pixels": {"dtype": "float32", "shape": [3]}}
# More records than two parse batches, and not a multiple of one.
BIG = 2 * PARSE_BATCH + 37


def _clients():
  big = [
    {"label": np.int32(i % 7), "pixels": np.array([i, -i, i / 2], np.float32)}
    for i in reversed(range(BIG))
  ]
  return {
    "big": big,
    "one": [{"label": np.int32(-3), "pixels": np.array([1.5, 2.5, 3.5], np.float32)}],
    "empty": [],
    "two/ü": [{"label": np.int32(2 - j), "pixels": np.full(3, j, np.float32)} for j in range(2)],
  }


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("per_client")
  spec = {"label": tf.TensorSpec([], tf.int32), "pixels": tf.TensorSpec([3], tf.float32)}
  db = fbt.write_tff_sqlite_input(str(tmp / "in.sqlite"), _clients(), spec)
  return fbt.prepare_store(db, str(tmp), element_spec=SPEC, order_by="@input")


@pytest.fixture
def store_copy(clean_store, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(clean_store, dst)
  return dst


def _per_client_datasets(data, client_id, traced=None):
  """The client's dataset through every per-client path of StoreClientData."""
  traced = traced or tf.function(data.serializable_dataset_fn, autograph=False)
  walked = dict(zip(_walk_order(data, seed=1), data.datasets(seed=1)))
  return {
    "create_tf_dataset_for_client": data.create_tf_dataset_for_client(client_id),
    "serializable_dataset_fn eager": data.serializable_dataset_fn(client_id),
    "serializable_dataset_fn traced": traced(tf.constant(client_id)),
    "datasets()": walked[client_id],
  }


def _walk_order(data, seed):
  order = list(data.client_ids)
  np.random.RandomState(seed).shuffle(order)
  return order


def test_every_path_keeps_the_input_order_across_parse_batches(clean_store):
  data = load_client_data(clean_store)
  assert data.client_ids == sorted(_clients())
  assert data.num_examples("big") == BIG
  traced = tf.function(data.serializable_dataset_fn, autograph=False)
  for cid, expected in _clients().items():
    for how, ds in _per_client_datasets(data, cid, traced).items():
      assert ds.element_spec == data.element_type_structure, how
      fbt.assert_elements_equal(
        fbt.dataset_elements(ds), expected, ordered=True, where=f"{cid} via {how}"
      )
  batches = list(data.create_tf_dataset_for_client("big").batch(100).as_numpy_iterator())
  assert [len(b["label"]) for b in batches] == [100] * (BIG // 100) + [BIG % 100]
  np.testing.assert_array_equal(
    np.concatenate([b["pixels"][:, 0] for b in batches]), np.arange(BIG)[::-1]
  )


def test_a_damaged_record_names_the_client_after_the_batches_before_it(store_copy):
  path = fbt.client_file(store_copy, "big")
  data = bytearray(open(path, "rb").read())
  data[-3] ^= 0xFF  # inside the last record: the first two parse batches are intact
  open(path, "wb").write(bytes(data))
  store = load_client_data(store_copy)
  for how, ds in _per_client_datasets(store, "big").items():
    seen = []
    if how.startswith("serializable"):
      # Not wrapped: graph consumers get TensorFlow's error, as documented.
      with pytest.raises(tf.errors.DataLossError):
        for e in ds:
          seen.append(e)
    else:
      with pytest.raises(ClientFileError, match=r"client 'big' in store .* is damaged"):
        for e in ds:
          seen.append(e)
    assert len(seen) == 2 * PARSE_BATCH, how
  with pytest.raises(tf.errors.DataLossError):
    list(store.create_tf_dataset_for_client("big").batch(10))
  # The other clients read as before.
  fbt.assert_elements_equal(
    fbt.dataset_elements(store.create_tf_dataset_for_client("one")), _clients()["one"]
  )


def test_a_missing_file_names_the_client_when_read(store_copy):
  os.remove(fbt.client_file(store_copy, "two/ü"))
  store = load_client_data(store_copy)
  dataset = store.create_tf_dataset_for_client("two/ü")  # building it reads nothing
  with pytest.raises(ClientFileError, match=r"client 'two/ü' in store .* is missing"):
    list(dataset)
  walked = dict(zip(_walk_order(store, seed=4), store.datasets(seed=4)))
  with pytest.raises(ClientFileError, match="client 'two/ü'"):
    list(walked["two/ü"])
  assert len(list(walked["big"])) == BIG


def test_client_datasets_reuse_one_traced_pipeline(clean_store, monkeypatch):
  # The pipeline is built in Python only when traced: once per element spec.
  builds = []
  read_records = reader_module._read_records
  monkeypatch.setattr(reader_module, "_read_records", lambda p: builds.append(p) or read_records(p))
  data = load_client_data(clean_store)
  data.create_tf_dataset_for_client("one")
  assert len(builds) <= 1
  before = len(builds)
  for cid in data.client_ids * 3:
    data.create_tf_dataset_for_client(cid)
  list(data.datasets(seed=0))
  # Subsets and other loads of the store share it too.
  data.subset(["big", "one"]).create_tf_dataset_for_client("big")
  load_client_data(clean_store).create_tf_dataset_for_client("big")
  assert len(builds) == before


def test_create_tf_dataset_for_client_inside_a_tf_function(clean_store):
  data = load_client_data(clean_store)

  @tf.function
  def first_pixel_sum():
    return data.create_tf_dataset_for_client("big").reduce(
      tf.constant(0.0), lambda acc, e: acc + e["pixels"][0]
    )

  assert float(first_pixel_sum()) == float(sum(range(BIG)))


def test_public_ops_give_the_same_elements(clean_store, monkeypatch):
  # Without TensorFlow's dataset internals the pipeline falls back to public ops.
  monkeypatch.setattr(reader_module, "_HAS_DATASET_INTERNALS", False)
  reader_module._dataset_by_path_fn.cache_clear()  # Trace anew, with the public ops.
  try:
    data = load_client_data(clean_store)
    for cid, expected in _clients().items():
      ds = data.create_tf_dataset_for_client(cid)
      assert len(_dataset_functions(ds)) > 1  # really the public ops
      fbt.assert_elements_equal(fbt.dataset_elements(ds), expected, ordered=True, where=cid)
      fbt.assert_elements_equal(
        fbt.dataset_elements(data.serializable_dataset_fn(cid)), expected, ordered=True, where=cid
      )
  finally:
    reader_module._dataset_by_path_fn.cache_clear()  # Later tests get the internal ops again.


def _dataset_functions(ds):
  graph = tf.compat.v1.GraphDef.FromString(ds._as_serialized_graph().numpy())
  return list(graph.library.function)


def test_a_client_dataset_holds_one_single_device_function_and_skips_static_rewrites(clean_store):
  # Each function of a dataset is instantiated anew for every iterator; the
  # parse is the only one, and single-device (no grappler pass per iterator).
  data = load_client_data(clean_store)
  traced = tf.function(data.serializable_dataset_fn, autograph=False)
  for ds in (
    data.create_tf_dataset_for_client("big"),
    data.serializable_dataset_fn("big"),
    traced(tf.constant("big")),
  ):
    functions = _dataset_functions(ds)
    assert len(functions) == 1, [f.signature.name for f in functions]
    assert functions[0].attr["experimental_ints_on_device"].b
    options = ds.options()
    assert options.experimental_optimization.apply_default_optimizations is False
    assert options.autotune.enabled is False
