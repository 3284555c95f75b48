"""fedbeam.format.fs: whole-or-nothing writes, temporary names, local and remote paths."""

import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from fedbeam.format import fs
from fedbeam.format.fs import atomic_write, is_remote, sync_filesystem, temp_name


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


def test_local_makedirs_is_idempotent_and_the_queries_see_what_was_written(tmp_path):
  fs.makedirs(str(tmp_path / "d"))
  fs.makedirs(str(tmp_path / "d"))  # exists already: no error
  atomic_write(str(tmp_path / "d" / "f"), b"1", fsync=False)
  assert fs.isdir(str(tmp_path / "d")) and fs.exists(str(tmp_path / "d" / "f"))
  assert fs.list_dir(str(tmp_path)) == ["d"]


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
  assert fs.list_dir(directory) == ["file.bin"]


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


# -- The operations of the store, the reader, validation and training ---------
# Local paths through os, URLs through tf.io.gfile: TensorFlow's in-memory
# filesystem (ram://, per process) stands in for gs://.


def _ram(name):
  return f"ram://fedbeam-test-fs-{name}"


def test_local_exists_isdir_list_dir_makedirs_and_open_read(tmp_path):
  root = str(tmp_path)
  fs.makedirs(os.path.join(root, "a", "b"))
  fs.makedirs(os.path.join(root, "a", "b"))  # exists already: no error
  atomic_write(os.path.join(root, "a", "f"), b"data")
  assert fs.exists(os.path.join(root, "a", "f")) and not fs.exists(os.path.join(root, "x"))
  assert fs.isdir(os.path.join(root, "a")) and not fs.isdir(os.path.join(root, "a", "f"))
  assert fs.list_dir(os.path.join(root, "a")) == ["b", "f"]
  with fs.open_read(os.path.join(root, "a", "f")) as f:
    assert f.read() == b"data"
  with fs.open_read(os.path.join(root, "a", "f"), encoding="utf-8") as f:
    assert f.read() == "data"
  with pytest.raises(FileNotFoundError):
    fs.list_dir(os.path.join(root, "x"))
  with pytest.raises(NotADirectoryError):
    fs.list_dir(os.path.join(root, "a", "f"))
  with pytest.raises(FileNotFoundError):
    fs.open_read(os.path.join(root, "x"))
  with pytest.raises(FileExistsError):
    fs.makedirs(os.path.join(root, "a", "f"))


def test_local_file_info_describes_links_and_special_files_without_following_them(tmp_path):
  (tmp_path / "f").write_bytes(b"12345")
  os.symlink(str(tmp_path / "f"), tmp_path / "link")
  os.mkfifo(tmp_path / "fifo")
  info = fs.file_info(str(tmp_path / "f"))
  assert (info.size, info.kind, info.is_file, info.target) == (5, "file", True, None)
  assert info.mtime == os.stat(tmp_path / "f").st_mtime
  link = fs.file_info(str(tmp_path / "link"))
  assert (link.kind, link.is_file, link.target) == ("symbolic link", False, str(tmp_path / "f"))
  assert fs.file_info(str(tmp_path / "link"), follow_links=True) == info
  assert fs.file_info(str(tmp_path / "fifo")).kind == "FIFO"
  assert fs.file_info(str(tmp_path)).kind == "directory"
  with pytest.raises(FileNotFoundError):
    fs.file_info(str(tmp_path / "missing"))


def test_local_walk_files_lists_every_file_at_any_depth_and_prunes(tmp_path):
  os.makedirs(tmp_path / "d" / "e")
  (tmp_path / "top").write_bytes(b"1")
  (tmp_path / "d" / "f").write_bytes(b"22")
  (tmp_path / "d" / "e" / "g").write_bytes(b"333")
  os.symlink("/", tmp_path / "d" / "to-root")  # described, never followed
  os.mkfifo(tmp_path / "d" / "e" / "fifo")
  walked = {rel: (info.kind, info.size) for rel, info in fs.walk_files(str(tmp_path))}
  assert walked == {
    "top": ("file", 1),
    "d/f": ("file", 2),
    "d/e/g": ("file", 3),
    "d/to-root": ("symbolic link", 1),
    "d/e/fifo": ("FIFO", 0),
  }
  assert fs.list_files(str(tmp_path)) == ["d/e/g", "d/f", "top"]
  assert fs.list_files(str(tmp_path) + "/") == ["d/e/g", "d/f", "top"]
  assert fs.list_files(str(tmp_path), prune=lambda rel: rel == "d/e") == ["d/f", "top"]
  assert fs.list_files(str(tmp_path / "missing")) == []


