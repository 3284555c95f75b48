"""Writes a store: one TFRecord file per client, the Avro manifest, then the metadata.

Every file is written to a temporary name beside its final one and renamed
into place, so a retried bundle replaces a file whole and never leaves a
partial or duplicate client. Files go to the job's own data directory
(`data-<job key>`); a sweep per shard directory removes temporary files a
killed worker left behind. The metadata file, which commits the store, is
written by the last step, which depends (through side inputs) on every
manifest file, every sweep and so on every client file. The commit succeeds
only if the store at the output is still the one the job found (none, without
`overwrite`): when another job committed first, this one fails and removes its
files. On local disks one `syncfs` makes every file and directory durable
before the commit (`fedbeam.format.fs.sync_filesystem`).
After it, dead data directories are removed (`data_dir_lease`: never one a
live job holds).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from typing import Any, Iterable, Mapping, Optional
import zlib

import apache_beam as beam
import google_crc32c

import fedbeam
from fedbeam.format import fs
from fedbeam.format.fs import atomic_write, sync_filesystem, temp_name
from fedbeam.format.layout import (
  FORMAT_VERSION,
  ID_ENCODING,
  MANIFEST_DIR,
  MANIFEST_SPEC_KEY,
  METADATA_FILE,
  client_relative_path,
  data_dir_name,
  default_num_shards,
  join,
)
from fedbeam.format.manifest import manifest_file_name, manifest_spec_value, manifest_sync_marker
from fedbeam.format.metadata import (
  metadata_path,
  metadata_to_json,
  parsed_schema,
  validate_metadata,
)
from fedbeam.format.spec import ElementSpec
from fedbeam.format.tfrecord import tfrecord_frames
from fedbeam.pipelines.data_dir_lease import committed_state, is_object_store, remove_dead_data_dirs
from fedbeam.pipelines.progress import CLIENTS_WRITTEN, CountProgress, ProgressChannel
from fedbeam.pipelines.records import ClientRecords

__all__ = [
  "MANIFEST_ROWS_PER_FILE",
  "EMPTY_SAMPLE_SIZE",
  "StoreWriteError",
  "write_file_atomically",
  "sweep_directory",
  "StoreStatsFn",
  "RUNNER_FAULT",
  "check_planned_splits",
  "REPLACES_ANY",
  "CleanupError",
  "commit_metadata",
  "remove_other_data_dirs",
  "clean_up_after_commit",
  "WriteStore",
]

# Manifest rows per manifest file (the file count follows the client count).
MANIFEST_ROWS_PER_FILE = 100_000
# Ids of empty clients kept in the metadata's report.
EMPTY_SAMPLE_SIZE = 20


class StoreWriteError(RuntimeError):
  """The store could not be written (I/O failure, or two ids mapping to one file)."""


_PIECE_BYTES = 4 << 20


def _pieces(chunks: Iterable[bytes]) -> Iterable[bytes]:
  # Records are a few KB; one write and one CRC update per record cost more
  # than the copy that joins them into pieces of a few MB.
  batch, size = [], 0
  for chunk in chunks:
    batch.append(chunk)
    size += len(chunk)
    if size >= _PIECE_BYTES:
      yield b"".join(batch)
      batch, size = [], 0
  if batch:
    yield b"".join(batch)


def _fsync_directory(directory: str) -> None:
  """Makes the entries (names) of a local directory durable; a no-op on object stores."""
  if is_object_store(directory):
    return
  fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_file_atomically(
  final_path: str, chunks: Iterable[bytes], fsync: bool = True
) -> tuple[int, int]:
  """Writes `chunks` to `final_path` with `fedbeam.format.fs.atomic_write`.

  A temporary file beside it is renamed into place; with `fsync` (local
  paths only) its content reaches the disk first, and the directory entry is
  made durable by the caller (`_fsync_directory`). Client and manifest files
  are written with `fsync=False`: the commit makes them durable all at once
  (`sync_filesystem`). A failure deletes the temporary file.

  Returns (number of bytes, CRC32C of the content).

  Raises:
    StoreWriteError: the file could not be written (naming `final_path`).
  """
  crc = google_crc32c.Checksum()

  def checked(pieces):
    for piece in pieces:
      crc.update(piece)
      yield piece

  try:
    size = atomic_write(final_path, checked(_pieces(chunks)), fsync=fsync)
  except Exception as e:
    raise StoreWriteError(f"cannot write {final_path}: {e}") from e
  return size, int.from_bytes(crc.digest(), "big")


class _WriteClientFile(beam.DoFn):
  """ClientRecords -> manifest row (dict), after writing the client's file."""

  def __init__(self, root: str, data_dir: str):
    self._root = root
    self._data_dir = data_dir
    self._clients = beam.metrics.Metrics.counter("fedbeam", "clients_written")
    self._examples = beam.metrics.Metrics.counter("fedbeam", "examples_written")
    self._bytes = beam.metrics.Metrics.counter("fedbeam", "bytes_written")

  def process(self, client: ClientRecords, num_shards: int) -> Iterable[dict[str, Any]]:
    rel = client_relative_path(client.client_id, client.split, num_shards)
    rel = posixpath.join(self._data_dir, rel)
    # Durable later, with every other file, by the commit's sync_filesystem.
    size, crc = write_file_atomically(
      join(self._root, rel), tfrecord_frames(client.records), fsync=False
    )
    self._clients.inc()
    self._examples.inc(len(client.records))
    self._bytes.inc(size)
    yield {
      "client_id": client.client_id,
      "split": client.split,
      "raw_client_id": client.raw_client_id,
      "pseudo_index": int(client.pseudo_index),
      "num_examples": len(client.records),
      "num_bytes": size,
      "path": rel,
      "crc32c": crc,
    }


