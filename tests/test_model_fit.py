"""A model that does not fit a store's element spec is refused before the first round."""

import os

import pytest
import tensorflow as tf

from fedbeam import testing
from fedbeam.cli import main
from fedbeam.runtime import models
from fedbeam.runtime.model_fit import ModelMismatchError, check_model_fits, describe_specs

TEXT_SPEC = {"snippets": tf.TensorSpec([], tf.string)}
IMAGES_28 = {"label": tf.TensorSpec([], tf.int64), "pixels": tf.TensorSpec([28, 28], tf.float32)}
FLAT_28 = {"label": tf.TensorSpec([], tf.int64), "pixels": tf.TensorSpec([784], tf.float32)}


def _check(name, element_spec):
  spec = models.get_model(name)
  check_model_fits(name, spec.model_fn, spec.preprocess, element_spec)


def test_image_model_on_a_text_store_names_the_feature_and_both_specs():
  with pytest.raises(ModelMismatchError) as e:
    _check("emnist-cnn", TEXT_SPEC)
  message = str(e.value)
  assert message.startswith(
    "--model emnist-cnn does not fit the store: its preprocessing "
    "failed on the store's elements (KeyError: 'pixels')"
  )
  assert message.endswith(
    "the store's element spec is {snippets: string[]}, the model's "
    "input spec is {x: float32[null, 28, 28], y: int32[null]}"
  )


def test_8x8_model_on_28x28_images_is_refused_with_both_specs():
  with pytest.raises(ModelMismatchError) as e:
    _check("digits-cnn", IMAGES_28)
  assert "--model digits-cnn does not fit the store: its preprocessing failed" in str(e.value)
  assert (
    "the store's element spec is {label: int64[], pixels: float32[28, 28]}, the model's "
    "input spec is {x: float32[null, 8, 8], y: int32[null]}"
  ) in str(e.value)


def test_text_model_on_an_image_store_is_refused():
  with pytest.raises(ModelMismatchError, match=r"KeyError: 'snippets'"):
    _check("char-rnn", IMAGES_28)


def test_models_that_fit_their_stores_pass():
  _check("emnist-cnn", IMAGES_28)
  _check("emnist-cnn", FLAT_28)
  _check(
    "digits-cnn",
    {"label": tf.TensorSpec([], tf.int32), "pixels": tf.TensorSpec([8, 8], tf.float32)},
  )
  _check("char-rnn", TEXT_SPEC)


def test_output_that_does_not_match_the_input_spec_is_refused():
  def model_fn():
    return models.get_model("emnist-cnn").model_fn()

  with pytest.raises(
    ModelMismatchError,
    match=r"preprocessing yields \{label: int64\[null\], "
    r"pixels: float32\[null, 784\]\}",
  ):
    check_model_fits("mine:model", model_fn, lambda ds: ds, FLAT_28)


def test_describe_specs_names_dtypes_and_shapes():
  assert describe_specs({"a": tf.TensorSpec([None, 3], tf.float32)}) == "{a: float32[null, 3]}"


def test_train_cli_refuses_a_model_that_does_not_fit_with_exit_2(tmp_path, capsys):
  store = testing.prepare_store(
    {"alice": [{"snippets": b"to be"}] * 3, "bob": [{"snippets": b"or not"}] * 2}, tmp_path
  )
  capsys.readouterr()
  code = main(
    [
      "train",
      store,
      "--model",
      "emnist-cnn",
      "--rounds",
      "1",
      "--clients-per-round",
      "1",
      "--output",
      str(tmp_path / "run"),
    ]
  )
  err = capsys.readouterr().err
  assert code == 2
  # Besides the loader's warning that a store without a test split is not
  # evaluated, one line: the error.
  lines = [line for line in err.strip().splitlines() if not line.startswith("WARNING ")]
  assert len(lines) == 1, err
  assert lines[0].startswith("fedbeam train: error: --model emnist-cnn does not fit the store: ")
  assert "{snippets: string[]}" in err and "{x: float32[null, 28, 28], y: int32[null]}" in err
  assert "Traceback" not in err
  assert not os.path.exists(tmp_path / "run")
