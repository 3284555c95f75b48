"""Faults and hostile input: each test injects one and asserts the exact outcome.

docs/reliability.md lists every case with the test that proves it.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import fastavro
import numpy as np
import pytest

from fedbeam import cli
from fedbeam import testing as fbt
from fedbeam.format.layout import MANIFEST_DIR, StoreFormatError
from fedbeam.format.manifest import manifest_file_name, read_manifest
from fedbeam.format.metadata import metadata_path, parsed_schema, read_metadata
from fedbeam.format.tfrecord import checksum, read_tfrecords, tfrecord_frame
from fedbeam.pipelines.records import ClientRecords
from fedbeam.pipelines.store_writer import StoreWriteError, _WriteClientFile, commit_metadata
from fedbeam.store_validation import validate_store

SPEC = {"label": {"dtype": "int32", "shape": []}, "pixels": {"dtype": "float32", "shape": [4]}}


def _clients(n=6, seed=0, prefix="c"):
  rng = np.random.default_rng(seed)
  return {
    f"{prefix}{i}": [
      {"label": np.int32(j % 3), "pixels": rng.random(4, dtype=np.float32)} for j in range(i + 1)
    ]
    for i in range(n)
  }


def _files(root):
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _rewrite_manifest(store, edit):
  """Applies edit(rows) to the (single) manifest file of a store, keeping it valid Avro."""
  metadata = read_metadata(store)
  path = os.path.join(store, metadata["data_dir"], MANIFEST_DIR, manifest_file_name(0, 1))
  with open(path, "rb") as f:
    rows = list(fastavro.reader(f))
  rows = edit(rows)
  with open(path, "wb") as f:
    fastavro.writer(f, parsed_schema("manifest"), rows)


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("clean")
  return fbt.prepare_store(_clients(), str(tmp), element_spec=SPEC)


@pytest.fixture
def store_copy(clean_store, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(clean_store, dst)
  return dst


def _run_cli(args, capsys):
  code = cli.main(args)
  out = capsys.readouterr()
  return code, out.out, out.err


# ---------------------------------------------------------------------------
# Integrity: fedbeam validate
# ---------------------------------------------------------------------------


def test_validate_passes_a_sound_store_with_one_line(clean_store, capsys):
  code, out, _ = _run_cli(["validate", clean_store, "--deep"], capsys)
  assert code == 0
  assert out.strip().count("\n") == 0
  assert out.startswith(f"OK {clean_store}: 6 clients, 21 examples, 6 client files verified")


def test_validate_names_a_missing_client_file(store_copy, capsys):
  os.remove(fbt.client_file(store_copy, "c3"))
  code, out, err = _run_cli(["validate", store_copy], capsys)
  assert code == 1
  assert "client 'c3'" in out and "file is missing" in out
  assert "INVALID" in err


def test_validate_names_a_damaged_client_file(store_copy, capsys):
  path = fbt.client_file(store_copy, "c4")
  data = bytearray(open(path, "rb").read())
  data[20] ^= 0x01
  open(path, "wb").write(bytes(data))
  code, out, _ = _run_cli(["validate", store_copy], capsys)
  assert code == 1
  assert "client 'c4'" in out and "CRC32C" in out and "the manifest says" in out


def test_validate_names_a_truncated_client_file(store_copy, capsys):
  path = fbt.client_file(store_copy, "c5")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:-7])
  code, out, _ = _run_cli(["validate", store_copy], capsys)
  assert code == 1
  assert "client 'c5'" in out and f"{len(data) - 7} bytes, the manifest says {len(data)}" in out
  assert "truncated data" in out


def test_validate_lists_stray_files(store_copy, capsys):
  metadata = read_metadata(store_copy)
  stray = os.path.join(store_copy, metadata["data_dir"], "all", "00000", ".x.tfrecord.tmp-1")
  open(stray, "wb").write(b"partial")
  code, out, _ = _run_cli(["validate", store_copy], capsys)
  assert code == 1
  assert f"stray file {metadata['data_dir']}/all/00000/.x.tfrecord.tmp-1" in out


def test_validate_reports_counts_that_do_not_add_up(store_copy, capsys):
  path = metadata_path(store_copy)
  metadata = json.load(open(path))
  metadata["splits"][0]["num_examples"] += 5
  open(path, "w").write(json.dumps(metadata))
  code, out, _ = _run_cli(["validate", store_copy], capsys)
  assert code == 1
  assert "split 'all': metadata says num_examples = 26, the manifest adds up to 21" in out


def test_validate_flags_a_manifest_path_outside_the_store(store_copy, capsys):
  def edit(rows):
    rows[0]["path"] = "../../etc/passwd"
    return rows

  _rewrite_manifest(store_copy, edit)
  code, out, _ = _run_cli(["validate", store_copy], capsys)
  assert code == 1
  assert "path '../../etc/passwd' is not where the id maps" in out
  # Loading ignores the manifest's path: files are found from the id alone.
  from fedbeam.runtime import load_client_data

  data = load_client_data(store_copy)
  assert len(list(data.create_tf_dataset_for_client("c0"))) == 1


def test_validate_deep_finds_records_that_do_not_match_the_spec(store_copy, capsys):
  # A well-framed file with the right size and checksum whose record lacks a
  # feature: only --deep parses records.
  from tensorflow.core.example import example_pb2

  example = example_pb2.Example()
  example.features.feature["label"].int64_list.value.append(1)
  data = tfrecord_frame(example.SerializeToString())
  path = fbt.client_file(store_copy, "c0")
  old_size = os.path.getsize(path)
  open(path, "wb").write(data)
  meta_path = metadata_path(store_copy)
  metadata = json.load(open(meta_path))
  metadata["splits"][0]["num_bytes"] += len(data) - old_size
  open(meta_path, "w").write(json.dumps(metadata))

  def edit(rows):
    for r in rows:
      if r["client_id"] == "c0":
        r["num_bytes"], r["crc32c"] = len(data), checksum(data)
    return rows

  _rewrite_manifest(store_copy, edit)
  assert validate_store(store_copy).ok
  code, out, _ = _run_cli(["validate", store_copy, "--deep"], capsys)
  assert code == 1
  assert "client 'c0'" in out and "record 0: feature 'pixels' is missing" in out


def test_loading_refuses_a_newer_format_version(store_copy):
  path = metadata_path(store_copy)
  metadata = json.load(open(path))
  metadata["format_version"] = 2
  open(path, "w").write(json.dumps(metadata))
  from fedbeam.runtime import load_client_data

  with pytest.raises(StoreFormatError, match="format version 2 is not supported"):
    load_client_data(store_copy)


def test_reading_a_damaged_client_file_names_the_client(store_copy):
  from fedbeam.runtime import load_client_data
  from fedbeam.runtime.client_data import ClientFileError

  path = fbt.client_file(store_copy, "c5")
  data = bytearray(open(path, "rb").read())
  data[30] ^= 0xFF
  open(path, "wb").write(bytes(data))
  dataset = load_client_data(store_copy).create_tf_dataset_for_client("c5")
  with pytest.raises(ClientFileError, match="client 'c5'.*is damaged"):
    list(dataset)


# ---------------------------------------------------------------------------
# Malformed stores
# ---------------------------------------------------------------------------


def test_missing_metadata_is_no_store_for_load_inspect_and_validate(store_copy, capsys):
  os.remove(metadata_path(store_copy))
  from fedbeam.runtime import load_client_data

  with pytest.raises(StoreFormatError, match="a write into it did not finish"):
    load_client_data(store_copy)
  code, _, err = _run_cli(["inspect", store_copy], capsys)
  assert code == 1 and "not a committed fedbeam store" in err
  code, out, _ = _run_cli(["validate", store_copy], capsys)
  assert code == 1 and "metadata.json is missing" in out


def test_truncated_manifest_is_a_clear_error(store_copy, capsys):
  metadata = read_metadata(store_copy)
  path = os.path.join(store_copy, metadata["data_dir"], MANIFEST_DIR, manifest_file_name(0, 1))
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])
  from fedbeam.runtime import load_client_data

  with pytest.raises(StoreFormatError, match="manifest file .* is damaged"):
    load_client_data(store_copy)
  code, _, err = _run_cli(["inspect", store_copy], capsys)
  assert code == 1 and "is damaged" in err
  code, out, _ = _run_cli(["validate", store_copy], capsys)
  assert code == 1 and "is damaged" in out


def test_missing_split_directory_is_a_clear_error(store_copy, capsys):
  metadata = read_metadata(store_copy)
  shutil.rmtree(os.path.join(store_copy, metadata["data_dir"], "all"))
  from fedbeam.runtime import load_client_data

  with pytest.raises(StoreFormatError, match="the directory of split 'all'.* is missing"):
    load_client_data(store_copy)
  code, out, _ = _run_cli(["validate", store_copy], capsys)
  assert code == 1 and out.count("file is missing") == 6


def test_store_is_read_without_unpickling(clean_store, monkeypatch, capsys):
  def refuse(*args, **kwargs):
    raise AssertionError("a store read must not unpickle")

  monkeypatch.setattr(pickle, "loads", refuse)
  monkeypatch.setattr(pickle, "load", refuse)
  monkeypatch.setattr(pickle, "Unpickler", refuse)
  from fedbeam.runtime import load_client_data

  data = load_client_data(clean_store)
  assert sum(len(list(data.create_tf_dataset_for_client(c))) for c in data.client_ids) == 21
  assert _run_cli(["inspect", clean_store, "--json"], capsys)[0] == 0
  assert _run_cli(["validate", clean_store, "--deep"], capsys)[0] == 0


# ---------------------------------------------------------------------------
# Faults while writing
# ---------------------------------------------------------------------------


class _FailsOnce(list):
  """Records whose first iteration raises halfway, like a worker dying mid-write."""

  def __init__(self, items):
    super().__init__(items)
    self.failed = False

  def __iter__(self):
    for i, item in enumerate(super().__iter__()):
      if not self.failed and i == len(self) // 2:
        self.failed = True
        raise IOError("injected write failure")
      yield item


def test_retried_client_write_leaves_exactly_one_complete_file(tmp_path):
  records = _FailsOnce([b"record-%d" % i for i in range(10)])
  client = ClientRecords(client_id="retried", records=records)
  dofn = _WriteClientFile(str(tmp_path), "data-0123456789abcdef")
  with pytest.raises(StoreWriteError, match="injected write failure"):
    list(dofn.process(client, 1))
  [row] = list(dofn.process(client, 1))  # The runner retries the bundle.
  files = [
    os.path.relpath(os.path.join(d, n), tmp_path)
    for d, _, names in os.walk(tmp_path)
    for n in names
  ]
  assert files == [row["path"]]
  with open(tmp_path / row["path"], "rb") as f:
    assert list(read_tfrecords(f)) == list(list.__iter__(records))
  assert row["num_examples"] == 10


def test_rerun_over_leftovers_is_byte_identical_and_sweeps_temp_files(clean_store, tmp_path):
  input_path = fbt.write_tfrecord_input(str(tmp_path / "in.tfrecord"), _clients())
  reference = fbt.prepare_store(
    input_path,
    str(tmp_path),
    output=str(tmp_path / "ref"),
    element_spec=SPEC,
    client_id_key="client_id",
  )
  leftovers = str(tmp_path / "killed")
  shutil.copytree(reference, leftovers)
  # What a killed job leaves: no metadata, a half-written temporary file, a
  # client file cut short.
  os.remove(metadata_path(leftovers))
  data_dir = read_metadata(reference)["data_dir"]
  shard = os.path.join(leftovers, data_dir, "all", "00000")
  open(os.path.join(shard, ".abc.tfrecord.tmp-dead"), "wb").write(b"half")
  victim = sorted(os.listdir(shard))[-1]
  open(os.path.join(shard, victim), "wb").write(b"cut")
  fbt.prepare_store(
    input_path, str(tmp_path), output=leftovers, element_spec=SPEC, client_id_key="client_id"
  )
  assert _files(leftovers) == _files(reference)


def test_second_job_to_a_committed_output_fails_and_leaves_it_untouched(
  clean_store, tmp_path, capsys
):
  before = _files(clean_store)
  input_path = fbt.write_tfrecord_input(str(tmp_path / "other.tfrecord"), _clients(3, seed=9))
  code, _, err = _run_cli(
    [
      "prepare",
      "--input",
      input_path,
      "--input-format",
      "tfrecord",
      "--client-id-key",
      "client_id",
      "--output",
      clean_store,
    ],
    capsys,
  )
  assert code == 1
  assert "already holds a committed fedbeam store; pass --overwrite" in err
  assert _files(clean_store) == before


def test_commit_is_exclusive_without_overwrite(tmp_path):
  root = str(tmp_path)
  commit_metadata(root, {"job": 1}, overwrite=False)
  with pytest.raises(StoreWriteError, match="another job committed a store"):
    commit_metadata(root, {"job": 2}, overwrite=False)
  assert json.load(open(metadata_path(root))) == {"job": 1}
  assert os.listdir(root) == ["metadata.json"]


def _prepare_cmd(input_path, output):
  return [
    sys.executable,
    "-m",
    "fedbeam.cli",
    "prepare",
    "--input",
    input_path,
    "--input-format",
    "tfrecord",
    "--client-id-key",
    "client_id",
    "--element-spec",
    output + ".spec.json",
    "--output",
    output,
  ]


def test_two_jobs_racing_to_one_output_one_wins_and_the_store_is_not_mixed(tmp_path):
  output = str(tmp_path / "store")
  with open(output + ".spec.json", "w") as f:
    json.dump(SPEC, f)
  inputs = [
    fbt.write_tfrecord_input(
      str(tmp_path / f"in{i}.tfrecord"), _clients(8, seed=i, prefix=f"job{i}_")
    )
    for i in range(2)
  ]
  logs = [open(tmp_path / f"job{i}.log", "wb") for i in range(2)]
  procs = [
    subprocess.Popen(_prepare_cmd(inputs[i], output), stdout=logs[i], stderr=subprocess.STDOUT)
    for i in range(2)
  ]
  codes = [p.wait(timeout=300) for p in procs]
  texts = [open(tmp_path / f"job{i}.log").read() for i in range(2)]
  assert sorted(codes) == [0, 1], texts
  loser = codes.index(1)
  assert (
    "another job committed a store" in texts[loser]
    or "already holds a committed fedbeam store" in texts[loser]
  ), texts[loser]
  report = validate_store(output, deep=True)
  assert report.ok, report.problems
  winner = 1 - loser
  metadata = read_metadata(output)
  assert metadata["parameters"]["input"] == inputs[winner]
  ids = {r["client_id"] for r in read_manifest(output, metadata)}
  assert ids == {f"job{winner}_{i}" for i in range(8)}
  assert [n for n in os.listdir(output) if n.startswith("data-")] == [metadata["data_dir"]]


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a directory")
  input_path = fbt.write_tfrecord_input(str(tmp_path / "in.tfrecord"), _clients(2))
  code, _, err = _run_cli(
    [
      "prepare",
      "--input",
      input_path,
      "--input-format",
      "tfrecord",
      "--client-id-key",
      "client_id",
      "--output",
      str(blocker / "store"),
    ],
    capsys,
  )
  assert code == 1
  assert f"--output {blocker / 'store'}" in err and "no store was committed" in err


@pytest.fixture
def tiny_disk(tmp_path):
  mount = tmp_path / "tiny"
  mount.mkdir()
  result = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
    capture_output=True,
    check=False,
  )
  if result.returncode != 0:
    pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
  yield str(mount)
  subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_a_clear_error_and_commits_nothing(tmp_path, tiny_disk, capsys):
  rng = np.random.default_rng(1)
  big = {
    f"c{i}": [
      {"label": np.int32(0), "pixels": rng.random(4096, dtype=np.float32)} for _ in range(10)
    ]
    for i in range(4)
  }
  input_path = fbt.write_tfrecord_input(str(tmp_path / "big.tfrecord"), big)
  output = os.path.join(tiny_disk, "store")
  code, _, err = _run_cli(
    [
      "prepare",
      "--input",
      input_path,
      "--input-format",
      "tfrecord",
      "--client-id-key",
      "client_id",
      "--output",
      output,
    ],
    capsys,
  )
  assert code == 1
  assert "No space left on device" in err, err
  assert not os.path.exists(metadata_path(output))


# ---------------------------------------------------------------------------
# Hostile or odd input
# ---------------------------------------------------------------------------

HOSTILE_IDS = [
  "../x",
  "../../etc/passwd",
  "/abs/path",
  "a\x00b",
  "tab\there",
  "\x1b[31mred",
  "new\nline",
  ".",
  "..",
  "~",
  "x" * 1000,
  "é" * 400,
  " ",
]


def test_hostile_client_ids_stay_inside_the_store_and_round_trip(tmp_path):
  clients = {
    cid: [{"label": np.int32(i), "pixels": np.full(4, i, np.float32)}]
    for i, cid in enumerate(HOSTILE_IDS)
  }
  store = fbt.prepare_store(clients, str(tmp_path), element_spec=SPEC)
  root = os.path.realpath(store)
  for dirpath, _, names in os.walk(store):
    for name in names:
      assert os.path.realpath(os.path.join(dirpath, name)).startswith(root + os.sep)
  fbt.assert_store_equals(store, clients)
  assert validate_store(store, deep=True).ok


def test_a_single_100_megabyte_example_is_kept_whole(tmp_path):
  n = 25 * 1024 * 1024  # float32 values: 100 MiB
  values = np.arange(n, dtype=np.float32)
  spec = {"label": {"dtype": "int32", "shape": []}, "pixels": {"dtype": "float32", "shape": [n]}}
  clients = {"huge": [{"label": np.int32(7), "pixels": values}]}
  store = fbt.prepare_store(clients, str(tmp_path), element_spec=spec)
  from fedbeam.runtime import load_client_data

  [element] = list(load_client_data(store).create_tf_dataset_for_client("huge"))
  assert int(element["label"]) == 7
  np.testing.assert_array_equal(element["pixels"].numpy(), values)


def test_a_client_with_many_tiny_examples_is_kept_whole(tmp_path):
  # docs/reliability.md and bench/ cover the 1M-example client; 100k keeps
  # the suite fast and exercises the same path (one group, one file).
  n = 100_000
  path = str(tmp_path / "many.tfrecord")
  from tensorflow.core.example import example_pb2

  with open(path, "wb") as f:
    for i in range(n):
      e = example_pb2.Example()
      e.features.feature["client_id"].bytes_list.value.append(b"busy")
      e.features.feature["label"].int64_list.value.append(i)
      f.write(tfrecord_frame(e.SerializeToString()))
  store = fbt.prepare_store(
    path,
    str(tmp_path),
    client_id_key="client_id",
    element_spec={"label": {"dtype": "int64", "shape": []}},
    order_by="label",
  )
  from fedbeam.runtime import load_client_data

  data = load_client_data(store)
  assert data.num_examples("busy") == n
  labels = np.concatenate(
    [b["label"].numpy() for b in data.create_tf_dataset_for_client("busy").batch(10_000)]
  )
  np.testing.assert_array_equal(labels, np.arange(n))


def test_input_with_no_examples_is_a_clear_error(tmp_path, capsys):
  path = tmp_path / "empty.tfrecord"
  path.write_bytes(b"")
  code, _, err = _run_cli(
    [
      "prepare",
      "--input",
      str(path),
      "--input-format",
      "tfrecord",
      "--client-id-key",
      "client_id",
      "--output",
      str(tmp_path / "store"),
    ],
    capsys,
  )
  assert code == 1
  assert "the input holds no record" in err and "--element-spec" in err
  assert not os.path.exists(metadata_path(str(tmp_path / "store")))


def test_input_where_every_client_is_empty_makes_a_store_of_empty_clients(tmp_path):
  import tensorflow as tf

  spec = {"label": tf.TensorSpec([], tf.int32), "pixels": tf.TensorSpec([4], tf.float32)}
  db = fbt.write_tff_sqlite_input(str(tmp_path / "empty.sqlite"), {"a": [], "b": []}, spec)
  store = fbt.prepare_store(db, str(tmp_path), element_spec=SPEC)
  metadata = read_metadata(store)
  assert metadata["empty_clients"]["found"] == 2
  assert metadata["splits"][0]["num_examples"] == 0
  from fedbeam.runtime import load_client_data

  data = load_client_data(store)
  assert data.client_ids == ["a", "b"]
  assert list(data.create_tf_dataset_for_client("a")) == []


def test_ids_in_different_unicode_forms_stay_distinct_clients(tmp_path):
  nfc, nfd = "caf\u00e9", "cafe\u0301"
  clients = {
    nfc: [{"label": np.int32(1), "pixels": np.ones(4, np.float32)}],
    nfd: [{"label": np.int32(2), "pixels": np.ones(4, np.float32)}],
  }
  store = fbt.prepare_store(clients, str(tmp_path), element_spec=SPEC)
  fbt.assert_store_equals(store, clients)


def test_non_utf8_client_id_names_the_record(tmp_path, capsys):
  from tensorflow.core.example import example_pb2

  path = str(tmp_path / "bad.tfrecord")
  with open(path, "wb") as f:
    for raw in (b"ok", b"\xff\xfe"):
      e = example_pb2.Example()
      e.features.feature["client_id"].bytes_list.value.append(raw)
      e.features.feature["label"].int64_list.value.append(1)
      f.write(tfrecord_frame(e.SerializeToString()))
  code, _, err = _run_cli(
    [
      "prepare",
      "--input",
      path,
      "--input-format",
      "tfrecord",
      "--client-id-key",
      "client_id",
      "--output",
      str(tmp_path / "store"),
    ],
    capsys,
  )
  assert code == 1
  assert f"{path} record 1" in err and "not valid UTF-8" in err
