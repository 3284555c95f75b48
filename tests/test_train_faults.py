"""`fedbeam train` under faults: damaged checkpoints, another store, two runs, bad client files."""

import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import test_train
from test_train import TINY, parse, read_metrics, tiny_options

from fedbeam import testing
from fedbeam.runtime import simulation, train
from fedbeam.runtime.client_data import load_client_data

helpers = test_train.helpers
digit_like_clients = test_train._digit_like_clients  # pylint: disable=protected-access


# -- Damaged checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A finished one-round run: `(run directory, its final state)`."""
  output = tmp_path_factory.mktemp("tiny") / "run"
  outcome = train.run_training(
    helpers.tiny_client_data(), None, TINY, tiny_options(output, rounds=1)
  )
  return output, outcome.state


def _rewritten(content, change):
  """The checkpoint `content` with its arrays passed through `change(dict) -> dict`."""
  with np.load(io.BytesIO(content), allow_pickle=False) as npz:
    arrays = {name: npz[name] for name in npz.files}
  buffer = io.BytesIO()
  np.savez(buffer, **change(arrays))
  return buffer.getvalue()


def _data_offset(content, entry):
  """Where the bytes of a zip entry start (after its local header)."""
  info = zipfile.ZipFile(io.BytesIO(content)).getinfo(entry)
  name_length, extra_length = struct.unpack(
    "<HH", content[info.header_offset + 26 : info.header_offset + 30]
  )
  return info.header_offset + 30 + name_length + extra_length


def _flip_array_byte(content):
  offset = _data_offset(content, "trainable/0.npy") + 128 + 5  # past the npy header
  return content[:offset] + bytes([content[offset] ^ 0x40]) + content[offset + 1 :]


def _replace(name, value):
  return lambda arrays: {**arrays, name: value}


def _without(name):
  return lambda arrays: {k: v for k, v in arrays.items() if k != name}


