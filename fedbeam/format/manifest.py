"""The manifest of a store: one Avro row per client, written in shards, read and bounded.

Rows (schemas/manifest.avsc) carry each client's id, split, counts, size,
path and checksum. Before fastavro decodes a manifest file, the block
framing of its Avro container is walked and checked against the bytes that
are really there (`check_blocks`, "Avro container framing" below).
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterable, Mapping, Optional

from fedbeam.format.fs import read_store_file
from fedbeam.format.layout import (
  MANIFEST_DIR,
  MANIFEST_SPEC_KEY,
  MAX_MANIFEST_FILE_BYTES,
  MIN_MANIFEST_ROW_BYTES,
  InvalidClientIdError,
  MissingStoreFileError,
  StoreFormatError,
  check_client_id,
  check_split_name,
  is_split_name,
  join,
)
from fedbeam.format.metadata import load_schema
from fedbeam.format.spec import ElementSpec, ElementSpecError

__all__ = [
  "manifest_file_name",
  "manifest_sync_marker",
  "manifest_path",
  "manifest_spec_value",
  "check_manifest_spec",
  "parse_manifest_file",
  "check_manifest_row",
  "check_manifest_rows",
  "read_manifest",
  "AvroContainerError",
  "check_blocks",
]


def manifest_file_name(index: int, count: int) -> str:
  """The name of manifest file `index` of `count`: part-SSSSS-of-NNNNN.avro."""
  return f"part-{index:05d}-of-{count:05d}.avro"


def manifest_sync_marker(job_key: str, index: int) -> bytes:
  """A 16-byte Avro sync marker derived from the job and the file, so reruns are byte-identical."""
  import hashlib  # pylint: disable=g-import-not-at-top

  return hashlib.sha256(f"fedbeam-manifest:{job_key}:{index}".encode("utf-8")).digest()[:16]


def manifest_path(root: str, metadata: Mapping[str, Any], index: int) -> str:
  """The path of manifest file `index` of the store at `root`."""
  count = metadata["manifest"]["num_files"]
  return join(root, metadata["data_dir"], MANIFEST_DIR, manifest_file_name(index, count))


def manifest_spec_value(spec: ElementSpec) -> str:
  """The element spec as the writer puts it in a manifest file's header (MANIFEST_SPEC_KEY)."""
  return json.dumps(spec.to_metadata(), sort_keys=True, separators=(",", ":"))


def _check_manifest_spec(header: Mapping[str, Any], element_spec: Any, path: str) -> None:
  """Raises StoreFormatError if the manifest header's element spec differs from the metadata's.

  Manifest files written before the header carried the spec have none; they
  are not checked.
  """
  value = header.get(MANIFEST_SPEC_KEY)
  if value is None:
    return
  if isinstance(value, bytes):
    value = value.decode("utf-8", "replace")
  try:
    written = ElementSpec.from_metadata(json.loads(value))
  except (ValueError, TypeError, KeyError, ElementSpecError) as e:
    raise StoreFormatError(f"manifest file {path}: its element spec is unreadable: {e}") from None
  if written != ElementSpec.from_metadata(element_spec):
    raise StoreFormatError(
      f"manifest file {path} was written for element spec {written.to_json()}, but "
      f"metadata.json says {ElementSpec.from_metadata(element_spec).to_json()}: the metadata "
      "was edited or belongs to another store"
    )


def check_manifest_spec(data: bytes, element_spec: Any, path: str) -> None:
  """Checks that the manifest file `data` was written for the metadata's `element_spec`.

  Raises:
    StoreFormatError: the file's header names another element spec (or is
      unreadable), naming `path`.
  """
  import fastavro  # pylint: disable=g-import-not-at-top

  try:
    header = fastavro.reader(io.BytesIO(data)).metadata
  except Exception as e:  # pylint: disable=broad-except
    raise StoreFormatError(f"manifest file {path} is damaged: {e}") from None
  _check_manifest_spec(header, element_spec, path)


