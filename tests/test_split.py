"""Train/test client splits against TFF 0.87's own `ClientData.train_test_client_split`.

The clients are written with TFF's `save_to_sql_client_data` (clients without
examples are listed in its `client_metadata` table); that database is the
input of the prepare job and, loaded with `load_and_parse_sql_client_data`,
the TFF ClientData whose split is the oracle.
"""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedbeam import testing
from fedbeam.format.layout import StoreFormatError
from fedbeam.format.manifest import read_manifest
from fedbeam.format.metadata import metadata_path, read_metadata
from fedbeam.pipelines.prepare import PrepareError
from fedbeam.pipelines.split import rank_key
from fedbeam.runtime.client_data import StoreClientData, load_client_data
from fedbeam.store_summary import format_summary, summarize_store

ELEMENT_SPEC = collections.OrderedDict(
  x=tf.TensorSpec([2], tf.float32), y=tf.TensorSpec([], tf.int32)
)
MULTI_PROCESSING = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
TFF_SPLIT = tff.simulation.datasets.ClientData.train_test_client_split


def make_clients(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return {
    cid: [
      {"x": rng.random(2, dtype=np.float32), "y": np.int32(rng.integers(0, 10))} for _ in range(n)
    ]
    for cid, n in sizes.items()
  }


def mixed_sizes():
  """40 clients, 11 of them empty, sizes 0..6, ids in no particular order."""
  rng = np.random.default_rng(2024)
  ids = [f"user-{int(v):04d}" for v in rng.choice(10_000, size=40, replace=False)]
  sizes = {cid: int(rng.integers(1, 7)) for cid in ids}
  for cid in rng.choice(ids, size=11, replace=False):
    sizes[str(cid)] = 0
  return sizes


MIXED = mixed_sizes()
# Mostly empty: 30 empty clients and 2 with examples.
EMPTY_HEAVY = {**{f"e{i:02d}": 0 for i in range(30)}, "full_a": 3, "full_b": 1}
# Seven raw clients (one empty) for --split-by raw.
RAW7 = {"frank": 3, "alice": 2, "grace": 1, "carol": 4, "dave": 0, "bob": 5, "erin": 2}


def write_db(directory, sizes, name):
  return testing.write_tff_sqlite_input(
    directory / f"{name}.sqlite", make_clients(sizes), ELEMENT_SPEC
  )


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
  d = tmp_path_factory.mktemp("inputs")
  return {
    name: write_db(d, sizes, name)
    for name, sizes in [("mixed", MIXED), ("empty_heavy", EMPTY_HEAVY), ("raw7", RAW7)]
  }


@pytest.fixture(scope="module")
def tff_data(dbs):
  return {
    name: tff.simulation.datasets.load_and_parse_sql_client_data(path, ELEMENT_SPEC)
    for name, path in dbs.items()
  }


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  return tmp_path_factory.mktemp("stores")


def prepare(db, work, name, beam_args=(), **flags):
  return testing.prepare_store(
    db, work, output=str(work / name), beam_args=beam_args, element_spec=ELEMENT_SPEC, **flags
  )


def split_ids(store):
  """{split name: sorted client ids} from the manifest."""
  out = collections.defaultdict(list)
  for row in read_manifest(store, read_metadata(store)):
    out[row["split"]].append(row["client_id"])
  return {k: sorted(v) for k, v in out.items()}


def counts(store):
  return {r["client_id"]: r["num_examples"] for r in read_manifest(store, read_metadata(store))}


def assert_not_committed(output):
  assert not os.path.exists(metadata_path(str(output)))
  with pytest.raises(StoreFormatError):
    load_client_data(str(output))


def tff_pop_order(ids, seed):
  """The order in which TFF 0.87 draws candidates: sorted ids shuffled, popped from the end."""
  order = sorted(ids)
  np.random.RandomState(seed).shuffle(order)
  return order[::-1]


def assert_valid_split(store, sizes, k):
  ids = split_ids(store)
  assert set(ids) == {"train", "test"}
  assert len(ids["test"]) == k
  assert not set(ids["train"]) & set(ids["test"])
  assert sorted(ids["train"] + ids["test"]) == sorted(sizes)
  assert all(sizes[c] > 0 for c in ids["test"])
  return ids


# --- --split-method tff: exactly TFF's pick -----------------------------------


@pytest.mark.parametrize("seed, k", [(0, 5), (1, 8), (42, 1), (2**32 - 1, 12)])
def test_tff_method_picks_tff_test_clients(dbs, tff_data, work, seed, k):
  store = prepare(
    dbs["mixed"], work, f"tff_{seed}_{k}", num_test_clients=k, split_seed=seed, split_method="tff"
  )
  train, test = TFF_SPLIT(tff_data["mixed"], k, seed)
  ids = assert_valid_split(store, MIXED, k)
  assert ids["test"] == sorted(test.client_ids)
  assert ids["train"] == sorted(train.client_ids)
  # Empty clients were skipped on the way for at least one of these seeds; none is in test.
  loaded = load_client_data(store, "test")
  assert all(loaded.num_examples(c) > 0 for c in loaded.client_ids)
  params = read_metadata(store)["parameters"]
  assert (
    params["num_test_units"],
    params["split_method"],
    params["split_seed"],
    params["split_by"],
  ) == (k, "tff", seed, "client")


def test_tff_oracle_data_has_skipped_empty_clients():
  """The seeds above do draw empty candidates, so skipping is exercised."""
  skipped = 0
  for seed, k in [(0, 5), (1, 8), (42, 1), (2**32 - 1, 12)]:
    found = 0
    for cid in tff_pop_order(MIXED, seed):
      if found == k:
        break
      if MIXED[cid]:
        found += 1
      else:
        skipped += 1
  assert skipped >= 3


# --- errors, with the seed's messages -----------------------------------------


@pytest.mark.parametrize("k", [0, -2])
def test_non_positive_k_fails(dbs, tff_data, work, k):
  with pytest.raises(ValueError, match=r"^Please specify num_test_clients > 0\.$"):
    TFF_SPLIT(tff_data["mixed"], k, 0)
  with pytest.raises(PrepareError) as e:
    prepare(dbs["mixed"], work, f"k_{k}", num_test_clients=k, split_method="tff")
  assert str(e.value) == (
    f"--num-test-clients must be > 0, got {k} (Please specify num_test_clients > 0.)"
  )
  assert_not_committed(work / f"k_{k}")


@pytest.mark.parametrize("method, k", [("tff", 40), ("hash", 41)])
def test_k_not_below_number_of_clients_fails(dbs, tff_data, work, method, k):
  tff_message = f"The client_data supplied has only 40 clients, but {k} test clients were requested"
  with pytest.raises(ValueError, match=f"^{tff_message}\\.$"):
    TFF_SPLIT(tff_data["mixed"], k, 0)
  name = f"k_too_big_{method}"
  with pytest.raises(PrepareError) as e:
    prepare(dbs["mixed"], work, name, num_test_clients=k, split_method=method)
  assert str(e.value) == f"{tff_message} (at most 39 can be test clients)"
  assert_not_committed(work / name)


def _tff_seed_with_skips(num_skipped):
  """A seed for which TFF skips exactly `num_skipped` empty clients of EMPTY_HEAVY before
  the first non-empty one (K = 1)."""
  for seed in range(100_000):
    order = tff_pop_order(EMPTY_HEAVY, seed)
    first = next(i for i, c in enumerate(order) if EMPTY_HEAVY[c])
    if first == num_skipped:
      return seed
  raise AssertionError("no such seed")


def _hash_seed_with_skips(num_skipped):
  for seed in range(100_000):
    order = sorted(EMPTY_HEAVY, key=lambda c: (rank_key(seed, c), c))
    first = next(i for i, c in enumerate(order) if EMPTY_HEAVY[c])
    if first == num_skipped:
      return seed
  raise AssertionError("no such seed")


@pytest.mark.parametrize("method", ["tff", "hash"])
def test_too_many_empty_clients_follows_the_5k_plus_10_rule(dbs, tff_data, work, method):
  # K = 1: the limit is 5 * 1 + 10 = 15 skipped clients; a 16th skip fails.
  find = _tff_seed_with_skips if method == "tff" else _hash_seed_with_skips
  ok_seed, failing_seed = find(15), find(16)
  ok = prepare(
    dbs["empty_heavy"],
    work,
    f"skip15_{method}",
    num_test_clients=1,
    split_seed=ok_seed,
    split_method=method,
  )
  ids = assert_valid_split(ok, EMPTY_HEAVY, 1)
  if method == "tff":
    _, test = TFF_SPLIT(tff_data["empty_heavy"], 1, ok_seed)
    assert ids["test"] == test.client_ids
    with pytest.raises(ValueError, match=r"^Encountered too many clients with no data\.$"):
      TFF_SPLIT(tff_data["empty_heavy"], 1, failing_seed)
  name = f"skip16_{method}"
  with pytest.raises(PrepareError) as e:
    prepare(
      dbs["empty_heavy"],
      work,
      name,
      num_test_clients=1,
      split_seed=failing_seed,
      split_method=method,
    )
  assert str(e.value).startswith(
    "Encountered too many clients with no data: 16 candidates had "
    "fewer than the required examples before 1 test clients were "
    "found"
  ), str(e.value)
  assert_not_committed(work / name)


def _tff_failure(sizes, k, seed):
  """(skipped, found) when TFF 0.87 gives up: out of candidates or more than 5k+10 skipped."""
  skipped = found = 0
  for cid in tff_pop_order(sizes, seed):
    if skipped > 5 * k + 10:
      break
    if sizes[cid]:
      found += 1
    else:
      skipped += 1
  return skipped, found


@pytest.mark.parametrize("method", ["tff", "hash"])
def test_fewer_non_empty_clients_than_k_fails(dbs, tff_data, work, method):
  with pytest.raises(ValueError, match=r"^Encountered too many clients with no data\.$"):
    TFF_SPLIT(tff_data["empty_heavy"], 3, 5)
  name = f"exhausted_{method}"
  with pytest.raises(PrepareError) as e:
    prepare(dbs["empty_heavy"], work, name, num_test_clients=3, split_seed=5, split_method=method)
  if method == "tff":
    skipped, found = _tff_failure(EMPTY_HEAVY, 3, 5)
    assert str(e.value) == (
      f"Encountered too many clients with no data: {skipped} candidates had fewer than the "
      f"required examples before 3 test clients were found ({found} found)"
    )
  else:
    assert str(e.value) == (
      "Encountered too many clients with no data: only 2 clients have "
      "enough examples for the 3 test clients requested"
    )
  assert_not_committed(work / name)


# --- --min-test-examples --------------------------------------------------------


def test_min_test_examples_tff_method_is_tff_with_batches(dbs, tff_data, work):
  # TFF's test clients have "at least one batch": batching by M with drop_remainder makes
  # that "at least M examples".
  store = prepare(
    dbs["mixed"],
    work,
    "min3_tff",
    num_test_clients=6,
    split_seed=9,
    split_method="tff",
    min_test_examples=3,
  )
  batched = tff_data["mixed"].preprocess(lambda ds: ds.batch(3, drop_remainder=True))
  _, test = TFF_SPLIT(batched, 6, 9)
  ids = assert_valid_split(store, MIXED, 6)
  assert ids["test"] == sorted(test.client_ids)
  assert all(MIXED[c] >= 3 for c in ids["test"])
  assert any(0 < MIXED[c] < 3 for c in ids["train"])
  assert read_metadata(store)["parameters"]["min_test_examples"] == 3


def test_min_test_examples_hash_method(dbs, work):
  store = prepare(
    dbs["mixed"], work, "min4_hash", num_test_clients=5, split_seed=3, min_test_examples=4
  )
  ids = assert_valid_split(store, MIXED, 5)
  eligible = sorted((c for c in MIXED if MIXED[c] >= 4), key=lambda c: (rank_key(3, c), c))
  assert ids["test"] == sorted(eligible[:5])


# --- the default hash method --------------------------------------------------


@pytest.fixture(scope="module")
def hash_store(dbs, work):
  return prepare(dbs["mixed"], work, "hash_seed_7", num_test_clients=8, split_seed=7)


def test_hash_method_picks_first_non_empty_clients_by_rank(hash_store):
  ids = assert_valid_split(hash_store, MIXED, 8)
  eligible = sorted((c for c in MIXED if MIXED[c] > 0), key=lambda c: (rank_key(7, c), c))
  assert ids["test"] == sorted(eligible[:8])
  params = read_metadata(hash_store)["parameters"]
  assert (params["split_method"], params["num_test_units"], params["split_seed"]) == ("hash", 8, 7)
  # Both splits load; the test split has exactly the test clients.
  assert load_client_data(hash_store, "test").client_ids == ids["test"]
  assert load_client_data(hash_store, "train").client_ids == ids["train"]


def test_hash_method_depends_on_seed(dbs, work, hash_store):
  other = prepare(dbs["mixed"], work, "hash_seed_8", num_test_clients=8, split_seed=8)
  assert_valid_split(other, MIXED, 8)
  assert split_ids(other)["test"] != split_ids(hash_store)["test"]


def test_same_seed_same_split_on_multi_processing_runner(dbs, work, hash_store):
  other = prepare(
    dbs["mixed"],
    work,
    "hash_seed_7_mp",
    beam_args=MULTI_PROCESSING,
    num_test_clients=8,
    split_seed=7,
  )
  assert split_ids(other) == split_ids(hash_store)
  assert counts(other) == counts(hash_store)
  testing.assert_store_equals(other, testing.read_store(hash_store, "test"), split="test")


# --- --split-by raw -------------------------------------------------------------


@pytest.mark.parametrize("method", ["hash", "tff"])
def test_split_by_raw_keeps_raw_clients_on_one_side(dbs, tff_data, work, method):
  store = prepare(
    dbs["raw7"],
    work,
    f"by_raw_{method}",
    num_transformed_clients=23,
    num_test_clients=2,
    split_seed=11,
    split_method=method,
    split_by="raw",
  )
  rows = list(read_manifest(store, read_metadata(store)))
  assert len(rows) == 23
  sides = collections.defaultdict(set)
  for r in rows:
    sides[r["raw_client_id"]].add(r["split"])
  assert all(len(s) == 1 for s in sides.values()), dict(sides)
  test_raw = sorted(raw for raw, s in sides.items() if s == {"test"})
  assert len(test_raw) == 2 and "dave" not in test_raw  # dave has no example
  test_clients = [r for r in rows if r["split"] == "test"]
  assert all(r["num_examples"] > 0 for r in test_clients)
  assert len(test_clients) == sum(4 if raw in ("alice", "bob") else 3 for raw in test_raw)
  if method == "tff":
    # Splitting by raw client with the tff method is TFF's split of the raw clients.
    _, test = TFF_SPLIT(tff_data["raw7"], 2, 11)
    assert test_raw == sorted(test.client_ids)
  else:
    eligible = sorted((c for c in RAW7 if RAW7[c] > 0), key=lambda c: (rank_key(11, c), c))
    assert test_raw == sorted(eligible[:2])
  assert read_metadata(store)["parameters"]["split_by"] == "raw"


def test_expansion_with_a_split_keeps_raw_clients_on_one_side_by_default(dbs, work):
  store = prepare(
    dbs["raw7"],
    work,
    "by_raw_default",
    num_transformed_clients=23,
    num_test_clients=2,
    split_seed=11,
  )
  rows = list(read_manifest(store, read_metadata(store)))
  sides = collections.defaultdict(set)
  for r in rows:
    sides[r["raw_client_id"]].add(r["split"])
  assert all(len(s) == 1 for s in sides.values()), dict(sides)
  assert sorted(raw for raw, s in sides.items() if s == {"test"}) == sorted(
    sorted((c for c in RAW7 if RAW7[c] > 0), key=lambda c: (rank_key(11, c), c))[:2]
  )
  assert read_metadata(store)["parameters"]["split_by"] == "raw"


def test_split_by_client_with_expansion_says_test_shares_raw_data_with_train(dbs, work):
  from fedbeam.pipelines.prepare import PrepareResult

  store = prepare(
    dbs["raw7"],
    work,
    "by_client",
    num_transformed_clients=23,
    num_test_clients=4,
    split_seed=11,
    split_by="client",
  )
  metadata = read_metadata(store)
  assert metadata["parameters"]["split_by"] == "client"
  summary = PrepareResult(metadata, {}, 1.0).summary()
  assert (
    "note: --split-by client split pseudo-clients one by one: test clients share raw "
    "data with train"
  ) in summary
  unexpanded = prepare(dbs["mixed"], work, "unexpanded_default", num_test_clients=4)
  metadata = read_metadata(unexpanded)
  assert metadata["parameters"]["split_by"] == "client"  # the same as raw without expansion
  assert "note:" not in PrepareResult(metadata, {}, 1.0).summary()


def test_split_by_help_says_what_splitting_pseudo_clients_one_by_one_does():
  from fedbeam.cli import build_parser

  prepare_parser = next(
    a
    for a in build_parser()._actions  # pylint: disable=protected-access
    if a.dest == "command"
  ).choices["prepare"]
  actions = prepare_parser._actions  # pylint: disable=protected-access
  (action,) = [a for a in actions if a.dest == "split_by"]
  assert action.default is None
  assert "raw (default with expansion)" in action.help
  assert "test clients then share raw data with train" in action.help


# --- --test-fraction --------------------------------------------------------------


@pytest.mark.parametrize("fraction, k", [(0.3, 12), (0.31, 12), (0.3125, 12), (0.4375, 18)])
def test_test_fraction_rounds_half_to_even(dbs, work, fraction, k):
  store = prepare(dbs["mixed"], work, f"fraction_{fraction}", test_fraction=fraction, split_seed=1)
  assert_valid_split(store, MIXED, k)
  params = read_metadata(store)["parameters"]
  assert params["test_fraction"] == fraction and params["num_test_units"] == k


def test_test_fraction_selecting_nothing_fails(dbs, work):
  with pytest.raises(PrepareError) as e:
    prepare(dbs["mixed"], work, "fraction_tiny", test_fraction=0.01)
  assert str(e.value) == "--test-fraction 0.01 of 40 clients selects no test client"
  assert_not_committed(work / "fraction_tiny")


# --- empty-client policies ----------------------------------------------------------


def test_keep_reports_empty_clients_in_train_only(hash_store):
  empty = sorted(c for c in MIXED if MIXED[c] == 0)
  metadata = read_metadata(hash_store)
  assert metadata["empty_clients"] == {"found": 11, "policy": "keep", "dropped": 0, "sample": empty}
  summary = summarize_store(hash_store)
  assert summary["splits"]["train"]["num_empty_clients"] == 11
  assert summary["splits"]["test"]["num_empty_clients"] == 0
  assert "empty clients: 11 found, policy keep, 0 dropped" in format_summary(summary)


def test_drop_removes_empty_clients_and_reports_them(dbs, work, tmp_path):
  store = prepare(
    dbs["mixed"], work, "drop", num_test_clients=8, split_seed=7, empty_clients="drop"
  )
  non_empty = {c: n for c, n in MIXED.items() if n}
  ids = assert_valid_split(store, non_empty, 8)
  assert not [c for c in ids["train"] if MIXED[c] == 0]
  empty = sorted(c for c in MIXED if MIXED[c] == 0)
  assert read_metadata(store)["empty_clients"] == {
    "found": 11,
    "policy": "drop",
    "dropped": 11,
    "sample": empty,
  }
  # `fedbeam inspect` reports them (it runs no TFF computation; output goes to a file).
  out, err = tmp_path / "inspect.json", tmp_path / "inspect.err"
  with open(out, "w") as f, open(err, "w") as g:
    subprocess.run(
      [os.path.join(os.path.dirname(sys.executable), "fedbeam"), "inspect", "--json", store],
      stdout=f,
      stderr=g,
      check=True,
    )
  report = json.loads(out.read_text())
  assert report["empty_client_report"] == {
    "found": 11,
    "policy": "drop",
    "dropped": 11,
    "sample": empty,
  }
  assert report["splits"]["train"]["num_empty_clients"] == 0
  assert report["splits"]["train"]["num_clients"] == 21


def test_fail_names_up_to_twenty_empty_clients(dbs, work):
  with pytest.raises(PrepareError) as e:
    prepare(dbs["empty_heavy"], work, "fail", empty_clients="fail")
  names = ", ".join(repr(f"e{i:02d}") for i in range(20))
  assert str(e.value) == (f"30 client(s) have no examples (--empty-clients fail): {names} ...")
  assert_not_committed(work / "fail")


# --- StoreClientData.train_test_client_split ------------------------------------------


@pytest.fixture(scope="module")
def unsplit(dbs, work):
  return {
    "mixed": prepare(dbs["mixed"], work, "unsplit_mixed"),
    "empty_heavy": prepare(dbs["empty_heavy"], work, "unsplit_empty_heavy"),
  }


@pytest.mark.parametrize("seed, k", [(0, 5), (3, 10), (2**31, 1), (None, 4)])
def test_store_client_data_split_equals_tff(unsplit, tff_data, seed, k):
  store = load_client_data(unsplit["mixed"])
  assert store.client_ids == tff_data["mixed"].client_ids
  train, test = StoreClientData.train_test_client_split(store, k, seed)
  assert isinstance(train, StoreClientData) and isinstance(test, StoreClientData)
  if seed is None:
    assert len(test.client_ids) == k and all(test.num_examples(c) > 0 for c in test.client_ids)
  else:
    tff_train, tff_test = TFF_SPLIT(tff_data["mixed"], k, seed)
    # Same clients in the same order, so datasets(seed) walks them as TFF's would.
    assert test.client_ids == tff_test.client_ids
    assert train.client_ids == tff_train.client_ids
    # TFF's own implementation run on the store object picks the same clients.
    _, generic_test = TFF_SPLIT(store, k, seed)
    assert set(generic_test.client_ids) == set(test.client_ids)
  assert not set(train.client_ids) & set(test.client_ids)
  assert len(train.client_ids) + len(test.client_ids) == 40
  cid = test.client_ids[0]
  testing.assert_elements_equal(
    [
      {k2: np.asarray(v) for k2, v in e.items()}
      for e in test.create_tf_dataset_for_client(cid).as_numpy_iterator()
    ],
    [
      {k2: np.asarray(v) for k2, v in e.items()}
      for e in store.create_tf_dataset_for_client(cid).as_numpy_iterator()
    ],
  )


def test_store_client_data_split_errors_match_tff(unsplit, tff_data):
  store = load_client_data(unsplit["mixed"])
  heavy = load_client_data(unsplit["empty_heavy"])
  cases = [
    (store, tff_data["mixed"], 0, 0),
    (store, tff_data["mixed"], 40, 0),
    (heavy, tff_data["empty_heavy"], 3, 5),
    (heavy, tff_data["empty_heavy"], 1, _tff_seed_with_skips(16)),
  ]
  for ours, theirs, k, seed in cases:
    with pytest.raises(ValueError) as tff_error:
      TFF_SPLIT(theirs, k, seed)
    with pytest.raises(ValueError) as our_error:
      StoreClientData.train_test_client_split(ours, k, seed)
    assert str(our_error.value) == str(tff_error.value)
  _, test = StoreClientData.train_test_client_split(heavy, 1, _tff_seed_with_skips(15))
  _, tff_test = TFF_SPLIT(tff_data["empty_heavy"], 1, _tff_seed_with_skips(15))
  assert test.client_ids == tff_test.client_ids


# --- the Top-K combiner behind the hash method and the expansion remainder -------------


def test_smallest_n_combiner_is_exact_across_accumulators():
  import random  # pylint: disable=g-import-not-at-top

  from fedbeam.pipelines.ranking import SmallestN  # pylint: disable=g-import-not-at-top

  fn = SmallestN()
  rng = random.Random(3)
  for total, n in [(0, 5), (10, 0), (50, 70), (5000, 1), (20_000, 3000)]:
    items = [(rng.getrandbits(64), f"c{i}") for i in range(total)]
    accs = []
    for part in range(4):
      acc = fn.create_accumulator()
      for item in items[part::4]:
        acc = fn.add_input(acc, (n, item))
      accs.append(fn.compact(acc) if part % 2 else acc)
    assert fn.extract_output(fn.merge_accumulators(accs)) == sorted(items)[:n]
