"""Labels per client of a store: counts read from the client files, entropies, the CLI plot."""

import math
import struct

import numpy as np
import pytest

from fedbeam import testing
from fedbeam.cli import main
from fedbeam.label_distribution import entropy_bits, read_label_distribution

# Client "a" holds one label, "b" two in equal numbers, "c" four in equal numbers.
CLIENTS = {
  "a": [{"x": 0.5, "label": 3}] * 4,
  "b": [{"x": 1.0, "label": 1}, {"x": 2.0, "label": 2}] * 2,
  "c": [{"x": float(i), "label": i} for i in range(4)],
}


def test_entropy_bits_of_uniform_and_point_distributions():
  assert entropy_bits([5, 0, 0]) == 0.0
  assert entropy_bits([1, 1]) == pytest.approx(1.0)
  assert entropy_bits([2, 2, 2, 2]) == pytest.approx(2.0)
  assert entropy_bits([]) == 0.0


def test_label_counts_are_each_clients_labels(tmp_path):
  store = testing.prepare_store(CLIENTS, tmp_path)
  d = read_label_distribution(store, "label")
  assert d.client_ids == ("a", "b", "c")
  assert d.labels == ("0", "1", "2", "3")
  np.testing.assert_array_equal(d.counts, [[0, 0, 0, 4], [0, 2, 2, 0], [1, 1, 1, 1]])
  assert d.mean_client_entropy == pytest.approx((0.0 + 1.0 + 2.0) / 3)
  pooled = [1, 3, 3, 5]
  assert d.pooled_entropy == pytest.approx(-sum(c / 12 * math.log2(c / 12) for c in pooled))


def test_label_counts_read_only_the_first_clients(tmp_path):
  store = testing.prepare_store(CLIENTS, tmp_path)
  d = read_label_distribution(store, "label", max_clients=2)
  assert d.client_ids == ("a", "b")
  assert d.counts.sum() == 8


def test_a_feature_that_is_no_label_is_refused_by_name(tmp_path):
  store = testing.prepare_store(CLIENTS, tmp_path)
  with pytest.raises(ValueError, match="'y' is not a feature of store"):
    read_label_distribution(store, "y")


def test_inspect_label_feature_writes_the_label_plot_and_prints_the_entropies(tmp_path, capsys):
  store = testing.prepare_store(CLIENTS, tmp_path)
  capsys.readouterr()
  plot = tmp_path / "sizes.png"
  assert main(["inspect", store, "--plot", str(plot), "--label-feature", "label"]) == 0
  out = capsys.readouterr().out
  labels_png = tmp_path / "sizes-labels.png"
  assert f"label distribution of the first 3 clients: {labels_png}" in out
  assert "mean per-client entropy of 'label' 1.000 bits" in out
  with open(labels_png, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24])[1] == 400


def test_inspect_label_feature_without_plot_or_of_a_missing_feature_exits_2(tmp_path, capsys):
  store = testing.prepare_store(CLIENTS, tmp_path)
  capsys.readouterr()
  assert main(["inspect", store, "--label-feature", "label"]) == 2
  assert "--label-feature needs --plot FILE.png" in capsys.readouterr().err
  assert main(["inspect", store, "--plot", str(tmp_path / "p.png"), "--label-feature", "y"]) == 2
  assert "--label-feature 'y' is not a feature" in capsys.readouterr().err
