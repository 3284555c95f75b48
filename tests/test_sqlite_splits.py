"""TFF SQLite split names: several `--sqlite-split` names, and TFF's splits kept as store splits.

The database is written in TFF's layout with sqlite3 (the schema of
`save_to_sql_client_data`), because TFF's writer puts each client in one
split while TFF's cached databases (EMNIST, Shakespeare) hold the same
writer in train and test; TFF's own `load_and_parse_sql_client_data` is the
oracle for what each split holds.
"""

import os
import sqlite3

import numpy as np
import pytest

from fedbeam import cli
from fedbeam import testing as fbt
from fedbeam.format.codec import Example
from fedbeam.format.layout import METADATA_FILE, UNSPLIT
from fedbeam.format.metadata import read_metadata
from fedbeam.pipelines.prepare import PrepareError
from fedbeam.runtime.client_data import load_client_data
from fedbeam.store_validation import validate_store

SPEC = {"label": {"dtype": "int64", "shape": []}, "x": {"dtype": "float32", "shape": [2]}}
# (split, client) -> examples; "w1" is in both splits, as EMNIST's writers are.
ROWS = {
  ("train", "w1"): 4,
  ("train", "w2"): 3,
  ("test", "w1"): 2,
  ("test", "w3"): 1,
  ("heldout", "w4"): 2,
}
# Declared in client_metadata without examples.
EMPTY = [("test", "w5")]


def _example(label: int, x) -> bytes:
  example = Example()
  example.features.feature["label"].int64_list.value.append(label)
  example.features.feature["x"].float_list.value.extend(x)
  return example.SerializeToString()


@pytest.fixture(scope="module")
def db(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tff-splits") / "splits.sqlite")
  rng = np.random.default_rng(0)
  con = sqlite3.connect(path)
  with con:
    con.execute(
      "CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
      "serialized_example_proto BLOB NOT NULL);"
    )
    con.execute(
      "CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT "
      "NULL, num_examples INTEGER NOT NULL);"
    )
    # Rows of the splits interleaved, as nothing in TFF's layout orders them.
    pending = [(split, cid) for (split, cid), n in ROWS.items() for _ in range(n)]
    for i in rng.permutation(len(pending)):
      split, cid = pending[i]
      con.execute(
        "INSERT INTO examples VALUES (?, ?, ?)",
        (split, cid, _example(int(rng.integers(0, 10)), rng.random(2).tolist())),
      )
    for (split, cid), n in list(ROWS.items()) + [(key, 0) for key in EMPTY]:
      con.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (cid, split, n))
  con.close()
  return path


def _tff_split(db, split):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  spec = {"label": tf.TensorSpec([], tf.int64), "x": tf.TensorSpec([2], tf.float32)}
  return tff.simulation.datasets.load_and_parse_sql_client_data(db, spec, split_name=split)


def _elements(dataset):
  return [{k: v.numpy() for k, v in element.items()} for element in dataset]


def test_kept_splits_hold_what_tff_loads_for_each_split(db, tmp_path, capsys):
  store = str(tmp_path / "kept")
  rc = cli.main(
    [
      "prepare",
      "--input",
      db,
      "--input-format",
      "tff-sqlite",
      "--sqlite-split",
      "train",
      "test",
      "--keep-sqlite-splits",
      "--order-by",
      "@input",
      "--element-spec",
      _spec_file(tmp_path),
      "--output",
      store,
    ]
  )
  assert rc == 0, capsys.readouterr().err
  metadata = read_metadata(store)
  assert [s["name"] for s in metadata["splits"]] == ["test", "train"]
  assert metadata["parameters"]["sqlite_split"] == "train,test"
  assert metadata["parameters"]["keep_sqlite_splits"] is True
  for split in ("train", "test"):
    ours, theirs = load_client_data(store, split=split), _tff_split(db, split)
    assert ours.client_ids == sorted(theirs.client_ids)
    for cid in ours.client_ids:
      fbt.assert_elements_equal(
        _elements(ours.create_tf_dataset_for_client(cid)),
        _elements(theirs.create_tf_dataset_for_client(cid)),
        ordered=True,
        where=f"{split}/{cid}",
      )
  assert load_client_data(store, split="test").client_ids == ["w1", "w3", "w5"]
  assert validate_store(store).ok
  # One ClientData cannot hold w1 twice: loading every split says so.
  with pytest.raises(ValueError, match="client 'w1' is in splits 'test' and 'train'"):
    load_client_data(store)


def _spec_file(tmp_path):
  import json  # pylint: disable=g-import-not-at-top

  path = tmp_path / "spec.json"
  path.write_text(json.dumps(SPEC))
  return str(path)


