"""`fedbeam validate`: do the metadata, the manifest and the client files agree?

Checks (every one reports the file and client at fault):
- the metadata parses, has a supported format version and matches its schema;
- every manifest file listed exists and parses; no client id appears twice in a split;
  every row names a split of the metadata and the path the id maps to (so no
  path can point outside the store);
- per-split client, example, byte and empty-client counts add up to the
  metadata's;
- every client file exists with the manifest's size and CRC32C, its TFRecord
  framing and CRCs are intact and it holds `num_examples` records;
- no stray file (temporary files, leftovers of an interrupted write);
- only regular files and directories: a symbolic link or FIFO is listed,
  never followed or opened (`fs.read_store_file`);
- with `deep`, every record is a tf.train.Example with exactly the element
  spec's features, value types and value counts, and values the spec's dtype
  holds (an int8 feature's values in [-128, 127], a float16's exact in
  float16), as the writer makes them; patterns that a relabelled dtype or
  shape leaves but bytes cannot prove wrong become `notes` (`_SpecEvidence`).

The metadata, manifest and row bounds are those of `metadata.read_metadata`
and `read_manifest` (docs/store-format.md, "Limits").
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
from typing import Any, Callable, Optional

import numpy as np

from fedbeam.format.fs import is_remote, read_store_file, remote_error_line, walk_files
from fedbeam.format.layout import (
  DATA_DIR_PREFIX,
  LEASE_FILE,
  MANIFEST_DIR,
  MAX_MANIFEST_FILE_BYTES,
  METADATA_FILE,
  InvalidClientIdError,
  MissingStoreFileError,
  StoreFormatError,
  client_relative_path,
  join,
)
from fedbeam.format.manifest import (
  check_manifest_row,
  check_manifest_spec,
  manifest_file_name,
  parse_manifest_file,
)
from fedbeam.format.metadata import read_metadata
from fedbeam.format.spec import ElementSpec, FeatureSpec
from fedbeam.format.tfrecord import CorruptRecordError, checksum, read_tfrecords

__all__ = [
  "MAX_LISTED_PROBLEMS",
  "ValidationReport",
  "validate_store",
]

# Problems listed before the report stops collecting (the count stays exact).
MAX_LISTED_PROBLEMS = 1000


@dataclasses.dataclass
class ValidationReport:
  """What `validate_store` found. `ok` is True when `problems` is empty."""

  path: str
  problems: list[str]
  num_problems: int = 0
  num_clients: int = 0
  num_examples: int = 0
  num_files_checked: int = 0
  deep: bool = False
  # What --deep saw that bytes cannot prove wrong (they do not change `ok`).
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return self.num_problems == 0

  def add(self, problem: str) -> None:
    self.num_problems += 1
    if len(self.problems) < MAX_LISTED_PROBLEMS:
      self.problems.append(problem)

  def summary(self) -> str:
    if self.ok:
      depth = (
        "every record parsed against the element spec" if self.deep else "sizes and checksums match"
      )
      return (
        f"OK {self.path}: {self.num_clients} clients, {self.num_examples} examples, "
        f"{self.num_files_checked} client files verified ({depth})"
      )
    more = self.num_problems - len(self.problems)
    return f"INVALID {self.path}: {self.num_problems} problem(s)" + (
      f" ({more} not listed)" if more > 0 else ""
    )


_WIRE_KIND = {
  "bytes": "bytes_list",
  "float": "float_list",
  "int64": "int64_list",
  "bits64": "int64_list",
}


class _SpecEvidence:
  """What a store's records say about dtypes and shapes their bytes cannot prove.

  An int64 feature relabelled float64 in the metadata, or a `[]` shape
  relabelled `[null]`, reads the very same bytes, so no record is wrong. What
  is left are patterns such edits leave: float64 values that are all
  subnormal (small integers read as float64 bits), a variable-length feature
  that holds the same number of values in every record. They become notes.
  """

  def __init__(self, spec: ElementSpec):
    # float64 feature -> [nonzero subnormal values, other nonzero values]
    self._float64 = {f.name: [0, 0] for f in spec.features if f.dtype == "float64"}
    # variable-length feature -> distinct value counts seen (at most 2 kept)
    self._counts = {f.name: set() for f in spec.features if f.is_variable_length}
    self._spec = spec
    self._records = 0

  def add_record(self) -> None:
    self._records += 1

  def observe(self, f: FeatureSpec, values) -> None:
    if f.name in self._float64 and len(values):
      x = np.asarray(values, np.int64).view(np.float64)
      small = np.abs(x) < np.finfo(np.float64).tiny
      seen = self._float64[f.name]
      seen[0] += int(np.count_nonzero(small & (x != 0)))
      seen[1] += int(np.count_nonzero(~small))
    counts = self._counts.get(f.name)
    if counts is not None and len(counts) < 2:
      counts.add(len(values))

  def notes(self) -> list[str]:
    out = []
    for name, (subnormal, other) in self._float64.items():
      if subnormal and not other:
        out.append(
          f"feature {name!r} (float64): all {subnormal} nonzero values are subnormal "
          "(below 2.2e-308), as integers stored as int64 and read as float64 are; "
          "check that the metadata's dtype is the one the store was written with"
        )
    for name, counts in self._counts.items():
      if len(counts) == 1 and self._records > 1:
        shape = list(self._spec[name].shape)
        n = next(iter(counts))
        out.append(
          f"feature {name!r} (shape {shape}): each of the {self._records} records holds "
          f"{n} value{'' if n == 1 else 's'}, as a fixed shape would; check that the "
          "metadata's shape is the one the store was written with"
        )
    return out


def _check_record(
  data: bytes, spec: ElementSpec, evidence: Optional[_SpecEvidence] = None
) -> Optional[str]:
  """Why a record does not match the spec, or None; feeds `evidence` if given."""
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top

  try:
    example = example_pb2.Example.FromString(data)
  except Exception as e:  # pylint: disable=broad-except
    return f"not a tf.train.Example ({e})"
  fmap = example.features.feature
  extra = sorted(set(fmap) - set(spec.names))
  if extra:
    return f"features {extra} are not in the element spec"
  for f in spec.features:
    if f.name not in fmap:
      return f"feature {f.name!r} is missing"
    kind = fmap[f.name].WhichOneof("kind")
    if kind != _WIRE_KIND[f.encoding]:
      return f"feature {f.name!r} is a {kind}, the spec's {f.dtype} is stored as {_WIRE_KIND[f.encoding]}"
    values = getattr(fmap[f.name], kind).value
    n = len(values)
    if f.is_variable_length:
      ok = (n % f.inner_size == 0) if f.inner_size else n == 0
    else:
      ok = n == f.inner_size
    if not ok:
      return f"feature {f.name!r} has {n} values, which does not fit shape {list(f.shape)}"
    problem = _check_values(f, values)
    if problem:
      return problem
    if evidence is not None:
      evidence.observe(f, values)
  if evidence is not None:
    evidence.add_record()
  return None


def _check_values(f: FeatureSpec, values) -> Optional[str]:
  """Why a feature's stored values cannot be values of its dtype, or None.

  The writer range-checks integers for their dtype and stores float16 values
  exactly, so a value outside them means the metadata's dtype is not the one
  the store was written with (e.g. an int64 feature relabelled int8).
  """
  if not values:
    return None
  if f.encoding == "int64" and f.dtype != "int64":
    info = np.iinfo(f.dtype) if f.dtype != "bool" else None
    lo, hi = (0, 1) if info is None else (int(info.min), int(info.max))
    bad = next((v for v in values if not lo <= v <= hi), None)
    if bad is not None:
      return (
        f"feature {f.name!r} holds {bad}, outside the range of its dtype {f.dtype} [{lo}, {hi}]"
      )
  elif f.dtype == "float16":
    stored = np.asarray(values, np.float32)
    exact = stored.astype(np.float16).astype(np.float32)
    if not np.array_equal(exact, stored, equal_nan=True):
      bad = stored[(exact != stored) & ~np.isnan(stored)][0]
      return f"feature {f.name!r} holds {bad!r}, which is not a float16 value"
  return None


def _list_files(
  root: str, report: "ValidationReport", skip_top: Callable[[str], bool] = lambda name: False
) -> Optional[set[str]]:
  """Every regular file under `root`, as '/'-separated paths relative to it.

  On local disks symbolic links and special files (FIFOs, devices) are
  reported, not followed or listed: a link to / would otherwise walk the
  whole filesystem. Remote filesystems hold neither. Top-level directories
  for which `skip_top(name)` holds are not walked (another job's data
  directory, whose files come and go). None (and a problem in the report)
  when a remote store cannot be listed.
  """

  def prune(rel_dir: str) -> bool:
    return "/" not in rel_dir and skip_top(rel_dir)

  if is_remote(root):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:
      return {rel for rel, info in walk_files(root, prune) if info.is_file}
    except tf.errors.OpError as e:
      report.add(f"cannot list {root}: {remote_error_line(e)}")
      return None
  found = set()
  for rel, info in walk_files(
    root, prune, onerror=lambda where, e: report.add(f"cannot list {where}: {e.strerror}")
  ):
    if info.is_file:
      found.add(rel)
    else:
      target = f" -> {info.target}" if info.target is not None else ""
      report.add(
        f"{rel}{target} is a {info.kind}; a store holds only regular files and directories"
      )
  return found


def validate_store(path: str, deep: bool = False) -> ValidationReport:
  """Checks a store; never raises for a damaged store (problems are in the report).

  An error no check foresaw is reported as a problem too (with its type), so
  `fedbeam validate` exits 1 with a message rather than a traceback.
  """
  report = ValidationReport(path=path, problems=[], deep=deep)
  try:
    _validate(path, deep, report)
  except Exception as e:  # pylint: disable=broad-except
    report.add(f"validation stopped: {type(e).__name__}: {remote_error_line(e)}")
  return report


def _validate(path: str, deep: bool, report: ValidationReport) -> None:
  try:
    metadata = read_metadata(path)
  except StoreFormatError as e:
    report.add(str(e))
    return
  spec = ElementSpec.from_metadata(metadata["element_spec"])
  num_shards = metadata["num_shards"]
  split_names = {s["name"] for s in metadata["splits"]}
  num_manifest = metadata["manifest"]["num_files"]
  data_dir = metadata["data_dir"]
  expected_files = {METADATA_FILE}
  expected_files.update(
    posixpath.join(data_dir, MANIFEST_DIR, manifest_file_name(i, num_manifest))
    for i in range(num_manifest)
  )
  totals: dict[str, list[int]] = {s: [0, 0, 0, 0] for s in split_names}
  seen: dict[tuple[str, str], str] = {}
  evidence = _SpecEvidence(spec) if deep else None
  least = spec.min_record_bytes()

  for i in range(num_manifest):
    rel = posixpath.join(data_dir, MANIFEST_DIR, manifest_file_name(i, num_manifest))
    rows = _read_manifest_file(path, join(path, rel), report, metadata["element_spec"])
    for row in rows:
      try:
        check_manifest_row(row, least, rel)
      except StoreFormatError as e:
        report.add(str(e))
        continue
      cid = row["client_id"]
      where = f"client {cid!r} ({rel})"
      # Unique within a split: a store of kept TFF splits holds an id in several.
      if (row["split"], cid) in seen:
        report.add(
          f"{where}: client id listed twice in split {row['split']!r} "
          f"(also in {seen[row['split'], cid]})"
        )
        continue
      seen[row["split"], cid] = rel
      if row["split"] not in split_names:
        report.add(f"{where}: split {row['split']!r} is not in the metadata {sorted(split_names)}")
        continue
      try:
        expected_path = posixpath.join(
          data_dir, client_relative_path(cid, row["split"], num_shards)
        )
      except InvalidClientIdError as e:
        report.add(f"{where}: {e}")
        continue
      if row["path"] != expected_path:
        report.add(f"{where}: path {row['path']!r} is not where the id maps ({expected_path!r})")
        continue
      expected_files.add(expected_path)
      t = totals[row["split"]]
      t[0] += 1
      t[1] += row["num_examples"]
      t[2] += row["num_bytes"]
      t[3] += 1 if row["num_examples"] == 0 else 0
      report.num_clients += 1
      report.num_examples += row["num_examples"]
      _check_client_file(path, row, spec, evidence, report)

  for s in metadata["splits"]:
    got = totals.get(s["name"], [0, 0, 0, 0])
    for i, field in enumerate(("num_clients", "num_examples", "num_bytes", "num_empty_clients")):
      if got[i] != s[field]:
        report.add(
          f"split {s['name']!r}: metadata says {field} = {s[field]}, the manifest adds "
          f"up to {got[i]}"
        )

  if evidence is not None:
    report.notes.extend(evidence.notes())
  # Other data-* directories are not part of the store (jobs still writing,
  # or leftovers the next commit removes; docs/store-format.md), nor is a
  # lease file its writer left behind.
  expected_files.add(posixpath.join(data_dir, LEASE_FILE))
  present = _list_files(
    path, report, skip_top=lambda name: name.startswith(DATA_DIR_PREFIX) and name != data_dir
  )
  for stray in sorted(present - expected_files if present is not None else ()):
    report.add(f"stray file {stray}: not listed in the manifest or metadata")


def _read_manifest_file(
  root: str, path: str, report: ValidationReport, element_spec: Any
) -> list[dict[str, Any]]:
  """The rows of a manifest file; its problems go to `report`.

  An element spec in the file's header that differs from the metadata's is a
  problem, but the rows are still returned so the client files get checked.
  """
  try:
    data = read_store_file(root, path, MAX_MANIFEST_FILE_BYTES, "manifest file")
    rows = parse_manifest_file(data, path)
  except StoreFormatError as e:
    report.add(str(e))
    return []
  try:
    check_manifest_spec(data, element_spec, path)
  except StoreFormatError as e:
    report.add(str(e))
  return rows


def _check_client_file(
  root: str,
  row: dict[str, Any],
  spec: ElementSpec,
  evidence: Optional[_SpecEvidence],
  report: ValidationReport,
) -> None:
  """Checks one client file; with `evidence` (--deep) every record against the spec."""
  cid, rel = row["client_id"], row["path"]
  where = f"client {cid!r} ({rel})"
  try:
    data = read_store_file(root, join(root, rel), None, "client file")
  except MissingStoreFileError:
    report.add(f"{where}: file is missing")
    return
  except StoreFormatError as e:
    report.add(f"{where}: {e}")
    return
  report.num_files_checked += 1
  if len(data) != row["num_bytes"]:
    report.add(f"{where}: {len(data)} bytes, the manifest says {row['num_bytes']}")
  crc = checksum(data)
  if crc != row["crc32c"]:
    report.add(f"{where}: CRC32C {crc:08x}, the manifest says {row['crc32c']:08x}")
  count = 0
  try:
    for record in read_tfrecords(io.BytesIO(data)):
      if evidence is not None:
        problem = _check_record(record, spec, evidence)
        if problem:
          report.add(f"{where}: record {count}: {problem}")
          return
      count += 1
  except CorruptRecordError as e:
    report.add(f"{where}: damaged TFRecord data: {e}")
    return
  if count != row["num_examples"]:
    report.add(f"{where}: {count} records, the manifest says {row['num_examples']}")
