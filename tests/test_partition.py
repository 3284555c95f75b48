"""Partitioners (`--partition iid|dirichlet|shard`): what each promises, checked on real stores.

Flower Datasets is not installed here; `_flower_dirichlet_counts` and
`_flower_shard_sizes` restate the size computations of its
DirichletPartitioner and ShardPartitioner (flwr_datasets/partitioner/) line
for line, so the plans are checked against Flower's definitions.
"""

import os

import numpy as np
import pytest

from fedbeam import cli
from fedbeam import testing as fbt
from fedbeam.format.codec import decode_examples
from fedbeam.format.layout import METADATA_FILE
from fedbeam.format.manifest import read_manifest
from fedbeam.format.metadata import read_metadata
from fedbeam.format.spec import ElementSpec
from fedbeam.format.tfrecord import read_tfrecords
from fedbeam.pipelines.partition import (
  PartitionConfig,
  PartitionError,
  build_plan,
  partition_sizes,
  permute,
)
from fedbeam.pipelines.prepare import PrepareError

MULTI_PROCESSING = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
NUM_LABELS = 10


def _elements(n, seed=0, sorted_labels=False):
  """n examples; `idx` makes each one unique, so examples can be counted one by one."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_LABELS, n)
  if sorted_labels:
    labels = np.sort(labels)
  return [
    {"idx": np.int64(i), "label": np.int64(label), "x": rng.random(2).astype(np.float32)}
    for i, label in enumerate(labels)
  ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("partition-inputs")
  elements = _elements(3000)
  # Two files, so elements of several files are ranked against each other.
  a = fbt.write_unkeyed_tfrecord_input(root / "a.tfrecord", elements[:1700])
  b = fbt.write_unkeyed_tfrecord_input(root / "b.tfrecord", elements[1700:])
  return {"pattern": f"{a},{b}", "elements": elements, "root": root}


def _prepare(inputs, tmp_path, name, beam_args=(), **partition):
  return fbt.prepare_store(
    inputs["pattern"],
    tmp_path / name,
    input_format="tfrecord",
    partition=PartitionConfig(**partition),
    beam_args=beam_args,
  )


def _store_columns(store):
  """{client id: {feature: values}}, read with numpy (no TensorFlow: these tests read many)."""
  metadata = read_metadata(store)
  spec = ElementSpec.from_metadata(metadata["element_spec"])
  out = {}
  for row in read_manifest(store, metadata):
    with open(os.path.join(store, row["path"]), "rb") as f:
      records = list(read_tfrecords(f))
    out[row["client_id"]] = decode_examples(records, spec)
  return out


def _label_counts(store):
  """{client id: [examples per label]} and {client id: sorted idx values}."""
  counts, idx = {}, {}
  for cid, columns in _store_columns(store).items():
    counts[cid] = np.bincount(columns["label"].astype(int), minlength=NUM_LABELS)
    idx[cid] = sorted(columns["idx"].astype(int).tolist())
  return counts, idx


def _assert_every_example_once(idx, n):
  everything = sorted(i for ids in idx.values() for i in ids)
  assert everything == list(range(n))


# ----------------------------------------------------------------------------
# The keyed permutation
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 65, 1000, 4099])
def test_permute_is_a_permutation_fixed_by_its_key(size):
  values = np.arange(size)
  out = permute(values, size, b"k")
  assert sorted(out.tolist()) == values.tolist()
  assert permute(values, size, b"k").tolist() == out.tolist()
  if size > 5:
    assert permute(values, size, b"other").tolist() != out.tolist()
    # Not the identity, nor a rotation.
    assert np.mean(out == values) < 0.2


def test_permute_refuses_values_outside_its_range():
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    permute([4], 4, b"k")


# ----------------------------------------------------------------------------
# Plans against Flower's definitions (counts only, no pipeline)
# ----------------------------------------------------------------------------


def _flower_dirichlet_counts(
  label_counts, num_partitions, alpha, min_size, seed, self_balancing=False
):
  """[labels, partitions] examples, as DirichletPartitioner's loop computes them."""
  rng = np.random.default_rng(seed)
  alpha = np.array([float(alpha)]).repeat(num_partitions)
  average = sum(label_counts) / num_partitions
  for _ in range(11):
    sizes = np.zeros(num_partitions, int)
    out = []
    for count in label_counts:
      proportions = rng.dirichlet(alpha)
      if self_balancing:
        proportions = np.array([0 if sizes[j] > average else p for j, p in enumerate(proportions)])
        proportions = proportions / proportions.sum()
      split = (np.cumsum(proportions) * count).astype(int)[:-1]
      parts = [len(p) for p in np.split(np.arange(count), split)]
      sizes += parts
      out.append(parts)
    if sizes.min() >= min_size:
      return np.array(out)
  raise ValueError("no draw")


