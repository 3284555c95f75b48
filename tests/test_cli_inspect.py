"""`fedbeam inspect` reports a store's splits, sizes and empty clients, and refuses non-stores."""

import json
import os
import shutil

import numpy as np
import pytest

from fedbeam import testing
from fedbeam.cli import main
from fedbeam.format.layout import METADATA_FILE
from fedbeam.format.metadata import read_metadata

SPEC = {"label": {"dtype": "int64", "shape": []}, "x": {"dtype": "float32", "shape": [3]}}
# Example counts per client: four empty clients, sizes up to 9.
SIZES = [0, 1, 2, 3, 0, 5, 6, 0, 9, 1, 0, 4]


def _clients():
  rng = np.random.RandomState(3)
  return {
    f"client-{i:02d}": [{"label": j, "x": rng.uniform(size=3).astype(np.float32)} for j in range(n)]
    for i, n in enumerate(SIZES)
  }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  root = tmp_path_factory.mktemp("inspect")
  sqlite = testing.write_tff_sqlite_input(root / "in.sqlite", _clients(), SPEC)
  return testing.prepare_store(sqlite, root, element_spec=SPEC)


def _inspect(capsys, *args):
  capsys.readouterr()
  code = main(["inspect", *args])
  out = capsys.readouterr()
  return code, out.out, out.err


def _nearest(values, q):
  return int(np.percentile(np.array(values), q, method="nearest"))


def test_json_summary_has_version_splits_empty_clients_and_percentiles(store, capsys):
  code, out, err = _inspect(capsys, store, "--json")
  assert code == 0, err
  summary = json.loads(out)
  assert summary["format_version"] == 1
  assert summary["empty_clients"] == 4
  assert list(summary["splits"]) == ["all"]
  split = summary["splits"]["all"]
  assert split["num_clients"] == len(SIZES)
  assert split["num_examples"] == sum(SIZES)
  assert split["num_empty_clients"] == 4
  assert split["client_size"] == {
    "min": 0,
    "p50": _nearest(SIZES, 50),
    "p90": _nearest(SIZES, 90),
    "p99": _nearest(SIZES, 99),
    "max": 9,
  }
  data_dir = read_metadata(store)["data_dir"]
  sizes = sum(
    os.path.getsize(os.path.join(d, n))
    for d, _, names in os.walk(os.path.join(store, data_dir, "all"))
    for n in names
  )
  assert split["num_bytes"] == sizes
  assert summary["element_spec"] == {
    "label": {"dtype": "int64", "shape": []},
    "x": {"dtype": "float32", "shape": [3]},
  }
  assert summary["empty_client_report"]["sample"] == [
    f"client-{i:02d}" for i, n in enumerate(SIZES) if n == 0
  ]


def test_human_summary_lists_each_split_and_the_empty_clients(store, capsys):
  code, out, err = _inspect(capsys, store)
  assert code == 0, err
  assert f"fedbeam store {store} (format v1" in out
  assert f"split all: {len(SIZES)} clients, {sum(SIZES)} examples" in out
  assert (
    f"examples per client: min 0, p50 {_nearest(SIZES, 50)}, p90 {_nearest(SIZES, 90)}, "
    f"p99 {_nearest(SIZES, 99)}, max 9"
  ) in out
  assert "empty clients: 4 found, policy keep, 0 dropped" in out
  assert "element spec: label: int64[], x: float32[3]" in out


def test_split_store_reports_every_split(tmp_path, capsys):
  clients = {k: v for k, v in _clients().items() if v}
  store = testing.prepare_store(clients, tmp_path, num_test_clients=2, split_seed=1)
  code, out, err = _inspect(capsys, store, "--json")
  assert code == 0, err
  splits = json.loads(out)["splits"]
  assert sorted(splits) == ["test", "train"]
  assert splits["test"]["num_clients"] == 2
  assert splits["train"]["num_clients"] == len(clients) - 2
  assert sum(s["num_examples"] for s in splits.values()) == sum(SIZES)


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "plain_file", "uncommitted"])
def test_path_without_a_store_exits_non_zero_with_a_clear_message(store, tmp_path, capsys, kind):
  path = tmp_path / "target"
  if kind == "empty_dir":
    path.mkdir()
  elif kind == "plain_file":
    path.write_text("hello")
  elif kind == "uncommitted":
    # What a killed job leaves: data, no metadata.
    shutil.copytree(store, path)
    os.remove(path / METADATA_FILE)
  code, out, err = _inspect(capsys, str(path), "--json")
  assert code == 1
  assert out == ""
  assert err.startswith("fedbeam inspect: error: ")
  assert str(path) in err
  expected = "did not finish" if kind == "uncommitted" else "holds no committed fedbeam store"
  assert expected in err


def test_store_with_a_missing_manifest_file_exits_non_zero(store, tmp_path, capsys):
  damaged = tmp_path / "damaged"
  shutil.copytree(store, damaged)
  data_dir = read_metadata(str(damaged))["data_dir"]
  os.remove(damaged / data_dir / "manifest" / "part-00000-of-00001.avro")
  code, _, err = _inspect(capsys, str(damaged))
  assert code == 1
  assert "part-00000-of-00001.avro is missing" in err
