"""dataset_grouper's side of the benchmarks; runs in build/grouper-venv (see grouper_env.sh).

dataset_grouper 0.3.0 pins tensorflow 2.12, so it cannot share fedbeam's
virtualenv. This script imports neither fedbeam nor anything from bench/; the
parent benchmark runs it as a subprocess and reads the JSON it writes.

`write`: dataset_grouper's pipeline over the benchmark's TFRecord input. It is
`dataset_grouper.tfds_to_tfrecords` with its TFDS source replaced by a read of
the same TFRecord files every other pipeline reads: ReadFromTFRecord ->
Example to the dict of
tensors a TFDS source yields -> `beam_transforms.
to_keyed_sequence_examples` (serialize each example with the FeaturesDict,
`CombinePerKey(MergeWithLimitFn)`, one SequenceExample per group) ->
WriteToTFRecord with a ProtoCoder, exactly as `tfds_to_tfrecords` does. The
client id is a feature of each example (dataset_grouper keys examples by a
function of the example and serializes every feature of it). Runner: Beam's
FnApiRunner with the options given (the benchmark passes 2 worker processes).

`stream`: `PartitionedDataset(...).build_group_stream()` (its defaults) over
every group, consumed like the fedbeam side: every batch of 20 of every group,
summing pixels and counting examples, eagerly (Python loops over the stream
and each group's batches) and inside one `tf.function` (nested
`Dataset.reduce`). A warm-up over the first 50 groups, then `--passes` timed
passes of each.

    build/grouper-venv/bin/python bench/grouper_worker.py write --input 'in/*.tfrecord' \
        --output out/groups --result write.json --direct_num_workers=2 \
        --direct_running_mode=multi_processing
    build/grouper-venv/bin/python bench/grouper_worker.py stream --pattern 'out/groups*' \
        --result stream.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

IMAGE = 28


def features_dict():
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.features.FeaturesDict(
    {
      "client_id": tfds.features.Tensor(shape=(), dtype=np.str_),
      "label": tfds.features.Scalar(np.int32),
      "pixels": tfds.features.Tensor(shape=(IMAGE, IMAGE), dtype=np.float32),
    }
  )


def to_tfds_example(record: bytes) -> dict:
  """A serialized input Example -> the dict of tensors a TFDS source yields.

  (dataset_grouper serializes examples with `tfds.as_numpy`, which takes
  tensors only.)
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  f = tf.train.Example.FromString(record).features.feature
  return {
    "client_id": tf.constant(f["client_id"].bytes_list.value[0]),
    "label": tf.constant(f["label"].int64_list.value[0], tf.int32),
    "pixels": tf.constant(
      np.asarray(f["pixels"].float_list.value, np.float32).reshape(IMAGE, IMAGE)
    ),
  }


def get_key(example: dict) -> bytes:
  return example["client_id"].numpy()


def run_write(args, beam_args) -> dict:
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # pylint: disable=g-import-not-at-top
  import dataset_grouper as dsg  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  fd = features_dict()
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  start = time.perf_counter()
  with beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(beam_args)) as root:
    examples = (
      root
      | "ReadTFRecord" >> beam.io.ReadFromTFRecord(args.input)
      | "ToTfdsExample" >> beam.Map(to_tfds_example)
    )
    keyed = dsg.beam.to_keyed_sequence_examples(examples, get_key, fd)
    _ = (
      keyed
      | "RemoveKey" >> beam.Map(lambda x: x[1])
      | "WriteTFRecords"
      >> beam.io.tfrecordio.WriteToTFRecord(
        args.output, coder=beam.coders.ProtoCoder(tf.train.SequenceExample)
      )
    )
  seconds = time.perf_counter() - start
  files = tf.io.gfile.glob(args.output + "*")
  return {
    "seconds": seconds,
    "files": len(files),
    "bytes": sum(tf.io.gfile.stat(f).length for f in files),
  }


def run_stream(args) -> dict:
  import dataset_grouper as dsg  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  pds = dsg.PartitionedDataset(args.pattern, features_dict())

  def eager_pass(limit=-1):
    groups, examples, total = 0, 0, 0.0
    for group in pds.build_group_stream().take(limit):
      acc = tf.constant(0.0)
      for batch in group.batch(args.batch_size):
        acc += tf.reduce_sum(batch["pixels"])
        examples += int(batch["label"].shape[0])
      total += float(acc)
      groups += 1
    return groups, examples, total

  @tf.function(input_signature=[tf.TensorSpec([], tf.int64)])
  def graph_pass(limit):
    def per_group(acc, group):
      n, s = group.batch(args.batch_size).reduce(
        (tf.constant(0, tf.int64), tf.constant(0.0)),
        lambda a, b: (
          a[0] + tf.cast(tf.shape(b["label"])[0], tf.int64),
          a[1] + tf.reduce_sum(b["pixels"]),
        ),
      )
      return acc[0] + 1, acc[1] + n, acc[2] + tf.cast(s, tf.float64)

    return (
      pds.build_group_stream()
      .take(limit)
      .reduce(
        (tf.constant(0, tf.int64), tf.constant(0, tf.int64), tf.constant(0.0, tf.float64)),
        per_group,
      )
    )

  def graph(limit=-1):
    g, n, s = graph_pass(tf.constant(limit, tf.int64))
    return int(g), int(n), float(s)

  out = {}
  for name, fn in (("eager", eager_pass), ("graph", graph)):
    fn(args.warmup_groups)  # warm-up: traces, opens the files
    seconds, counts = [], None
    for _ in range(args.passes):
      start = time.perf_counter()
      counts = fn()
      seconds.append(time.perf_counter() - start)
    groups, examples, total = counts
    out[name] = {
      "seconds": seconds,
      "median_s": statistics.median(seconds),
      "min_s": min(seconds),
      "max_s": max(seconds),
      "groups": groups,
      "examples": examples,
      "pixel_sum": total,
      "ms_per_group": 1000 * statistics.median(seconds) / groups,
    }
    print(
      f"{name}: {groups} groups, {examples} examples, median "
      f"{out[name]['ms_per_group']:.2f} ms/group",
      flush=True,
    )
  return out


def versions() -> dict:
  import apache_beam  # pylint: disable=g-import-not-at-top
  import dataset_grouper  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return {
    "python": platform.python_version(),
    "dataset_grouper": dataset_grouper.__version__,
    "tensorflow": tf.__version__,
    "apache_beam": apache_beam.__version__,
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="mode", required=True)
  w = sub.add_parser("write")
  w.add_argument("--input", required=True)
  w.add_argument("--output", required=True, help="file path prefix of the group files")
  w.add_argument("--result", required=True)
  s = sub.add_parser("stream")
  s.add_argument("--pattern", required=True)
  s.add_argument("--passes", type=int, default=3)
  s.add_argument("--batch-size", type=int, default=20)
  s.add_argument("--warmup-groups", type=int, default=50)
  s.add_argument("--result", required=True)
  args, beam_args = p.parse_known_args(argv)
  if args.mode == "write":
    result = run_write(args, beam_args)
  else:
    if beam_args:
      p.error(f"unknown arguments {beam_args}")
    result = run_stream(args)
  result["versions"] = versions()
  with open(args.result, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
