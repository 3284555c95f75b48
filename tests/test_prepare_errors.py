"""`fedbeam prepare` refuses bad input and flags clearly and never leaves a committed store."""

import json
import os
import signal
import subprocess
import sys
import time

import fastavro
import numpy as np
import pytest

from fedbeam import testing
from fedbeam.cli import main
from fedbeam.format.layout import METADATA_FILE, StoreFormatError
from fedbeam.format.tfrecord import tfrecord_frame
from fedbeam.runtime.client_data import load_client_data

FEDBEAM = os.path.join(os.path.dirname(sys.executable), "fedbeam")
CLIENTS = {"alice": [{"x": 1.0, "y": 1}, {"x": 2.0, "y": 2}], "bob": [{"x": 3.0, "y": 3}]}


def _run(capsys, *args):
  """Runs `fedbeam ARGS` in-process; returns (exit code, stderr)."""
  capsys.readouterr()
  code = main(list(args))
  return code, capsys.readouterr().err


def _assert_no_store(output):
  assert not os.path.exists(os.path.join(output, METADATA_FILE))
  with pytest.raises(StoreFormatError):
    load_client_data(str(output))


def _prepare_args(input_path, output, *extra, fmt="tfrecord", key="client_id"):
  args = ["prepare", "--input", str(input_path), "--input-format", fmt, "--output", str(output)]
  if key:
    args += ["--client-id-key", key]
  return args + list(extra)


def _example(features):
  from tensorflow.core.example import example_pb2

  ex = example_pb2.Example()
  for name, (kind, values) in features.items():
    getattr(ex.features.feature[name], kind).value.extend(values)
  return ex.SerializeToString()


def _write_records(path, records):
  with open(path, "wb") as f:
    for r in records:
      f.write(tfrecord_frame(r))
  return str(path)


def _assert_fails(capsys, args, output, *culprits, code=None):
  exit_code, err = _run(capsys, *args)
  assert exit_code != 0, err
  if code is not None:
    assert exit_code == code, err
  for culprit in culprits:
    assert culprit in err, f"{culprit!r} not in:\n{err}"
  _assert_no_store(output)
  return err


def test_missing_client_id_feature_names_the_record(tmp_path, capsys):
  path = testing.write_tfrecord_input(tmp_path / "in.tfrecord", CLIENTS, client_id_key="user")
  _assert_fails(
    capsys,
    _prepare_args(path, tmp_path / "out"),
    tmp_path / "out",
    "client-id feature 'client_id' is missing",
    f"{path} record 0",
  )


def test_float_client_id_feature_is_rejected(tmp_path, capsys):
  # Integer ids (int64_list) are accepted as their decimal string
  # (test_input_formats.py); a float cannot name a client.
  path = _write_records(
    tmp_path / "ids.tfrecord",
    [_example({"client_id": ("float_list", [7.0]), "x": ("float_list", [1.0])})],
  )
  _assert_fails(
    capsys,
    _prepare_args(path, tmp_path / "out"),
    tmp_path / "out",
    "client-id feature 'client_id' is a float_list",
    f"{path} record 0",
  )


def test_avro_float_client_id_field_is_rejected(tmp_path, capsys):
  path = str(tmp_path / "ids.avro")
  schema = {
    "type": "record",
    "name": "R",
    "fields": [{"name": "uid", "type": "double"}, {"name": "x", "type": "float"}],
  }
  with open(path, "wb") as f:
    fastavro.writer(
      f, fastavro.parse_schema(schema), [{"uid": 3.5, "x": 1.0}, {"uid": 4.0, "x": 2.0}]
    )
  _assert_fails(
    capsys,
    _prepare_args(path, tmp_path / "out", fmt="avro", key="uid"),
    tmp_path / "out",
    "client-id field 'uid' is float 3.5, expected a string or an integer",
    f"{path} record 0",
  )


def test_inconsistent_feature_types_name_both_files(tmp_path, capsys):
  a = testing.write_tfrecord_input(tmp_path / "in" / "a.tfrecord", {"c1": [{"v": 1.5}]})
  b = testing.write_tfrecord_input(tmp_path / "in" / "b.tfrecord", {"c2": [{"v": 2}]})
  err = _assert_fails(
    capsys,
    _prepare_args(tmp_path / "in" / "*.tfrecord", tmp_path / "out"),
    tmp_path / "out",
    "feature 'v' has inconsistent types",
    a,
    b,
  )
  assert "float32" in err and "int64" in err


def test_feature_missing_in_some_records_names_both_records(tmp_path, capsys):
  path = testing.write_tfrecord_input(
    tmp_path / "in.tfrecord", {"c1": [{"v": 1.0, "w": 2.0}], "c2": [{"v": 3.0}]}
  )
  _assert_fails(
    capsys,
    _prepare_args(path, tmp_path / "out"),
    tmp_path / "out",
    "records have different features",
    f"{path} record 0",
    f"{path} record 1",
  )


