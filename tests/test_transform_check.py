"""A transform is tried on the input's first record before the prepare job starts."""

import os
import subprocess

import numpy as np
import pytest

from fedbeam import testing
from fedbeam.cli import main
from fedbeam.format.spec import ElementSpec
from fedbeam.pipelines.expansion import ExpansionError
from fedbeam.pipelines.transform_check import (
  check_transform_on_first_record,
  describe_spec,
  first_input_record,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = {"alice": [{"snippets": b"to be or not"}], "bob": [{"snippets": b"that is"}]}
IMAGES = {"carol": [{"pixels": np.zeros(784, np.float32), "label": np.int64(3)}]}


def test_image_transform_on_a_text_input_fails_before_the_job_naming_feature_and_spec(
  tmp_path, capsys
):
  path = testing.write_tfrecord_input(tmp_path / "text.tfrecord", TEXT)
  output = tmp_path / "store"
  code = main(
    [
      "prepare",
      "--input",
      path,
      "--input-format",
      "tfrecord",
      "--client-id-key",
      "client_id",
      "--output",
      str(output),
      "--num-transformed-clients",
      "4",
      "--transform",
      "fedbeam.transforms:random_affine",
    ]
  )
  err = capsys.readouterr().err
  assert code == 1
  assert (
    "fedbeam prepare: error: transform for raw client 'alice', index 1 raised KeyError: "
    "'pixels' (--transform fedbeam.transforms:random_affine tried on "
    f"{path} record 0 before the job started; the element spec is "
    "{snippets: string[]})"
  ) in err
  assert not output.exists()  # Refused before the output directory was made.


def test_transform_that_fits_the_first_record_passes_the_check(tmp_path):
  from fedbeam.transforms import random_affine

  path = testing.write_tfrecord_input(tmp_path / "images.tfrecord", IMAGES)
  record = first_input_record([path], "tfrecord", "client_id")
  assert record.client_id == "carol"
  check_transform_on_first_record(random_affine, record, None, 4, "random_affine")


def test_check_uses_the_declared_spec(tmp_path):
  from fedbeam.transforms import random_affine

  path = testing.write_tfrecord_input(tmp_path / "images.tfrecord", IMAGES)
  record = first_input_record([path], "tfrecord", "client_id")
  spec = ElementSpec.from_json(
    {"label": {"dtype": "int64", "shape": []}, "pixels": {"dtype": "float32", "shape": [28, 28]}}
  )
  check_transform_on_first_record(random_affine, record, spec, 4, "random_affine")
  wide = ElementSpec.from_json(
    {"label": {"dtype": "int64", "shape": []}, "pixels": {"dtype": "float32", "shape": [784]}}
  )

  def widens_label(raw_client_id, index):
    import tensorflow as tf

    del raw_client_id
    if index == 1:
      return lambda e: dict(e, label=tf.cast(e["label"], tf.float32))
    return None

  with pytest.raises(
    ExpansionError,
    match=r"changed feature 'label' .* the element spec is "
    r"\{label: int64\[\], pixels: float32\[784\]\}",
  ):
    check_transform_on_first_record(widens_label, record, wide, 4, "widens_label")


def test_describe_spec_names_every_feature_with_dtype_and_shape():
  spec = ElementSpec.from_json(
    {"a": {"dtype": "string", "shape": [None]}, "b": {"dtype": "float32", "shape": [2, 3]}}
  )
  assert describe_spec(spec) == "a: string[null], b: float32[2, 3]"


def test_first_input_record_of_an_input_without_records_is_none(tmp_path):
  empty = tmp_path / "empty.tfrecord"
  empty.write_bytes(b"")
  assert first_input_record([str(empty)], "tfrecord", "client_id") is None


def test_transform_module_in_the_current_directory_needs_no_pythonpath(tmp_path):
  path = testing.write_tfrecord_input(tmp_path / "images.tfrecord", IMAGES)
  (tmp_path / "my_warps.py").write_text(
    "from fedbeam.transforms import random_affine\n\n"
    "def make_transform_fn(raw_client_id, index):\n"
    "  return random_affine(raw_client_id, index)\n"
  )
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  log = tmp_path / "log.txt"
  with open(log, "wb") as f:
    code = subprocess.call(
      [
        os.path.join(REPO, ".venv", "bin", "fedbeam"),
        "prepare",
        "--input",
        path,
        "--input-format",
        "tfrecord",
        "--client-id-key",
        "client_id",
        "--output",
        "store",
        "--num-transformed-clients",
        "3",
        "--transform",
        "my_warps:make_transform_fn",
      ],
      cwd=tmp_path,
      env=env,
      stdout=f,
      stderr=subprocess.STDOUT,
      timeout=600,
    )
  assert code == 0, log.read_text()
  assert "store written: 3 clients" in log.read_text()
