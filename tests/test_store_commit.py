"""The writer side of the commit: concurrent jobs, reruns, durability, leftovers, messages.

Jobs run as real `fedbeam prepare` processes (or `run_prepare` in this
process); a job is held mid-write by a transform that waits for a file, so a
test decides when it goes on, or kills it. docs/reliability.md names these tests.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from test_reliability import SPEC, _clients, _files, tiny_disk  # noqa: F401 (tiny_disk: a fixture)

import fedbeam
from fedbeam import cli
from fedbeam import testing as fbt
from fedbeam.format import fs as fs_module
from fedbeam.format.layout import DATA_DIR_PREFIX, LEASE_FILE
from fedbeam.format.manifest import read_manifest
from fedbeam.format.metadata import metadata_path, read_metadata
from fedbeam.pipelines.prepare import PrepareConfig, job_key
from fedbeam.pipelines.store_writer import StoreWriteError, commit_metadata
from fedbeam.store_validation import validate_store

# make_transform_fn that, when FEDBEAM_TEST_GATE is set, holds the job at its
# third client (two client files are written by then) until `release` exists.
GATE_MODULE = textwrap.dedent("""
    import os, time
    _calls = [0]

    def make_transform_fn(raw_client_id, index):
      gate = os.environ.get("FEDBEAM_TEST_GATE")
      _calls[0] += 1
      # Calls 1 and 2 are the launcher's check of the transform on the first
      # record (pseudo-clients 0 and 1); the job's third client holds.
      if gate and _calls[0] == 5:
        open(os.path.join(gate, "waiting"), "w").close()
        while not os.path.exists(os.path.join(gate, "release")):
          time.sleep(0.05)
      return None