# (case, damage(path, content), expected message after "checkpoint {path}")
CHECKPOINT_DAMAGE = [
  (
    "truncated to half",
    lambda p, c: p.write_bytes(c[: len(c) // 2]),
    " is truncated or damaged (not a complete .npz file: File is not a zip file)",
  ),
  (
    "empty",
    lambda p, c: p.write_bytes(b""),
    " is truncated or damaged (not a complete .npz file: File is not a zip file)",
  ),
  (
    "one byte of an array flipped",
    lambda p, c: p.write_bytes(_flip_array_byte(c)),
    " is damaged: its entry trainable/0.npy fails its CRC-32 check",
  ),
  (
    "a directory in its place",
    lambda p, c: (p.unlink(), p.mkdir()),
    " is a directory, not a checkpoint file",
  ),
  ("a FIFO in its place", lambda p, c: (p.unlink(), os.mkfifo(p)), " is not a regular file"),
  ("missing", lambda p, c: p.unlink(), " does not exist"),
  (
    "an array with another shape",
    lambda p, c: p.write_bytes(
      _rewritten(c, _replace("trainable/0", np.zeros((4, 5), np.float32)))
    ),
    ": trainable/0 is float32 of shape (4, 5), this model and server optimizer need "
    "float32 of shape (3, 5)",
  ),
  (
    "an array of another dtype",
    lambda p, c: p.write_bytes(_rewritten(c, _replace("trainable/1", np.zeros(5, np.float64)))),
    ": trainable/1 is float64 of shape (5,), this model and server optimizer need "
    "float32 of shape (5,)",
  ),
  (
    "one weight fewer",
    lambda p, c: p.write_bytes(_rewritten(c, _without("trainable/3"))),
    " holds 3 trainable weights, this model and server optimizer have 4",
  ),
  (
    "the round number removed",
    lambda p, c: p.write_bytes(_rewritten(c, _without("round_num"))),
    " lacks entries ['round_num'] and has unexpected entries []",
  ),
  (
    "metadata that is not JSON",
    lambda p, c: p.write_bytes(_rewritten(c, _replace("metadata", np.asarray("{seed")))),
    ": its metadata is not JSON (Expecting property name enclosed in double quotes: "
    "line 1 column 2 (char 1))",
  ),
  (
    "metadata as bytes",
    lambda p, c: p.write_bytes(_rewritten(c, _replace("metadata", np.asarray(b"{}")))),
    ": metadata is bytes16 of shape (), this model and server optimizer need a unicode "
    "string of shape ()",
  ),
  (
    "a negative round number",
    lambda p, c: p.write_bytes(_rewritten(c, _replace("round_num", np.asarray(-3, np.int64)))),
    ": round number -3 is negative",
  ),
]


@pytest.mark.parametrize(
  "case,damage,message", CHECKPOINT_DAMAGE, ids=[case for case, _, _ in CHECKPOINT_DAMAGE]
)
def test_a_damaged_checkpoint_is_one_error_naming_the_file(
  tiny_run, tmp_path, case, damage, message
):
  output, like = tiny_run
  path = tmp_path / "checkpoint.npz"
  content = (output / train.CHECKPOINT_NAME).read_bytes()
  path.write_bytes(content)
  damage(path, content)
  # ValueError: the error train maps to exit status 1; BadZipFile, EOFError and the like
  # are not ValueErrors.
  with pytest.raises(ValueError) as info:
    simulation.load_state(str(path), like)
  assert str(info.value) == f"checkpoint {path}{message}", case
  assert isinstance(info.value, simulation.CheckpointError)


def test_a_sound_checkpoint_loads_exactly(tiny_run):
  output, like = tiny_run
  state, metadata = simulation.load_state(str(output / train.CHECKPOINT_NAME), like)
  assert state.round_num == 1 == metadata["round_num"]
  helpers.assert_same_weights(state.model_weights, like.model_weights)


def test_a_checkpoint_from_another_run_directory_is_refused(tiny_run, tmp_path):
  output, _ = tiny_run
  other = tmp_path / "other"
  data = helpers.tiny_client_data()
  train.run_training(data, None, TINY, tiny_options(other, rounds=1, client_lr=0.3))
  # The checkpoint of a run with client_lr 0.1 beside config.json of a run with 0.3.
  shutil.copy(output / train.CHECKPOINT_NAME, other / train.CHECKPOINT_NAME)
  with pytest.raises(simulation.CheckpointError) as info:
    train.run_training(data, None, TINY, tiny_options(other, rounds=2, resume=True, client_lr=0.3))
  assert str(info.value) == (
    f"checkpoint {other / train.CHECKPOINT_NAME} was written with other settings than "
    "config.json records; it belongs to another run (use --overwrite to start over)"
  )


# -- Through `fedbeam train` on a store ------------------------------------------------------


@pytest.fixture(scope="module")
def split_store(tmp_path_factory):
  return testing.prepare_store(
    digit_like_clients(8), tmp_path_factory.mktemp("split"), num_test_clients=2
  )


def train_args(store, output, rounds, *extra):
  return parse(
    [
      str(store),
      "--model",
      "digits-cnn",
      "--rounds",
      str(rounds),
      "--clients-per-round",
      "6",
      "--output",
      str(output),
      "--no-progress",
      *extra,
    ]
  )


def error_lines(capsys):
  err = capsys.readouterr().err
  assert "Traceback" not in err
  return [line for line in err.splitlines() if line.startswith("fedbeam train:")]


def test_resume_from_a_truncated_checkpoint_exits_1_and_changes_nothing(
  split_store, tmp_path, capsys
):
  output = tmp_path / "run"
  assert train.run_train(train_args(split_store, output, 1)) == 0
  checkpoint = output / train.CHECKPOINT_NAME
  checkpoint.write_bytes(checkpoint.read_bytes()[:-100])
  before = {
    name: (output / name).read_bytes()
    for name in (train.CHECKPOINT_NAME, train.METRICS_NAME, train.CONFIG_NAME)
  }
  capsys.readouterr()
  assert train.run_train(train_args(split_store, output, 3, "--resume")) == 1
  assert error_lines(capsys) == [
    f"fedbeam train: error: checkpoint {checkpoint} is truncated or damaged (not a "
    "complete .npz file: File is not a zip file)"
  ]
  assert {name: (output / name).read_bytes() for name in before} == before
  assert not (output / train.LOCK_NAME).exists()


# -- Resume against another store -----------------------------------------------------------


def test_resume_against_another_store_is_refused_naming_both(tmp_path, capsys):
  store = testing.prepare_store(digit_like_clients(7), tmp_path / "first", num_test_clients=1)
  output = tmp_path / "run"
  assert train.run_train(train_args(store, output, 1)) == 0
  first_data_dir = load_client_data(store).metadata["data_dir"]
  moved = shutil.copytree(store, tmp_path / "moved")
  # Prepared again at the same path, from other clients.
  testing.prepare_store(
    digit_like_clients(8), tmp_path / "second", output=store, num_test_clients=1, overwrite=True
  )
  second_data_dir = load_client_data(store).metadata["data_dir"]
  assert second_data_dir != first_data_dir
  metrics = (output / train.METRICS_NAME).read_bytes()
  capsys.readouterr()
  assert train.run_train(train_args(store, output, 2, "--resume")) == 2
  (line,) = error_lines(capsys)
  assert line.startswith(
    "fedbeam train: error: --resume against another store than the "
    f"run in {output} was trained on (train data: the run used store "
    f"{store} (data dir {first_data_dir}, metadata sha256 "
  )
  assert f"this is store {store} (data dir {second_data_dir}, metadata sha256 " in line
  assert "splits ['train']" in line and "; test data: the run used store" in line
  assert line.endswith("; pass the run's store or use another --output")
  assert (output / train.METRICS_NAME).read_bytes() == metrics

  # The run's store, moved elsewhere, is still the run's store.
  assert train.run_train(train_args(moved, output, 2, "--resume")) == 0
  assert [r["round"] for r in read_metrics(output)] == ["1", "2"]


# -- Two runs on one --output ----------------------------------------------------------------


def test_a_second_run_on_a_busy_output_fails_at_once_and_a_killed_run_does_not_block(tmp_path):
  output = tmp_path / "busy"
  script = tmp_path / "first_run.py"
  script.write_text(test_train.KILLED_RUN)
  go = tmp_path / "go"
  go.touch()
  log = open(tmp_path / "first.log", "w")
  first = subprocess.Popen(
    [sys.executable, str(script), test_train.TESTS_DIR, str(output), "100000", str(go)],
    stdout=log,
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )
  data = helpers.tiny_client_data()
  try:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and first.poll() is None:
      if (output / train.METRICS_NAME).exists() and len(read_metrics(output)) >= 3:
        break
      time.sleep(0.05)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]

    start = time.monotonic()
    with pytest.raises(train.TrainError) as info:
      train.run_training(data, None, TINY, tiny_options(output, rounds=2, resume=True))
    assert time.monotonic() - start < 5
    assert str(info.value).startswith(
      f"{output} is in use by another fedbeam train (pid {first.pid} on host "
      f"{socket.gethostname()}, started "
    )
    assert str(info.value).endswith(
      f"; lock {output / train.LOCK_NAME}); wait for it to finish or use another --output"
    )
    with pytest.raises(train.TrainError, match="is in use by another fedbeam train"):
      train.run_training(data, None, TINY, tiny_options(output, rounds=5, overwrite=True))
    assert (output / train.CHECKPOINT_NAME).exists()  # --overwrite removed nothing

    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
  finally:
    if first.poll() is None:
      os.killpg(first.pid, signal.SIGKILL)
      first.wait(timeout=30)
    log.close()

  # The killed run's lock file is left behind; its lock died with it.
  assert f'"pid": {first.pid}' in (output / train.LOCK_NAME).read_text()
  rows = read_metrics(output)
  assert [r["round"] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]
  rounds = len(rows) + 1
  resumed = train.run_training(data, None, TINY, tiny_options(output, rounds=rounds, resume=True))
  assert resumed.state.round_num == rounds
  assert [r["round"] for r in read_metrics(output)] == [str(i) for i in range(1, rounds + 1)]
  assert not (output / train.LOCK_NAME).exists()


# -- Client files missing or damaged during training ------------------------------------------


def _truncate(path):
  content = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(content[:-7])


CLIENT_FAULTS = [
  # (case, split, index among the split's sorted ids, fault, message after "error: ")
  (
    "a missing training client",
    "train",
    2,
    os.remove,
    "round 1: client {id!r} could not be read or trained on: NotFoundError: {path}; No "
    "such file or directory",
  ),
  (
    "the first training client missing",
    "train",
    0,
    os.remove,
    "building the loop: client {id!r} could not be read or trained on: NotFoundError: "
    "{path}; No such file or directory",
  ),
  (
    "a truncated training client",
    "train",
    3,
    _truncate,
    "round 1: client {id!r} could not be read or trained on: DataLossError: truncated record at ",
  ),
  (
    "a missing test client",
    "test",
    1,
    os.remove,
    "round 1: test client {id!r} could not be read: the file of client {id!r} in store "
    "{store} is missing; run `fedbeam validate {store}`",
  ),
]


@pytest.mark.parametrize(
  "case,split,index,fault,message", CLIENT_FAULTS, ids=[c[0] for c in CLIENT_FAULTS]
)
def test_a_bad_client_file_exits_1_naming_the_client_and_the_store(
  split_store, tmp_path, capsys, case, split, index, fault, message
):
  store = str(shutil.copytree(split_store, tmp_path / "store"))
  client_id = sorted(load_client_data(store, split=split).client_ids)[index]
  path = testing.client_file(store, client_id, split)
  fault(path)
  output = tmp_path / "run"
  capsys.readouterr()
  assert train.run_train(train_args(store, output, 2)) == 1, case
  (line,) = error_lines(capsys)
  expected = message.format(id=client_id, path=path, store=store)
  assert line.startswith("fedbeam train: error: " + expected)
  # The hint to run validate is added unless the reader's message already gives it.
  hint = (
    ""
    if "fedbeam validate" in expected
    else (f"; `fedbeam validate {store}` checks every client file")
  )
  assert line.endswith(f" (store {store}){hint}")
  assert not (output / train.CHECKPOINT_NAME).exists()
  assert not (output / train.METRICS_NAME).exists() or read_metrics(output) == []
