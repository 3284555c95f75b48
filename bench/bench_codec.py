"""The store record codec against its peers: protobuf messages and TensorFlow's parser.

Every way fedbeam turns values into store records, or store records into
values, is timed beside the general-purpose way it could use instead, on
EMNIST-like elements (`label`: int32, `pixels`: float32 [28, 28]; the
benchmark pipeline's spec, `bench/workload.py`):

- `encode, one element`: `codec.encode_example` (the Example written
  directly, one element per call) against building a `codec.Example` message
  value by value and serializing it deterministically, and against
  `codec.encode_examples` of a single row;
- `encode, a client at once`: `codec.encode_examples` over a client's
  elements stacked on axis 0 against the message way per element;
- `decode, a client at once`: `codec.decode_examples` (numpy) against
  `tf.io.parse_example` of the same records (eager, one call; `.numpy()` of
  every feature) and against `codec.Example.FromString` per record;
- `store record from an input record`: `example_records.encode_batch` (the
  input records of one TFRecord batch with their client-id entry cut out,
  with numpy over the batch) against `encode_record` of each record parsed
  on its own (protobuf parse, delete the id, serialize deterministically).

Both sides of a row produce the same bytes (or values); the script checks
that before it times anything. It prints one JSON object: per row, each
side's microseconds per record for every run, their medians, and the ratio
of the medians (peer / fedbeam; above 1 means fedbeam's way is faster).

    .venv/bin/python -m bench.bench_codec --records 2048 --runs 7

Results: the "Store record codec" section of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Mapping

import numpy as np

from bench.workload import ELEMENT_SPEC_JSON
from fedbeam.format.codec import Example, decode_examples, encode_example, encode_examples
from fedbeam.format.spec import ElementSpec

__all__ = ["columns_of", "example_message", "time_rows"]


def example_message(values: Mapping[str, np.ndarray], spec: ElementSpec) -> Example:
  """One element as a `codec.Example` message, value by value: the protobuf way.

  `values` is as for `codec.encode_example` (every feature of `spec`, in the
  feature's dtype); `SerializeToString(deterministic=True)` of the message
  is the bytes `encode_example` gives (checked before timing).
  """
  example = Example()
  fmap = example.features.feature
  for f in spec.features:
    arr = np.asarray(values[f.name]).reshape(-1)
    feature = fmap[f.name]
    # SetInParent: a feature without values still holds its (empty) list.
    if f.encoding == "bytes":
      feature.bytes_list.SetInParent()
      feature.bytes_list.value.extend(bytes(v) for v in arr.tolist())
    elif f.encoding == "float":
      feature.float_list.SetInParent()
      feature.float_list.value.extend(arr.astype(np.float32).tolist())
    elif f.encoding == "int64":
      feature.int64_list.SetInParent()
      feature.int64_list.value.extend(arr.astype(np.int64).tolist())
    else:  # bits64: the exact 64-bit pattern of float64/uint64.
      feature.int64_list.SetInParent()
      feature.int64_list.value.extend(
        np.ascontiguousarray(arr.astype(f.dtype)).view(np.int64).tolist()
      )
  return example


def columns_of(n: int, seed: int = 0) -> dict[str, np.ndarray]:
  """`n` EMNIST-like elements stacked on axis 0: label int32 in [0, 62), pixels float32."""
  rng = np.random.default_rng(seed)
  return {
    "label": rng.integers(0, 62, n).astype(np.int32),
    "pixels": rng.random((n, 28, 28), dtype=np.float32),
  }


def _per_record_us(fn: Callable[[], object], n: int, runs: int) -> list[float]:
  fn()  # warm-up: caches, lazy imports, TensorFlow's first op
  out = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    out.append((time.perf_counter() - start) / n * 1e6)
  return out


def _row(
  name: str,
  fedbeam: tuple[str, Callable[[], object]],
  peers: list[tuple[str, Callable[[], object]]],
  n: int,
  runs: int,
) -> dict:
  row = {"row": name, "records": n}
  sides = [fedbeam] + peers
  for label, fn in sides:
    us = _per_record_us(fn, n, runs)
    row[label] = {
      "us_per_record": [round(u, 3) for u in us],
      "median": round(statistics.median(us), 3),
    }
  for label, _ in peers:
    row[f"ratio {label} / {fedbeam[0]}"] = round(
      row[label]["median"] / row[fedbeam[0]]["median"], 2
    )
  return row


def time_rows(n: int, runs: int) -> list[dict]:
  """The benchmark's rows for `n` records and `runs` timed runs each (see the module doc)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from fedbeam.pipelines.example_records import ExampleBatch, encode_batch, encode_record  # pylint: disable=g-import-not-at-top

  spec = ElementSpec.from_json(ELEMENT_SPEC_JSON)
  columns = columns_of(n)
  elements = [{k: v[i] for k, v in columns.items()} for i in range(n)]
  records = encode_examples(columns, spec, n)
  by_message = [example_message(e, spec).SerializeToString(deterministic=True) for e in elements]
  assert records == by_message == [encode_example(e, spec) for e in elements]

  rows = [
    _row(
      "encode, one element",
      ("encode_example", lambda: [encode_example(e, spec) for e in elements]),
      [
        (
          "protobuf message",
          lambda: [
            example_message(e, spec).SerializeToString(deterministic=True) for e in elements
          ],
        ),
        (
          "encode_examples of one row",
          lambda: [
            encode_examples({k: np.asarray(v)[None] for k, v in e.items()}, spec, 1)[0]
            for e in elements
          ],
        ),
      ],
      n,
      runs,
    ),
    _row(
      "encode, a client at once",
      ("encode_examples", lambda: encode_examples(columns, spec, n)),
      [
        (
          "protobuf message",
          lambda: [
            example_message(e, spec).SerializeToString(deterministic=True) for e in elements
          ],
        )
      ],
      n,
      runs,
    ),
  ]

  config = {
    "label": tf.io.FixedLenFeature([], tf.int64),
    "pixels": tf.io.FixedLenFeature([28, 28], tf.float32),
  }
  decoded = decode_examples(records, spec)
  parsed = tf.io.parse_example(tf.constant(records), config)
  assert np.array_equal(decoded["label"], parsed["label"].numpy())
  assert np.array_equal(decoded["pixels"], parsed["pixels"].numpy())

  def by_protobuf():
    labels = np.empty(n, np.int32)
    pixels = np.empty((n, 28, 28), np.float32)
    for i, r in enumerate(records):
      feature = Example.FromString(r).features.feature
      labels[i] = feature["label"].int64_list.value[0]
      pixels[i] = np.asarray(feature["pixels"].float_list.value, np.float32).reshape(28, 28)
    return labels, pixels

  assert np.array_equal(by_protobuf()[1], decoded["pixels"])
  rows.append(
    _row(
      "decode, a client at once",
      ("decode_examples", lambda: decode_examples(records, spec)),
      [
        (
          "tf.io.parse_example",
          lambda: {
            k: v.numpy() for k, v in tf.io.parse_example(tf.constant(records), config).items()
          },
        ),
        ("protobuf message", by_protobuf),
      ],
      n,
      runs,
    )
  )

  id_spec = ElementSpec.from_json(
    {"client_id": {"dtype": "string", "shape": []}, **ELEMENT_SPEC_JSON}
  )
  ids = np.array([f"f{i % 16:07d}".encode() for i in range(n)], dtype=object)
  inputs = encode_examples(dict(columns, client_id=ids), id_spec, n)
  batch = ExampleBatch("input.tfrecord", 0, inputs, "client_id")
  cut = [data for _, _, data in encode_batch(batch, spec)]
  one_by_one = [encode_record(batch.input_record(i), spec) for i in range(n)]
  assert cut == one_by_one == records
  rows.append(
    _row(
      "store record from an input record",
      ("encode_batch", lambda: encode_batch(batch, spec)),
      [
        (
          "parse and serialize",
          lambda: [encode_record(batch.input_record(i), spec) for i in range(n)],
        )
      ],
      n,
      runs,
    )
  )
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--records", type=int, default=2048)
  p.add_argument("--runs", type=int, default=5)
  args = p.parse_args(argv)
  print(
    json.dumps(
      {"records": args.records, "runs": args.runs, "rows": time_rows(args.records, args.runs)},
      indent=1,
    )
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
