"""Hostile stores: a real store edited by hand must fail cleanly, never crash, hang or escape.

Each test takes a store made by the real prepare job, forges one thing in it
(issue 16, items 6 to 9 and 14) and asserts the exact error. A victim that
could crash (a segfault) or hang runs in a subprocess with a timeout, so a
crash or hang fails the test instead of pytest. docs/reliability.md lists
each case with its test.
"""

import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap

import fastavro
import numpy as np
import pytest

from fedbeam import store_validation
from fedbeam import testing as fbt
from fedbeam.format import spec as element_spec
from fedbeam.format.layout import (
  MANIFEST_DIR,
  MAX_METADATA_BYTES,
  UNSPLIT,
  StoreFormatError,
  check_split_name,
)
from fedbeam.format.manifest import manifest_file_name, read_manifest
from fedbeam.format.metadata import load_schema, metadata_path, parsed_schema, read_metadata
from fedbeam.format.tfrecord import CorruptRecordError, masked_crc, read_tfrecords
from fedbeam.store_validation import validate_store

# The spec is inferred (label: int64, pixels: float32 [4]); labels above 127
# do not fit an int8.
LABELS = (45, 145, 245, 345)


def _clients(n=6):
  rng = np.random.default_rng(0)
  return {
    f"c{i}": [
      {"label": np.int64(LABELS[j % 4]), "pixels": rng.random(4, dtype=np.float32)}
      for j in range(i + 1)
    ]
    for i in range(n)
  }


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
  return fbt.prepare_store(_clients(), str(tmp_path_factory.mktemp("hostile")))


@pytest.fixture
def store(clean_store, tmp_path):
  dst = str(tmp_path / "store")
  shutil.copytree(clean_store, dst)
  return dst


def _edit_metadata(store, edit):
  path = metadata_path(store)
  with open(path, encoding="utf-8") as f:
    metadata = json.load(f)
  edit(metadata)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(metadata, f)


def _manifest_file(store):
  with open(metadata_path(store), encoding="utf-8") as f:
    data_dir = json.load(f)["data_dir"]
  return os.path.join(store, data_dir, MANIFEST_DIR, manifest_file_name(0, 1))


def _edit_manifest_rows(store, edit):
  """Rewrites the store's one manifest file with edit(row) applied to every row."""
  path = _manifest_file(store)
  with open(path, "rb") as f:
    rows = [edit(row) for row in fastavro.reader(f)]
  with open(path, "wb") as f:
    fastavro.writer(f, parsed_schema("manifest"), rows)