def test_feature_missing_from_a_declared_spec_names_the_record(tmp_path, capsys):
  path = testing.write_tfrecord_input(
    tmp_path / "in.tfrecord", {"c1": [{"v": 1.0, "w": 2.0}], "c2": [{"v": 3.0}]}
  )
  spec = tmp_path / "spec.json"
  spec.write_text(
    json.dumps({"v": {"dtype": "float32", "shape": []}, "w": {"dtype": "float32", "shape": []}})
  )
  _assert_fails(
    capsys,
    _prepare_args(path, tmp_path / "out", "--element-spec", str(spec)),
    tmp_path / "out",
    "feature 'w' is missing",
    f"{path} record 1",
    "'c2'",
  )


def test_integer_outside_a_declared_bool_is_named(tmp_path, capsys):
  path = testing.write_tfrecord_input(
    tmp_path / "in.tfrecord", {"c1": [{"flag": 1}], "c2": [{"flag": 0}, {"flag": 2}]}
  )
  spec = tmp_path / "spec.json"
  spec.write_text(json.dumps({"flag": {"dtype": "bool", "shape": []}}))
  _assert_fails(
    capsys,
    _prepare_args(path, tmp_path / "out", "--element-spec", str(spec)),
    tmp_path / "out",
    "feature 'flag' has value 2",
    "bool",
    f"{path} record 2",
  )


def test_garbage_tfrecord_file_is_named(tmp_path, capsys):
  good = testing.write_tfrecord_input(tmp_path / "in" / "a.tfrecord", CLIENTS)
  bad = tmp_path / "in" / "b.tfrecord"
  bad.write_bytes(np.random.RandomState(0).bytes(300))
  _assert_fails(
    capsys,
    _prepare_args(tmp_path / "in" / "*.tfrecord", tmp_path / "out"),
    tmp_path / "out",
    f"{bad}: unreadable TFRecord file",
  )
  assert os.path.exists(good)


def test_truncated_avro_file_is_named(tmp_path, capsys):
  many = {f"c{i}": [{"x": float(j), "y": j} for j in range(20)] for i in range(20)}
  path = testing.write_avro_input(tmp_path / "in.avro", many)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  _assert_fails(
    capsys,
    _prepare_args(path, tmp_path / "out", fmt="avro"),
    tmp_path / "out",
    f"{path}: unreadable Avro file",
  )


def test_input_pattern_matching_nothing_is_named(tmp_path, capsys):
  pattern = str(tmp_path / "nothing-*.tfrecord")
  _assert_fails(
    capsys,
    _prepare_args(pattern, tmp_path / "out"),
    tmp_path / "out",
    f"--input '{pattern}' matches no file",
  )


def test_client_id_key_is_required_for_tfrecord(tmp_path, capsys):
  path = testing.write_tfrecord_input(tmp_path / "in.tfrecord", CLIENTS)
  _assert_fails(
    capsys,
    _prepare_args(path, tmp_path / "out", key=None),
    tmp_path / "out",
    "--client-id-key is required with --input-format tfrecord",
    code=2,
  )


def test_client_id_key_is_required_for_avro_as_a_usage_error(tmp_path, capsys):
  path = testing.write_avro_input(tmp_path / "in.avro", CLIENTS)
  _assert_fails(
    capsys,
    _prepare_args(path, tmp_path / "out", fmt="avro", key=None),
    tmp_path / "out",
    "--client-id-key is required with --input-format avro",
    code=2,
  )


def test_missing_sqlite_split_names_the_splits_that_exist(tmp_path, capsys):
  import tensorflow as tf

  spec = {"x": tf.TensorSpec([], tf.float32), "y": tf.TensorSpec([], tf.int64)}
  path = testing.write_tff_sqlite_input(
    tmp_path / "in.sqlite", CLIENTS, spec, {"alice": "train", "bob": "test"}
  )
  _assert_fails(
    capsys,
    _prepare_args(
      path, tmp_path / "out", "--sqlite-split", "validation", fmt="tff-sqlite", key=None
    ),
    tmp_path / "out",
    f"--sqlite-split 'validation': {path} has no such split; its splits are 'test', 'train'",
    code=1,
  )


def test_existing_store_is_refused_without_overwrite_and_left_intact(tmp_path, capsys):
  path = testing.write_tfrecord_input(tmp_path / "in.tfrecord", CLIENTS)
  output = tmp_path / "out"
  assert _run(capsys, *_prepare_args(path, output))[0] == 0
  before = {
    p: open(os.path.join(d, p), "rb").read() for d, _, names in os.walk(output) for p in names
  }
  other = testing.write_tfrecord_input(tmp_path / "other.tfrecord", {"carol": [{"x": 9.0, "y": 9}]})
  code, err = _run(capsys, *_prepare_args(other, output))
  assert code != 0
  assert f"--output {output} already holds a committed fedbeam store" in err
  assert "--overwrite" in err
  after = {
    p: open(os.path.join(d, p), "rb").read() for d, _, names in os.walk(output) for p in names
  }
  assert after == before
  testing.assert_store_equals(str(output), CLIENTS, ordered=False)


