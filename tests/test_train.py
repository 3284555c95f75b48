"""`fedbeam train`: flags, outputs, checkpoints, and resume after a kill."""

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf
import test_simulation as helpers

from fedbeam.runtime import models, simulation, train

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def parse(argv):
  parser = argparse.ArgumentParser(prog="fedbeam train")
  train.add_train_arguments(parser)
  return parser.parse_args(argv)


REQUIRED = [
  "store",
  "--model",
  "digits-cnn",
  "--rounds",
  "3",
  "--clients-per-round",
  "2",
  "--output",
  "out",
]


def test_flags_parse_into_options():
  options = train.options_from_args(
    parse(
      REQUIRED
      + [
        "--client-epochs",
        "2",
        "--delta-l2",
        "0.01",
        "--server-momentum",
        "0.9",
        "--devices",
        "/device:GPU:0, /device:GPU:1",
        "--client-weighting",
        "uniform",
        "--loop",
        "reduce",
      ]
    )
  )
  assert options.rounds == 3 and options.client_epochs == 2
  assert options.delta_l2 == 0.01 and options.server_momentum == 0.9
  assert options.devices == ("/device:GPU:0", "/device:GPU:1")
  assert options.client_weighting == "uniform" and options.loop == "reduce"
  assert not options.resume and options.progress


@pytest.mark.parametrize(
  "extra,message",
  [
    (["--rounds", "0"], "expected a positive integer, got '0'"),
    (["--client-lr", "-1"], "expected a positive number, got '-1'"),
    (["--delta-l2", "nan"], "expected a finite number, got 'nan'"),
    (["--seed", "x"], "expected a nonnegative integer, got 'x'"),
    (["--resume", "--overwrite"], "not allowed with argument"),
    (["--loop", "fast"], "invalid choice: 'fast'"),
  ],
)
def test_bad_flags_exit_with_a_message(extra, message, capsys):
  with pytest.raises(SystemExit) as info:
    parse(REQUIRED + extra)
  assert info.value.code == 2
  assert message in capsys.readouterr().err


def test_run_train_reports_bad_settings_and_returns_nonzero(capsys):
  args = parse(REQUIRED + ["--server-optimizer", "adam", "--server-momentum", "0.9"])
  assert train.run_train(args) == 2
  assert "--server-momentum applies to --server-optimizer sgd only" in (capsys.readouterr().err)


def test_run_train_reports_an_unknown_model_as_usage_error(tmp_path, capsys):
  args = parse(
    [
      "--model",
      "resnet",
      "--rounds",
      "1",
      "--clients-per-round",
      "1",
      "--output",
      str(tmp_path / "o"),
      str(tmp_path),
    ]
  )
  assert train.run_train(args) == 2
  assert "unknown model 'resnet'" in capsys.readouterr().err


def test_run_train_reports_a_missing_store(tmp_path, capsys):
  args = parse(
    [
      "--model",
      "digits-cnn",
      "--rounds",
      "1",
      "--clients-per-round",
      "1",
      "--output",
      str(tmp_path / "o"),
      str(tmp_path / "no-store"),
    ]
  )
  assert train.run_train(args) == 1
  assert "fedbeam train: error:" in capsys.readouterr().err


def test_importing_train_does_not_import_tensorflow():
  code = "import sys, fedbeam.runtime.train; print('tensorflow' in sys.modules)"
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
  )
  assert out.stdout.strip() == "False"


TINY = models.ModelSpec("tiny", helpers.tiny_model_fn, lambda d: d, "tiny")


def tiny_options(output, **overrides):
  settings = dict(
    model="tiny",
    rounds=3,
    clients_per_round=3,
    output=str(output),
    batch_size=2,
    client_epochs=2,
    shuffle_buffer=8,
    server_momentum=0.9,
    seed=4,
    devices=("/device:CPU:0",),
    progress=False,
  )
  settings.update(overrides)
  return train.TrainOptions(**settings)


def read_metrics(output):
  with open(os.path.join(output, train.METRICS_NAME)) as f:
    return list(csv.DictReader(f))


