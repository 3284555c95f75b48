"""codec.Example: the same Example bytes as TensorFlow's class, without importing TensorFlow."""

import subprocess
import sys
import textwrap

import tensorflow as tf

from fedbeam.format.codec import Example


def _tf_example():
  return tf.train.Example(
    features=tf.train.Features(
      feature={
        "bytes": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a", b"", b"\xff" * 300])),
        "floats": tf.train.Feature(float_list=tf.train.FloatList(value=[1.5, -0.0, 3e38, 1e-45])),
        "ints": tf.train.Feature(int64_list=tf.train.Int64List(value=[0, -1, 2**63 - 1, -(2**63)])),
        "none": tf.train.Feature(),
      }
    )
  )


def test_tf_example_bytes_parse_and_reserialize_unchanged():
  data = _tf_example().SerializeToString(deterministic=True)
  ours = Example.FromString(data)
  assert ours.SerializeToString(deterministic=True) == data
  kinds = {k: v.WhichOneof("kind") for k, v in ours.features.feature.items()}
  assert kinds == {
    "bytes": "bytes_list",
    "floats": "float_list",
    "ints": "int64_list",
    "none": None,
  }
  assert list(ours.features.feature["ints"].int64_list.value) == [0, -1, 2**63 - 1, -(2**63)]


def test_our_bytes_parse_in_tensorflow():
  ours = Example.FromString(_tf_example().SerializeToString())
  del ours.features.feature["none"]
  back = tf.train.Example.FromString(ours.SerializeToString(deterministic=True))
  assert back.features.feature["floats"].float_list.value[0] == 1.5
  assert set(back.features.feature) == {"bytes", "floats", "ints"}


def test_pipeline_worker_code_paths_do_not_import_tensorflow(tmp_path):
  # A Beam worker that reads Examples and writes client files would otherwise
  # spend seconds importing TensorFlow.
  example = _tf_example()
  del example.features.feature["none"]
  script = textwrap.dedent(f"""
      import sys
      from fedbeam.format.codec import encode_examples
      from fedbeam.format.layout import client_file_name, client_relative_path
      from fedbeam.pipelines import example_records, store_writer
      record = {example.SerializeToString()!r}
      example_records.parse_example_record(record, None, "test", ("f", 0))
      client_relative_path("client_ü", "train", 64)
      client_file_name("x" * 400)
      store_writer.sweep_directory({str(tmp_path)!r}, [])
      # Expansion with a transform that has a numpy batch form (the built-in warp).
      import numpy as np
      from fedbeam import transforms
      from fedbeam.format.spec import ElementSpec, FeatureSpec
      from fedbeam.pipelines import expansion
      spec = ElementSpec((FeatureSpec("label", "int32", ()),
                          FeatureSpec("pixels", "float32", (4, 4))))
      records = encode_examples({{"label": np.arange(3, dtype=np.int32),
                                    "pixels": np.arange(48, dtype=np.float32).reshape(3, 4, 4)}},
                                   spec, 3)
      warped = expansion.apply_transform(transforms.random_affine, "c", 1, records, spec)
      assert len(warped) == 3 and warped != records
      print("tensorflow" in sys.modules)
      """)
  out = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
  ).stdout
  assert out.strip().splitlines()[-1] == "False"