def test_several_split_names_without_keeping_them_read_their_rows_as_one_split(db, tmp_path):
  store = fbt.prepare_store(db, tmp_path, sqlite_split=["train", "heldout"], element_spec=SPEC)
  (split,) = read_metadata(store)["splits"]
  assert split["name"] == UNSPLIT and split["num_examples"] == 4 + 3 + 2
  data = load_client_data(store)
  assert data.client_ids == ["w1", "w2", "w4"]
  assert data.num_examples("w1") == 4  # w1's test rows are not read.


def test_a_missing_split_name_is_refused_naming_the_splits_there(db, tmp_path):
  with pytest.raises(
    PrepareError,
    match=r"--sqlite-split 'validation': .*splits\.sqlite has no "
    r"such split; its splits are 'heldout', 'test', 'train'",
  ):
    fbt.prepare_store(db, tmp_path, sqlite_split=["train", "validation"], element_spec=SPEC)
  assert not os.path.exists(tmp_path / "store" / METADATA_FILE)


@pytest.mark.parametrize(
  "flags,message",
  [
    (dict(keep_sqlite_splits=True, num_test_clients=1), "excludes --num-test-clients"),
    (dict(keep_sqlite_splits=True, num_transformed_clients=10), "pseudo-client expansion"),
    (dict(sqlite_split=["train", "train"]), "names each split once"),
  ],
)
def test_kept_splits_refuse_flags_that_contradict_them(db, tmp_path, flags, message):
  with pytest.raises(PrepareError, match=message):
    fbt.prepare_store(db, tmp_path, element_spec=SPEC, **flags)


def test_fedbeam_train_trains_and_evaluates_on_kept_tff_splits(tmp_path):
  # EMNIST's layout: every writer in both of TFF's digit splits.
  from fedbeam.runtime import train  # pylint: disable=g-import-not-at-top

  path = str(tmp_path / "digits.sqlite")
  rng = np.random.default_rng(2)
  con = sqlite3.connect(path)
  with con:
    con.execute(
      "CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
      "serialized_example_proto BLOB NOT NULL);"
    )
    con.execute(
      "CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT "
      "NULL, num_examples INTEGER NOT NULL);"
    )
    for split, n in (("digits_only_train", 4), ("digits_only_test", 2)):
      for w in range(4):
        for _ in range(n):
          example = Example()
          example.features.feature["label"].int64_list.value.append(int(rng.integers(0, 10)))
          example.features.feature["pixels"].float_list.value.extend(
            (rng.random(64) * 16).astype(np.float32).tolist()
          )
          con.execute(
            "INSERT INTO examples VALUES (?, ?, ?)",
            (split, f"f{w:04d}", example.SerializeToString()),
          )
        con.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (f"f{w:04d}", split, n))
  con.close()
  store = fbt.prepare_store(
    path,
    tmp_path,
    keep_sqlite_splits=True,
    element_spec={
      "label": {"dtype": "int32", "shape": []},
      "pixels": {"dtype": "float32", "shape": [8, 8]},
    },
  )
  parser = __import__("argparse").ArgumentParser()
  train.add_train_arguments(parser)
  output = tmp_path / "run"
  args = parser.parse_args(
    [
      store,
      "--model",
      "digits-cnn",
      "--rounds",
      "1",
      "--clients-per-round",
      "2",
      "--output",
      str(output),
      "--no-progress",
      "--train-split",
      "digits_only_train",
      "--test-split",
      "digits_only_test",
    ]
  )
  assert train.run_train(args) == 0
  with open(output / "metrics.csv", encoding="utf-8") as f:
    header, row = f.read().splitlines()[:2]
  values = dict(zip(header.split(","), row.split(",")))
  assert values["test_accuracy"] and values["train_loss"]


def test_kept_split_keys_give_back_split_and_id_whatever_the_id_holds():
  from fedbeam.pipelines import sources  # pylint: disable=g-import-not-at-top

  for split, cid in [("train", "w1"), ("digits_only_test", "a/b c/ü"), ("t", "")]:
    assert sources.kept_split_client(sources.kept_split_key(split, cid)) == (split, cid)
  assert sources.sqlite_split_names("train") == ("train",)
  assert sources.sqlite_split_names(["a", "b"]) == ("a", "b")
  assert sources.sqlite_split_names(None) is None


def test_sqlite_splits_lists_the_names_of_both_tables(db):
  from fedbeam.pipelines import sources  # pylint: disable=g-import-not-at-top

  assert sources.sqlite_splits(db) == ["heldout", "test", "train"]