""")


@pytest.fixture
def gate(tmp_path):
  """(module dir for PYTHONPATH, gate dir) of the holding transform."""
  modules = tmp_path / "modules"
  modules.mkdir()
  (modules / "gate_transform.py").write_text(GATE_MODULE)
  gate_dir = tmp_path / "gate"
  gate_dir.mkdir()
  return str(modules), str(gate_dir)


def _write_inputs(tmp_path, n=2):
  return [
    fbt.write_tfrecord_input(
      str(tmp_path / f"in{i}.tfrecord"), _clients(8, seed=i, prefix=f"job{i}_")
    )
    for i in range(n)
  ]


def _cmd(input_path, output, *extra):
  spec = output + ".spec.json"
  with open(spec, "w") as f:
    json.dump(SPEC, f)
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
    spec,
    "--output",
    output,
    "--transform",
    "gate_transform:make_transform_fn",
    "--num-transformed-clients",
    "8",
    *extra,
  ]


def _start(cmd, modules, log_path, gate_dir=None):
  env = dict(os.environ, PYTHONPATH=modules, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("FEDBEAM_TEST_GATE", None)
  if gate_dir:
    env["FEDBEAM_TEST_GATE"] = gate_dir
  log = open(log_path, "wb")
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_for(path, proc, timeout=180):
  deadline = time.monotonic() + timeout
  while not os.path.exists(path):
    assert proc.poll() is None, f"the job ended before {path} appeared"
    assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
    time.sleep(0.05)


def _data_dirs(output):
  return sorted(n for n in os.listdir(output) if n.startswith(DATA_DIR_PREFIX))


def _client_files(directory):
  return sorted(
    os.path.relpath(os.path.join(d, n), directory)
    for d, _, names in os.walk(directory)
    for n in names
    if n.endswith(".tfrecord")
  )


def _snapshot(directory):
  """(bytes, inode, mtime_ns) of every file under `directory`."""
  out = {}
  for d, _, names in os.walk(directory):
    for n in names:
      path = os.path.join(d, n)
      st = os.stat(path)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = (f.read(), st.st_ino, st.st_mtime_ns)
  return out


def _committed_store(tmp_path, modules, input_path, output):
  proc = _start(_cmd(input_path, output), modules, tmp_path / "first.log")
  assert proc.wait(timeout=300) == 0, open(tmp_path / "first.log").read()
  return read_metadata(output)


# ---------------------------------------------------------------------------
# 1. Two --overwrite jobs to one output
# ---------------------------------------------------------------------------


def test_two_overwrite_jobs_end_with_one_complete_store_and_the_loser_fails(tmp_path, gate):
  modules, gate_dir = gate
  inputs = _write_inputs(tmp_path, 3)
  output = str(tmp_path / "store")
  old = _committed_store(tmp_path, modules, inputs[2], output)
  held = _start(_cmd(inputs[0], output, "--overwrite"), modules, tmp_path / "a.log", gate_dir)
  try:
    _wait_for(os.path.join(gate_dir, "waiting"), held)
    [held_dir] = [d for d in _data_dirs(output) if d != old["data_dir"]]
    written = _client_files(os.path.join(output, held_dir))
    assert len(written) == 2
    # The second job runs to its commit while the first is held.
    other = _start(_cmd(inputs[1], output, "--overwrite"), modules, tmp_path / "b.log")
    assert other.wait(timeout=300) == 0, open(tmp_path / "b.log").read()
    winner = read_metadata(output)
    assert winner["parameters"]["input"] == inputs[1]
    # The winner removed the old store's directory, not the live job's.
    assert _data_dirs(output) == sorted([held_dir, winner["data_dir"]])
    assert _client_files(os.path.join(output, held_dir)) == written
  finally:
    open(os.path.join(gate_dir, "release"), "w").close()
  assert held.wait(timeout=300) == 1
  text = open(tmp_path / "a.log").read()
  assert (
    f"another job committed a store at {output} while this one was writing (it now "
    f"names {winner['data_dir']}); this job's files were not committed"
  ) in text, text
  assert "no store was committed" in text
  assert read_metadata(output) == winner
  assert _data_dirs(output) == [winner["data_dir"]]  # The loser removed its own files.
  report = validate_store(output, deep=True)
  assert report.ok, report.problems
  ids = {r["client_id"] for r in read_manifest(output, winner)}
  assert ids == {f"job1_{i}" for i in range(8)}


def test_a_killed_jobs_directory_is_removed_by_the_next_commit_a_live_ones_never(tmp_path):
  from fedbeam.pipelines import data_dir_lease  # pylint: disable=g-import-not-at-top

  root = str(tmp_path / "store")
  os.makedirs(root)
  live = data_dir_lease.claim_data_dir(root, "a" * 64)
  dead = os.path.join(root, "data-00000000000000ff")
  os.makedirs(os.path.join(dead, "all"))
  open(os.path.join(dead, "all", "x.tfrecord"), "wb").write(b"partial")
  # A lease whose process is gone: the file stays, nobody holds its lock.
  open(os.path.join(dead, LEASE_FILE), "w").write('{"pid": 1}')
  keep = os.path.join(root, "data-0000000000000001")
  os.makedirs(keep)
  with live:
    open(os.path.join(live.path, "part"), "wb").write(b"written")
    removed = data_dir_lease.remove_dead_data_dirs(root, "data-0000000000000001")
    assert removed == ["data-00000000000000ff"]
    assert _data_dirs(root) == sorted(["data-0000000000000001", live.data_dir])
    # A second claim of the same key cannot take the live job's directory.
    with data_dir_lease.claim_data_dir(root, "a" * 64) as second:
      assert second.data_dir != live.data_dir
  # Released: the directory is dead now and goes at the next clean-up.
  assert data_dir_lease.remove_dead_data_dirs(root, "data-0000000000000001") == [live.data_dir]
  assert _data_dirs(root) == ["data-0000000000000001"]


def test_on_object_stores_only_directories_older_than_the_committed_one_are_removed(tmp_path):
  from fedbeam.pipelines import data_dir_lease  # pylint: disable=g-import-not-at-top

  root = str(tmp_path)
  for name, age in (
    ("data-000000000000000a", 300),
    ("data-000000000000000b", 0),
    ("data-000000000000000c", -5),
  ):
    os.makedirs(os.path.join(root, name))
    path = os.path.join(root, name, "f.tfrecord")
    open(path, "wb").write(b"x")
    t = time.time() - 100 - age
    os.utime(path, (t, t))
  # b is committed; a stopped before b started; c is still being written.
  removed = data_dir_lease.remove_dead_data_dirs(root, "data-000000000000000b", object_store=True)
  assert removed == ["data-000000000000000a"]
  assert _data_dirs(root) == ["data-000000000000000b", "data-000000000000000c"]


# ---------------------------------------------------------------------------
# 2. A rerun with the committed store's job key; killed --overwrite (11)
# ---------------------------------------------------------------------------


def test_a_rerun_with_the_same_job_key_never_touches_the_committed_data_dir(tmp_path, gate):
  modules, gate_dir = gate
  [input_path] = _write_inputs(tmp_path, 1)
  output = str(tmp_path / "store")
  old = _committed_store(tmp_path, modules, input_path, output)
  committed = os.path.join(output, old["data_dir"])
  before = _snapshot(committed)
  metadata_before = open(metadata_path(output), "rb").read()
  rerun = _start(_cmd(input_path, output, "--overwrite"), modules, tmp_path / "rerun.log", gate_dir)
  try:
    _wait_for(os.path.join(gate_dir, "waiting"), rerun)
    [fresh] = [d for d in _data_dirs(output) if d != old["data_dir"]]
    assert len(_client_files(os.path.join(output, fresh))) == 2
    assert _snapshot(committed) == before  # Same bytes, inodes and times; nothing added.
    os.kill(rerun.pid, signal.SIGKILL)
  finally:
    rerun.kill()
    rerun.wait()
  assert rerun.returncode == -signal.SIGKILL
  # The killed --overwrite left the old store exactly as it was, and valid.
  assert open(metadata_path(output), "rb").read() == metadata_before
  assert _snapshot(committed) == before
  report = validate_store(output, deep=True)
  assert report.ok, report.problems
  # The next commit removes the killed job's directory (its lease is free).
  proc = _start(_cmd(input_path, output, "--overwrite"), modules, tmp_path / "again.log")
  assert proc.wait(timeout=300) == 0, open(tmp_path / "again.log").read()
  new = read_metadata(output)
  assert _data_dirs(output) == [new["data_dir"]]
  assert new["data_dir"] not in (old["data_dir"], fresh)
  # Same job: the same client bytes under the new directory.
  after = _snapshot(os.path.join(output, new["data_dir"]))
  assert {k: v[0] for k, v in after.items() if k.endswith(".tfrecord")} == {
    k: v[0] for k, v in before.items() if k.endswith(".tfrecord")
  }


def test_job_key_covers_the_fedbeam_version_and_the_transform_code(tmp_path, monkeypatch):
  module = tmp_path / "edited_transform.py"
  module.write_text("def make(raw_client_id, index):\n  return None\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  config = PrepareConfig(
    input="in",
    input_format="tfrecord",
    output="out",
    client_id_key="client_id",
    transform="edited_transform:make",
  )
  inputs = [("in", 10, 1.0)]
  key = job_key(config, inputs)
  assert job_key(config, inputs) == key
  module.write_text("def make(raw_client_id, index):\n  return lambda x: x\n")
  edited = job_key(config, inputs)
  assert edited != key
  monkeypatch.setattr(fedbeam, "__version__", fedbeam.__version__ + ".post1")
  assert job_key(config, inputs) not in (key, edited)


# ---------------------------------------------------------------------------
# 5. Durability
# ---------------------------------------------------------------------------


def _record_fsyncs(monkeypatch, metadata_path):
  """Wraps os.fsync to record (path, metadata.json existed) for every call in this process."""
  calls = []
  real = os.fsync

  def recording(fd):
    calls.append((os.readlink(f"/proc/self/fd/{fd}"), os.path.exists(metadata_path)))
    return real(fd)

  monkeypatch.setattr(os, "fsync", recording)
  return calls


def _record_syncfs(monkeypatch, output):
  """Wraps fedbeam.format.fs._syncfs to record, per call, the store's files at that moment."""
  calls = []
  real = fs_module._syncfs

  def recording(fd):
    calls.append(
      {
        "path": os.readlink(f"/proc/self/fd/{fd}"),
        "committed": os.path.exists(metadata_path(output)),
        "files": {os.path.join(d, n) for d, _, names in os.walk(output) for n in names},
      }
    )
    return real(fd)

  monkeypatch.setattr(fs_module, "_syncfs", recording)
  return calls


