"""Writes a store: one TFRecord file per client, the Avro manifest, then the metadata.

Every file is written to a temporary name beside its final one and renamed
into place, so a retried bundle replaces a file whole and never leaves a
partial or duplicate client. The metadata file, which commits the store, is
written by the last step, which depends (through side inputs) on every
manifest file and so on every client file.
"""

from __future__ import annotations

import posixpath
import uuid
import zlib
from typing import Any, Iterable, Mapping, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
import google_crc32c

import fedbeam
from fedbeam.element_spec import ElementSpec
from fedbeam.pipelines.records import ClientRecords
from fedbeam import store_format as sf

# Manifest rows per manifest file (the file count follows the client count).
MANIFEST_ROWS_PER_FILE = 100_000
# Ids of empty clients kept in the metadata's report.
EMPTY_SAMPLE_SIZE = 20


class StoreWriteError(RuntimeError):
  """The store could not be written (I/O failure, or two ids mapping to one file)."""


def _temp_name(final_path: str) -> str:
  head, tail = posixpath.split(final_path)
  return posixpath.join(head, f".{tail}.tmp-{uuid.uuid4().hex}")


def write_file_atomically(final_path: str, chunks: Iterable[bytes]) -> tuple[int, int]:
  """Writes `chunks` to a temporary file and renames it to `final_path`.

  Returns (number of bytes, CRC32C of the content).
  """
  tmp = _temp_name(final_path)
  crc = google_crc32c.Checksum()
  size = 0
  try:
    with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      for chunk in chunks:
        f.write(chunk)
        crc.update(chunk)
        size += len(chunk)
    FileSystems.rename([tmp], [final_path])
  except Exception as e:
    try:
      FileSystems.delete([tmp])
    except Exception:  # pylint: disable=broad-except
      pass
    raise StoreWriteError(f"cannot write {final_path}: {e}") from e
  return size, int.from_bytes(crc.digest(), "big")


class _WriteClientFile(beam.DoFn):
  """ClientRecords -> manifest row (dict), after writing the client's file."""

  def __init__(self, root: str):
    self._root = root
    self._clients = beam.metrics.Metrics.counter("fedbeam", "clients_written")
    self._examples = beam.metrics.Metrics.counter("fedbeam", "examples_written")
    self._bytes = beam.metrics.Metrics.counter("fedbeam", "bytes_written")

  def process(self, client: ClientRecords, num_shards: int) -> Iterable[dict[str, Any]]:
    rel = sf.client_relative_path(client.client_id, client.split, num_shards)
    size, crc = write_file_atomically(
        sf.join(self._root, rel), (sf.tfrecord_frame(r) for r in client.records))
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

  def __init__(self, root: str, job_key: str):
    self._root = root
    self._job_key = job_key

  def process(self, element, num_files: int) -> Iterable[str]:
    import io  # pylint: disable=g-import-not-at-top
    import fastavro  # pylint: disable=g-import-not-at-top
    index, rows = element
    rows = sorted((r for r in rows if r is not None), key=lambda r: r["client_id"])
    buf = io.BytesIO()
    fastavro.writer(buf, sf.parsed_schema("manifest"), rows, codec="null",
                    sync_marker=sf.manifest_sync_marker(self._job_key, index))
    name = sf.manifest_file_name(index, num_files)
    write_file_atomically(sf.join(self._root, sf.MANIFEST_DIR, name), [buf.getvalue()])
    yield name


def _check_no_path_collision(element):
  path, ids = element
  ids = sorted(set(ids))
  if len(ids) > 1:
    raise StoreWriteError(
        f"client ids {ids!r} map to the same file {path}; fedbeam cannot store both "
        "(shorten the ids)")
  return path


class StoreStatsFn(beam.CombineFn):
  """Manifest rows -> {"splits": {name: counts}, "num_clients", "empty": {count, sample}}."""

  def create_accumulator(self):
    return {"splits": {}, "empty_count": 0, "empty_sample": []}

  def add_input(self, acc, row):
    s = acc["splits"].setdefault(row["split"], [0, 0, 0, 0])
    s[0] += 1
    s[1] += row["num_examples"]
    s[2] += row["num_bytes"]
    if row["num_examples"] == 0:
      s[3] += 1
      acc["empty_count"] += 1
      acc["empty_sample"] = sorted(acc["empty_sample"] + [row["client_id"]])[:EMPTY_SAMPLE_SIZE]
    return acc

  def merge_accumulators(self, accs):
    out = self.create_accumulator()
    for acc in accs:
      for name, counts in acc["splits"].items():
        s = out["splits"].setdefault(name, [0, 0, 0, 0])
        for i in range(4):
          s[i] += counts[i]
      out["empty_count"] += acc["empty_count"]
      out["empty_sample"] = sorted(out["empty_sample"] + acc["empty_sample"])[:EMPTY_SAMPLE_SIZE]
    return out

  def extract_output(self, acc):
    return acc


def _merge_reports(parameters: Mapping[str, Any], reports) -> dict[str, Any]:
  """Job parameters plus what steps resolved at run time (e.g. the number of test clients)."""
  merged = dict(parameters)
  for report in reports:
    for key, value in sorted(report.items()):
      merged[key] = value
  return merged


