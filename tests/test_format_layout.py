"""The store's two id -> path mappings (Python and TF ops) agree, and ids are checked."""

import base64
import posixpath

import pytest
import tensorflow as tf

from fedbeam.format.layout import (
  InvalidClientIdError,
  check_client_id,
  client_file_name,
  client_relative_path,
  client_relative_path_tf,
  shard_of,
)

# Ids that stress the mapping: separators, dot segments, spaces, non-ASCII,
# NUL, the 150-byte boundary (also inside multi-byte characters), ids whose
# 96-byte prefix cuts a character, and ids ending like a shard suffix.
TRICKY_IDS = [
  "a",
  "a/b",
  "a/b/c/",
  "/leading",
  "/",
  "..",
  "../..",
  "../../etc/passwd",
  ".",
  "./x",
  "with space",
  " ",
  "tab\there",
  "new\nline",
  "nul\x00byte",
  "naïve",
  "日本語のクライアント",
  "emoji 🙂🚀",
  "é",
  "-_=+",
  "a~b",
  "x" * 149,
  "x" * 150,
  "x" * 151,
  "y" * 300,
  "é" * 75,
  "é" * 76,
  "a" + "é" * 100,
  "🙂" * 40,
  "../" * 60,
  "client_12",
  "abc_12",
  "_12",
  "f0f0_12",
  "AAAA",
  "AAAA=",
  "AAA",
  "QUFB",
]

SPLITS = ["all", "train", "test"]
NUM_SHARDS = [1, 7, 1000]


@pytest.fixture(scope="module")
def tf_paths():
  """Every (id, split, num_shards) mapped by client_relative_path_tf inside one tf.function."""
  results = {}
  for num_shards in NUM_SHARDS:

    @tf.function(input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.string)])
    def path_fn(client_id, split, n=num_shards):
      return client_relative_path_tf(client_id, split, n)

    for split in SPLITS:
      for cid in TRICKY_IDS:
        results[cid, split, num_shards] = (
          path_fn(tf.constant(cid), tf.constant(split)).numpy().decode()
        )
  return results


@pytest.mark.parametrize("num_shards", NUM_SHARDS)
@pytest.mark.parametrize("split", SPLITS)
def test_python_and_tf_graph_paths_are_identical(tf_paths, split, num_shards):
  mismatches = {}
  for cid in TRICKY_IDS:
    python_path = client_relative_path(cid, split, num_shards)
    if python_path != tf_paths[cid, split, num_shards]:
      mismatches[cid] = (python_path, tf_paths[cid, split, num_shards])
  assert not mismatches


def test_paths_follow_the_documented_rule():
  for cid in TRICKY_IDS:
    raw = cid.encode("utf-8")
    shard = int(tf.strings.to_hash_bucket_fast(cid, 7).numpy())
    if len(raw) <= 150:
      name = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    else:
      fingerprint = tf.fingerprint(tf.constant([cid]), method="farmhash64").numpy()[0]
      name = (
        base64.urlsafe_b64encode(raw[:96]).decode().rstrip("=") + "~" + bytes(fingerprint).hex()
      )
    assert client_relative_path(cid, "train", 7) == f"train/{shard:05d}/{name}.tfrecord", cid


def test_long_name_fingerprint_and_shard_use_the_same_farmhash64():
  # The hex digits are Fingerprint64's 8 bytes little-endian; the shard is
  # the same Fingerprint64 modulo num_shards (docs/store-format.md).
  for cid in [c for c in TRICKY_IDS if len(c.encode()) > 150]:
    digits = client_file_name(cid)[: -len(".tfrecord")].split("~")[1]
    fingerprint = int.from_bytes(bytes.fromhex(digits), "little")
    for num_shards in (7, 1000, 2**31 - 1):
      assert shard_of(cid, num_shards) == fingerprint % num_shards


def test_every_path_stays_inside_its_split_and_shard_directory():
  names = set()
  for cid in TRICKY_IDS:
    for num_shards in NUM_SHARDS:
      rel = client_relative_path(cid, "train", num_shards)
      parts = rel.split("/")
      assert len(parts) == 3, rel
      split, shard, name = parts
      assert split == "train"
      assert shard.isdigit() and len(shard) == 5 and int(shard) < num_shards
      assert name not in (".", "..") and not name.startswith(".") and name.endswith(".tfrecord")
      assert set(name[: -len(".tfrecord")]) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~"
      ), name
      assert posixpath.normpath(posixpath.join("/store", rel)).startswith("/store/train/")
      # Within common file-name limits, including the writer's temporary name.
      assert len(name.encode()) + len(".") + len(".tmp-") + 32 <= 255
    names.add(client_file_name(cid))
  assert len(names) == len(TRICKY_IDS), "two distinct ids share a file name"


def test_long_ids_with_a_common_prefix_get_distinct_names():
  prefix = "p" * 200
  names = {client_file_name(prefix + suffix) for suffix in ["a", "b", "_12", "é"]}
  assert len(names) == 4
  assert all("~" in n for n in names)


@pytest.mark.parametrize("bad", ["", b"", b"\xff\xfe", b"ok\xc3", 12, None])
def test_check_client_id_rejects_empty_non_utf8_and_non_strings(bad):
  with pytest.raises(InvalidClientIdError) as e:
    check_client_id(bad, "input.tfrecord record 3")
  assert "input.tfrecord record 3" in str(e.value)


def test_check_client_id_accepts_text_and_utf8_bytes():
  assert check_client_id("naïve") == "naïve"
  assert check_client_id("naïve".encode()) == "naïve"
  with pytest.raises(InvalidClientIdError, match="empty"):
    client_relative_path("", "all", 1)
