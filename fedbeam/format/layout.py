"""Where everything of a store lives: names, limits, and client id -> file.

A store is a directory (local or any Beam/TensorFlow filesystem such as gs://)::

    STORE/
      metadata.json                             commit marker, written last
      data-<job>/manifest/part-SSSSS-of-NNNNN.avro   one row per client
      data-<job>/<split>/<shard:05d>/<name>.tfrecord one file per client, records
                                                are serialized tf.train.Example

`data-<job>` is named by a hash of the job (inputs, their sizes and times, and
parameters): a rerun of the same job writes the same bytes to the same paths,
and two different jobs aimed at one output never write into each other's
files; the metadata names the data directory of the committed job.

`docs/store-format.md` describes every file, field and invariant. The id ->
file mapping below exists twice, in Python (writer) and in TensorFlow ops
(reader, traceable by `tf.function`), and tests pin them to each other. The
shard of an id and the name of a long id come from farmhash's Fingerprint64,
the hash behind TensorFlow's string bucketing, computed here in Python so
that writers need not import TensorFlow (see "Fingerprint64" below).
"""

from __future__ import annotations

import base64
import functools
import posixpath
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  import tensorflow as tf

__all__ = [
  "FORMAT_VERSION",
  "METADATA_FILE",
  "MANIFEST_DIR",
  "DATA_DIR_PREFIX",
  "LEASE_FILE",
  "MANIFEST_SPEC_KEY",
  "CLIENT_FILE_SUFFIX",
  "ID_ENCODING",
  "UNSPLIT",
  "MAX_PLAIN_ID_BYTES",
  "LONG_ID_PREFIX_BYTES",
  "MAX_FILES_PER_DIRECTORY",
  "TARGET_FILES_PER_SHARD",
  "MAX_METADATA_BYTES",
  "MAX_JSON_DEPTH",
  "MAX_MANIFEST_FILES",
  "MAX_MANIFEST_FILE_BYTES",
  "MIN_MANIFEST_ROW_BYTES",
  "SPLIT_NAME_RE",
  "StoreFormatError",
  "MissingStoreFileError",
  "InvalidClientIdError",
  "check_client_id",
  "check_split_name",
  "is_split_name",
  "client_file_name",
  "shard_of",
  "shard_dir_name",
  "data_dir_name",
  "client_relative_path",
  "client_relative_path_tf",
  "default_num_shards",
  "join",
  "fingerprint64",
  "hash_bucket",
]

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
MANIFEST_DIR = "manifest"
DATA_DIR_PREFIX = "data-"
# A writing job's lease inside its data directory (fedbeam/pipelines/data_dir_lease.py).
LEASE_FILE = ".lease"
# Key of the element spec in each manifest file's Avro header (docs/store-format.md).
MANIFEST_SPEC_KEY = "fedbeam.element_spec"
CLIENT_FILE_SUFFIX = ".tfrecord"
ID_ENCODING = "base64url-v1"
UNSPLIT = "all"

# Ids up to this many UTF-8 bytes are named by their full base64url encoding
# (<= 200 characters); longer ids by the encoding of their first
# LONG_ID_PREFIX_BYTES bytes, "~" (never produced by base64url) and their
# farmhash64 fingerprint in hex, which keeps names under 255 bytes.
MAX_PLAIN_ID_BYTES = 150
LONG_ID_PREFIX_BYTES = 96
MAX_FILES_PER_DIRECTORY = 10_000
TARGET_FILES_PER_SHARD = 4_096

# Limits on what is read from a store (docs/store-format.md, "Limits"). Every
# size, count and name in a store is checked against them, and against the
# bytes really there, before anything is allocated or followed.
MAX_METADATA_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 32
MAX_MANIFEST_FILES = 100_000
MAX_MANIFEST_FILE_BYTES = 2**30
# A manifest row has 8 fields of at least one byte each.
MIN_MANIFEST_ROW_BYTES = 8
# Split directory names: what the writer makes ("all", "train", "test") and
# names like them; never ".", "..", a path, or the manifest directory.
SPLIT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class StoreFormatError(ValueError):
  """A path that holds no readable fedbeam store, or a store fedbeam cannot read."""


class MissingStoreFileError(StoreFormatError):
  """A file the store needs is not there."""


class InvalidClientIdError(ValueError):
  """A client id that cannot be stored (empty, or not valid UTF-8 text)."""