class _CommitStore(beam.DoFn):
  """Writes metadata.json last (temp + rename), then drops the in-progress marker."""

  def __init__(self, root: str, parameters: Mapping[str, Any], empty_policy: str):
    self._root = root
    self._parameters = dict(parameters)
    self._empty_policy = empty_policy

  def process(self, _, stats, spec: ElementSpec, num_shards: int, manifest_files,
              empty_report: Optional[Mapping[str, Any]] = None, reports=()):
    splits = [
        {"name": name, "num_clients": c[0], "num_examples": c[1], "num_bytes": c[2],
         "num_empty_clients": c[3]}
        for name, c in sorted(stats["splits"].items())
    ]
    report = dict(empty_report or {})
    metadata = {
        "format_version": sf.FORMAT_VERSION,
        "fedbeam_version": fedbeam.__version__,
        "element_spec": spec.to_metadata(),
        "id_encoding": sf.ID_ENCODING,
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
    sf.validate_metadata(metadata, "new store metadata")
    write_file_atomically(sf.metadata_path(self._root), [sf.metadata_to_json(metadata)])
    marker = sf.join(self._root, sf.IN_PROGRESS_FILE)
    if FileSystems.exists(marker):
      FileSystems.delete([marker])
    yield metadata


class WriteStore(beam.PTransform):
  """Writes `ClientRecords` (with their split set) as a committed store at `root`.

  Input: PCollection[ClientRecords]. Side data: `spec` (singleton
  PCollection[ElementSpec]); optional `empty_report` singleton (the empty
  client check's report). `num_shards` None picks one shard directory per
  ~4096 clients. Output: singleton PCollection with the metadata dict.
  The caller prepares `root` (see `fedbeam.pipelines.prepare`).
  """

  def __init__(self, root: str, spec, *, num_shards: Optional[int] = None,
               parameters: Optional[Mapping[str, Any]] = None, job_key: str = "",
               empty_report=None, empty_policy: str = "keep", reports=()):
    super().__init__()
    self._reports = list(reports)
    self._root = root
    self._spec = spec
    self._num_shards = num_shards
    self._parameters = dict(parameters or {})
    self._job_key = job_key
    self._empty_report = empty_report
    self._empty_policy = empty_policy

  def expand(self, clients):
    root = self._root
    p = clients.pipeline
    num_clients = clients | "CountClients" >> beam.combiners.Count.Globally()
    if self._num_shards is None:
      num_shards = num_clients | "PickNumShards" >> beam.Map(sf.default_num_shards)
    else:
      fixed = self._num_shards
      num_shards = p | "NumShards" >> beam.Create([fixed])
    rows = clients | "WriteClientFiles" >> beam.ParDo(
        _WriteClientFile(root), beam.pvalue.AsSingleton(num_shards))

    # Only long ids are named by a hash; check those never share a file.
    collisions = (rows
                  | "LongIdPaths" >> beam.Filter(lambda r: "~" in r["path"])
                  | "KeyByPath" >> beam.Map(lambda r: (r["path"], r["client_id"]))
                  | "GroupByPath" >> beam.GroupByKey()
                  | "CheckPaths" >> beam.Map(_check_no_path_collision))

    num_files = num_clients | "PickManifestFiles" >> beam.Map(
        lambda n: max(1, -(-n // MANIFEST_ROWS_PER_FILE)))
    all_buckets = num_files | "EveryManifestFile" >> beam.FlatMap(
        lambda n: [(i, None) for i in range(n)])
    keyed_rows = rows | "KeyByManifestFile" >> beam.Map(
        lambda r, n: (_manifest_bucket(r["client_id"], n), r), beam.pvalue.AsSingleton(num_files))
    manifest_files = ((keyed_rows, all_buckets)
                      | "MergeManifestRows" >> beam.Flatten()
                      | "GroupManifestRows" >> beam.GroupByKey()
                      | "WriteManifestFiles" >> beam.ParDo(
                          _WriteManifestFile(root, self._job_key),
                          beam.pvalue.AsSingleton(num_files)))
    stats = rows | "Stats" >> beam.CombineGlobally(StoreStatsFn())
    side = dict(
        stats=beam.pvalue.AsSingleton(stats),
        spec=beam.pvalue.AsSingleton(self._spec),
        num_shards=beam.pvalue.AsSingleton(num_shards),
        manifest_files=beam.pvalue.AsList(manifest_files),
    )
    if self._empty_report is not None:
      side["empty_report"] = beam.pvalue.AsSingleton(self._empty_report)
    if self._reports:
      side["reports"] = beam.pvalue.AsList(
          tuple(self._reports) | "MergeReports" >> beam.Flatten())
    # The collision check must finish before the commit.
    checked = p | "CommitTrigger" >> beam.Create([root])
    checked = checked | "AfterPathCheck" >> beam.Map(
        lambda r, _: r, beam.pvalue.AsList(collisions))
    return checked | "Commit" >> beam.ParDo(
        _CommitStore(root, self._parameters, self._empty_policy), **side)
