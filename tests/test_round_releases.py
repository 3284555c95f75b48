"""round_releases: metrics.csv rows and TensorBoard scalars through tff.program's managers."""

import asyncio
import csv

import tensorflow as tf

from fedbeam.runtime.round_releases import METRICS_COLUMNS, RoundReleases, metrics_row
from fedbeam.runtime.simulation import RoundResult


def result(round_num, loss=0.5, test_accuracy=None):
  return RoundResult(
    round_num=round_num,
    clients=(),
    train_metrics={"loss": loss, "accuracy": 0.25},
    eval_metrics=None if test_accuracy is None else {"loss": 1.0, "accuracy": test_accuracy},
    num_examples=12,
    seconds=1.5,
    eval_seconds=0.0,
    update_applied=True,
  )


def read_rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_metrics_row_formats_values_as_metrics_csv_holds_them():
  assert metrics_row(result(3, loss=0.1)) == {
    "round": "3",
    "train_loss": "0.1",
    "train_accuracy": "0.25",
    "test_loss": "",
    "test_accuracy": "",
    "seconds": "1.500000",
    "examples": "12",
  }


def test_releases_append_rows_in_column_order_and_a_rerun_round_replaces_later_rows(tmp_path):
  path = str(tmp_path / "metrics.csv")
  with RoundReleases(path, str(tmp_path / "tb")) as releases:
    for r in (1, 2, 3):
      releases.release(result(r, test_accuracy=0.5 if r == 2 else None))
    releases.release(result(2, loss=0.75))
  with open(path) as f:
    assert next(csv.reader(f)) == list(METRICS_COLUMNS)
  rows = read_rows(path)
  assert [r["round"] for r in rows] == ["1", "2"]
  assert rows[1] == metrics_row(result(2, loss=0.75))


def test_releases_write_tensorboard_scalars_of_what_the_round_measured(tmp_path):
  with RoundReleases(str(tmp_path / "metrics.csv"), str(tmp_path / "tb")) as releases:
    releases.release(result(1))
    releases.release(result(2, test_accuracy=0.5))
  tags = {}
  for event_file in tf.io.gfile.glob(str(tmp_path / "tb" / "events.out.tfevents*")):
    for event in tf.compat.v1.train.summary_iterator(event_file):
      for value in event.summary.value:
        tags.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
  assert tags["train/loss"] == [(1, 0.5), (2, 0.5)]
  assert tags["test/accuracy"] == [(2, 0.5)]
  assert "test/loss" in tags and tags["round/examples"] == [(1, 12.0), (2, 12.0)]
  assert tags["round/seconds"] == [(1, 1.5), (2, 1.5)]


def test_releases_work_inside_a_running_event_loop(tmp_path):
  path = str(tmp_path / "metrics.csv")

  async def train_in_a_notebook():
    with RoundReleases(path, str(tmp_path / "tb")) as releases:
      releases.release(result(1))

  asyncio.run(train_in_a_notebook())
  assert [r["round"] for r in read_rows(path)] == ["1"]
