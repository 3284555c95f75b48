"""The metadata document of a store (`metadata.json`): schema, bounds, reading and writing.

The metadata is the store's commit marker (the writer creates it last) and
names the committed data directory, the element spec, the splits and the
parameters of the job. `read_metadata` bounds and checks every value before a
reader follows it. Avro schemas of the metadata and the manifest are in
`schemas/` (package data, reached through the `fedbeam/schemas` link).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from fedbeam.format.fs import isdir, list_dir, read_store_file
from fedbeam.format.layout import (
  DATA_DIR_PREFIX,
  FORMAT_VERSION,
  MAX_JSON_DEPTH,
  MAX_MANIFEST_FILES,
  MAX_METADATA_BYTES,
  METADATA_FILE,
  MissingStoreFileError,
  StoreFormatError,
  check_split_name,
  join,
)
from fedbeam.format.spec import ElementSpec, ElementSpecError

__all__ = [
  "load_schema",
  "parsed_schema",
  "metadata_path",
  "validate_metadata",
  "read_metadata",
  "data_root",
  "metadata_to_json",
]

_SCHEMA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "schemas")


def load_schema(name: str) -> dict[str, Any]:
  """Returns the parsed Avro schema `schemas/<name>.avsc`."""
  with open(os.path.join(_SCHEMA_DIR, f"{name}.avsc"), encoding="utf-8") as f:
    return json.load(f)


def parsed_schema(name: str) -> dict[str, Any]:
  """`schemas/<name>.avsc` parsed by fastavro, ready for its reader, writer and validator."""
  import fastavro  # pylint: disable=g-import-not-at-top

  return fastavro.parse_schema(load_schema(name))


# --------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------


def metadata_path(root: str) -> str:
  """The path of the metadata file of the store at `root`."""
  return join(root, METADATA_FILE)


def validate_metadata(metadata: Mapping[str, Any], where: str) -> None:
  """Checks a metadata document against schemas/metadata.avsc; raises StoreFormatError."""
  from fastavro._validate_common import ValidationError  # pylint: disable=g-import-not-at-top
  from fastavro.validation import validate  # pylint: disable=g-import-not-at-top

  try:
    validate(dict(metadata), parsed_schema("metadata"), raise_errors=True)
  except ValidationError as e:
    raise StoreFormatError(f"{where}: metadata does not match schemas/metadata.avsc: {e}") from None


def _json_depth(text: bytes) -> int:
  """How deeply the arrays and objects of a JSON text nest (brackets inside strings not counted)."""
  unquoted = re.sub(rb'"(?:[^"\\]|\\.)*"', b"", text)
  steps = np.frombuffer(unquoted, np.uint8)
  change = np.isin(steps, (ord("["), ord("{"))).astype(np.int64)
  change -= np.isin(steps, (ord("]"), ord("}")))
  return int(np.cumsum(change).max(initial=0))


def read_metadata(root: str) -> dict[str, Any]:
  """Reads and checks `STORE/metadata.json`.

  Beyond its schema, the document is bounded (MAX_METADATA_BYTES,
  MAX_JSON_DEPTH) and its values must make sense: a supported dtype and a
  shape within `ElementSpec.check_size_limits` for every feature, valid and
  distinct split names, num_shards >= 1 and 1 <= manifest.num_files <=
  min(MAX_MANIFEST_FILES, max(1, number of clients)).

  Raises:
    StoreFormatError: no committed store at `root`, unreadable or malformed
      metadata, or a format version this fedbeam cannot read.
  """
  path = metadata_path(root)
  try:
    data = read_store_file(root, path, MAX_METADATA_BYTES, "metadata")
  except MissingStoreFileError:
    if _holds_data_dirs(root):
      raise StoreFormatError(
        f"{root} is not a committed fedbeam store: a write into it did not finish "
        f"({METADATA_FILE} is missing); rerun the job"
      ) from None
    raise StoreFormatError(f"{root} holds no committed fedbeam store ({path} not found)") from None
  if _json_depth(data) > MAX_JSON_DEPTH:
    raise StoreFormatError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
  try:
    metadata = json.loads(data.decode("utf-8"))
  except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
    raise StoreFormatError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(metadata, dict):
    raise StoreFormatError(f"{path}: expected a JSON object")
  version = metadata.get("format_version")
  if version != FORMAT_VERSION:
    raise StoreFormatError(
      f"{root}: store format version {version!r} is not supported by this fedbeam "
      f"(it reads version {FORMAT_VERSION}); use a fedbeam release that writes it"
    )
  validate_metadata(metadata, path)
  data_dir = metadata["data_dir"]
  if (
    not data_dir.startswith(DATA_DIR_PREFIX)
    or "/" in data_dir
    or "\\" in data_dir
    or data_dir in (".", "..")
  ):
    raise StoreFormatError(f"{path}: data_dir {data_dir!r} is not a data directory of the store")
  _check_metadata_values(metadata, path)
  return metadata


def _holds_data_dirs(root: str) -> bool:
  """Whether `root` is a directory holding data-* directories (False if it cannot be listed)."""
  try:
    return isdir(root) and any(n.startswith(DATA_DIR_PREFIX) for n in list_dir(root))
  except Exception:  # pylint: disable=broad-except
    # OSError locally, tf.errors.OpError remotely: either way no store is there to read.
    return False


def _check_metadata_values(metadata: Mapping[str, Any], path: str) -> None:
  """The bounds of `read_metadata` that the schema cannot express."""
  try:
    ElementSpec.from_metadata(metadata["element_spec"]).check_size_limits(f"{path}: element_spec")
  except ElementSpecError as e:
    raise StoreFormatError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
  names = [check_split_name(s["name"], path) for s in metadata["splits"]]
  if len(set(names)) != len(names):
    raise StoreFormatError(f"{path}: split names {names} are not distinct")
  for s in metadata["splits"]:
    for field in ("num_clients", "num_examples", "num_bytes", "num_empty_clients"):
      if s[field] < 0:
        raise StoreFormatError(f"{path}: split {s['name']!r}: {field} is {s[field]}")
  if metadata["num_shards"] < 1:
    raise StoreFormatError(f"{path}: num_shards is {metadata['num_shards']}; it must be at least 1")
  num_clients = sum(s["num_clients"] for s in metadata["splits"])
  num_files = metadata["manifest"]["num_files"]
  most = min(MAX_MANIFEST_FILES, max(1, num_clients))
  if not 1 <= num_files <= most:
    raise StoreFormatError(
      f"{path}: manifest.num_files is {num_files}; a store of {num_clients} clients has "
      f"1 to {most} manifest files"
    )


def data_root(root: str, metadata: Mapping[str, Any]) -> str:
  """The committed data directory of the store at `root`."""
  return join(root, metadata["data_dir"])


def metadata_to_json(metadata: Mapping[str, Any]) -> bytes:
  """The bytes of `metadata.json` for a metadata document (UTF-8, indented, keys in order)."""
  text = json.dumps(metadata, indent=2, sort_keys=False, ensure_ascii=False)
  return (text + "\n").encode("utf-8")
