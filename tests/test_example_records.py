"""encode_batch: whole batches of Example records give the bytes the record-by-record way gives."""

import numpy as np
import pytest

from fedbeam.format.codec import Example
from fedbeam.format.spec import ElementSpec, FeatureSpec
from fedbeam.pipelines import example_records as er
from fedbeam.pipelines.records import InputError

SPEC = ElementSpec((FeatureSpec("label", "int32", ()), FeatureSpec("pixels", "float32", (2, 3))))


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1
  out = bytearray()
  while n >= 0x80:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _ld(tag: int, payload: bytes) -> bytes:
  return bytes([tag]) + _varint(len(payload)) + payload


def _entry(name: str, feature: bytes) -> bytes:
  return _ld(0x0A, _ld(0x0A, name.encode()) + _ld(0x12, feature))


def _bytes_feature(*values: bytes) -> bytes:
  return _ld(0x0A, b"".join(_ld(0x0A, v) for v in values))


def _int_feature(*values: int, varints: bytes = None) -> bytes:
  return _ld(0x1A, _ld(0x0A, varints if varints is not None else b"".join(map(_varint, values))))


def _float_feature(values) -> bytes:
  return _ld(0x12, _ld(0x0A, np.asarray(values, "<f4").tobytes()))


def _record(
  cid: bytes,
  label: int = 3,
  pixels=None,
  order=("cid", "label", "pixels"),
  label_varints: bytes = None,
) -> bytes:
  pixels = np.arange(6, dtype=np.float32) if pixels is None else pixels
  entries = {
    "cid": _entry("client_id", _bytes_feature(cid)),
    "label": _entry("label", _int_feature(label, varints=label_varints)),
    "pixels": _entry("pixels", _float_feature(pixels)),
  }
  return _ld(0x0A, b"".join(entries[k] for k in order))


def _one_by_one(batch, spec):
  out = []
  for i in range(len(batch)):
    record = batch.input_record(i)
    out.append((record.client_id, record.position, er.encode_record(record, spec)))
  return out


def _batch(records, first=0):
  return er.ExampleBatch("in.tfrecord", first, list(records), "client_id")


def test_alike_records_give_the_record_by_record_bytes(monkeypatch):
  rng = np.random.default_rng(0)
  records = [
    _record(
      f"c{i % 7}".encode(),
      label=int(rng.integers(0, 100)),
      pixels=rng.normal(size=6).astype(np.float32),
    )
    for i in range(50)
  ]
  batch = _batch(records, first=100)
  parsed = []
  parse = er.parse_example_record
  monkeypatch.setattr(er, "parse_example_record", lambda *a: parsed.append(a[3]) or parse(*a))
  got = er.encode_batch(batch, SPEC)
  assert parsed == [("in.tfrecord", 100)]  # Only the template is parsed.
  monkeypatch.undo()
  assert got == _one_by_one(batch, SPEC)
  assert got[3][:2] == ("c3", ("in.tfrecord", 103))
  # The store record is the record without its client id, as TensorFlow would parse it.
  assert Example.FromString(got[0][2]).features.feature.keys() == {"label", "pixels"}


def test_mixed_layouts_values_and_encodings_give_the_record_by_record_bytes():
  nan_bits = np.array([0x7FC00001] * 6, np.uint32).view(np.float32)
  records = []
  for i in range(40):
    cid = ("ü" * (i % 3) + f"id{i % 5}").encode()
    records += [
      _record(cid, label=i),  # one-byte label
      _record(cid, label=1000 + i),  # two-byte label
      _record(cid, label=5, order=("label", "cid", "pixels")),  # id entry elsewhere
      _record(cid, label=7, order=("pixels", "label", "cid")),  # keys out of order
      _record(cid, label=9, label_varints=b"\x89\x00"),  # a non-minimal varint
      _record(cid, pixels=nan_bits),  # NaN payloads kept
    ]
  batch = _batch(records)
  assert er.encode_batch(batch, SPEC) == _one_by_one(batch, SPEC)
  bool_spec = ElementSpec((FeatureSpec("label", "bool", ()), SPEC["pixels"]))
  flags = _batch([_record(b"x", label=i % 2) for i in range(20)])
  assert er.encode_batch(flags, bool_spec) == _one_by_one(flags, bool_spec)


def test_records_converted_to_the_spec_give_the_record_by_record_bytes():
  # int64 values into a float feature, and an int8 label: stored after conversion.
  spec = ElementSpec((FeatureSpec("label", "int8", ()), FeatureSpec("pixels", "float64", (2, 3))))
  batch = _batch([_record(b"c", label=i) for i in range(30)])
  assert er.encode_batch(batch, spec) == _one_by_one(batch, spec)