def test_every_file_is_made_durable_by_one_syncfs_before_the_commit(tmp_path, monkeypatch):
  output = str(tmp_path / "store")
  fsyncs = _record_fsyncs(monkeypatch, metadata_path(output))
  syncs = _record_syncfs(monkeypatch, output)
  fbt.prepare_store(_clients(), str(tmp_path), element_spec=SPEC)
  metadata = read_metadata(output)
  data = os.path.join(output, metadata["data_dir"])
  files = {os.path.join(d, n) for d, _, names in os.walk(data) for n in names}
  assert len(files) == 7  # 6 clients and 1 manifest file.
  # One syncfs of the data directory's filesystem, after every client and
  # manifest file is in place under its final name and before the commit:
  # it makes their content and every directory entry durable at once.
  assert len(syncs) == 1
  (sync,) = syncs
  assert sync["path"] == data
  assert not sync["committed"]
  # (and the job's lease, removed after the commit)
  assert sync["files"] == files | {os.path.join(data, LEASE_FILE)}
  # The commit itself: the metadata file is fsynced (under its temporary
  # name) before it appears, and the store directory's entry after.
  before = [path for path, committed in fsyncs if not committed]
  assert [os.path.basename(p).split(".tmp-")[0] for p in before] == [
    "." + os.path.basename(metadata_path(output))
  ]
  assert os.path.dirname(before[0]) == output
  assert (output, True) in fsyncs
  # No client or manifest file is fsynced on its own.
  assert not any(p.startswith(data) for p, _ in fsyncs)


