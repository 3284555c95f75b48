"""fedbeam.format.fs: whole-or-nothing writes, temporary names, local and remote paths."""

import errno
import os
import re

import pytest

from fedbeam.format import fs
from fedbeam.format.fs import atomic_write, file_ops, is_remote, sync_filesystem, temp_name


def test_atomic_write_writes_bytes_or_pieces_and_returns_the_size(tmp_path):
  path = str(tmp_path / "a" / "b" / "file.bin")  # parents are created
  assert atomic_write(path, b"hello") == 5
  assert open(path, "rb").read() == b"hello"
  assert atomic_write(path, (p for p in [b"new ", b"", b"content"])) == 11
  assert open(path, "rb").read() == b"new content"
  assert sorted(os.listdir(tmp_path / "a" / "b")) == ["file.bin"]


def test_atomic_write_that_fails_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
  path = str(tmp_path / "file.bin")
  atomic_write(path, b"old")

  def pieces():
    yield b"partial"
    raise RuntimeError("source failed")

  with pytest.raises(RuntimeError, match="source failed"):
    atomic_write(path, pieces())
  assert open(path, "rb").read() == b"old"
  assert os.listdir(tmp_path) == ["file.bin"]


def test_atomic_write_fsyncs_the_content_before_the_rename_unless_told_not_to(
  tmp_path, monkeypatch
):
  path = str(tmp_path / "file.bin")
  calls = []
  real_fsync, real_replace = os.fsync, os.replace
  monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
  monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
  atomic_write(path, b"x")
  assert calls == ["fsync", "replace"]
  calls.clear()
  atomic_write(path, b"y", fsync=False)
  assert calls == ["replace"]
  assert open(path, "rb").read() == b"y"


def test_temp_name_is_a_fresh_hidden_name_beside_the_final_one():
  first, second = temp_name("gs://b/store/metadata.json"), temp_name("gs://b/store/metadata.json")
  assert first != second
  assert re.fullmatch(r"gs://b/store/\.metadata\.json\.tmp-[0-9a-f]{32}", first), first
  assert re.fullmatch(r"\.x\.tmp-[0-9a-f]{32}", temp_name("x"))


def test_is_remote_tells_urls_from_local_paths():
  assert is_remote("gs://bucket/store") and is_remote("s3://b/x")
  assert not is_remote("/tmp/store") and not is_remote("relative/dir")
  assert not is_remote("/tmp/odd:name")


def test_file_ops_of_a_local_path_use_the_os_module(tmp_path):
  fs = file_ops(str(tmp_path))
  fs.makedirs(str(tmp_path / "d"))
  fs.makedirs(str(tmp_path / "d"))  # exists already: no error
  with fs.open(str(tmp_path / "d" / "f"), "wb") as f:
    f.write(b"1")
  assert fs.isdir(str(tmp_path / "d")) and fs.exists(str(tmp_path / "d" / "f"))
  assert fs.listdir(str(tmp_path)) == ["d"]


def test_atomic_write_to_a_url_goes_through_tf_gfile_whole_or_not_at_all():
  # TensorFlow's in-memory filesystem stands in for gs://: same gfile calls, no network.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  directory = "ram://fedbeam-test-atomic-write"
  path = f"{directory}/file.bin"
  assert atomic_write(path, b"old") == 3
  assert atomic_write(path, [b"new", b"er"]) == 5

  def pieces():
    yield b"partial"
    raise RuntimeError("source failed")

  with pytest.raises(RuntimeError, match="source failed"):
    atomic_write(path, pieces())
  with tf.io.gfile.GFile(path, "rb") as f:
    assert f.read() == b"newer"
  assert file_ops(directory).listdir(directory) == ["file.bin"]


def test_sync_filesystem_syncs_the_filesystem_holding_a_local_directory(tmp_path, monkeypatch):
  synced = []
  real = fs._syncfs
  monkeypatch.setattr(fs, "_syncfs", lambda fd: (synced.append(os.fstat(fd).st_dev), real(fd))[1])
  (tmp_path / "f").write_bytes(b"x")
  sync_filesystem(str(tmp_path))
  assert synced == [os.stat(tmp_path).st_dev]


def test_sync_filesystem_names_the_path_on_a_write_error_and_on_a_missing_path(
  tmp_path, monkeypatch
):
  with pytest.raises(FileNotFoundError, match="missing"):
    sync_filesystem(str(tmp_path / "missing"))

  def failing(fd):
    raise OSError(errno.EIO, os.strerror(errno.EIO))

  monkeypatch.setattr(fs, "_syncfs", failing)
  with pytest.raises(OSError, match=f"cannot make the files under {tmp_path}.*Input/output"):
    sync_filesystem(str(tmp_path))


def test_sync_filesystem_does_nothing_for_an_object_store_url(monkeypatch):
  monkeypatch.setattr(fs, "_syncfs", lambda fd: pytest.fail("synced a URL"))
  sync_filesystem("gs://bucket/store/data-x")
