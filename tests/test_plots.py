"""Plots of a store's client sizes and of a run's accuracy; matplotlib only when plotting."""

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from fedbeam import testing
from fedbeam.cli import main
from fedbeam.plots import plot_accuracy, plot_client_sizes, read_accuracy

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == PNG
  return struct.unpack(">II", head[16:24])


def test_client_size_histogram_is_a_png_of_the_figure_size(tmp_path):
  path = str(tmp_path / "sizes.png")
  plot_client_sizes({"train": [1, 2, 2, 3, 300], "test": [4, 5]}, path)
  assert _png_size(path) == (600, 350)


def test_client_size_histogram_of_no_client_is_refused(tmp_path):
  with pytest.raises(ValueError, match="no client to plot"):
    plot_client_sizes({"train": []}, str(tmp_path / "sizes.png"))
  assert not os.path.exists(tmp_path / "sizes.png")


def test_read_accuracy_keeps_rounds_without_evaluation_as_nan(tmp_path):
  metrics = tmp_path / "metrics.csv"
  metrics.write_text(
    "round,train_loss,train_accuracy,test_loss,test_accuracy,seconds,examples\n"
    "1,2.0,0.25,,,1.0,10\n2,1.5,0.5,1.6,0.4,1.0,10\n"
  )
  rounds, train, test = read_accuracy(str(metrics))
  assert rounds == [1, 2] and train == [0.25, 0.5]
  assert np.isnan(test[0]) and test[1] == 0.4
  plot_accuracy(str(metrics), str(tmp_path / "accuracy.png"), chance=0.1)
  assert _png_size(str(tmp_path / "accuracy.png")) == (600, 350)


def test_read_accuracy_of_another_csv_names_the_file(tmp_path):
  other = tmp_path / "other.csv"
  other.write_text("a,b\n1,2\n")
  with pytest.raises(ValueError, match="other.csv: not a fedbeam train metrics.csv"):
    read_accuracy(str(other))


def test_inspect_plot_writes_the_histogram_and_a_bad_path_exits_1(tmp_path, capsys):
  store = testing.prepare_store({f"c{i}": [{"x": float(i)}] * (i + 1) for i in range(6)}, tmp_path)
  capsys.readouterr()
  assert main(["inspect", store, "--plot", str(tmp_path / "sizes.png")]) == 0
  assert f"client-size histogram: {tmp_path / 'sizes.png'}" in capsys.readouterr().out
  assert _png_size(str(tmp_path / "sizes.png")) == (600, 350)
  bad = str(tmp_path / "no-such-dir" / "sizes.png")
  assert main(["inspect", store, "--plot", bad]) == 1
  assert f"fedbeam inspect: error: --plot {bad}: " in capsys.readouterr().err


def test_matplotlib_is_imported_only_to_plot():
  code = (
    "import sys, fedbeam.cli, fedbeam.plots, fedbeam.pipelines.prepare; "
    "print('matplotlib' in sys.modules)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    timeout=300,
    check=True,
  )
  assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_train_plot_writes_the_accuracy_plot_of_the_run(tmp_path, capsys):
  rng = np.random.default_rng(0)
  clients = {
    f"w{i}": [
      {"pixels": rng.random((8, 8), dtype=np.float32), "label": np.int64(j % 10)} for j in range(4)
    ]
    for i in range(6)
  }
  store = testing.prepare_store(clients, tmp_path, num_test_clients=2)
  run = tmp_path / "run"
  assert (
    main(
      [
        "train",
        store,
        "--model",
        "digits-cnn",
        "--rounds",
        "2",
        "--clients-per-round",
        "2",
        "--output",
        str(run),
        "--no-progress",
        "--plot",
      ]
    )
    == 0
  )
  assert f"accuracy plot: {run / 'accuracy.png'}" in capsys.readouterr().err
  assert _png_size(str(run / "accuracy.png")) == (600, 350)