def test_training_writes_metrics_tensorboard_and_checkpoint(tmp_path):
  output = tmp_path / "run"
  outcome = train.run_training(
    helpers.tiny_client_data(),
    helpers.tiny_client_data(3, seed=8),
    TINY,
    tiny_options(output, eval_every=2),
  )
  assert [r.round_num for r in outcome.rounds] == [1, 2, 3]
  rows = read_metrics(output)
  assert list(rows[0]) == list(train.METRICS_COLUMNS)
  assert [r["round"] for r in rows] == ["1", "2", "3"]
  # Evaluated every 2 rounds and after the last.
  assert [bool(r["test_accuracy"]) for r in rows] == [False, True, True]
  for row, result in zip(rows, outcome.rounds):
    assert float(row["train_loss"]) == result.train_metrics["loss"]
    assert int(row["examples"]) == result.num_examples > 0
  events = os.listdir(output / "tensorboard")
  assert any(name.startswith("events.out.tfevents") for name in events)
  state, metadata = simulation.load_state(str(output / "checkpoint.npz"), outcome.state)
  assert state.round_num == 3 and metadata["rng"] == {"seed": 4, "next_round": 4}
  helpers.assert_same_weights(state.model_weights, outcome.state.model_weights)
  config = json.loads((output / "config.json").read_text())
  assert config["seed"] == 4 and config["has_test_split"] is True
  assert not [n for n in os.listdir(output) if n.endswith(".tmp")]


def test_output_of_another_run_needs_resume_or_overwrite(tmp_path):
  output = tmp_path / "run"
  data = helpers.tiny_client_data()
  train.run_training(data, None, TINY, tiny_options(output, rounds=1))
  with pytest.raises(train.TrainError, match="pass --resume .* --overwrite"):
    train.run_training(data, None, TINY, tiny_options(output, rounds=2))
  outcome = train.run_training(data, None, TINY, tiny_options(output, rounds=2, overwrite=True))
  assert [r.round_num for r in outcome.rounds] == [1, 2]
  assert [r["round"] for r in read_metrics(output)] == ["1", "2"]


def test_resume_with_other_settings_is_refused(tmp_path):
  output = tmp_path / "run"
  data = helpers.tiny_client_data()
  train.run_training(data, None, TINY, tiny_options(output, rounds=1))
  with pytest.raises(train.TrainError, match="client_lr: was 0.1, now 0.2"):
    train.run_training(data, None, TINY, tiny_options(output, rounds=2, resume=True, client_lr=0.2))


KILLED_RUN = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    from fedbeam.runtime.tff_worker import register_worker_cleanup
    register_worker_cleanup()
    import test_train
    from fedbeam.runtime import train
    # Imports take most of the time; the test computes its reference run
    # meanwhile and says when to start.
    while not os.path.exists(sys.argv[4]):
      time.sleep(0.01)
    train.run_training(test_train.helpers.tiny_client_data(), None,
                       test_train.TINY,
                       test_train.tiny_options(sys.argv[2], rounds=int(sys.argv[3])))