def _manifest_bucket(client_id: str, num_files: int) -> int:
  return zlib.crc32(client_id.encode("utf-8")) % num_files


class _WriteManifestFile(beam.DoFn):
  def __init__(self, root: str, data_dir: str, job_key: str):
    self._root = root
    self._data_dir = data_dir
    self._job_key = job_key

  def process(self, element, num_files: int, spec: ElementSpec) -> Iterable[str]:
    import io  # pylint: disable=g-import-not-at-top

    import fastavro  # pylint: disable=g-import-not-at-top

    index, rows = element
    # By id, then split: a store of kept TFF splits holds an id in several splits.
    rows = sorted((r for r in rows if r is not None), key=lambda r: (r["client_id"], r["split"]))
    buf = io.BytesIO()
    # The element spec also goes into each manifest file's header: a reader
    # compares it with the metadata's, so a dtype or shape edited in
    # metadata.json (same bytes, other values) is caught.
    fastavro.writer(
      buf,
      parsed_schema("manifest"),
      rows,
      codec="null",
      sync_marker=manifest_sync_marker(self._job_key, index),
      metadata={MANIFEST_SPEC_KEY: manifest_spec_value(spec)},
    )
    name = manifest_file_name(index, num_files)
    write_file_atomically(
      join(self._root, self._data_dir, MANIFEST_DIR, name), [buf.getvalue()], fsync=False
    )
    yield name


def _entries_in(directory: str) -> list[str]:
  """Names of the entries directly in `directory` (hidden ones too); none if it is missing."""
  try:
    return fs.list_dir(directory)
  except FileNotFoundError:
    return []


def sweep_directory(directory: str, keep: Iterable[str]) -> list[str]:
  """Deletes files in `directory` whose names are not in `keep`; returns their names.

  Clears what a killed worker or an earlier run of the same job left behind
  (temporary files, clients that are not in this run's manifest).
  Subdirectories are left alone.
  """
  keep = set(keep)
  stray = []
  for name in _entries_in(directory):
    path = join(directory, name)
    if name not in keep and not fs.isdir(path):  # asked of strays only: one request each remotely
      fs.remove(path)
      stray.append(name)
  return stray


