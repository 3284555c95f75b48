"""fedbeam.format.layout.fingerprint64 against TensorFlow's farmhash ops, for every length class."""

import random

import tensorflow as tf

from fedbeam.format.layout import fingerprint64, hash_bucket


def _strings():
  rng = random.Random(7)
  # farmhash branches at 4, 8, 16, 32 and 64 bytes and loops per 64 bytes.
  out = [bytes(rng.getrandbits(8) for _ in range(n)) for n in range(0, 200) for _ in range(3)]
  out += [f"client_{i}".encode() for i in range(300)]
  out += ["writer/ünïcode-✓".encode("utf-8"), b"\x00" * 65, b"\xff" * 128]
  return out


def test_fingerprint64_equals_tf_fingerprint_farmhash64():
  strings = _strings()
  want = tf.fingerprint(tf.constant(strings), method="farmhash64").numpy()
  for s, fp in zip(strings, want):
    assert fingerprint64(s) == int.from_bytes(bytes(fp), "little"), len(s)


def test_hash_bucket_equals_to_hash_bucket_fast():
  strings = _strings()
  for num_buckets in (1, 3, 64, 4096, 2**31 - 1):
    want = tf.strings.to_hash_bucket_fast(tf.constant(strings), num_buckets).numpy()
    assert [hash_bucket(s, num_buckets) for s in strings] == want.tolist(), num_buckets