""")


def test_resume_after_kill_ends_exactly_like_an_uninterrupted_run(tmp_path):
  rounds = 30
  killed_dir = tmp_path / "killed"
  script = tmp_path / "killed_run.py"
  script.write_text(KILLED_RUN)
  go = tmp_path / "go"
  log = open(tmp_path / "killed.log", "w")
  process = subprocess.Popen(
    [sys.executable, str(script), TESTS_DIR, str(killed_dir), str(rounds), str(go)],
    stdout=log,
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )
  try:
    data = helpers.tiny_client_data()
    reference = train.run_training(
      data, None, TINY, tiny_options(tmp_path / "whole", rounds=rounds)
    )
    go.touch()
    deadline = time.monotonic() + 120
    # Metrics rows are written before each checkpoint: 4 rows means the
    # checkpoint of round 3 is on disk.
    while time.monotonic() < deadline and process.poll() is None:
      if (killed_dir / train.METRICS_NAME).exists() and len(read_metrics(killed_dir)) >= 4:
        break
      time.sleep(0.02)
    assert process.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait(timeout=30)
    log.close()

  probe = simulation.SimulationLoop(
    helpers.tiny_model_fn,
    *train._build_optimizers(tiny_options(".")),  # pylint: disable=protected-access
    data,
    simulation.SimulationConfig(clients_per_round=3),
    devices=["/device:CPU:0"],
  )
  killed_state, _ = simulation.load_state(str(killed_dir / "checkpoint.npz"), probe.state)
  assert 3 <= killed_state.round_num < rounds

  resumed = train.run_training(
    data, None, TINY, tiny_options(killed_dir, rounds=rounds, resume=True)
  )
  assert resumed.start_round == killed_state.round_num
  assert resumed.rounds[0].round_num == killed_state.round_num + 1
  helpers.assert_same_weights(resumed.state.model_weights, reference.state.model_weights)
  resumed_server = tf.nest.flatten(resumed.state.server_optimizer_state)
  reference_server = tf.nest.flatten(reference.state.server_optimizer_state)
  assert len(resumed_server) == len(reference_server) > 1  # momentum slots
  for a, b in zip(resumed_server, reference_server):
    np.testing.assert_array_equal(a, b)
  killed_rows = read_metrics(killed_dir)
  whole_rows = read_metrics(tmp_path / "whole")
  assert [r["round"] for r in killed_rows] == [str(i) for i in range(1, rounds + 1)]
  for a, b in zip(killed_rows, whole_rows):
    assert (a["train_loss"], a["train_accuracy"], a["examples"]) == (
      b["train_loss"],
      b["train_accuracy"],
      b["examples"],
    )


def _digit_like_clients(num_clients):
  rng = np.random.default_rng(1)
  return {
    f"writer_{i}": [
      {"pixels": (rng.random((8, 8)) * 16).astype(np.float32), "label": int(rng.integers(0, 10))}
      for _ in range(3 + i % 3)
    ]
    for i in range(num_clients)
  }


@pytest.fixture(scope="module")
def split_store(tmp_path_factory):
  from fedbeam import testing  # pylint: disable=g-import-not-at-top

  return testing.prepare_store(
    _digit_like_clients(8), tmp_path_factory.mktemp("split"), num_test_clients=2
  )


def test_fedbeam_train_on_a_store_with_a_test_split(split_store, tmp_path, capsys):
  output = tmp_path / "run"
  args = parse(
    [
      split_store,
      "--model",
      "digits-cnn",
      "--rounds",
      "2",
      "--clients-per-round",
      "3",
      "--output",
      str(output),
      "--eval-every",
      "1",
      "--no-progress",
    ]
  )
  assert train.run_train(args) == 0
  rows = read_metrics(output)
  assert [r["round"] for r in rows] == ["1", "2"]
  assert all(r["test_accuracy"] and r["test_loss"] for r in rows)
  assert "round 2: test loss" in capsys.readouterr().err
  # Resuming a finished run runs nothing and succeeds.
  assert (
    train.run_train(
      parse(
        [
          split_store,
          "--model",
          "digits-cnn",
          "--rounds",
          "2",
          "--clients-per-round",
          "3",
          "--output",
          str(output),
          "--eval-every",
          "1",
          "--no-progress",
          "--resume",
        ]
      )
    )
    == 0
  )
  assert len(read_metrics(output)) == 2


def test_too_many_clients_per_round_for_the_store(split_store, tmp_path, capsys):
  args = parse(
    [
      split_store,
      "--model",
      "digits-cnn",
      "--rounds",
      "1",
      "--clients-per-round",
      "7",
      "--output",
      str(tmp_path / "o"),
    ]
  )
  assert train.run_train(args) == 1
  assert "clients_per_round=7 exceeds the 6 training clients" in (capsys.readouterr().err)


def test_fedbeam_train_on_a_store_without_split(tmp_path):
  from fedbeam import testing  # pylint: disable=g-import-not-at-top

  store = testing.prepare_store(_digit_like_clients(4), tmp_path / "all")
  output = tmp_path / "run"
  args = parse(
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
    ]
  )
  assert train.run_train(args) == 0
  (row,) = read_metrics(output)
  assert row["train_loss"] and not row["test_loss"]


def test_fedbeam_train_evaluates_on_a_split_of_another_store(split_store, tmp_path):
  from fedbeam import testing  # pylint: disable=g-import-not-at-top

  store = testing.prepare_store(_digit_like_clients(4), tmp_path / "all")
  output = tmp_path / "run"
  args = parse(
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
      "--test-store",
      split_store,
      "--test-split",
      "test",
    ]
  )
  assert train.run_train(args) == 0
  (row,) = read_metrics(output)
  assert row["train_loss"] and row["test_loss"] and row["test_accuracy"]


@pytest.mark.parametrize(
  "extra,message",
  [
    (["--train-split", "validation"], "split 'validation' is not in store"),
    (["--test-split", "train"], "--test-split 'train' is the split trained on"),
  ],
)
def test_fedbeam_train_names_a_bad_split(split_store, tmp_path, capsys, extra, message):
  args = parse(
    [
      split_store,
      "--model",
      "digits-cnn",
      "--rounds",
      "1",
      "--clients-per-round",
      "2",
      "--output",
      str(tmp_path / "o"),
      "--no-progress",
    ]
    + extra
  )
  assert train.run_train(args) == 1
  assert message in capsys.readouterr().err