def check_client_id(client_id: Any, where: str = "") -> str:
  """Returns `client_id` if it is a storable id; raises InvalidClientIdError naming `where`."""
  suffix = f" ({where})" if where else ""
  if isinstance(client_id, bytes):
    try:
      client_id = client_id.decode("utf-8")
    except UnicodeDecodeError:
      raise InvalidClientIdError(f"client id {client_id!r} is not valid UTF-8{suffix}") from None
  if not isinstance(client_id, str):
    raise InvalidClientIdError(
      f"client id must be a string, got {type(client_id).__name__} {client_id!r}{suffix}"
    )
  if not client_id:
    raise InvalidClientIdError(f"client id is empty{suffix}; every client needs a non-empty id")
  return client_id


# --------------------------------------------------------------------------
# Client id -> file (Python side, used by the writer)
# --------------------------------------------------------------------------


def _b64(data: bytes) -> str:
  return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _fingerprint_hex(client_id: str) -> str:
  """`tf.fingerprint(id, "farmhash64")` as hex (its bytes are little-endian)."""
  return fingerprint64(client_id.encode("utf-8")).to_bytes(8, "little").hex()


def client_file_name(client_id: str) -> str:
  """The file name of a client: base64url of the id, or prefix~fingerprint for long ids."""
  raw = check_client_id(client_id).encode("utf-8")
  if len(raw) <= MAX_PLAIN_ID_BYTES:
    return _b64(raw) + CLIENT_FILE_SUFFIX
  return _b64(raw[:LONG_ID_PREFIX_BYTES]) + "~" + _fingerprint_hex(client_id) + CLIENT_FILE_SUFFIX


def shard_of(client_id: str, num_shards: int) -> int:
  """The shard directory of a client: `tf.strings.to_hash_bucket_fast(id, num_shards)`."""
  return hash_bucket(check_client_id(client_id).encode("utf-8"), num_shards)


def shard_dir_name(shard: int) -> str:
  return f"{shard:05d}"


def data_dir_name(job_key: str) -> str:
  """The data directory of a job: 'data-' and 16 hex digits of the job key."""
  return DATA_DIR_PREFIX + job_key[:16]


def client_relative_path(client_id: str, split: str, num_shards: int) -> str:
  """`<split>/<shard>/<name>.tfrecord`, relative to the data directory, '/'-separated."""
  return posixpath.join(
    split, shard_dir_name(shard_of(client_id, num_shards)), client_file_name(client_id)
  )