def _plan_counts(plan, num_clients):
  out = []
  for k, count in enumerate(plan.counts):
    clients = plan.clients(k, np.arange(count))
    out.append(np.bincount(clients[clients >= 0], minlength=num_clients))
  return np.array(out)


def _one_element_counts(label_counts):
  return [(("f", 0), tuple(enumerate(label_counts)))]


@pytest.mark.parametrize("alpha,balancing", [(0.1, False), (0.5, True), (100.0, False)])
def test_dirichlet_plan_gives_flowers_counts_for_the_same_seed(alpha, balancing):
  label_counts = [300, 250, 280, 310, 290, 260, 330, 270, 300, 310]
  config = PartitionConfig(
    "dirichlet",
    12,
    label_key="label",
    alpha=alpha,
    seed=3,
    min_client_examples=5,
    self_balancing=balancing,
  )
  plan = build_plan(_one_element_counts(label_counts), config)
  expected = _flower_dirichlet_counts(label_counts, 12, alpha, 5, 3, balancing)
  np.testing.assert_array_equal(_plan_counts(plan, 12), expected)


def test_iid_plan_gives_flowers_sizes():
  plan = build_plan(_one_element_counts([1003]), PartitionConfig("iid", 10))
  assert _plan_counts(plan, 10)[0].tolist() == [101, 101, 101] + [100] * 7
  assert partition_sizes(1003, 10).tolist() == [101, 101, 101] + [100] * 7


def test_plan_ranks_elements_by_file_and_index_whatever_their_order():
  config = PartitionConfig("dirichlet", 4, label_key="label", alpha=1.0, min_client_examples=0)
  items = [(("b", 0), ((0, 3), (1, 2))), (("a", 5), ((1, 4),)), (("a", 0), ((0, 1), (1, 1)))]
  one, other = build_plan(items, config), build_plan(items[::-1], config)
  assert one.offsets == other.offsets == {("a", 0): (0, 0), ("a", 5): (1, 1), ("b", 0): (1, 5)}


def test_plan_refuses_more_clients_than_examples():
  with pytest.raises(PartitionError, match="--num-clients 11 is more than the 10 examples"):
    build_plan(_one_element_counts([10]), PartitionConfig("iid", 11))


def test_plan_refuses_labels_of_mixed_types():
  items = [(("a", 0), ((1, 2), (b"cat", 1)))]
  with pytest.raises(PartitionError, match="both integers and strings"):
    build_plan(items, PartitionConfig("shard", 1, label_key="label", shards_per_client=1))


@pytest.mark.parametrize(
  "bad,message",
  [
    (dict(method="dirichlet", num_clients=3, label_key="y"), "--dirichlet-alpha"),
    (dict(method="dirichlet", num_clients=3, alpha=1.0), "--label-key"),
    (dict(method="shard", num_clients=3, label_key="y"), "--shards-per-client"),
    (dict(method="iid", num_clients=0), "--num-clients"),
    (dict(method="iid", num_clients=3, alpha=0.5), "--dirichlet-alpha"),
    (dict(method="iid", num_clients=3, shard_size=4), "--shard-size"),
    (dict(method="random", num_clients=3), "--partition 'random'"),
  ],
)
def test_partition_config_names_the_flag_at_fault(bad, message):
  with pytest.raises(PartitionError, match=message):
    PartitionConfig(**bad).validate()


# ----------------------------------------------------------------------------
# Stores
# ----------------------------------------------------------------------------


