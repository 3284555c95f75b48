"""Store records round-trip exactly: the encoders, the numpy decoder and TensorFlow's parser."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from fedbeam.format.codec import (
  Example,
  RecordDecodeError,
  decode_examples,
  encode_example,
  encode_examples,
  features_field_header,
  make_batch_parser,
  make_record_parser,
  records_to_elements,
  serialize_example,
)
from fedbeam.format.spec import ENCODINGS, ElementSpec, FeatureSpec


def _bits(dtype, values):
  return np.array(values, dtype=dtype)


F64_SPECIALS = np.array(
  [
    0x7FF8000000000001,
    0xFFF0000000000000,
    0x8000000000000000,
    0x0000000000000001,
    0x7FEFFFFFFFFFFFFF,
    0x3FB999999999999A,
    0x7FF4000000000000,
  ],
  dtype=np.uint64,
).view(np.float64)
F32_SPECIALS = np.array(
  [0x7FC00001, 0xFF800000, 0x80000000, 0x00000001, 0x7F7FFFFF, 0x3DCCCCCD], dtype=np.uint32
).view(np.float32)

# One value per dtype: a scalar, a fixed [2, 3] block and a variable [None, 2] list.
SCALARS = {
  "string": b"nul\x00and\xffraw bytes",
  "float16": np.float16(-65504.0),
  "float32": F32_SPECIALS[0],
  "float64": F64_SPECIALS[0],
  "bool": True,
  "int8": np.int8(-128),
  "int16": np.int16(-32768),
  "int32": np.int32(-(2**31)),
  "int64": np.int64(-(2**63)),
  "uint8": np.uint8(255),
  "uint16": np.uint16(65535),
  "uint32": np.uint32(2**32 - 1),
  "uint64": np.uint64(2**64 - 1),
}


def _block(dtype, n):
  """n values of `dtype` covering its extremes (bit patterns for floats)."""
  if dtype == "string":
    pool = [b"", b"\x00", b"a\x00b", "é".encode(), b"\xff\xfe", b"x" * 300]
    return np.array([pool[i % len(pool)] for i in range(n)], dtype=object)
  if dtype == "bool":
    return np.array([i % 2 == 0 for i in range(n)], dtype=bool)
  if dtype == "float64":
    return np.resize(F64_SPECIALS, n)
  if dtype == "float32":
    return np.resize(F32_SPECIALS, n)
  if dtype == "float16":
    return np.resize(
      np.array([0x7C00, 0x8000, 0x0001, 0x7BFF, 0x3555], np.uint16).view(np.float16), n
    )
  info = np.iinfo(dtype)
  return np.resize(np.array([info.min, info.max, 0, 1, info.max - 1, info.min + 1], dtype=dtype), n)


def _spec_and_element(variable_rows: int):
  features, values = [], collections.OrderedDict()
  for dtype in ENCODINGS:
    features.append(FeatureSpec(f"{dtype}_scalar", dtype, ()))
    values[f"{dtype}_scalar"] = np.array(
      SCALARS[dtype], dtype=object if dtype == "string" else dtype
    )
    features.append(FeatureSpec(f"{dtype}_fixed", dtype, (2, 3)))
    values[f"{dtype}_fixed"] = _block(dtype, 6).reshape(2, 3)
    features.append(FeatureSpec(f"{dtype}_variable", dtype, (None, 2)))
    values[f"{dtype}_variable"] = _block(dtype, 2 * variable_rows).reshape(variable_rows, 2)
  return ElementSpec(tuple(features)), values


def _assert_exact(name, actual, expected):
  actual = np.asarray(actual)
  assert actual.shape == expected.shape, name
  if expected.dtype == object:
    assert actual.tolist() == expected.tolist(), name
  elif expected.dtype.kind == "f":
    assert actual.dtype == expected.dtype, name
    width = f"u{expected.itemsize}"
    np.testing.assert_array_equal(actual.view(width), expected.view(width), err_msg=name)
  else:
    assert actual.dtype == expected.dtype, name
    np.testing.assert_array_equal(actual, expected, err_msg=name)


@pytest.mark.parametrize("variable_rows", [0, 1, 3])
def test_record_parser_round_trips_every_dtype_and_shape_bit_for_bit(variable_rows):
  spec, element = _spec_and_element(variable_rows)
  record = encode_example(element, spec)
  parse = tf.function(make_record_parser(spec))
  parsed = parse(tf.constant(record))
  assert list(parsed) == spec.names
  for name, value in element.items():
    _assert_exact(name, parsed[name].numpy(), value)


def test_batch_parser_round_trips_fixed_shapes_bit_for_bit():
  spec, element = _spec_and_element(1)
  fixed = ElementSpec(tuple(f for f in spec.features if not f.is_variable_length))
  elements = [
    element,
    collections.OrderedDict((k, np.flip(v) if v.ndim else v) for k, v in element.items()),
  ]
  records = [encode_example({k: e[k] for k in fixed.names}, fixed) for e in elements]
  parse = tf.function(make_batch_parser(fixed))
  parsed = parse(tf.constant(records))
  for i, e in enumerate(elements):
    for name in fixed.names:
      _assert_exact(f"{name}[{i}]", parsed[name].numpy()[i], e[name])


def test_records_to_elements_gives_the_spec_and_values():
  for variable in (False, True):
    spec, element = _spec_and_element(2)
    if not variable:
      spec = ElementSpec(tuple(f for f in spec.features if not f.is_variable_length))
    element = {k: element[k] for k in spec.names}
    records = tf.data.Dataset.from_tensor_slices([encode_example(element, spec)] * 3)
    ds = records_to_elements(records, spec)
    assert ds.element_spec == spec.to_tensor_specs()
    out = list(ds.as_numpy_iterator())
    assert len(out) == 3
    for name in spec.names:
      _assert_exact(name, out[2][name], element[name])


def test_encoding_is_deterministic_and_uses_the_documented_lists():
  from tensorflow.core.example import example_pb2

  spec, element = _spec_and_element(1)
  record = encode_example(element, spec)
  assert record == encode_example(element, spec)
  example = example_pb2.Example.FromString(record)
  kinds = {
    "bytes": "bytes_list",
    "float": "float_list",
    "int64": "int64_list",
    "bits64": "int64_list",
  }
  for f in spec.features:
    assert example.features.feature[f.name].WhichOneof("kind") == kinds[f.encoding], f.name
  # float64 and uint64 are stored as the 64-bit pattern (bits64).
  stored = example.features.feature["float64_scalar"].int64_list.value[0]
  assert np.int64(stored).view(np.float64).tobytes() == F64_SPECIALS[0].tobytes()
  assert example.features.feature["uint64_scalar"].int64_list.value[0] == -1


@pytest.mark.parametrize("variable_rows", [0, 1, 3])
def test_encoding_equals_protobufs_deterministic_serialization(variable_rows):
  from tensorflow.core.example import example_pb2

  spec, element = _spec_and_element(variable_rows)
  example = example_pb2.Example()
  for f in spec.features:
    feature = example.features.feature[f.name]
    values = np.asarray(element[f.name]).reshape(-1)
    if f.encoding == "bytes":
      feature.bytes_list.SetInParent()
      feature.bytes_list.value.extend(values.tolist())
    elif f.encoding == "float":
      feature.float_list.SetInParent()
      feature.float_list.value.extend(values.astype(np.float32).tolist())
    else:
      feature.int64_list.SetInParent()
      ints = (
        values.astype(f.dtype).view(np.int64) if f.encoding == "bits64" else values.astype(np.int64)
      )
      feature.int64_list.value.extend(ints.tolist())
  assert encode_example(element, spec) == example.SerializeToString(deterministic=True)


@pytest.mark.parametrize("variable_rows", [0, 3])
def test_serialize_example_gives_encode_example_bytes_for_both_message_classes(variable_rows):
  from tensorflow.core.example import example_pb2

  spec, element = _spec_and_element(variable_rows)
  record = encode_example(element, spec)
  # Parsed, the map's entries come back in no promised order; serialized again they are sorted.
  assert serialize_example(example_pb2.Example.FromString(record)) == record
  ours = Example.FromString(record)
  assert serialize_example(ours) == record
  key = spec.features[-1].name
  value = ours.features.feature[key]
  del ours.features.feature[key]
  ours.features.feature[key].CopyFrom(value)  # re-inserted last, still written in key order
  assert serialize_example(ours) == record


def test_encode_examples_gives_encode_example_bytes_for_every_dtype():
  spec, element = _spec_and_element(1)
  fixed = ElementSpec(tuple(f for f in spec.features if not f.is_variable_length))
  rng = np.random.default_rng(3)
  elements = [element]
  for _ in range(5):  # Permuted values: other lengths of int64 varints, other floats.
    elements.append(
      collections.OrderedDict(
        (k, rng.permutation(v.reshape(-1)).reshape(v.shape) if v.size > 1 else v)
        for k, v in element.items()
      )
    )
  columns = {name: np.stack([e[name] for e in elements]) for name in fixed.names}
  want = [encode_example({k: e[k] for k in fixed.names}, fixed) for e in elements]
  assert encode_examples(columns, fixed, len(elements)) == want
  assert encode_examples({n: c[:0] for n, c in columns.items()}, fixed, 0) == []


def _fixed_elements(count: int):
  spec, element = _spec_and_element(1)
  fixed = ElementSpec(tuple(f for f in spec.features if not f.is_variable_length))
  rng = np.random.default_rng(11)
  elements = [{k: element[k] for k in fixed.names}]
  for _ in range(count - 1):  # Permuted values: other varint lengths, other floats.
    elements.append(
      {
        k: rng.permutation(v.reshape(-1)).reshape(v.shape) if v.size > 1 else v
        for k, v in elements[0].items()
      }
    )
  return fixed, elements


def test_decode_examples_equals_tensorflows_batch_parse_for_every_dtype():
  fixed, elements = _fixed_elements(6)
  records = [encode_example(e, fixed) for e in elements]
  decoded = decode_examples(records, fixed)
  parsed = make_batch_parser(fixed)(tf.constant(records))
  assert list(decoded) == fixed.names
  for name in fixed.names:
    _assert_exact(name, decoded[name], parsed[name].numpy())
    for i, e in enumerate(elements):
      _assert_exact(f"{name}[{i}]", decoded[name][i], e[name])
  assert {n: v.shape for n, v in decode_examples([], fixed).items()} == {
    f.name: (0,) + f.shape for f in fixed.features
  }


def _entry(key: bytes, feature: bytes) -> bytes:
  body = b"\x0a" + bytes([len(key)]) + key + b"\x12" + bytes([len(feature)]) + feature
  return b"\x0a" + bytes([len(body)]) + body


def _record(*entries: bytes) -> bytes:
  features = b"".join(entries)
  return b"\x0a" + bytes([len(features)]) + features


def test_decode_examples_reads_any_serializer_output_like_tensorflow():
  # Unpacked numbers, entries in any order, an extra feature, a repeated key
  # (the later entry wins) and the `features` field given twice (merged).
  from fedbeam.format.codec import Example  # pylint: disable=g-import-not-at-top

  spec = ElementSpec(
    (
      FeatureSpec("v", "float32", (3,)),
      FeatureSpec("n", "int64", (2,)),
      FeatureSpec("s", "string", ()),
    )
  )
  floats = np.array([1.5, -2.0, 3.25], "<f4").tobytes()
  unpacked_floats = b"".join(b"\x0d" + floats[i : i + 4] for i in range(0, 12, 4))
  float_list = b"\x12" + bytes([len(unpacked_floats)]) + unpacked_floats
  int_list = b"\x1a\x05\x08\x96\x01\x08\x07"  # 150 and 7, unpacked
  record = _record(
    _entry(b"n", int_list),
    _entry(b"extra", b"\x12\x00"),
    _entry(b"s", b"\x0a\x03\x0a\x01x"),
    _entry(b"v", b"\x12\x00"),
  ) + _record(_entry(b"v", float_list), _entry(b"s", b"\x0a\x04\x0a\x02yz"))
  reference = Example.FromString(record)  # protobuf's own reading of the same bytes
  assert list(reference.features.feature["v"].float_list.value) == [1.5, -2.0, 3.25]
  decoded = decode_examples([record], spec)
  parsed = make_batch_parser(spec)(tf.constant([record]))
  for name in spec.names:
    _assert_exact(name, decoded[name], parsed[name].numpy())
  assert decoded["n"].tolist() == [[150, 7]] and decoded["s"].tolist() == [b"yz"]


def test_decode_examples_of_unpacked_integers_in_records_of_one_length_equals_tensorflow():
  # Unpacked varints of other lengths move the bytes after them; records whose
  # varints end elsewhere than the first record's are read one by one.
  spec = ElementSpec((FeatureSpec("n", "int64", (2,)), FeatureSpec("s", "string", ())))

  def record(ints: bytes, text: bytes) -> bytes:
    return _record(
      _entry(b"n", b"\x1a" + bytes([len(ints)]) + ints),
      _entry(b"s", b"\x0a" + bytes([len(text) + 2, 0x0A, len(text)]) + text),
    )

  records = [
    record(b"\x08\x96\x01\x08\x07", b"ab"),  # 150, 7
    record(b"\x08\x05\x08\x96\x01", b"cd"),  # 5, 150: same length, other offsets
    record(b"\x08\xff\x01\x08\x00", b"ef"),  # 255, 0
    record(b"\x08\x01\x08\x02", b"ghi"),
  ]  # shorter ints, longer string
  assert len({len(r) for r in records}) == 1
  decoded = decode_examples(records, spec)
  parsed = make_batch_parser(spec)(tf.constant(records))
  for name in spec.names:
    _assert_exact(name, decoded[name], parsed[name].numpy())
  assert decoded["n"].tolist() == [[150, 7], [5, 150], [255, 0], [1, 2]]


def test_features_field_header_opens_what_encode_example_writes():
  spec = ElementSpec((FeatureSpec("v", "float32", (40,)),))
  record = encode_example({"v": np.zeros(40, np.float32)}, spec)
  header = features_field_header(len(record) - 3)  # A two-byte length: 128 or more.
  assert len(record) - 3 > 127 and len(header) == 3 and record.startswith(header)


@pytest.mark.parametrize(
  "feature, message",
  [
    (b"\x1a\x03\x0a\x01\x01\x1a\x03\x0a\x01\x07", "more than one list field"),
    (b"\x1a\x06\x0a\x01\x01\x0a\x01\x07", "packed values in more than one piece"),
  ],
)
def test_decode_examples_refuses_encodings_tensorflow_reads_otherwise(feature, message):
  # Protobuf would merge both lists; TensorFlow's parser reads only the first.
  spec = ElementSpec((FeatureSpec("n", "int64", (2,)),))
  with pytest.raises(RecordDecodeError, match=message):
    decode_examples([_record(_entry(b"n", feature))], spec)


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda r: r[:-3], "record 1: .*"),
    (
      lambda r: encode_example(
        {"v": np.zeros(2, np.float32)}, ElementSpec((FeatureSpec("v", "float32", (2,)),))
      ),
      "record 1: feature 'v' has 2 values, which does not fit shape \\[3\\]",
    ),
    (
      lambda r: encode_example(
        {"w": np.zeros(3, np.float32)}, ElementSpec((FeatureSpec("w", "float32", (3,)),))
      ),
      "record 1: feature 'v' is missing",
    ),
    (
      lambda r: encode_example(
        {"v": np.zeros(3, np.int64)}, ElementSpec((FeatureSpec("v", "int64", (3,)),))
      ),
      "record 1: feature 'v' holds a int64_list, the element spec \\(float32\\) needs a float_list",
    ),
  ],
)
def test_decode_examples_names_the_record_and_feature_at_fault(change, message):
  spec = ElementSpec((FeatureSpec("v", "float32", (3,)),))
  good = encode_example({"v": np.ones(3, np.float32)}, spec)
  with pytest.raises(RecordDecodeError, match=message):
    decode_examples([good, change(good)], spec)


def test_decode_examples_of_equal_length_but_different_layout_equals_tensorflow():
  # Records of one length are read at the first one's offsets only when their
  # framing matches it; these do not, or hold other numbers in equal bytes.
  spec = ElementSpec(
    (
      FeatureSpec("a", "int64", (2,)),
      FeatureSpec("b", "int64", ()),
      FeatureSpec("v", "float32", (2,)),
    )
  )
  canonical = [
    encode_example(
      {"a": np.array(a, np.int64), "b": np.array(b, np.int64), "v": np.array(v, np.float32)}, spec
    )
    for a, b, v in [
      ([1, 2], 300, [0.5, 1.5]),
      ([300, 2], 1, [2.5, -1.0]),
      ([3, 4], 200, [7.0, 8.0]),
      ([1, 400], 5, [1.0, 2.0]),
      ([5, 6], 129, [3.0, 4.0]),
    ]
  ]
  assert len({len(r) for r in canonical}) == 1
  floats = np.array([9.0, 10.0], "<f4").tobytes()
  swapped = _record(
    _entry(b"v", b"\x12\x0a\x0a\x08" + floats),
    _entry(b"b", b"\x1a\x04\x0a\x02\xc8\x01"),
    _entry(b"a", b"\x1a\x04\x0a\x02\x08\x09"),
  )
  records = canonical + [swapped] * 2 + canonical[::-1]
  assert len({len(r) for r in records}) == 1
  decoded = decode_examples(records, spec)
  parsed = make_batch_parser(spec)(tf.constant(records))
  for name in spec.names:
    _assert_exact(name, decoded[name], parsed[name].numpy())
  assert decoded["a"][5].tolist() == [8, 9] and decoded["b"][5] == 200 and decoded["b"][1] == 1


def test_decode_examples_checks_the_count_of_varints_in_equal_bytes():
  spec = ElementSpec((FeatureSpec("a", "int64", (3,)),))
  good = encode_example({"a": np.array([1, 2, 300], np.int64)}, spec)
  two = _record(_entry(b"a", b"\x1a\x06\x0a\x04\xac\x02\xac\x02"))  # [300, 300]: 4 bytes too
  assert len(two) == len(good)
  with pytest.raises(RecordDecodeError, match="record 2: feature 'a' has 2 values"):
    decode_examples([good, good, two, good], spec)