def default_num_shards(num_clients: int) -> int:
  """Enough shard directories that each holds about TARGET_FILES_PER_SHARD files."""
  return max(1, -(-num_clients // TARGET_FILES_PER_SHARD))


def join(root: str, *parts: str) -> str:
  """Joins store paths with '/', which every Beam and TF filesystem accepts."""
  return posixpath.join(root.rstrip("/") if root != "/" else root, *parts)


# --------------------------------------------------------------------------
# Client id -> file (TensorFlow side, traceable, used by the reader)
# --------------------------------------------------------------------------

_HEX_BYTES = [f"{i:02x}" for i in range(256)]


def client_relative_path_tf(client_id: tf.Tensor, split: tf.Tensor, num_shards: int) -> tf.Tensor:
  """In-graph twin of `client_relative_path`: a scalar tf.string path.

  `client_id` and `split` are scalar tf.string tensors; O(1) per lookup, no
  table of ids.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  client_id = tf.convert_to_tensor(client_id, tf.string)
  shard = tf.strings.to_hash_bucket_fast(client_id, num_shards)
  shard_dir = tf.strings.as_string(shard, width=5, fill="0")

  def plain_name():
    return tf.io.encode_base64(client_id, pad=False)

  def long_name():
    prefix = tf.io.encode_base64(
      tf.strings.substr(client_id, 0, LONG_ID_PREFIX_BYTES, unit="BYTE"), pad=False
    )
    fp = tf.fingerprint(tf.reshape(client_id, [1]), method="farmhash64")[0]
    hex_digits = tf.gather(tf.constant(_HEX_BYTES), tf.cast(fp, tf.int32))
    return tf.strings.join([prefix, "~", tf.strings.reduce_join(hex_digits)])

  name = tf.cond(
    tf.strings.length(client_id, unit="BYTE") <= MAX_PLAIN_ID_BYTES, plain_name, long_name
  )
  return tf.strings.join([split, "/", shard_dir, "/", name, CLIENT_FILE_SUFFIX])


# --------------------------------------------------------------------------
# Split names
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)  # every manifest row names one of a store's few splits
def is_split_name(name: str) -> bool:
  """Whether `name` matches SPLIT_NAME_RE and is not the manifest directory."""
  return bool(SPLIT_NAME_RE.fullmatch(name)) and name != MANIFEST_DIR


def check_split_name(name: Any, where: str) -> str:
  """Returns `name` if it is a valid split name (SPLIT_NAME_RE, not 'manifest').

  Raises:
    StoreFormatError: naming `where` and the pattern.
  """
  if not isinstance(name, str) or not is_split_name(name):
    raise StoreFormatError(
      f"{where}: split name {name!r} is not a split directory name (letters, digits, '_' "
      f"and '-', starting with a letter or digit, at most 64 characters, not {MANIFEST_DIR!r})"
    )
  return name


# --------------------------------------------------------------------------
# Fingerprint64
# --------------------------------------------------------------------------
#
# farmhash's Fingerprint64, the hash behind TensorFlow's string bucketing, in Python.
#
# The store names shard directories `tf.strings.to_hash_bucket_fast(id, n)`
# (= Fingerprint64(id) mod n) and long-id files by `tf.fingerprint(id,
# "farmhash64")` (its 8 little-endian bytes), so that readers can compute
# paths in TF ops. Writers compute the same values here, without importing
# TensorFlow in every pipeline worker. This follows farmhash's `farmhashna`
# `Hash64` (seed-free), which `util::Fingerprint64` uses; tests pin it to
# TensorFlow's ops.

_MASK = (1 << 64) - 1
_K0 = 0xC3A5C85C97CB3127
_K1 = 0xB492B66FBE98F273
_K2 = 0x9AE16A3B2F90404F


def _fetch64(s: bytes, i: int) -> int:
  return int.from_bytes(s[i : i + 8], "little")


def _fetch32(s: bytes, i: int) -> int:
  return int.from_bytes(s[i : i + 4], "little")


def _rotate(v: int, shift: int) -> int:
  return v if shift == 0 else ((v >> shift) | (v << (64 - shift))) & _MASK


def _shift_mix(v: int) -> int:
  return v ^ (v >> 47)


def _hash_len16(u: int, v: int, mul: int) -> int:
  a = ((u ^ v) * mul) & _MASK
  a ^= a >> 47
  b = ((v ^ a) * mul) & _MASK
  b ^= b >> 47
  return (b * mul) & _MASK


def _hash_len0to16(s: bytes) -> int:
  n = len(s)
  if n >= 8:
    mul = _K2 + n * 2
    a = (_fetch64(s, 0) + _K2) & _MASK
    b = _fetch64(s, n - 8)
    c = (_rotate(b, 37) * mul + a) & _MASK
    d = ((_rotate(a, 25) + b) * mul) & _MASK
    return _hash_len16(c, d, mul)
  if n >= 4:
    mul = _K2 + n * 2
    a = _fetch32(s, 0)
    return _hash_len16((n + (a << 3)) & _MASK, _fetch32(s, n - 4), mul)
  if n > 0:
    y = (s[0] + (s[n >> 1] << 8)) & 0xFFFFFFFF
    z = (n + (s[n - 1] << 2)) & 0xFFFFFFFF
    return (_shift_mix(((y * _K2) ^ (z * _K0)) & _MASK) * _K2) & _MASK
  return _K2


def _hash_len17to32(s: bytes) -> int:
  n = len(s)
  mul = _K2 + n * 2
  a = (_fetch64(s, 0) * _K1) & _MASK
  b = _fetch64(s, 8)
  c = (_fetch64(s, n - 8) * mul) & _MASK
  d = (_fetch64(s, n - 16) * _K2) & _MASK
  return _hash_len16(
    (_rotate((a + b) & _MASK, 43) + _rotate(c, 30) + d) & _MASK,
    (a + _rotate((b + _K2) & _MASK, 18) + c) & _MASK,
    mul,
  )


def _hash_len33to64(s: bytes) -> int:
  n = len(s)
  mul = _K2 + n * 2
  a = (_fetch64(s, 0) * _K2) & _MASK
  b = _fetch64(s, 8)
  c = (_fetch64(s, n - 8) * mul) & _MASK
  d = (_fetch64(s, n - 16) * _K2) & _MASK
  y = (_rotate((a + b) & _MASK, 43) + _rotate(c, 30) + d) & _MASK
  z = _hash_len16(y, (a + _rotate((b + _K2) & _MASK, 18) + c) & _MASK, mul)
  e = (_fetch64(s, 16) * mul) & _MASK
  f = _fetch64(s, 24)
  g = ((y + _fetch64(s, n - 32)) * mul) & _MASK
  h = ((z + _fetch64(s, n - 24)) * mul) & _MASK
  return _hash_len16(
    (_rotate((e + f) & _MASK, 43) + _rotate(g, 30) + h) & _MASK,
    (e + _rotate((f + a) & _MASK, 18) + g) & _MASK,
    mul,
  )


def _weak_hash_len32_with_seeds(s: bytes, i: int, a: int, b: int) -> tuple[int, int]:
  w, x, y, z = _fetch64(s, i), _fetch64(s, i + 8), _fetch64(s, i + 16), _fetch64(s, i + 24)
  a = (a + w) & _MASK
  b = _rotate((b + a + z) & _MASK, 21)
  c = a
  a = (a + x + y) & _MASK
  b = (b + _rotate(a, 44)) & _MASK
  return (a + z) & _MASK, (b + c) & _MASK


def fingerprint64(data: bytes) -> int:
  """farmhash::Fingerprint64 of `data`, as an unsigned 64-bit int."""
  n = len(data)
  if n <= 16:
    return _hash_len0to16(data)
  if n <= 32:
    return _hash_len17to32(data)
  if n <= 64:
    return _hash_len33to64(data)
  s = data
  seed = 81
  x = seed
  y = (seed * _K1 + 113) & _MASK
  z = (_shift_mix((y * _K2 + 113) & _MASK) * _K2) & _MASK
  v = (0, 0)
  w = (0, 0)
  x = (x * _K2 + _fetch64(s, 0)) & _MASK
  end = ((n - 1) // 64) * 64
  last64 = end + ((n - 1) & 63) - 63
  i = 0
  while True:
    x = (_rotate((x + y + v[0] + _fetch64(s, i + 8)) & _MASK, 37) * _K1) & _MASK
    y = (_rotate((y + v[1] + _fetch64(s, i + 48)) & _MASK, 42) * _K1) & _MASK
    x ^= w[1]
    y = (y + v[0] + _fetch64(s, i + 40)) & _MASK
    z = (_rotate((z + w[0]) & _MASK, 33) * _K1) & _MASK
    v = _weak_hash_len32_with_seeds(s, i, (v[1] * _K1) & _MASK, (x + w[0]) & _MASK)
    w = _weak_hash_len32_with_seeds(
      s, i + 32, (z + w[1]) & _MASK, (y + _fetch64(s, i + 16)) & _MASK
    )
    z, x = x, z
    i += 64
    if i == end:
      break
  mul = _K1 + ((z & 0xFF) << 1)
  i = last64
  w = ((w[0] + ((n - 1) & 63)) & _MASK, w[1])
  v = ((v[0] + w[0]) & _MASK, v[1])
  w = ((w[0] + v[0]) & _MASK, w[1])
  x = (_rotate((x + y + v[0] + _fetch64(s, i + 8)) & _MASK, 37) * mul) & _MASK
  y = (_rotate((y + v[1] + _fetch64(s, i + 48)) & _MASK, 42) * mul) & _MASK
  x ^= (w[1] * 9) & _MASK
  y = (y + v[0] * 9 + _fetch64(s, i + 40)) & _MASK
  z = (_rotate((z + w[0]) & _MASK, 33) * mul) & _MASK
  v = _weak_hash_len32_with_seeds(s, i, (v[1] * mul) & _MASK, (x + w[0]) & _MASK)
  w = _weak_hash_len32_with_seeds(s, i + 32, (z + w[1]) & _MASK, (y + _fetch64(s, i + 16)) & _MASK)
  z, x = x, z
  return _hash_len16(
    (_hash_len16(v[0], w[0], mul) + _shift_mix(y) * _K0 + z) & _MASK,
    (_hash_len16(v[1], w[1], mul) + x) & _MASK,
    mul,
  )


def hash_bucket(data: bytes, num_buckets: int) -> int:
  """`tf.strings.to_hash_bucket_fast` of one string: Fingerprint64 mod `num_buckets`."""
  return fingerprint64(data) % num_buckets