def _walk_closed_directory(root: str) -> None:
  errors = []
  walked = [rel for rel, _ in fs.walk_files(root, onerror=lambda d, e: errors.append(d))]
  assert walked == ["f"] and errors == [os.path.join(root, "closed")]
  with pytest.raises(PermissionError):
    list(fs.walk_files(root))


def test_local_walk_files_reports_a_directory_it_cannot_list_to_onerror():
  # Root lists any directory, so as root the walk runs in a child that has
  # dropped to an unprivileged user.
  root = tempfile.mkdtemp()
  os.chmod(root, 0o755)
  os.makedirs(os.path.join(root, "closed"))
  with open(os.path.join(root, "f"), "wb") as f:
    f.write(b"1")
  os.chmod(os.path.join(root, "closed"), 0)
  try:
    if os.geteuid() != 0:
      _walk_closed_directory(root)
      return
    pid = os.fork()
    if pid == 0:
      code = 1
      try:
        os.setgid(65534)
        os.setuid(65534)
        _walk_closed_directory(root)
        code = 0
      finally:
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the walk as an unprivileged user failed"
  finally:
    os.chmod(os.path.join(root, "closed"), 0o755)
    shutil.rmtree(root)


def test_local_remove_and_remove_tree(tmp_path):
  os.makedirs(tmp_path / "d" / "e")
  (tmp_path / "d" / "e" / "f").write_bytes(b"1")
  (tmp_path / "file").write_bytes(b"1")
  with pytest.raises(IsADirectoryError):
    fs.remove(str(tmp_path / "d"))
  with pytest.raises(NotADirectoryError):
    fs.remove_tree(str(tmp_path / "file"))
  fs.remove(str(tmp_path / "file"))
  fs.remove_tree(str(tmp_path / "d"))
  assert os.listdir(tmp_path) == []
  with pytest.raises(FileNotFoundError):
    fs.remove(str(tmp_path / "file"))
  with pytest.raises(FileNotFoundError):
    fs.remove_tree(str(tmp_path / "d"))


def test_url_exists_isdir_list_dir_file_info_open_read_and_remove():
  root = _ram("ops")
  fs.makedirs(f"{root}/d")
  atomic_write(f"{root}/d/f", b"abc")
  atomic_write(f"{root}/g", b"12")
  assert fs.exists(f"{root}/d/f") and fs.exists(f"{root}/d") and not fs.exists(f"{root}/x")
  assert fs.isdir(f"{root}/d") and not fs.isdir(f"{root}/g")
  assert fs.list_dir(root) == ["d", "g"]
  info = fs.file_info(f"{root}/d/f")
  assert (info.size, info.kind, info.is_file, info.target) == (3, "file", True, None)
  assert fs.file_info(f"{root}/d").kind == "directory"
  with fs.open_read(f"{root}/g") as f:
    assert f.read() == b"12"
  with fs.open_read(f"{root}/g", encoding="utf-8") as f:
    assert f.read() == "12"
  for missing in (fs.file_info, fs.list_dir, fs.open_read, fs.remove, fs.remove_tree):
    with pytest.raises(FileNotFoundError, match=f"{root}/x"):
      missing(f"{root}/x")
  with pytest.raises(NotADirectoryError):
    fs.remove_tree(f"{root}/g")
  fs.remove(f"{root}/g")
  assert not fs.exists(f"{root}/g") and fs.list_dir(root) == ["d"]


def test_url_walk_files_and_list_files_go_to_any_depth_and_prune():
  root = _ram("walk")
  fs.makedirs(f"{root}/data/a/b")
  for rel in ("top", "data/f", "data/a/g", "data/a/b/h"):
    atomic_write(f"{root}/{rel}", rel.encode())
  walked = {rel: (info.kind, info.size) for rel, info in fs.walk_files(root)}
  assert walked == {
    "top": ("file", 3),
    "data/f": ("file", 6),
    "data/a/g": ("file", 8),
    "data/a/b/h": ("file", 10),
  }
  assert fs.list_files(root) == ["data/a/b/h", "data/a/g", "data/f", "top"]
  assert fs.list_files(root, prune=lambda rel: rel == "data/a") == ["data/f", "top"]
  assert fs.list_files(f"{root}/data/a") == ["b/h", "g"]
  assert fs.list_files(_ram("walk-missing")) == []