def test_sync_failure_fails_the_job_and_commits_nothing(tmp_path, monkeypatch):
  output = str(tmp_path / "store")

  def failing(fd):
    raise OSError(errno.EIO, os.strerror(errno.EIO))

  monkeypatch.setattr(fs_module, "_syncfs", failing)
  with pytest.raises(Exception, match="store not committed: .*cannot make the files under"):
    fbt.prepare_store(_clients(), str(tmp_path), element_spec=SPEC)
  assert not os.path.exists(metadata_path(output))


def test_no_fsync_skips_every_fsync(tmp_path, monkeypatch):
  output = str(tmp_path / "store")
  calls = _record_fsyncs(monkeypatch, metadata_path(output))
  syncs = _record_syncfs(monkeypatch, output)
  fbt.prepare_store(_clients(), str(tmp_path), element_spec=SPEC, fsync=False)
  assert validate_store(output, deep=True).ok
  assert calls == []
  assert syncs == []


# ---------------------------------------------------------------------------
# 11. Disk full and failed jobs
# ---------------------------------------------------------------------------


def _big_input(tmp_path):
  rng = np.random.default_rng(1)
  big = {
    f"c{i}": [
      {"label": np.int32(0), "pixels": rng.random(4096, dtype=np.float32)} for _ in range(10)
    ]
    for i in range(4)
  }
  return fbt.write_tfrecord_input(str(tmp_path / "big.tfrecord"), big)


def _used_bytes(mount):
  st = os.statvfs(mount)
  return (st.f_blocks - st.f_bfree) * st.f_frsize


def _prepare(capsys, input_path, output, *extra):
  code = cli.main(
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
      *extra,
    ]
  )
  return code, capsys.readouterr().err


def test_a_job_that_fills_the_disk_removes_its_files(tmp_path, tiny_disk, capsys):
  output = os.path.join(tiny_disk, "store")
  used = _used_bytes(tiny_disk)
  code, err = _prepare(capsys, _big_input(tmp_path), output)
  assert code == 1 and "No space left on device" in err, err
  assert os.listdir(output) == []  # No data directory, no temporary file.
  assert _used_bytes(tiny_disk) == used


def test_a_failed_overwrite_on_a_full_disk_leaves_the_old_store_valid(tmp_path, tiny_disk, capsys):
  output = os.path.join(tiny_disk, "store")
  fbt.prepare_store(_clients(), str(tmp_path), output=output, element_spec=SPEC)
  before = _files(output)
  code, err = _prepare(capsys, _big_input(tmp_path), output, "--overwrite")
  assert code == 1 and "No space left on device" in err, err
  assert "no store was committed" in err
  assert _files(output) == before
  report = validate_store(output, deep=True)
  assert report.ok, report.problems


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_commit_that_hits_enospc_leaves_no_temporary_file(tiny_disk, overwrite):
  root = os.path.join(tiny_disk, "store")
  os.makedirs(root)
  with open(os.path.join(tiny_disk, "filler"), "wb", buffering=0) as f:
    try:
      while True:
        f.write(b"\0" * 4096)
    except OSError:
      pass  # The disk is full.
  with pytest.raises(StoreWriteError, match="No space left on device"):
    commit_metadata(root, {"padding": "x" * 100_000}, overwrite=overwrite)
  assert os.listdir(root) == []


# ---------------------------------------------------------------------------
# 12. A clean-up that fails after the commit
# ---------------------------------------------------------------------------


@pytest.fixture
def undeletable_leftover(tmp_path):
  """A store with a dead data directory that holds a mount point (rmdir fails: EBUSY)."""
  output = str(tmp_path / "store")
  fbt.prepare_store(_clients(), str(tmp_path), output=output, element_spec=SPEC)
  mount = os.path.join(output, "data-00000000000000ee", "busy")
  os.makedirs(mount)
  result = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mount], capture_output=True, check=False
  )
  if result.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
  yield output
  with open("/proc/mounts") as f:
    mounts = [line.split()[1] for line in f if line.split()[1].startswith(str(tmp_path))]
  for path in mounts:
    subprocess.run(["umount", "-l", path], check=False)


def test_a_failed_clean_up_after_the_commit_says_the_store_was_committed(
  tmp_path, undeletable_leftover, capsys
):
  output = undeletable_leftover
  old = read_metadata(output)["data_dir"]
  input_path = fbt.write_tfrecord_input(str(tmp_path / "new.tfrecord"), _clients(3, seed=5))
  code, err = _prepare(capsys, input_path, output, "--overwrite")
  assert code == 1
  new = read_metadata(output)
  assert new["parameters"]["input"] == input_path and new["data_dir"] != old
  assert f"the store at {output} was committed (its metadata names {new['data_dir']})" in err
  assert "removing data it no longer needs failed" in err and "Device or resource busy" in err
  assert f"the store at {output} was committed and is valid; only the clean-up" in err
  assert "no store was committed" not in err
  report = validate_store(output, deep=True)
  assert report.ok, report.problems
  assert report.num_clients == 3