def parse_manifest_file(
  data: bytes, path: str, element_spec: Optional[Any] = None
) -> list[dict[str, Any]]:
  """The rows of a manifest file's bytes, after `check_blocks`.

  `element_spec`: the metadata's `element_spec`; when given, it must equal the
  spec the writer put in the file's header (`MANIFEST_SPEC_KEY`).

  Raises:
    StoreFormatError: the file is not a readable manifest, or its element spec
      differs from `element_spec`, naming `path`.
  """
  import fastavro  # pylint: disable=g-import-not-at-top

  try:
    count = check_blocks(data, MIN_MANIFEST_ROW_BYTES)
    reader = fastavro.reader(io.BytesIO(data))
    # The file's own schema must be the manifest's, field for field, so every
    # row has exactly its fields and types. (Decoding with reader_schema would
    # check the same per row, at 2.5x the cost.)
    if _fields(reader.writer_schema) != _fields(load_schema("manifest")):
      raise StoreFormatError(
        f"manifest file {path} was not written with schemas/manifest.avsc "
        f"(its fields: {_fields(reader.writer_schema)})"
      )
    if element_spec is not None:
      _check_manifest_spec(reader.metadata, element_spec, path)
    rows = list(reader)
  except StoreFormatError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise StoreFormatError(f"manifest file {path} is damaged: {e}") from None
  if len(rows) != count:
    raise StoreFormatError(
      f"manifest file {path} is damaged: its blocks hold {count} rows, {len(rows)} were decoded"
    )
  return rows


def _fields(schema: Any) -> list:
  """[(name, type)] of a record schema's fields; [] for anything else."""
  if not isinstance(schema, dict) or not isinstance(schema.get("fields"), list):
    return []
  return [(f.get("name"), f.get("type")) for f in schema["fields"] if isinstance(f, dict)]


def check_manifest_row(row: Mapping[str, Any], min_record_bytes: int, where: str) -> None:
  """Checks the values of one manifest row that fastavro's types do not bound.

  The client id must be storable, the split a valid name, the counts
  non-negative, and the file big enough for its examples: num_examples *
  `min_record_bytes` (`ElementSpec.min_record_bytes()` of the store's spec)
  <= num_bytes.

  Raises:
    StoreFormatError: naming `where` and the client.
  """
  try:
    cid = check_client_id(row["client_id"])
  except InvalidClientIdError as e:
    raise StoreFormatError(f"{where}: {e}") from None
  who = f"{where}: client {cid!r}"
  check_split_name(row["split"], who)
  n, size = row["num_examples"], row["num_bytes"]
  if n < 0 or size < 0:
    raise StoreFormatError(f"{who}: num_examples {n} and num_bytes {size} must not be negative")
  if n * min_record_bytes > size:
    raise StoreFormatError(
      f"{who}: {n} examples of the element spec take at least {n * min_record_bytes} bytes, "
      f"the manifest says the file has {size}"
    )


def check_manifest_rows(rows: list[Mapping[str, Any]], min_record_bytes: int, where: str) -> None:
  """`check_manifest_row` for every row, at a fraction of its cost per row.

  One pass over the rows finds the first that breaks a bound (each split
  name is checked once); that row goes through `check_manifest_row` for the
  message.

  Raises:
    StoreFormatError: as `check_manifest_row`, for the first row at fault.
  """
  bad_splits = {
    r["split"] for r in rows if not isinstance(r["split"], str) or not is_split_name(r["split"])
  }
  bad = next(
    (
      r
      for r in rows
      if not isinstance(r["client_id"], str)
      or not r["client_id"]
      or r["split"] in bad_splits
      or r["num_examples"] < 0
      or r["num_bytes"] < 0
      or r["num_examples"] * min_record_bytes > r["num_bytes"]
    ),
    None,
  )
  if bad is not None:
    check_manifest_row(bad, min_record_bytes, where)