@pytest.mark.parametrize(
  "bad, message",
  [
    (_record(b"ab", label=2**31), "record 13 .*outside the range of int32"),
    (_record(b"\xff\xfe"), r"not valid UTF-8 \(in.tfrecord record 13\)"),
    (b"\x0a\x05garbage", "record 13: not a serialized tf.train.Example"),
  ],
  ids=["out-of-range", "id-not-utf8", "not-an-example"],
)
def test_the_first_bad_record_of_a_batch_is_named(bad, message):
  # The good records share the bad ones' length (and layout, where they have one).
  good = [_record(b"ab", label=2**31 - 1) for _ in range(20)]
  records = good[:3] + [bad] + good[3:] + [bad]
  with pytest.raises(InputError, match=message):
    er.encode_batch(_batch(records, first=10), SPEC)


def test_a_value_out_of_range_in_an_alike_group_is_refused():
  records = [_record(b"c", label=100) for _ in range(20)]
  records[12] = _record(b"c", label=200)  # Same length; too large for int8.
  spec = ElementSpec((FeatureSpec("label", "int8", ()), SPEC["pixels"]))
  with pytest.raises(InputError, match="record 12 .*outside the range of int8"):
    er.encode_batch(_batch(records), spec)


def test_as_input_records_unbatches_and_passes_records_through():
  batch = _batch([_record(b"a"), _record(b"b")], first=4)
  records = list(er.as_input_records(batch))
  assert [(r.client_id, r.position) for r in records] == [
    ("a", ("in.tfrecord", 4)),
    ("b", ("in.tfrecord", 5)),
  ]
  assert list(er.as_input_records(records[0])) == [records[0]]


def _idless(label: int = 3, pixels=None, order=("label", "pixels"), label_varints=None) -> bytes:
  pixels = np.arange(6, dtype=np.float32) if pixels is None else pixels
  entries = {
    "label": _entry("label", _int_feature(label, varints=label_varints)),
    "pixels": _entry("pixels", _float_feature(pixels)),
  }
  return _ld(0x0A, b"".join(entries[k] for k in order))


def _given_ids_batch(records, rowids):
  ids = tuple(f"user {r % 4}/ü" for r in rowids)
  return er.ExampleBatch(
    "db.sqlite",
    rowids[0],
    list(records),
    None,
    client_ids=ids,
    indices=tuple(rowids),
    index_name="rowid",
  )


def test_records_with_given_ids_are_stored_as_read_when_alike(monkeypatch):
  rng = np.random.default_rng(1)
  records = [
    _idless(label=int(rng.integers(0, 100)), pixels=rng.normal(size=6).astype("f4"))
    for _ in range(30)
  ]
  rowids = list(range(7, 67, 2))
  batch = _given_ids_batch(records, rowids)
  parsed = []
  parse = er.parse_example_record
  monkeypatch.setattr(er, "parse_example_record", lambda *a: parsed.append(a[3]) or parse(*a))
  got = er.encode_batch(batch, SPEC)
  assert parsed == [("db.sqlite", 7)]  # Only the template is parsed.
  monkeypatch.undo()
  assert got == _one_by_one(batch, SPEC)
  assert [g[2] for g in got] == records  # Already store records: nothing is cut.
  assert got[2][:2] == ("user 3/ü", ("db.sqlite", 11))


def test_records_with_given_ids_in_other_layouts_give_the_record_by_record_bytes():
  records = []
  for i in range(12):
    records += [
      _idless(label=i),
      _idless(label=1000 + i),
      _idless(order=("pixels", "label")),
      _idless(label=9, label_varints=b"\x89\x00"),
    ]
  batch = _given_ids_batch(records, list(range(len(records))))
  got = er.encode_batch(batch, SPEC)
  assert got == _one_by_one(batch, SPEC)
  # Out of key order, or a non-minimal varint: stored as the parse-and-serialize way writes it.
  assert got[2][2] != records[2] and got[3][2] != records[3]


def test_a_bad_record_with_a_given_id_is_named_by_its_rowid():
  records = [_idless(label=2**31 - 1) for _ in range(20)]
  records[5] = _idless(label=2**31)
  with pytest.raises(InputError, match=r"db\.sqlite record 105 .*outside the range of int32"):
    er.encode_batch(_given_ids_batch(records, list(range(100, 120))), SPEC)
  records[5] = b"\x0a\x05garbage"
  with pytest.raises(InputError, match=r"db\.sqlite rowid 105: not a serialized"):
    er.encode_batch(_given_ids_batch(records, list(range(100, 120))), SPEC)


def test_a_batch_takes_a_client_id_key_or_given_ids_not_both():
  with pytest.raises(ValueError, match="not both"):
    er.ExampleBatch("f", 0, [b""], "client_id", client_ids=("a",))
  with pytest.raises(ValueError, match="2 client_ids for 1 records"):
    er.ExampleBatch("f", 0, [b""], None, client_ids=("a", "b"))