def test_iid_clients_have_flowers_sizes_and_every_example_once(inputs, tmp_path):
  store = _prepare(inputs, tmp_path, "iid", method="iid", num_clients=7, seed=1)
  counts, idx = _label_counts(store)
  assert sorted(counts) == sorted(str(j) for j in range(7))
  # 3000 = 7 * 428 + 4: Flower's sizes, the first four clients one larger.
  assert [len(idx[str(j)]) for j in range(7)] == [429] * 4 + [428] * 3
  _assert_every_example_once(idx, 3000)
  # A seeded shuffle, not runs of the input: every client spans the whole input.
  assert all(ids[0] < 100 and ids[-1] > 2900 for ids in idx.values())
  parameters = read_metadata(store)["parameters"]
  assert parameters["partition"] == "iid" and parameters["num_clients"] == 7
  assert parameters["partition_seed"] == 1 and parameters["partition_dropped_examples"] == 0


def _mean_top_label_share(counts):
  shares = [c.max() / c.sum() for c in counts.values() if c.sum()]
  return float(np.mean(shares))


def test_dirichlet_label_concentration_follows_alpha(inputs, tmp_path):
  low = _prepare(
    inputs,
    tmp_path,
    "a01",
    method="dirichlet",
    num_clients=20,
    label_key="label",
    alpha=0.1,
    min_client_examples=5,
  )
  high = _prepare(
    inputs,
    tmp_path,
    "a100",
    method="dirichlet",
    num_clients=20,
    label_key="label",
    alpha=100.0,
    min_client_examples=5,
  )
  low_counts, low_idx = _label_counts(low)
  high_counts, high_idx = _label_counts(high)
  for idx in (low_idx, high_idx):
    _assert_every_example_once(idx, 3000)
  assert len(low_counts) == len(high_counts) == 20
  assert min(c.sum() for c in low_counts.values()) >= 5
  # alpha 100: every client holds close to 1/10 of each label; alpha 0.1: one label dominates.
  assert _mean_top_label_share(high_counts) < 0.2
  assert _mean_top_label_share(low_counts) > 0.6
  # The store's per-client label counts are exactly the Flower counts of the same seed.
  label_totals = np.bincount([int(e["label"]) for e in inputs["elements"]], minlength=NUM_LABELS)
  expected = _flower_dirichlet_counts(label_totals, 20, 0.1, 5, 0)
  np.testing.assert_array_equal(np.array([low_counts[str(j)] for j in range(20)]).T, expected)


def test_dirichlet_that_cannot_reach_the_minimum_fails_and_commits_nothing(inputs, tmp_path):
  with pytest.raises(PrepareError, match="--min-client-examples 400"):
    _prepare(
      inputs,
      tmp_path,
      "bad",
      method="dirichlet",
      num_clients=20,
      label_key="label",
      alpha=0.05,
      min_client_examples=400,
    )
  assert not os.path.exists(tmp_path / "bad" / "store" / METADATA_FILE)


def test_shard_clients_hold_shards_of_few_labels_and_drop_the_rest(tmp_path):
  # Input sorted by label, 1005 examples: 10 clients x 2 shards of 1005 // 20 = 50.
  elements = _elements(1005, seed=4, sorted_labels=True)
  path = fbt.write_unkeyed_tfrecord_input(tmp_path / "in.tfrecord", elements)
  store = fbt.prepare_store(
    path,
    tmp_path / "s",
    partition=PartitionConfig("shard", 10, label_key="label", shards_per_client=2, seed=5),
  )
  counts, idx = _label_counts(store)
  assert [len(idx[str(j)]) for j in range(10)] == [100] * 10
  kept = sorted(i for ids in idx.values() for i in ids)
  assert len(kept) == len(set(kept)) == 1000
  # A shard is 50 consecutive examples of the label order: at most 2 labels each,
  # so a client of 2 shards holds at most 4 labels, and most hold 2 or 3.
  assert max(int((c > 0).sum()) for c in counts.values()) <= 4
  assert np.mean([(c > 0).sum() for c in counts.values()]) < 3.5
  metadata = read_metadata(store)
  assert metadata["parameters"]["partition_dropped_examples"] == 5
  assert metadata["parameters"]["num_input_records"] == 1000