def read_manifest(root: str, metadata: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
  """Yields every manifest row of the store (all splits), file by file.

  Each file is read whole (at most MAX_MANIFEST_FILE_BYTES, regular files
  only; see `read_store_file`), its Avro framing checked, and every row
  checked with `check_manifest_rows`. `metadata` is what `read_metadata`
  returned.

  Raises:
    StoreFormatError: a manifest file is missing, damaged or holds a row out
      of bounds, naming the file (and the client).
  """
  count = metadata["manifest"]["num_files"]
  least = ElementSpec.from_metadata(metadata["element_spec"]).min_record_bytes()
  for i in range(count):
    path = manifest_path(root, metadata, i)
    try:
      data = read_store_file(root, path, MAX_MANIFEST_FILE_BYTES, "manifest file")
    except MissingStoreFileError:
      raise StoreFormatError(
        f"manifest file {path} is missing (metadata lists {count} files)"
      ) from None
    rows = parse_manifest_file(data, path, metadata["element_spec"])
    check_manifest_rows(rows, least, f"manifest file {path}")
    yield from rows


# --------------------------------------------------------------------------
# Avro container framing
# --------------------------------------------------------------------------
#
# The block structure of an Avro object container file, checked before a decoder reads it.
#
# An Avro container file is a header (magic, a metadata map, a 16-byte sync
# marker) and blocks of (record count, byte size, data, sync marker). The counts
# and sizes are plain numbers in the file: forged, they make a decoder allocate
# terabytes (a size of 2**40) or silently skip every record (a negative count,
# which fastavro reads as an empty block). `check_blocks` walks the blocks of
# a file held in memory and checks each number against the bytes that are
# really there, so a decoder handed the same bytes never sees a forged one.
# See the Avro specification, "Object Container Files".

MAGIC = b"Obj\x01"
SYNC_SIZE = 16


class AvroContainerError(ValueError):
  """An Avro container file whose header or block framing is malformed."""


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
  """The zig-zag varint at `pos` and the position after it."""
  value = shift = 0
  while True:
    if pos >= len(data):
      raise AvroContainerError(f"truncated number at byte {pos}")
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return (value >> 1) ^ -(value & 1), pos
    shift += 7
    if shift > 63:
      raise AvroContainerError(f"number at byte {pos} is longer than 64 bits")


def _skip_header_map(data: bytes, pos: int) -> int:
  """Skips the header's metadata map (blocks of string -> bytes entries)."""
  while True:
    count, pos = _read_long(data, pos)
    if count == 0:
      return pos
    if count < 0:  # a negative count is followed by the block's byte size
      count = -count
      _, pos = _read_long(data, pos)
    for _ in range(2 * count):  # key, value
      size, pos = _read_long(data, pos)
      if size < 0 or size > len(data) - pos:
        raise AvroContainerError(
          f"header entry of {size} bytes at byte {pos} does not fit in the {len(data)}-byte file"
        )
      pos += size


def check_blocks(data: bytes, min_record_bytes: int = 1) -> int:
  """Checks the framing of the Avro container file `data`; returns its number of records.

  Every block's record count must be positive and at most its byte size over
  `min_record_bytes` (a record of the file's schema takes at least that many
  bytes), its byte size must fit in what is left of the file, and its sync
  marker must be the header's.

  Raises:
    AvroContainerError: the first number or marker that does not fit, with
      its byte offset.
  """
  if data[: len(MAGIC)] != MAGIC:
    raise AvroContainerError("not an Avro container file (bad magic)")
  pos = _skip_header_map(data, len(MAGIC))
  sync = data[pos : pos + SYNC_SIZE]
  if len(sync) < SYNC_SIZE:
    raise AvroContainerError("truncated header (no sync marker)")
  pos += SYNC_SIZE
  total = 0
  while pos < len(data):
    start = pos
    count, pos = _read_long(data, pos)
    size, pos = _read_long(data, pos)
    left = len(data) - pos - SYNC_SIZE
    if size < 0 or size > left:
      raise AvroContainerError(
        f"block at byte {start} claims {size} bytes, {max(left, 0)} are left in the file"
      )
    if count <= 0 or count * min_record_bytes > size:
      raise AvroContainerError(f"block at byte {start} claims {count} records in {size} bytes")
    pos += size
    if data[pos : pos + SYNC_SIZE] != sync:
      raise AvroContainerError(f"block at byte {start} does not end with the file's sync marker")
    pos += SYNC_SIZE
    total += count
  return total