def test_non_empty_directory_without_a_store_is_refused(tmp_path, capsys):
  path = testing.write_tfrecord_input(tmp_path / "in.tfrecord", CLIENTS)
  output = tmp_path / "out"
  output.mkdir()
  (output / "notes.txt").write_text("mine")
  _assert_fails(
    capsys,
    _prepare_args(path, output),
    output,
    f"--output {output} is not empty and holds no fedbeam store",
  )
  assert (output / "notes.txt").read_text() == "mine"
  assert os.listdir(output) == ["notes.txt"]


def test_unknown_flag_is_a_usage_error(tmp_path, capsys):
  path = testing.write_tfrecord_input(tmp_path / "in.tfrecord", CLIENTS)
  _assert_fails(
    capsys,
    _prepare_args(path, tmp_path / "out", "--shard-count=3"),
    tmp_path / "out",
    "unknown flag --shard-count",
    code=2,
  )
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
  "content,culprit",
  [
    ("{not json", "is not valid JSON"),
    (json.dumps({"x": {"dtype": "complex64", "shape": []}}), "dtype 'complex64' is not supported"),
    (json.dumps({"x": {"dtype": "float32", "shape": [2, None]}}), "only the leading dimension"),
    (json.dumps({"x": {"dtype": "float32"}}), "feature 'x' must be"),
    (json.dumps([]), "expected a non-empty JSON object"),
  ],
)
def test_bad_element_spec_file_is_named(tmp_path, capsys, content, culprit):
  path = testing.write_tfrecord_input(tmp_path / "in.tfrecord", CLIENTS)
  spec = tmp_path / "spec.json"
  spec.write_text(content)
  _assert_fails(
    capsys,
    _prepare_args(path, tmp_path / "out", "--element-spec", str(spec)),
    tmp_path / "out",
    "--element-spec",
    str(spec),
    culprit,
    code=2,
  )


def test_missing_element_spec_file_is_named(tmp_path, capsys):
  path = testing.write_tfrecord_input(tmp_path / "in.tfrecord", CLIENTS)
  missing = str(tmp_path / "absent.json")
  _assert_fails(
    capsys,
    _prepare_args(path, tmp_path / "out", "--element-spec", missing),
    tmp_path / "out",
    f"cannot read element spec file {missing}",
    code=2,
  )


# ----------------------------------------------------------------------------
# A killed job
# ----------------------------------------------------------------------------


def _store_files(root):
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      full = os.path.join(dirpath, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, root)] = f.read()
  return out


def _client_files_exist(output):
  for _dirpath, _, names in os.walk(output):
    if any(n.endswith(".tfrecord") and not n.startswith(".") for n in names):
      return True
  return False


@pytest.mark.slow
def test_killed_job_leaves_no_store_and_a_rerun_matches_an_uninterrupted_run(tmp_path, capsys):
  rng = np.random.RandomState(0)
  clients = {
    f"client/{i:05d}": [
      {"x": rng.uniform(size=4).astype(np.float32), "y": int(j)} for j in range(3)
    ]
    for i in range(4000)
  }
  path = testing.write_tfrecord_input(tmp_path / "in.tfrecord", clients)
  output = tmp_path / "killed"
  args = _prepare_args(path, output)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  with open(tmp_path / "killed.log", "wb") as log:
    proc = subprocess.Popen([FEDBEAM, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
      deadline = time.monotonic() + 180
      while not _client_files_exist(output):
        assert proc.poll() is None, "the job ended before writing any client file"
        assert time.monotonic() < deadline, "no client file appeared within 180 s"
        time.sleep(0.05)
      os.kill(proc.pid, signal.SIGKILL)
    finally:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(output / METADATA_FILE), (
    "the job committed before it was killed; make the input larger"
  )
  written = sum(n.endswith(".tfrecord") for _, _, names in os.walk(output) for n in names)
  assert 0 < written < len(clients)

  with pytest.raises(StoreFormatError, match="not a committed fedbeam store"):
    load_client_data(str(output))
  code, err = _run(capsys, "inspect", str(output))
  assert code != 0 and str(output) in err

  # Rerun the same command: it succeeds over the leftovers...
  assert _run(capsys, *args)[0] == 0
  # ...and writes exactly what an uninterrupted run writes.
  clean = tmp_path / "clean"
  assert _run(capsys, *_prepare_args(path, clean))[0] == 0
  rerun_files, clean_files = _store_files(output), _store_files(clean)
  assert sorted(rerun_files) == sorted(clean_files)
  assert [k for k in clean_files if rerun_files[k] != clean_files[k]] == []
  assert load_client_data(str(output)).client_ids == sorted(clients)


def test_input_pattern_without_a_directory_matches_in_the_current_directory(
  tmp_path, capsys, monkeypatch
):
  testing.write_tfrecord_input(tmp_path / "part-0.tfrecord", CLIENTS)
  monkeypatch.chdir(tmp_path)
  code, err = _run(capsys, *_prepare_args("part-*.tfrecord", tmp_path / "out"))
  assert code == 0, err
  assert sorted(load_client_data(str(tmp_path / "out")).client_ids) == sorted(CLIENTS)