def test_url_remove_tree_removes_every_object_under_the_prefix():
  root = _ram("remove-tree")
  fs.makedirs(f"{root}/dir/a/b")
  for rel in ("dir/f", "dir/a/g", "dir/a/b/h", "dir-sibling/f", "other"):
    atomic_write(f"{root}/{rel}", b"x")
  fs.remove_tree(f"{root}/dir")
  # (ram:// says "dir" exists while "dir-sibling" does: it matches names by prefix.)
  for rel in ("dir/f", "dir/a", "dir/a/g", "dir/a/b/h"):
    assert not fs.exists(f"{root}/{rel}"), rel
  assert fs.exists(f"{root}/dir-sibling/f") and fs.exists(f"{root}/other")


def test_url_remove_tree_removes_objects_under_directories_no_object_marks():
  # An object store has no directories: objects written under a/b/ make "a" and
  # "a/b" exist without a marker (ram:// does not list such directories).
  root = _ram("remove-prefix")
  for rel in ("dir/f", "dir/a/g", "dir/a/b/h", "keep"):
    atomic_write(f"{root}/{rel}", b"x")
  assert fs.isdir(f"{root}/dir/a")
  fs.remove_tree(f"{root}/dir")
  for rel in ("dir", "dir/f", "dir/a/g", "dir/a/b/h"):
    assert not fs.exists(f"{root}/{rel}"), rel
  assert fs.exists(f"{root}/keep")


def test_the_filesystem_operations_of_a_local_path_do_not_import_tensorflow(tmp_path):
  script = textwrap.dedent(f"""
      import os, sys
      from fedbeam.format import fs
      root = {str(tmp_path)!r}
      fs.makedirs(os.path.join(root, "d"))
      fs.atomic_write(os.path.join(root, "d", "f"), b"x")
      assert fs.exists(root) and fs.isdir(root) and fs.list_dir(root) == ["d"]
      assert fs.list_files(root) == ["d/f"] and fs.file_info(os.path.join(root, "d", "f")).is_file
      with fs.open_read(os.path.join(root, "d", "f")) as f:
        f.read()
      fs.remove(os.path.join(root, "d", "f"))
      fs.remove_tree(os.path.join(root, "d"))
      print("tensorflow" in sys.modules)
      """)
  out = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
  ).stdout
  assert out.strip().splitlines()[-1] == "False"


def test_every_public_function_is_documented_and_exported():
  for name in fs.__all__:
    assert getattr(fs, name).__doc__, name
  for name in ("exists", "isdir", "list_dir", "list_files", "walk_files", "file_info"):
    assert name in fs.__all__
  for name in ("open_read", "makedirs", "remove", "remove_tree", "FileInfo"):
    assert name in fs.__all__


def test_a_store_prepared_to_a_url_loads_back_and_validates(tmp_path):
  # The whole store goes through the URL branch: the in-process runner with
  # one worker shares this process's ram:// filesystem.
  import numpy as np  # pylint: disable=g-import-not-at-top

  from fedbeam import testing  # pylint: disable=g-import-not-at-top
  from fedbeam.store_validation import validate_store  # pylint: disable=g-import-not-at-top

  clients = {
    f"c{i}": [{"x": np.array([float(i), float(j)], np.float32)} for j in range(i + 1)]
    for i in range(3)
  }
  out = testing.prepare_store(
    clients,
    tmp_path,
    output=_ram("store") + "/out",
    beam_args=["--direct_num_workers=1", "--direct_running_mode=in_memory"],
  )
  assert fs.exists(f"{out}/metadata.json")
  back = testing.read_store(out)
  assert sorted(back) == ["c0", "c1", "c2"]
  for cid, elements in clients.items():
    assert sorted(e["x"].tolist() for e in back[cid]) == [e["x"].tolist() for e in elements]
  report = validate_store(out)
  assert report.problems == []


def test_walk_files_reports_a_path_it_cannot_list_to_onerror_or_raises(tmp_path):
  (tmp_path / "f").write_bytes(b"1")
  errors = []
  walked = list(fs.walk_files(str(tmp_path / "f"), onerror=lambda d, e: errors.append((d, e))))
  assert walked == [] and [(d, type(e)) for d, e in errors] == [
    (str(tmp_path / "f"), NotADirectoryError)
  ]
  with pytest.raises(NotADirectoryError):
    list(fs.walk_files(str(tmp_path / "f")))