class _SweepShardDirectory(beam.DoFn):
  """(shard directory, file names) -> number of stray files removed."""

  def __init__(self, root: str):
    self._root = root
    self._swept = beam.metrics.Metrics.counter("fedbeam", "stray_files_removed")

  def process(self, element):
    directory, names = element
    removed = sweep_directory(join(self._root, directory), names)
    self._swept.inc(len(removed))
    yield len(removed)


def _check_no_path_collision(element):
  path, ids = element
  ids = sorted(set(ids))
  if len(ids) > 1:
    raise StoreWriteError(
      f"client ids {ids!r} map to the same file {path}; fedbeam cannot store both (shorten the ids)"
    )
  return path


class StoreStatsFn(beam.CombineFn):
  """Manifest rows -> {"splits": {name: counts}, "num_clients", "empty": {count, sample}}."""

  def create_accumulator(self) -> dict[str, Any]:
    return {"splits": {}, "empty_count": 0, "empty_sample": []}

  def add_input(self, acc: dict[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    s = acc["splits"].setdefault(row["split"], [0, 0, 0, 0])
    s[0] += 1
    s[1] += row["num_examples"]
    s[2] += row["num_bytes"]
    if row["num_examples"] == 0:
      s[3] += 1
      acc["empty_count"] += 1
      acc["empty_sample"] = sorted(acc["empty_sample"] + [row["client_id"]])[:EMPTY_SAMPLE_SIZE]
    return acc

  def merge_accumulators(self, accs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    out = self.create_accumulator()
    for acc in accs:
      for name, counts in acc["splits"].items():
        s = out["splits"].setdefault(name, [0, 0, 0, 0])
        for i in range(4):
          s[i] += counts[i]
      out["empty_count"] += acc["empty_count"]
      out["empty_sample"] = sorted(out["empty_sample"] + acc["empty_sample"])[:EMPTY_SAMPLE_SIZE]
    return out

  def extract_output(self, acc: dict[str, Any]) -> dict[str, Any]:
    return acc


# The end of every message of a check that found a runner fault.
RUNNER_FAULT = "the runner lost or duplicated data, so the store was not committed (rerun the job)"


def check_planned_splits(planned: Mapping[str, Any], written: Mapping[str, Any]) -> None:
  """Raises StoreWriteError unless every split holds the clients and examples planned.

  `planned` and `written` are `StoreStatsFn` outputs: over the sizes the job
  planned for each client (from the raw sizes, the expansion plan and the
  split's choice) and over the manifest rows of the files written.
  """
  none = [0, 0, 0, 0]
  for name in sorted(set(planned["splits"]) | set(written["splits"])):
    want = planned["splits"].get(name, none)
    got = written["splits"].get(name, none)
    if tuple(want[:2]) != tuple(got[:2]):
      raise StoreWriteError(
        f"split {name!r}: wrote {got[0]} clients with {got[1]} examples but the job planned "
        f"{want[0]} clients with {want[1]} examples; {RUNNER_FAULT}"
      )


def _merge_reports(parameters: Mapping[str, Any], reports) -> dict[str, Any]:
  """Job parameters plus what steps resolved at run time (e.g. the number of test clients).

  Resolved keys follow the parameters in sorted order: the reports arrive in
  whatever order the runner delivers them, and the metadata's bytes must not
  depend on it.
  """
  merged = dict(parameters)
  resolved: dict[str, Any] = {}
  for report in reports:
    resolved.update(report)
  for key in sorted(resolved):
    merged[key] = resolved[key]
  return merged


# `replaces` of a commit that replaces whatever store is there (no check).
REPLACES_ANY = "*"


class CleanupError(StoreWriteError):
  """The store was committed, but removing what it no longer needs failed."""


class _RootLock:
  """An exclusive flock on a local store directory, held while a commit checks and writes.

  The kernel drops it when the process dies, so a killed commit never blocks
  the next one. Object stores get no lock (see `commit_metadata`).
  """

  def __init__(self, root: str):
    self._root = root
    self._fd = None

  def __enter__(self):
    if not is_object_store(self._root):
      import fcntl  # pylint: disable=g-import-not-at-top

      self._fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY)
      fcntl.flock(self._fd, fcntl.LOCK_EX)
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def _remove_temp_metadata(root: str) -> None:
  """Deletes top-level temporary metadata files (of killed commits; callers hold the lock)."""
  for name in _list_directory(root):
    if name.startswith(f".{METADATA_FILE}.tmp-"):
      fs.remove(join(root, name))


def _write_metadata(root: str, data: bytes, exclusive: bool, fsync: bool) -> None:
  """Writes metadata.json from a temporary file; `exclusive`: fail if it exists (local only)."""
  final = metadata_path(root)
  if is_object_store(root) or not exclusive:
    write_file_atomically(final, [data], fsync=fsync)
  else:
    tmp = temp_name(final)
    try:
      with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        if fsync:
          os.fsync(f.fileno())
      os.link(tmp, final)
    except OSError as e:
      if isinstance(e, FileExistsError):
        raise
      raise StoreWriteError(f"cannot write {final}: {e}") from e
    finally:
      try:
        os.unlink(tmp)
      except FileNotFoundError:
        pass
  if fsync:
    _fsync_directory(root)


def commit_metadata(
  root: str,
  metadata: Mapping[str, Any],
  overwrite: bool,
  replaces: Optional[str] = REPLACES_ANY,
  fsync: bool = True,
) -> None:
  """Writes `root/metadata.json`, the commit point of a store.

  The commit succeeds only if the store at `root` is still the one the job
  found when it started: `replaces` is the SHA-256 of the metadata.json it
  found (None: it found none; `REPLACES_ANY`: no check). Without `overwrite`
  the job must have found none. On local disks the check and the write run
  under an exclusive lock on `root`, and without `overwrite` the file is
  created through a hard link, which fails atomically when it exists. Object
  stores (no lock, no exclusive create through tf.io.gfile) check
  first and then write, which leaves a window of one write.

  A commit that finds its own metadata already in place (a retried commit)
  succeeds. Top-level temporary metadata files of killed commits are removed.

  Raises:
    StoreWriteError: another job committed a store at `root` first, or the
      file could not be written (no temporary file is left).
  """
  data = metadata_to_json(metadata)
  expected = None if not overwrite else replaces

  def taken(what):
    return StoreWriteError(
      f"another job committed a store at {root} while this one was writing ({what}); this "
      "job's files were not committed (rerun the job, with --overwrite to replace that store)"
    )

  with _RootLock(root):
    found_dir, found = committed_state(root)
    if found == hashlib.sha256(data).hexdigest():
      return  # This job's own commit, retried.
    if expected != REPLACES_ANY and found != expected:
      raise taken(f"it now names {found_dir}" if found is not None else "and it is gone")
    try:
      _write_metadata(root, data, exclusive=expected is None, fsync=fsync)
    except FileExistsError:
      raise taken("it appeared during the commit") from None
    finally:
      if not is_object_store(root):
        _remove_temp_metadata(root)


def _list_directory(directory: str) -> list[str]:
  """Names of the entries (files and directories, hidden ones too) of `directory`."""
  return fs.list_dir(directory) if fs.isdir(directory) else []


def remove_other_data_dirs(root: str, keep: str) -> list[str]:
  """Deletes the data directories of `root` no job needs any more; returns their names.

  See `fedbeam.pipelines.data_dir_lease.remove_dead_data_dirs`: directories
  of live jobs (and `keep`) stay.
  """
  return remove_dead_data_dirs(root, keep)


def clean_up_after_commit(root: str, data_dir: str) -> list[str]:
  """Removes dead data directories after `data_dir` was committed at `root`.

  Raises:
    CleanupError: something could not be deleted; the message says that the
      store was committed and what is left.
  """
  try:
    removed = remove_other_data_dirs(root, data_dir)
    if is_object_store(root):  # Local commits remove them under their lock.
      _remove_temp_metadata(root)
  except Exception as e:  # pylint: disable=broad-except
    raise CleanupError(
      f"the store at {root} was committed (its metadata names {data_dir}), but removing "
      f"data it no longer needs failed: {e}; delete leftover data-* directories other than "
      f"{data_dir} by hand, or let the next job that commits there remove them"
    ) from e
  return removed


class _CommitStore(beam.DoFn):
  """Writes metadata.json last, then removes other jobs' data directories."""

  def __init__(
    self,
    root: str,
    data_dir: str,
    parameters: Mapping[str, Any],
    empty_policy: str,
    overwrite: bool,
    replaces: Optional[str] = REPLACES_ANY,
    fsync: bool = True,
  ):
    self._root = root
    self._data_dir = data_dir
    self._parameters = dict(parameters)
    self._empty_policy = empty_policy
    self._overwrite = overwrite
    self._replaces = replaces
    self._fsync = fsync

  def process(
    self,
    _,
    stats,
    spec: ElementSpec,
    num_shards: int,
    manifest_files,
    empty_report: Optional[Mapping[str, Any]] = None,
    reports=(),
    swept=(),
    expected_clients: Optional[int] = None,
    planned_splits: Optional[Mapping[str, Any]] = None,
    input_records: Optional[int] = None,
  ):
    # Each figure below comes from a step other than the writer's, whose
    # manifest rows `stats` sums: a runner that loses or duplicates output
    # cannot make both sides agree.
    written = sum(c[0] for c in stats["splits"].values())
    if input_records and not written:
      raise StoreWriteError(
        f"the readers read {input_records} input records but no client file was written; "
        f"{RUNNER_FAULT}"
      )
    if expected_clients is not None:
      dropped = int((empty_report or {}).get("dropped", 0))
      if written != expected_clients - dropped:
        raise StoreWriteError(
          f"wrote {written} client files but the job makes {expected_clients - dropped} "
          f"clients ({expected_clients} planned, {dropped} dropped as empty); {RUNNER_FAULT}"
        )
    if planned_splits is not None:
      check_planned_splits(planned_splits, stats)
    splits = [
      {
        "name": name,
        "num_clients": c[0],
        "num_examples": c[1],
        "num_bytes": c[2],
        "num_empty_clients": c[3],
      }
      for name, c in sorted(stats["splits"].items())
    ]
    report = dict(empty_report or {})
    metadata = {
      "format_version": FORMAT_VERSION,
      "fedbeam_version": fedbeam.__version__,
      "element_spec": spec.to_metadata(),
      "data_dir": self._data_dir,
      "id_encoding": ID_ENCODING,
      "num_shards": int(num_shards),
      "manifest": {"num_files": len(manifest_files)},
      "splits": splits,
      "empty_clients": {
        "found": int(report.get("found", stats["empty_count"])),
        "policy": report.get("policy", self._empty_policy),
        "dropped": int(report.get("dropped", 0)),
        "sample": list(report.get("sample", stats["empty_sample"])),
      },
      "parameters": _merge_reports(self._parameters, reports),
    }
    validate_metadata(metadata, "new store metadata")
    self._commit(metadata)
    clean_up_after_commit(self._root, self._data_dir)
    yield metadata

  def _commit(self, metadata: Mapping[str, Any]) -> None:
    """Sweeps the manifest directory, makes the data durable, commits the metadata.

    Durability is one `sync_filesystem` of the data directory here, after
    every client and manifest file is in place under its final name (this
    step waits for them all through its side inputs), rather than an fsync
    per file in the workers: syncfs covers the files the workers wrote and
    every directory entry, and the commit below is written only after it
    returns, so a power loss leaves a complete store or none.
    """
    data = join(self._root, self._data_dir)
    num_files = metadata["manifest"]["num_files"]
    sweep_directory(
      join(data, MANIFEST_DIR), [manifest_file_name(i, num_files) for i in range(num_files)]
    )
    if self._fsync:
      try:
        sync_filesystem(data)
      except OSError as e:
        raise StoreWriteError(f"store not committed: {e}") from e
    try:
      commit_metadata(self._root, metadata, self._overwrite, self._replaces, fsync=self._fsync)
    except StoreWriteError:
      # Another job won; remove this job's files unless the winner is this
      # very job (a retried commit).
      if committed_state(self._root)[0] != self._data_dir and fs.exists(data):
        fs.remove_tree(data)
      raise


class WriteStore(beam.PTransform):
  """Writes `ClientRecords` (with their split set) as a committed store at `root`.

  Files go to `root/<data_dir>`; `data_dir` defaults to the one
  `data_dir_name(job_key)` names. With `overwrite` the commit replaces an
  existing metadata file; without it, an existing one fails the job.

  Input: PCollection[ClientRecords]. Side data: `spec` (singleton
  PCollection[ElementSpec]); optional `empty_report` singleton (the empty
  client check's report). `num_shards` None picks one shard directory per
  ~4096 clients. Output: singleton PCollection with the metadata dict.
  The caller prepares `root` (see `fedbeam.pipelines.prepare`).
  """

  def __init__(
    self,
    root: str,
    spec: beam.PCollection[ElementSpec],
    *,
    num_shards: Optional[int] = None,
    parameters: Optional[Mapping[str, Any]] = None,
    job_key: str = "",
    empty_report: Optional[beam.PCollection[dict[str, Any]]] = None,
    empty_policy: str = "keep",
    reports: Iterable[beam.PCollection[dict[str, Any]]] = (),
    overwrite: bool = False,
    planned_clients: Optional[beam.PCollection[int]] = None,
    planned_splits: Optional[beam.PCollection[dict[str, Any]]] = None,
    input_records: Optional[beam.PCollection[int]] = None,
    data_dir: Optional[str] = None,
    replaces: Optional[str] = REPLACES_ANY,
    fsync: bool = True,
    progress: Optional[ProgressChannel] = None,
  ):
    """`planned_clients`: optional PCollection[int] of at most one element
    (none: 0), the number of clients the job makes before empty ones are
    dropped, known without counting `clients` (which would hold every client
    back until the count is done). It picks the default shard count, and the
    commit fails unless that many files (less the dropped ones) were written.
    `planned_splits`: optional `StoreStatsFn` output over the clients'
    planned sizes, at most one element (none: no planned client); the commit
    fails unless every split holds the planned clients and examples
    (`check_planned_splits`).

    The figures the commit checks are side inputs with a default for an
    empty PCollection (`beam.CombineGlobally(...).without_defaults()` feeds
    them), which saves the runner a stage per figure; an empty figure is the
    same as a zero one, as a default-injecting CombineGlobally would make it.
    `input_records`: optional singleton PCollection[int], the records the
    input's readers read; the commit fails if they are not 0 and no client
    file was written.

    `data_dir` and `replaces` come from `data_dir_lease.claim_data_dir`: the
    job's data directory and the SHA-256 of the metadata it found (None: no
    store); the commit fails if another job committed meanwhile.
    `REPLACES_ANY` skips that check. `fsync`: make files and directories
    durable before the commit (local disks: one `sync_filesystem`; the
    metadata file and the store directory are then fsynced). `progress`: a local
    `ProgressChannel` that counts the client files written as they are."""
    super().__init__()
    self._planned_clients = planned_clients
    self._planned_splits = planned_splits
    self._input_records = input_records
    self._overwrite = overwrite
    self._data_dir = data_dir or data_dir_name(
      hashlib.sha256(job_key.encode()).hexdigest() if len(job_key) < 16 else job_key
    )
    self._replaces = replaces
    self._fsync = fsync
    self._progress = progress
    self._reports = list(reports)
    self._root = root
    self._spec = spec
    self._num_shards = num_shards
    self._parameters = dict(parameters or {})
    self._job_key = job_key
    self._empty_report = empty_report
    self._empty_policy = empty_policy

  def expand(self, clients: beam.PCollection[ClientRecords]) -> beam.PCollection[dict[str, Any]]:
    root = self._root
    p = clients.pipeline
    num_clients = clients | "CountClients" >> beam.combiners.Count.Globally()
    if self._num_shards is None:
      basis = num_clients if self._planned_clients is None else self._planned_clients
      num_shards = basis | "PickNumShards" >> beam.Map(default_num_shards)
      no_shards = default_num_shards(0)
    else:
      fixed = self._num_shards
      num_shards = p | "NumShards" >> beam.Create([fixed])
      no_shards = fixed
    data_dir = self._data_dir
    rows = clients | "WriteClientFiles" >> beam.ParDo(
      _WriteClientFile(root, data_dir), beam.pvalue.AsSingleton(num_shards, default_value=no_shards)
    )
    if self._progress is not None:
      _ = rows | "ReportWritten" >> beam.ParDo(CountProgress(self._progress, CLIENTS_WRITTEN))
    swept = (
      rows
      | "KeyByShardDirectory"
      >> beam.Map(lambda r: (posixpath.dirname(r["path"]), posixpath.basename(r["path"])))
      | "GroupByShardDirectory" >> beam.GroupByKey()
      | "SweepShardDirectories" >> beam.ParDo(_SweepShardDirectory(root))
    )

    # Only long ids are named by a hash; check those never share a file.
    collisions = (
      rows
      | "LongIdPaths" >> beam.Filter(lambda r: "~" in r["path"])
      | "KeyByPath" >> beam.Map(lambda r: (r["path"], r["client_id"]))
      | "GroupByPath" >> beam.GroupByKey()
      | "CheckPaths" >> beam.Map(_check_no_path_collision)
    )

    num_files = num_clients | "PickManifestFiles" >> beam.Map(
      lambda n: max(1, -(-n // MANIFEST_ROWS_PER_FILE))
    )
    all_buckets = num_files | "EveryManifestFile" >> beam.FlatMap(
      lambda n: [(i, None) for i in range(n)]
    )
    keyed_rows = rows | "KeyByManifestFile" >> beam.Map(
      lambda r, n: (_manifest_bucket(r["client_id"], n), r), beam.pvalue.AsSingleton(num_files)
    )
    manifest_files = (
      (keyed_rows, all_buckets)
      | "MergeManifestRows" >> beam.Flatten()
      | "GroupManifestRows" >> beam.GroupByKey()
      | "WriteManifestFiles"
      >> beam.ParDo(
        _WriteManifestFile(root, data_dir, self._job_key),
        beam.pvalue.AsSingleton(num_files),
        beam.pvalue.AsSingleton(self._spec),
      )
    )
    stats = rows | "Stats" >> beam.CombineGlobally(StoreStatsFn()).without_defaults()
    no_rows = StoreStatsFn().create_accumulator()
    side = dict(
      stats=beam.pvalue.AsSingleton(stats, default_value=no_rows),
      spec=beam.pvalue.AsSingleton(self._spec),
      num_shards=beam.pvalue.AsSingleton(num_shards, default_value=no_shards),
      manifest_files=beam.pvalue.AsList(manifest_files),
      swept=beam.pvalue.AsList(swept),
    )
    if self._empty_report is not None:
      side["empty_report"] = beam.pvalue.AsSingleton(self._empty_report)
    if self._planned_clients is not None:
      # Fewer files than planned means the runner lost data.
      side["expected_clients"] = beam.pvalue.AsSingleton(self._planned_clients, default_value=0)
    if self._planned_splits is not None:
      side["planned_splits"] = beam.pvalue.AsSingleton(self._planned_splits, default_value=no_rows)
    if self._input_records is not None:
      side["input_records"] = beam.pvalue.AsSingleton(self._input_records)
    if self._reports:
      side["reports"] = beam.pvalue.AsList(tuple(self._reports) | "MergeReports" >> beam.Flatten())
    # The collision check must finish before the commit.
    checked = p | "CommitTrigger" >> beam.Create([root])
    checked = checked | "AfterPathCheck" >> beam.Map(lambda r, _: r, beam.pvalue.AsList(collisions))
    return checked | "Commit" >> beam.ParDo(
      _CommitStore(
        root,
        data_dir,
        self._parameters,
        self._empty_policy,
        self._overwrite,
        self._replaces,
        self._fsync,
      ),
      **side,
    )
