"""The runtime reader checks client files and manifest rows against what the store says.

Issue 16: short, empty, swapped and forged client files (items 3, 6 and 13) fail every
per-client read path naming the client; manifest rows that disagree with the metadata
(item 10) fail `load_client_data` naming the figure.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap

import fastavro
import numpy as np
import pytest
import tensorflow as tf

from fedbeam import testing as fbt
from fedbeam.format.layout import MANIFEST_DIR, StoreFormatError
from fedbeam.format.manifest import manifest_file_name
from fedbeam.format.metadata import metadata_path, parsed_schema, read_metadata
from fedbeam.format.tfrecord import masked_crc, read_tfrecords, tfrecord_frames
from fedbeam.runtime.client_data import ClientFileError, load_client_data

SPEC = {"label": {"dtype": "int32", "shape": []}, "pixels": {"dtype": "float32", "shape": [4]}}


def _clients():
  rng = np.random.default_rng(3)
  return {
    f"c{i}": [
      {"label": np.int32(j % 3), "pixels": rng.random(4, dtype=np.float32)} for j in range(i + 1)
    ]
    for i in range(6)
  }


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
  return fbt.prepare_store(_clients(), str(tmp_path_factory.mktemp("checks")), element_spec=SPEC)


@pytest.fixture
def store(clean_store, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(clean_store, dst)
  return dst


def _records(path):
  with open(path, "rb") as f:
    return list(read_tfrecords(f))


def _write_records(path, records):
  with open(path, "wb") as f:
    f.write(b"".join(tfrecord_frames(records)))


def _every_path_fails(store_path, cid, eager_match, graph_match):
  """Reads `cid` through every per-client path; each must fail naming the client."""
  data = load_client_data(store_path)
  with pytest.raises(ClientFileError, match=eager_match):
    list(data.create_tf_dataset_for_client(cid))
  # A transformation of the eager dataset never reaches the file either.
  # TensorFlow's message escapes the quotes around the id.
  with pytest.raises(tf.errors.InvalidArgumentError, match=rf"client\W+{cid}\W+ in store"):
    list(data.create_tf_dataset_for_client(cid).batch(2))
  with pytest.raises(tf.errors.InvalidArgumentError, match=rf"client\W+{cid}\W+ in store"):
    list(data.serializable_dataset_fn(cid))
  traced = tf.function(data.serializable_dataset_fn, autograph=False)
  with pytest.raises(tf.errors.OpError, match=graph_match):
    list(traced(tf.constant(cid)))
  with pytest.raises(ClientFileError, match=eager_match):
    data.client_tensors_fn(cid)

  @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
  def label_sum(client_id):
    return tf.reduce_sum(data.client_tensors_fn(client_id)["label"])

  with pytest.raises(
    tf.errors.InvalidArgumentError, match=rf"the file of client.*{cid}.*in store {store_path} holds"
  ) as e:
    label_sum(tf.constant(cid))
  assert isinstance(data.client_file_error(e.value, cid), ClientFileError)
  # Every other client reads as before.
  fbt.assert_elements_equal(
    fbt.dataset_elements(data.create_tf_dataset_for_client("c1")), _clients()["c1"], ordered=False
  )


# ---------------------------------------------------------------------------
# Item 3: short, empty and swapped client files
# ---------------------------------------------------------------------------


def test_a_file_cut_at_a_record_boundary_fails_every_read_path(store):
  path = fbt.client_file(store, "c5")
  _write_records(path, _records(path)[:4])  # 4 of its 6 records, framing intact
  size = os.path.getsize(path)
  _every_path_fails(
    store,
    "c5",
    rf"client 'c5' in store .* is {size} bytes, the manifest says",
    rf"client.*c5.*is.*{size}.*bytes, the manifest says",
  )


def test_an_empty_client_file_fails_every_read_path(store):
  open(fbt.client_file(store, "c3"), "wb").close()
  _every_path_fails(
    store,
    "c3",
    r"client 'c3' in store .* is 0 bytes, the manifest says",
    r"client.*c3.*is.*\b0\b.*bytes, the manifest says",
  )


def test_swapped_client_files_fail_instead_of_serving_each_others_data(store):
  a, b = fbt.client_file(store, "c2"), fbt.client_file(store, "c4")
  tmp = a + ".swap"
  os.rename(a, tmp)
  os.rename(b, a)
  os.rename(tmp, b)
  for cid in ("c2", "c4"):
    _every_path_fails(
      store,
      cid,
      rf"client '{cid}' .* bytes, the manifest says",
      rf"client.*{cid}.*bytes, the manifest says",
    )


def test_a_file_with_more_records_than_the_manifest_fails_on_count(store):
  # The manifest (and the metadata's totals, so the load checks pass) says c2
  # holds 2 records; its file, of the size the manifest gives, holds 3.
  metadata = read_metadata(store)
  _edit_manifest(
    store, lambda rows: [dict(r, num_examples=2) if r["client_id"] == "c2" else r for r in rows]
  )
  metadata["splits"][0]["num_examples"] -= 1
  with open(metadata_path(store), "w") as f:
    json.dump(metadata, f)
  data = load_client_data(store)
  with pytest.raises(
    ClientFileError, match="client 'c2' .* holds more than 2 records, the manifest says 2"
  ):
    list(data.create_tf_dataset_for_client("c2"))
  with pytest.raises(ClientFileError, match="client 'c2' .* holds more than 2 records"):
    data.client_tensors_fn("c2")
  traced = tf.function(data.serializable_dataset_fn, autograph=False)
  with pytest.raises(tf.errors.FailedPreconditionError, match="expected to contain 2 elements"):
    list(traced(tf.constant("c2")))

  @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
  def count(client_id):
    return tf.shape(data.client_tensors_fn(client_id)["label"])[0]

  with pytest.raises(tf.errors.InvalidArgumentError, match=r"client.*c2.*holds.*3.*records"):
    count(tf.constant("c2"))
  assert int(count(tf.constant("c5"))) == 6


def test_a_sound_client_reads_the_same_through_every_path(clean_store):
  data = load_client_data(clean_store)
  traced = tf.function(data.serializable_dataset_fn, autograph=False)
  for cid, expected in _clients().items():
    for ds in (
      data.create_tf_dataset_for_client(cid),
      data.serializable_dataset_fn(cid),
      traced(tf.constant(cid)),
    ):
      assert int(ds.cardinality()) in (len(expected), tf.data.UNKNOWN_CARDINALITY)
      fbt.assert_elements_equal(fbt.dataset_elements(ds), expected, ordered=False, where=cid)
    tensors = data.client_tensors_fn(cid)
    assert tensors["label"].shape[0] == len(expected)
  assert int(data.create_tf_dataset_for_client("c4").cardinality()) == 5


# ---------------------------------------------------------------------------
# Item 6 (reader): a record length forged to 2^40 with a valid length CRC
# ---------------------------------------------------------------------------


def test_a_forged_record_length_is_refused_before_tensorflow_reads_it(store):
  path = fbt.client_file(store, "c5")
  data = bytearray(open(path, "rb").read())
  length = struct.pack("<Q", 1 << 40)
  data[:12] = length + struct.pack("<I", masked_crc(length))  # pylint: disable=protected-access
  open(path, "wb").write(bytes(data))
  # In a child process: unguarded, TensorFlow's record reader allocates 1 TiB
  # and the process dies.
  script = textwrap.dedent(f"""
      from fedbeam.runtime.client_data import ClientFileError, load_client_data
      from fedbeam.runtime.tff_worker import stop_tff_workers
      data = load_client_data({store!r})
      for name, read in (("eager", lambda: list(data.create_tf_dataset_for_client("c5"))),
                         ("tensors", lambda: data.client_tensors_fn("c5"))):
        try:
          read()
          print(name, "read without error")
        except ClientFileError as e:
          print(name, "ClientFileError", e)
      stop_tff_workers()
      """)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  run = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
  )
  assert run.returncode == 0, run.stderr[-2000:]
  lines = [l for l in run.stdout.splitlines() if l.startswith(("eager", "tensors"))]
  assert len(lines) == 2, run.stdout
  for line in lines:
    assert "ClientFileError the file of client 'c5'" in line
    assert "is damaged: record 0 says it is 1099511627776 bytes long" in line


# ---------------------------------------------------------------------------
# Item 13 (reader): client_tensors_fn names the client of a missing or damaged file
# ---------------------------------------------------------------------------


def test_client_tensors_fn_names_the_client_of_a_missing_or_damaged_file(store):
  os.remove(fbt.client_file(store, "c3"))
  path = fbt.client_file(store, "c5")
  data = bytearray(open(path, "rb").read())
  data[30] ^= 0xFF  # inside the first record: its data CRC fails
  open(path, "wb").write(bytes(data))
  tensors_fn = load_client_data(store).client_tensors_fn
  with pytest.raises(ClientFileError, match=rf"client 'c3' in store {store} is missing"):
    tensors_fn("c3")
  with pytest.raises(ClientFileError, match=rf"client 'c5' in store {store} is damaged"):
    tensors_fn(tf.constant("c5"))
  with pytest.raises(ValueError, match="'nobody' is not a client"):
    tensors_fn("nobody")
  assert tensors_fn("c4")["label"].shape == (5,)


# ---------------------------------------------------------------------------
# Item 10: manifest rows that disagree with the metadata
# ---------------------------------------------------------------------------


def _edit_manifest(store_path, edit):
  metadata = read_metadata(store_path)
  path = os.path.join(
    store_path,
    metadata["data_dir"],
    MANIFEST_DIR,
    manifest_file_name(0, metadata["manifest"]["num_files"]),
  )
  with open(path, "rb") as f:
    rows = edit(list(fastavro.reader(f)))
  with open(path, "wb") as f:
    fastavro.writer(f, parsed_schema("manifest"), rows)


def _with(cid, **fields):
  return lambda rows: [dict(r, **fields) if r["client_id"] == cid else r for r in rows]


@pytest.mark.parametrize(
  "edit, match",
  [
    (
      lambda rows: [r for r in rows if r["client_id"] != "c2"],
      r"split 'all' has num_clients 6 in the metadata but 5 in the manifest",
    ),
    (_with("c2", split="other"), r"client 'c2' names split 'other', which the metadata does not"),
    # Rows out of bounds on their own are refused by the manifest reader.
    (
      _with("c2", num_examples=-3),
      r"client 'c2': num_examples -3 and num_bytes \d+ must not be "
      r"negative",
    ),
    (
      _with("c2", num_bytes=-1),
      r"client 'c2': num_examples 3 and num_bytes -1 must not be "
      r"negative",
    ),
    (
      _with("c2", num_examples=4),
      r"split 'all' has num_examples 21 in the metadata but 22 in the manifest",
    ),
    (
      _with("c2", num_examples=10**9),
      r"client 'c2': 1000000000 examples of the element spec "
      r"take at least \d+ bytes, the manifest says the file "
      r"has \d+",
    ),
    (
      _with("c2", num_bytes=5),
      r"client 'c2': 3 examples of the element spec take at least "
      r"\d+ bytes, the manifest says the file has 5",
    ),
    (
      _with("c0", num_examples=0),
      r"client 'c0' has num_examples 0 in num_bytes \d+: only an "
      r"empty client has 0 bytes",
    ),
    (_with("c2", num_bytes=200), r"split 'all' has num_bytes \d+ in the metadata but"),
    (lambda rows: rows + [dict(rows[0])], r"client 'c0' appears twice"),
  ],
)
def test_manifest_rows_that_disagree_with_the_metadata_are_refused(store, edit, match):
  _edit_manifest(store, edit)
  where = re.escape(store)
  with pytest.raises(
    StoreFormatError, match=rf"(store {where} is damaged|manifest file {where}/\S+): .*{match}"
  ):
    load_client_data(store)


def test_a_sound_manifest_loads_every_client(clean_store):
  data = load_client_data(clean_store)
  assert len(data) == 6 and [data.num_examples(c) for c in data.client_ids] == list(range(1, 7))


# ---------------------------------------------------------------------------
# The in-graph lookup of manifest figures
# ---------------------------------------------------------------------------


def test_manifest_figures_look_up_every_id_even_when_keys_collide():
  from fedbeam.runtime.client_file_checks import ManifestFigures

  ids = [f"id{i}" for i in range(50)] + ["", "two/ü", "x" * 300]
  examples = list(range(len(ids)))
  sizes = [100 + 7 * i for i in range(len(ids))]
  for key_fn, exact in ((None, 0), (lambda s: tf.strings.to_hash_bucket_fast(s, 4), len(ids))):
    figures = (
      ManifestFigures(ids, examples, sizes)
      if key_fn is None
      else ManifestFigures(ids, examples, sizes, key_fn=key_fn)
    )
    assert figures.num_exact == exact
    lookup = tf.function(figures.lookup, input_signature=[tf.TensorSpec([], tf.string)])
    for cid, n, b in zip(ids, examples, sizes):
      assert [v.numpy() for v in lookup(tf.constant(cid))] == [True, n, b], cid
    assert [v.numpy() for v in lookup(tf.constant("not there"))] == [False, -1, -1]
