"""Text inputs: CSV, JSON Lines and LEAF's JSON files.

Each file is read whole by one worker (so every record keeps its file and
line or example number for error messages and `--order-by @input`), through
Beam's FileSystems, so `gs://` paths and `.gz` files work. Files must be
UTF-8.

- CSV: a header row naming the columns, then one record per row. The
  client-id column's text is the id; every other cell is a scalar feature:
  an integer literal (`-12`) is int64, a decimal or exponent literal
  (`0.5`, `1e-3`, `nan`, `inf`) float32, anything else a string. A column
  that holds integers in some rows and decimals in others is float32.
- JSON Lines: one JSON object per line (blank lines are skipped). The
  client-id member is a string or an integer (stored as its decimal
  string); every other member is a feature (see `raw_values.json_feature`:
  numbers, strings, booleans and rectangular nested lists of them).
- LEAF (github.com/TalwalkarLab/leaf): `{"users": [...], "num_samples":
  [...], "user_data": {user: {"x": [...], "y": [...]}}}`, as LEAF's
  preprocessing writes them. Each user is a client; its i-th example has
  the features `x` and `y` (LEAF's names) holding `x[i]` and `y[i]`
  (any other list of the same length in `user_data[user]` is a feature
  too). `num_samples`, when present, must match. `hierarchies` is ignored.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
import numpy as np

from fedbeam.format.layout import InvalidClientIdError, check_client_id
from fedbeam.pipelines import sources
from fedbeam.pipelines.raw_values import client_id_of, json_feature
from fedbeam.pipelines.records import (
  FLOAT32,
  INT64,
  SCALAR,
  STRING,
  InputError,
  InputRecord,
  RawFeature,
)

_INT_TEXT = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_TEXT = re.compile(
  r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?\Z|[+-]?(nan|inf|infinity)\Z",
  re.IGNORECASE,
)


def _csv_feature(cell: str, name: str, source: str) -> RawFeature:
  if not cell:
    raise InputError(f"{source}: column {name!r} is empty; fedbeam needs a value in every row")
  if _INT_TEXT.match(cell):
    try:
      return RawFeature(np.array([int(cell)], dtype=np.int64), INT64, SCALAR, (), widens=True)
    except OverflowError:
      raise InputError(
        f"{source}: column {name!r} holds {cell}, outside the range of int64"
      ) from None
  if _FLOAT_TEXT.match(cell):
    return RawFeature(np.array([float(cell)], dtype=np.float64), FLOAT32, SCALAR, (), widens=True)
  value = np.empty(1, dtype=object)
  value[0] = cell.encode("utf-8")
  return RawFeature(value, STRING, SCALAR, ())


class _RawReader(io.RawIOBase):
  """A binary file object with only `read` (Beam's decompressing CompressedFile) as raw I/O.

  `io.TextIOWrapper` needs a buffered stream; this lets `io.BufferedReader`
  provide one over any Beam file.
  """

  def __init__(self, f):
    super().__init__()
    self._f = f

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    data = self._f.read(len(buffer))
    buffer[: len(data)] = data
    return len(data)


class _ReadTextFile(beam.DoFn):
  """path -> lists of `InputRecord`s of the file, in order; subclasses decode the text."""

  def __init__(self, client_id_key: str):
    self._client_id_key = client_id_key
    self._records = beam.metrics.Metrics.counter("fedbeam", "input_records")

  def process(self, path: str) -> Iterable[list[InputRecord]]:
    where = ["the start"]  # What was read last, for the error message.
    try:
      with FileSystems.open(path) as f:
        text = io.TextIOWrapper(io.BufferedReader(_RawReader(f)), encoding="utf-8", newline="")
        records = self._counted(self._records_of(text, path, where))
        yield from sources._in_lists(records)  # pylint: disable=protected-access
    except InputError:
      raise
    except UnicodeDecodeError as e:
      raise InputError(f"{path}: not UTF-8 text after {where[0]} ({e})") from None
    except Exception as e:  # pylint: disable=broad-except
      raise InputError(f"{path}: unreadable after {where[0]}: {e}") from None

  def _counted(self, records: Iterable[InputRecord]) -> Iterable[InputRecord]:
    for record in records:
      self._records.inc()
      yield record

  def _records_of(self, text, path: str, where: list) -> Iterable[InputRecord]:
    """The records of one decoded file; each format's reader (below) defines it.

    `where[0]` is kept at the position being read (line, row or user), for
    the error messages of `process`.
    """
    raise NotImplementedError(f"{type(self).__name__} reads no format of its own")


class _ReadCsvFile(_ReadTextFile):
  def _records_of(self, text, path: str, where: list) -> Iterable[InputRecord]:
    key = self._client_id_key
    reader = csv.reader(text)
    try:
      header = next(reader, None)
      if not header:
        raise InputError(f"{path}: CSV file has no header row")
      if len(set(header)) != len(header):
        raise InputError(f"{path}: CSV header {header} repeats a column name")
      if key not in header:
        raise InputError(f"{path}: client-id column {key!r} is not in the CSV header {header}")
      id_index = header.index(key)
      features = [(i, name) for i, name in enumerate(header) if i != id_index]
      for row in reader:
        line = reader.line_num
        where[0] = f"line {line}"
        if not row:
          continue  # A blank line.
        source = f"{path} line {line}"
        if len(row) != len(header):
          raise InputError(f"{source}: {len(row)} fields, but the header has {len(header)}")
        try:
          client_id = check_client_id(row[id_index], source)
        except InvalidClientIdError as e:
          raise InputError(str(e)) from None
        values = {name: _csv_feature(row[i], name, source) for i, name in features}
        yield InputRecord(client_id, values, (path, line), unit="line")
    except csv.Error as e:
      raise InputError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None


def _json_record(obj: Any, key: str, path: str, index: int, unit: str) -> InputRecord:
  source = f"{path} {unit} {index}"
  if not isinstance(obj, dict):
    raise InputError(f"{source}: expected a JSON object, got {type(obj).__name__}")
  if key not in obj:
    raise InputError(
      f"{source}: client-id member {key!r} is missing (members present: {sorted(obj)})"
    )
  client_id = client_id_of(obj[key], key, source)
  features = {name: json_feature(value, name, source) for name, value in obj.items() if name != key}
  return InputRecord(client_id, features, (path, index), unit=unit)


class _ReadJsonLinesFile(_ReadTextFile):
  def _records_of(self, text, path: str, where: list) -> Iterable[InputRecord]:
    for line_number, line in enumerate(text, start=1):
      where[0] = f"line {line_number}"
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise InputError(f"{path} line {line_number}: not valid JSON ({e})") from None
      yield _json_record(obj, self._client_id_key, path, line_number, "line")


def _leaf_users(data: Any, path: str) -> list:
  """The users of a parsed LEAF file, checked against its `user_data` and `num_samples`."""
  if not isinstance(data, dict) or not isinstance(data.get("user_data"), dict):
    raise InputError(
      f'{path}: not a LEAF file (expected a JSON object with "users" and "user_data")'
    )
  users = data.get("users")
  user_data = data["user_data"]
  if not isinstance(users, list):
    raise InputError(f'{path}: not a LEAF file ("users" must be a list)')
  missing = [u for u in users if str(u) not in user_data]
  if missing:
    raise InputError(f'{path}: user {missing[0]!r} is in "users" but not in "user_data"')
  listed = {str(u) for u in users}
  extra = [u for u in user_data if u not in listed]
  if extra:
    raise InputError(f'{path}: user {extra[0]!r} is in "user_data" but not in "users"')
  counts = data.get("num_samples")
  if counts is not None and (not isinstance(counts, list) or len(counts) != len(users)):
    raise InputError(f'{path}: "num_samples" must list one count per user ({len(users)} users)')
  for k, user in enumerate(users):
    entry = user_data[str(user)]
    if not isinstance(entry, dict) or not entry:
      raise InputError(
        f"{path}: user {user!r}: user_data must be an object of lists "
        'such as {"x": [...], "y": [...]}'
      )
    lengths = {name: len(v) if isinstance(v, list) else None for name, v in entry.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
      raise InputError(
        f"{path}: user {user!r}: user_data members must be lists of one "
        f"length (one item per example), got lengths {lengths}"
      )
    if counts is not None and counts[k] != next(iter(lengths.values())):
      raise InputError(
        f"{path}: user {user!r}: num_samples says {counts[k]} examples, "
        f"user_data holds {next(iter(lengths.values()))}"
      )
  return users


class _ReadLeafFile(_ReadTextFile):
  def _records_of(self, text, path: str, where: list) -> Iterable[InputRecord]:
    try:
      data = json.load(text)
    except json.JSONDecodeError as e:
      raise InputError(f"{path}: not valid JSON ({e})") from None
    for user in _leaf_users(data, path):
      entry = data["user_data"][str(user)]
      client_id = client_id_of(user, "users", f"{path} users")
      names = list(entry)
      for i in range(len(entry[names[0]])):
        source = f"{path} user {client_id!r} example {i}"
        where[0] = f"user {client_id!r} example {i}"
        features = {name: json_feature(entry[name][i], name, source) for name in names}
        # The index counts the user's examples: positions only order records of one client.
        yield InputRecord(client_id, features, (path, i), unit="example")


class ReadCsvRecords(sources._ReadFiles):  # pylint: disable=protected-access
  """Reads CSV files with a header row. Output: lists of `InputRecord`s; positions (file, line)."""

  reader_cls = _ReadCsvFile


class ReadJsonLinesRecords(sources._ReadFiles):  # pylint: disable=protected-access
  """Reads JSON Lines files. Output: lists of `InputRecord`s; positions (file, line from 1)."""

  reader_cls = _ReadJsonLinesFile


class ReadLeafRecords(sources._ReadFiles):  # pylint: disable=protected-access
  """Reads LEAF JSON files. Output: lists of `InputRecord`s; positions (file, example of the user).

  The client ids are LEAF's users; no client-id key is needed.
  """

  def __init__(self, paths: Sequence[str], client_id_key: Optional[str] = None):
    super().__init__(paths, client_id_key or "")

  reader_cls = _ReadLeafFile


__all__ = ["ReadCsvRecords", "ReadJsonLinesRecords", "ReadLeafRecords"]