def _run(tmp_path, args, timeout=120):
  """Runs `python args...` in its own process group; returns (exit code, output).

  A crash shows as a negative exit code; a run past `timeout` is killed (with
  its children) and fails the test.
  """
  log = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}.log"
  with open(log, "wb") as out:
    proc = subprocess.Popen(
      [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
      code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      pytest.fail(f"{args} did not finish within {timeout} s: {log.read_text()[-2000:]}")
  return code, log.read_text()


def _fedbeam(tmp_path, *args, timeout=120):
  return _run(tmp_path, ["-m", "fedbeam.cli", *args], timeout=timeout)


# Loads each store named on the command line and reads every client; prints
# one line per store: "<store>: read N" or "<store>: StoreFormatError: ...".
# One process for every store: importing TFF takes most of its time.
_LOAD_ALL = textwrap.dedent("""
    import sys
    from fedbeam.format.layout import (MANIFEST_DIR, MAX_METADATA_BYTES, StoreFormatError, UNSPLIT,
                                       check_split_name)
    from fedbeam.format.manifest import manifest_file_name, read_manifest
    from fedbeam.format.metadata import load_schema, metadata_path, parsed_schema, read_metadata
    from fedbeam.format.tfrecord import CorruptRecordError, masked_crc, read_tfrecords
    from fedbeam.runtime import load_client_data, stop_tff_workers
    for store in sys.argv[1:]:
      try:
        data = load_client_data(store)
        n = sum(len(list(data.create_tf_dataset_for_client(c))) for c in data.client_ids)
        print(f"{store}: read {n}", flush=True)
      except StoreFormatError as e:
        print(f"{store}: StoreFormatError: {e}", flush=True)
    stop_tff_workers()
""")


def _zigzag(n):
  n = (n << 1) ^ (n >> 63)
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _forge_first_block(path, count=None, size=None):
  """Replaces the record count and/or byte size of an Avro file's first block."""
  with open(path, "rb") as f:
    data = f.read()
  sync = data[-16:]
  start = data.index(sync) + 16
  pos, fields = start, []
  for _ in range(2):
    end = pos
    while data[end] & 0x80:
      end += 1
    fields.append(data[pos : end + 1])
    pos = end + 1
  if count is not None:
    fields[0] = _zigzag(count)
  if size is not None:
    fields[1] = _zigzag(size)
  with open(path, "wb") as f:
    f.write(data[:start] + b"".join(fields) + data[pos:])


def _forge_block_size(store):
  _forge_first_block(_manifest_file(store), size=2**40)


def _forge_huge_shape(store):
  _edit_metadata(store, lambda m: m["element_spec"][1].update(shape=[1_000_000_000]))


def _replace_manifest_by_fifo(store):
  os.remove(_manifest_file(store))
  os.mkfifo(_manifest_file(store))


_LOADER_VICTIMS = {
  "block_size": _forge_block_size,
  "huge_shape": _forge_huge_shape,
  "fifo_manifest": _replace_manifest_by_fifo,
}


@pytest.fixture(scope="module")
def loader_runs(clean_store, tmp_path_factory):
  """{victim: (store, the loader's line for it, the whole output)} from one loader process.

  Before the fixes the first victim crashed the process (a segfault, so no
  line for any victim) and the last one hung it.
  """
  tmp = tmp_path_factory.mktemp("loader")
  stores = {}
  for name, forge in _LOADER_VICTIMS.items():
    stores[name] = str(tmp / name)
    shutil.copytree(clean_store, stores[name])
    forge(stores[name])
  code, out = _run(tmp, ["-c", _LOAD_ALL, *stores.values()])
  assert code == 0, out
  lines = dict(line.split(": ", 1) for line in out.splitlines() if line.startswith(str(tmp)))
  return {name: (store, lines.get(store, ""), out) for name, store in stores.items()}


# ---------------------------------------------------------------------------
# 6. Sizes read from a store are bounded before anything is allocated
# ---------------------------------------------------------------------------


def test_forged_manifest_block_size_is_a_clear_error_for_load_inspect_and_validate(
  loader_runs, tmp_path
):
  store, line, out = loader_runs["block_size"]
  path = _manifest_file(store)
  assert line.startswith(f"StoreFormatError: manifest file {path} is damaged: block at byte "), out
  assert f"claims {2**40} bytes, " in line
  code, out = _fedbeam(tmp_path, "inspect", store)
  assert code == 1, out
  assert f"fedbeam inspect: error: manifest file {path} is damaged: block at byte" in out
  report = validate_store(store)
  assert any(f"claims {2**40} bytes" in p for p in report.problems), report.problems


def test_negative_manifest_block_count_does_not_drop_rows_silently(store):
  # fastavro reads a negative block count as an empty block: 0 clients, no error.
  _forge_first_block(_manifest_file(store), count=-6)
  metadata = read_metadata(store)
  with pytest.raises(StoreFormatError, match="claims -6 records"):
    list(read_manifest(store, metadata))


def test_huge_metadata_shape_is_refused_at_metadata_read(loader_runs):
  store, line, out = loader_runs["huge_shape"]
  limit = element_spec.MAX_VALUES_PER_EXAMPLE
  with pytest.raises(
    StoreFormatError,
    match=r"feature 'pixels' \(shape \[1000000000\]\) brings an example to "
    rf"1000000001 values; fedbeam reads at most {limit}",
  ):
    read_metadata(store)
  assert line.startswith("StoreFormatError: ") and "1000000001 values" in line, out
  report = validate_store(store)
  assert not report.ok and "1000000001 values" in report.problems[0]


def test_shape_too_big_for_the_manifest_sizes_is_refused(store):
  # Within the values limit, but 100,000 float32 values take at least 400 kB per
  # example, and no client file is that big. (Without the manifest headers'
  # spec, which would catch the edit first, as in a store of an older writer.)
  _drop_manifest_spec(store)

  def edit(m):
    m["element_spec"][1]["shape"] = [100_000]

  _edit_metadata(store, edit)
  metadata = read_metadata(store)
  with pytest.raises(
    StoreFormatError,
    match=r"client 'c0': 1 examples of the element spec take at least 400017 "
    r"bytes, the manifest says the file has \d+",
  ):
    list(read_manifest(store, metadata))
  report = validate_store(store)
  assert not report.ok
  assert sum("take at least" in p for p in report.problems) == 6


def test_negative_manifest_counts_are_refused(store):
  def edit(row):
    if row["client_id"] == "c2":
      row["num_examples"] = -3
    return row

  _edit_manifest_rows(store, edit)
  with pytest.raises(
    StoreFormatError, match="client 'c2': num_examples -3 and num_bytes .* must not be negative"
  ):
    list(read_manifest(store, read_metadata(store)))


def test_manifest_with_another_schema_is_refused(store):
  # A string num_examples would reach the loader's arithmetic as text.
  schema = load_schema("manifest")
  for field in schema["fields"]:
    if field["name"] == "num_examples":
      field["type"] = "string"
  path = _manifest_file(store)
  with open(path, "rb") as f:
    rows = list(fastavro.reader(f))
  for row in rows:
    row["num_examples"] = "many"
  with open(path, "wb") as f:
    fastavro.writer(f, fastavro.parse_schema(schema), rows)
  with pytest.raises(
    StoreFormatError, match=f"manifest file {path} was not written with schemas/manifest.avsc"
  ):
    list(read_manifest(store, read_metadata(store)))


def test_forged_tfrecord_length_is_bounded_by_the_file(store, tmp_path):
  path = fbt.client_file(store, "c3")
  with open(path, "rb") as f:
    data = f.read()
  length = struct.pack("<Q", 2**40)
  forged = length + struct.pack("<I", masked_crc(length)) + data[12:]
  with open(path, "wb") as f:
    f.write(forged)
  left = len(forged) - 12
  # A real file: before the bound, f.read(2**40) asked for a terabyte.
  with open(path, "rb") as f:
    with pytest.raises(
      CorruptRecordError,
      match=rf"record 0: truncated data \(its length {2**40} does not fit in "
      rf"the {left} bytes left in the file\)",
    ):
      list(read_tfrecords(f))
  report = validate_store(store)
  assert any(f"its length {2**40} does not fit" in p for p in report.problems)
  # A stream of unknown size (gzip here) is read in pieces up to its end.
  with gzip.open(tmp_path / "forged.gz", "wb") as f:
    f.write(forged)
  with gzip.open(tmp_path / "forged.gz", "rb") as f:
    with pytest.raises(CorruptRecordError, match="^record 0: truncated data$"):
      list(read_tfrecords(f))
  with gzip.open(tmp_path / "sound.gz", "wb") as f:
    f.write(data)
  with gzip.open(tmp_path / "sound.gz", "rb") as f:
    assert len(list(read_tfrecords(f))) == 4


# ---------------------------------------------------------------------------
# 7. No hangs: FIFOs, symbolic links, huge counts, deep JSON
# ---------------------------------------------------------------------------


def test_client_file_replaced_by_a_fifo_does_not_hang_validate(store, tmp_path):
  path = fbt.client_file(store, "c1")
  os.remove(path)
  os.mkfifo(path)
  code, out = _fedbeam(tmp_path, "validate", store, timeout=60)
  assert code == 1, out
  assert (
    f"client 'c1' ({os.path.relpath(path, store)}): client file {path} is not a regular "
    "file (FIFO)" in out
  )
  assert f"{os.path.relpath(path, store)} is a FIFO; a store holds only regular files" in out


def test_manifest_replaced_by_a_fifo_does_not_hang_the_loader(loader_runs):
  store, line, out = loader_runs["fifo_manifest"]
  assert (
    line == f"StoreFormatError: manifest file {_manifest_file(store)} is not a regular file (FIFO)"
  ), out


def test_symlink_out_of_the_store_is_listed_not_followed(store, tmp_path):
  outside = tmp_path / "outside"
  (outside / "deep").mkdir(parents=True)
  (outside / "deep" / "secret.txt").write_text("not the store's")
  shard = os.path.dirname(fbt.client_file(store, "c0"))
  os.symlink(str(outside), os.path.join(shard, "escape"))
  report = validate_store(store)
  rel = os.path.relpath(os.path.join(shard, "escape"), store)
  assert (
    f"{rel} -> {outside} is a symbolic link; a store holds only regular files and "
    "directories" in report.problems
  )
  assert not any("secret.txt" in p for p in report.problems), report.problems


def test_client_file_symlinked_outside_is_refused(store, tmp_path):
  path = fbt.client_file(store, "c2")
  copy = tmp_path / "elsewhere.tfrecord"
  shutil.copy(path, copy)
  os.remove(path)
  os.symlink(str(copy), path)
  report = validate_store(store)
  rel = os.path.relpath(path, store)
  assert (
    f"client 'c2' ({rel}): client file {path} is a symbolic link; a store holds only "
    "regular files" in report.problems
  )
  assert report.num_files_checked == 5


def test_huge_manifest_file_count_is_refused_at_once(store, tmp_path):
  _edit_metadata(store, lambda m: m["manifest"].update(num_files=2_000_000_000))
  code, out = _fedbeam(tmp_path, "validate", store, timeout=60)
  assert code == 1, out
  assert "manifest.num_files is 2000000000; a store of 6 clients has 1 to 6 manifest files" in out


def test_deeply_nested_metadata_is_a_clear_error(store):
  with open(metadata_path(store), "w") as f:
    f.write("[" * 200_000)
  with pytest.raises(StoreFormatError, match="JSON nested deeper than 32 levels"):
    read_metadata(store)
  assert "JSON nested deeper than 32 levels" in validate_store(store).problems[0]


def test_oversized_metadata_is_refused(store):
  with open(metadata_path(store), "rb") as f:
    data = f.read()
  with open(metadata_path(store), "wb") as f:
    f.write(data + b" " * MAX_METADATA_BYTES)
  with pytest.raises(StoreFormatError, match=f"fedbeam reads at most {MAX_METADATA_BYTES}"):
    read_metadata(store)


# ---------------------------------------------------------------------------
# 8. No escape through split names
# ---------------------------------------------------------------------------


def _move_split(store, name):
  """Renames split 'all' to `name` in metadata and manifest, with the files where it points."""
  metadata = read_metadata(store)
  data_root = os.path.join(store, metadata["data_dir"])
  target = os.path.normpath(os.path.join(data_root, name))
  shutil.copytree(os.path.join(data_root, UNSPLIT), target)
  _edit_metadata(store, lambda m: m["splits"][0].update(name=name))

  def edit(row):
    row["split"] = name
    row["path"] = f"{metadata['data_dir']}/{name}/{row['path'].split('/', 2)[2]}"
    return row

  _edit_manifest_rows(store, edit)
  shutil.rmtree(os.path.join(data_root, UNSPLIT))


def test_split_name_leading_out_of_the_store_is_refused(store, tmp_path):
  _move_split(store, "../../outside")
  with pytest.raises(
    StoreFormatError, match=r"split name '\.\./\.\./outside' is not a split directory name"
  ):
    read_metadata(store)
  from fedbeam.runtime import load_client_data

  with pytest.raises(StoreFormatError, match="split name '../../outside'"):
    load_client_data(store)
  report = validate_store(store, deep=True)
  assert not report.ok and "split name '../../outside'" in report.problems[0]


@pytest.mark.parametrize("name", ["..", ".", "manifest", "a/b", "", "x" * 65, "tr ain"])
def test_split_names_are_checked(name):
  with pytest.raises(StoreFormatError, match="is not a split directory name"):
    check_split_name(name, "here")


@pytest.mark.parametrize("name", ["all", "train", "test", "val-1", "Fold_2"])
def test_split_names_the_writer_makes_pass(name):
  assert check_split_name(name, "here") == name


def test_manifest_row_with_a_bad_split_name_is_refused(store):
  def edit(row):
    if row["client_id"] == "c4":
      row["split"] = "../x"
    return row

  _edit_manifest_rows(store, edit)
  with pytest.raises(StoreFormatError, match="client 'c4': split name '../x'"):
    list(read_manifest(store, read_metadata(store)))


# ---------------------------------------------------------------------------
# 9. validate never raises; --deep catches relabelled dtypes
# ---------------------------------------------------------------------------


def test_unknown_dtype_is_a_finding_not_a_traceback(store, tmp_path):
  _edit_metadata(store, lambda m: m["element_spec"][0].update(dtype="complex512"))
  code, out = _fedbeam(tmp_path, "validate", store)
  assert code == 1, out
  assert "Traceback" not in out
  assert "feature 'label': dtype 'complex512' is not supported" in out
  with pytest.raises(StoreFormatError, match="dtype 'complex512' is not supported"):
    read_metadata(store)


def test_zero_shards_is_a_finding_and_a_load_error(store, tmp_path):
  _edit_metadata(store, lambda m: m.update(num_shards=0))
  code, out = _fedbeam(tmp_path, "validate", store)
  assert code == 1, out
  assert "Traceback" not in out and "num_shards is 0; it must be at least 1" in out
  from fedbeam.runtime import load_client_data

  with pytest.raises(StoreFormatError, match="num_shards is 0"):
    load_client_data(store)


def test_an_unforeseen_error_is_a_problem_not_a_traceback(store, monkeypatch):
  def fail(data):
    raise RuntimeError("checksum failed\n\tin a way no check foresaw")

  monkeypatch.setattr(store_validation, "checksum", fail)
  report = validate_store(store)
  assert report.problems == [
    "validation stopped: RuntimeError: checksum failed in a way no check foresaw"
  ]


SPEC_EDITS = {
  "int64 as int8": lambda m: m["element_spec"][0].update(dtype="int8"),
  "int64 as float64": lambda m: m["element_spec"][0].update(dtype="float64"),
  "int64 as uint64": lambda m: m["element_spec"][0].update(dtype="uint64"),
  "scalar as variable length": lambda m: m["element_spec"][0].update(shape=[None]),
  "feature removed": lambda m: m.update(element_spec=m["element_spec"][1:]),
  "float32 as float16": lambda m: m["element_spec"][1].update(dtype="float16"),
}


@pytest.mark.parametrize("edit", sorted(SPEC_EDITS))
def test_an_element_spec_edited_in_metadata_is_caught_by_validate_and_load(store, edit):
  # Some of these edits leave every byte a valid encoding of the new spec
  # (uint64 and float64 values are stored as int64 bit patterns; a scalar is a
  # list of one): the manifest files' headers keep the spec the job wrote.
  _edit_metadata(store, SPEC_EDITS[edit])
  report = validate_store(store)
  assert not report.ok
  assert any(
    "was written for element spec" in p and "metadata.json says" in p for p in report.problems
  ), report.problems
  from fedbeam.runtime.client_data import load_client_data

  with pytest.raises(StoreFormatError, match="was written for element spec"):
    load_client_data(store)


def _drop_manifest_spec(store):
  """Rewrites the manifest without the element spec in its header, as older writers did."""
  _edit_manifest_rows(store, lambda row: row)


def test_deep_validate_catches_int64_relabelled_int8(store):
  _drop_manifest_spec(store)
  _edit_metadata(store, lambda m: m["element_spec"][0].update(dtype="int8"))
  assert validate_store(store).ok  # the bytes are intact; only their reading changed
  report = validate_store(store, deep=True)
  assert not report.ok
  assert (
    "record 1: feature 'label' holds 145, outside the range of its dtype int8 "
    "[-128, 127]" in report.problems[1]
  )


def test_deep_validate_catches_float32_relabelled_float16(store):
  _drop_manifest_spec(store)
  _edit_metadata(store, lambda m: m["element_spec"][1].update(dtype="float16"))
  report = validate_store(store, deep=True)
  assert not report.ok
  assert "feature 'pixels' holds" in report.problems[0]
  assert "which is not a float16 value" in report.problems[0]


def test_deep_validate_notes_int64_relabelled_float64(store, capsys):
  # Without the spec in the manifest (an older store), the bytes are those of
  # a float64 feature too, so this is a note, not a problem.
  _drop_manifest_spec(store)
  _edit_metadata(store, lambda m: m["element_spec"][0].update(dtype="float64"))
  from fedbeam import cli

  assert cli.main(["validate", store, "--deep"]) == 0
  out = capsys.readouterr().out
  assert (
    "  note: feature 'label' (float64): all 21 nonzero values are subnormal (below "
    "2.2e-308), as integers stored as int64 and read as float64 are" in out
  )
  assert out.rstrip().splitlines()[-1].startswith(f"OK {store}: ")
  assert validate_store(store).notes == []  # only --deep reads values


def test_deep_validate_notes_a_scalar_relabelled_variable_length(store):
  _drop_manifest_spec(store)
  _edit_metadata(store, lambda m: m["element_spec"][0].update(shape=[None]))
  report = validate_store(store, deep=True)
  assert report.ok
  assert report.notes == [
    "feature 'label' (shape [None]): each of the 21 records holds 1 value, as a fixed shape "
    "would; check that the metadata's shape is the one the store was written with"
  ]


def test_deep_validate_has_no_notes_for_a_sound_store(clean_store):
  report = validate_store(clean_store, deep=True)
  assert report.ok and report.notes == []


def test_deep_validate_catches_a_removed_feature(store):
  _drop_manifest_spec(store)
  _edit_metadata(store, lambda m: m.update(element_spec=m["element_spec"][1:]))
  assert validate_store(store).ok
  report = validate_store(store, deep=True)
  assert report.num_problems == 6
  assert "record 0: features ['label'] are not in the element spec" in report.problems[0]


# ---------------------------------------------------------------------------
# 14. Unreachable remote stores
# ---------------------------------------------------------------------------

# A bucket URL whose host cannot be resolved here (no network): TensorFlow's
# GCS client fails at once with "Could not resolve host" (3-4 s, no retries).
UNREACHABLE = "gs://fedbeam-unreachable-test-bucket/store"


@pytest.mark.parametrize("command", ["validate", "inspect"])
def test_unreachable_gs_store_is_one_line(command, capsys):
  from fedbeam import cli

  code = cli.main([command, UNREACHABLE])
  captured = capsys.readouterr()
  out = captured.out + captured.err
  if "resolve host" not in out:
    pytest.skip(f"the GCS host resolves here (this test needs a machine without network): {out}")
  assert code == 1, out
  lines = [l for l in out.splitlines() if UNREACHABLE in l]
  assert lines and all("\t" not in l for l in lines), out
  assert f"cannot read metadata {UNREACHABLE}/metadata.json: " in lines[0]
  assert "Could not resolve host" in lines[0]