def test_dirichlet_store_is_byte_identical_in_process_and_on_two_workers(inputs, tmp_path):
  flags = dict(method="dirichlet", num_clients=15, label_key="label", alpha=0.5, seed=9)
  one = _prepare(inputs, tmp_path, "one", **flags)
  two = _prepare(inputs, tmp_path, "two", beam_args=MULTI_PROCESSING, **flags)

  def files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
      for name in names:
        with open(os.path.join(dirpath, name), "rb") as f:
          out[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
    return out

  a, b = files(one), files(two)
  assert len([k for k in a if k.endswith(".tfrecord")]) == 15
  assert a == b


def test_dirichlet_clients_without_examples_are_kept_as_empty_clients(inputs, tmp_path):
  store = _prepare(
    inputs,
    tmp_path,
    "empty",
    method="dirichlet",
    num_clients=200,
    label_key="label",
    alpha=0.01,
    min_client_examples=0,
    seed=2,
  )
  metadata = read_metadata(store)
  (split,) = metadata["splits"]
  assert split["num_clients"] == 200 and split["num_examples"] == 3000
  assert split["num_empty_clients"] > 0


def test_avro_input_is_partitioned_like_tfrecord(tmp_path):
  elements = _elements(500, seed=6)
  avro = fbt.write_avro_input(tmp_path / "in.avro", {"x": elements}, client_id_key=None)
  tfrecord = fbt.write_unkeyed_tfrecord_input(tmp_path / "in.tfrecord", elements)
  config = PartitionConfig("dirichlet", 6, label_key="label", alpha=0.3, seed=1)
  spec = {
    "idx": {"dtype": "int64", "shape": []},
    "label": {"dtype": "int64", "shape": []},
    "x": {"dtype": "float32", "shape": [2]},
  }
  from_avro = fbt.prepare_store(avro, tmp_path / "avro", partition=config, element_spec=spec)
  from_tfrecord = fbt.prepare_store(tfrecord, tmp_path / "tfr", partition=config, element_spec=spec)
  a, b = _label_counts(from_avro)[1], _label_counts(from_tfrecord)[1]
  assert a == b and len(a) == 6


def test_a_record_without_the_label_is_named(tmp_path):
  elements = _elements(40)
  del elements[17]["label"]
  path = fbt.write_unkeyed_tfrecord_input(tmp_path / "in.tfrecord", elements[17:18] + elements)
  with pytest.raises(
    PrepareError, match=r"in\.tfrecord record 0: label feature 'label' is missing"
  ):
    fbt.prepare_store(
      path,
      tmp_path / "s",
      partition=PartitionConfig("shard", 2, label_key="label", shards_per_client=1),
      element_spec={
        "idx": {"dtype": "int64", "shape": []},
        "x": {"dtype": "float32", "shape": [2]},
        "label": {"dtype": "int64", "shape": []},
      },
    )
  assert not os.path.exists(tmp_path / "s" / "store" / METADATA_FILE)


# ----------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------


def test_cli_prepare_partition_dirichlet_writes_the_clients(inputs, tmp_path, capsys):
  out = tmp_path / "cli"
  rc = cli.main(
    [
      "prepare",
      "--input",
      inputs["pattern"],
      "--input-format",
      "tfrecord",
      "--partition",
      "dirichlet",
      "--label-key",
      "label",
      "--num-clients",
      "8",
      "--dirichlet-alpha",
      "0.5",
      "--partition-seed",
      "0",
      "--output",
      str(out),
    ]
  )
  assert rc == 0, capsys.readouterr().err
  assert "8 clients, 3000 examples" in capsys.readouterr().out


@pytest.mark.parametrize(
  "argv,code,message",
  [
    (["--num-clients", "8"], 2, "--num-clients need --partition"),
    (
      ["--partition", "dirichlet", "--num-clients", "8", "--label-key", "label"],
      1,
      "--dirichlet-alpha",
    ),
    (
      ["--partition", "iid", "--num-clients", "8", "--client-id-key", "label"],
      1,
      "--partition and --client-id-key exclude each other",
    ),
  ],
)
def test_cli_partition_flags_are_checked(inputs, tmp_path, capsys, argv, code, message):
  rc = cli.main(
    [
      "prepare",
      "--input",
      inputs["pattern"],
      "--input-format",
      "tfrecord",
      "--output",
      str(tmp_path / "x"),
    ]
    + argv
  )
  assert rc == code
  assert message in capsys.readouterr().err
