"""Built-in models, their preprocessing, and module:function references."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedbeam.runtime import models, simulation
from fedbeam.runtime.simulation import metrics as simulation_metrics


def test_builtin_names():
  assert models.builtin_model_names() == ["char-rnn", "digits-cnn", "emnist-cnn"]


def test_unknown_name_lists_the_choices():
  with pytest.raises(ValueError, match="char-rnn, digits-cnn, emnist-cnn"):
    models.get_model("resnet")


def _examples(dataset):
  return list(dataset.as_numpy_iterator())


def test_image_preprocess_scales_by_image_maximum_and_casts_labels():
  raw = np.arange(64, dtype=np.float32).reshape(8, 8) % 17  # 0..16
  dataset = tf.data.Dataset.from_tensor_slices(
    collections.OrderedDict(
      pixels=np.stack([raw, raw / 16.0]),
      label=np.array([3, 7], np.int64),
    )
  )
  first, second = _examples(models.image_preprocess(8, 8)(dataset))
  np.testing.assert_allclose(first["x"], raw / 16.0, rtol=1e-6)
  np.testing.assert_allclose(second["x"], raw / 16.0, rtol=1e-6)
  assert first["y"] == 3 and second["y"] == 7
  assert first["y"].dtype == np.int32 and first["x"].dtype == np.float32


def test_image_preprocess_accepts_flat_pixels():
  dataset = tf.data.Dataset.from_tensor_slices(
    collections.OrderedDict(pixels=np.ones((1, 64), np.float32), label=np.zeros((1, 1), np.int32))
  )
  (example,) = _examples(models.image_preprocess(8, 8)(dataset))
  assert example["x"].shape == (8, 8) and example["y"].shape == ()


def _both_forms(preprocess, elements):
  """(per-element examples stacked, batch-form examples) as numpy."""
  dataset = tf.data.Dataset.from_tensor_slices(elements)
  per_element = _examples(preprocess(dataset))
  stacked = {k: np.stack([e[k] for e in per_element]) for k in ("x", "y")}
  batched = {k: v.numpy() for k, v in preprocess.fedbeam_batch_fn(elements).items()}
  return stacked, batched


def test_image_preprocess_batch_form_equals_per_element_form():
  rng = np.random.default_rng(3)
  pixels = (rng.random((6, 64)) * 32 - 16).astype(np.float32)
  pixels[2] = 0.0  # The 1e-6 floor of the scale.
  elements = collections.OrderedDict(
    pixels=pixels, label=rng.integers(0, 10, (6, 1)).astype(np.int64)
  )
  stacked, batched = _both_forms(models.image_preprocess(8, 8), elements)
  for key in ("x", "y"):
    assert batched[key].dtype == stacked[key].dtype
    np.testing.assert_array_equal(batched[key], stacked[key])
  assert batched["x"].shape == (6, 8, 8) and batched["y"].shape == (6,)


@pytest.mark.parametrize("name", ["digits-cnn", "emnist-cnn"])
def test_builtin_image_batch_form_equals_per_element_form(name):
  data = STORE_LIKE_DATA[name]()
  preprocess = models.get_model(name).preprocess
  for client_id in data.client_ids:
    elements = data.create_tf_dataset_for_client(client_id).batch(1000).get_single_element()
    stacked, batched = _both_forms(preprocess, elements)
    for key in ("x", "y"):
      assert batched[key].dtype == stacked[key].dtype
      np.testing.assert_array_equal(batched[key], stacked[key])


def test_image_preprocess_refuses_images_of_another_size_in_both_forms():
  preprocess = models.image_preprocess(8, 8)
  elements = collections.OrderedDict(
    pixels=np.ones((2, 7, 7), np.float32), label=np.zeros(2, np.int32)
  )
  with pytest.raises(ValueError, match="Cannot reshape"):
    _examples(preprocess(tf.data.Dataset.from_tensor_slices(elements)))
  with pytest.raises(tf.errors.InvalidArgumentError):
    preprocess.fedbeam_batch_fn(elements)


def test_char_ids_map_printable_ascii_and_frame_the_snippet():
  ids = models.char_ids(tf.constant("a b\né")).numpy().tolist()
  # BOS, 'a', ' ', 'b', newline, OOV for 'é', EOS.
  assert ids == [1, ord("a") - 32 + 4, 4, ord("b") - 32 + 4, 99, 3, 2]
  assert models.CHAR_VOCAB_SIZE == 101


def test_char_rnn_preprocess_cuts_padded_shifted_sequences():
  preprocess = models.char_rnn_preprocess(sequence_length=4)
  dataset = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(snippets=["abcdef", "z"]))
  examples = _examples(preprocess(dataset))
  a, b, c, d, e, f = (ord(ch) - 28 for ch in "abcdef")
  # "abcdef" -> [BOS a b c d e f EOS] padded to 10 -> two chunks of 5.
  assert [ex["x"].tolist() for ex in examples] == [
    [1, a, b, c],
    [e, f, 2, 0],
    [1, ord("z") - 28, 2, 0],
  ]
  assert [ex["y"].tolist() for ex in examples] == [
    [a, b, c, d],
    [f, 2, 0, 0],
    [ord("z") - 28, 2, 0, 0],
  ]


def _image_clients(height, width, num_classes, label_dtype, scale):
  rng = np.random.default_rng(0)
  data = {}
  for i in range(3):
    data[f"w{i}"] = collections.OrderedDict(
      pixels=(rng.random((4 + i, height, width)) * scale).astype(np.float32),
      label=rng.integers(0, num_classes, 4 + i).astype(label_dtype),
    )
  return tff.simulation.datasets.TestClientData(data)


def _snippet_clients():
  return tff.simulation.datasets.TestClientData(
    {
      "KING": collections.OrderedDict(
        snippets=["Now is the winter of our discontent", "Made glorious"]
      ),
      "QUEEN": collections.OrderedDict(snippets=["To be, or not to be, that is the question:\n"]),
      "FOOL": collections.OrderedDict(snippets=["Sirrah!"]),
    }
  )


STORE_LIKE_DATA = {
  "digits-cnn": lambda: _image_clients(8, 8, 10, np.int64, 16.0),
  "emnist-cnn": lambda: _image_clients(28, 28, 62, np.int32, 1.0),
  "char-rnn": _snippet_clients,
}


@pytest.mark.parametrize("name", sorted(STORE_LIKE_DATA))
def test_builtin_model_trains_on_store_shaped_data(name):
  spec = models.get_model(name)
  assert spec.name == name and spec.description
  loop = simulation.SimulationLoop(
    spec.model_fn,
    tff.learning.optimizers.build_sgdm(0.05),
    tff.learning.optimizers.build_sgdm(1.0),
    STORE_LIKE_DATA[name](),
    simulation.SimulationConfig(clients_per_round=2, batch_size=4, eval_every=0),
    preprocess=spec.preprocess,
    devices=["/device:CPU:0"],
  )
  before = loop.state.model_weights
  result = loop.run_round()
  loss, accuracy = simulation.loss_and_accuracy(result.train_metrics)
  assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0
  assert result.num_examples > 0
  assert any(
    not np.array_equal(a, b) for a, b in zip(before.trainable, loop.state.model_weights.trainable)
  )


def test_digits_cnn_learns_real_digits():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = digits.images.astype(np.float32)  # 0..16, as load_digits gives
  labels = digits.target.astype(np.int64)
  order = np.random.default_rng(0).permutation(len(labels))
  train, test = order[:1400], order[1400:]
  clients = {
    f"writer{i}": collections.OrderedDict(pixels=images[idx], label=labels[idx])
    for i, idx in enumerate(np.array_split(train, 10))
  }
  spec = models.get_model("digits-cnn")
  loop = simulation.SimulationLoop(
    spec.model_fn,
    tff.learning.optimizers.build_sgdm(0.1),
    tff.learning.optimizers.build_sgdm(1.0),
    tff.simulation.datasets.TestClientData(clients),
    simulation.SimulationConfig(clients_per_round=5, batch_size=20, client_epochs=2, eval_every=0),
    test_data=tff.simulation.datasets.TestClientData(
      {"held_out": collections.OrderedDict(pixels=images[test], label=labels[test])}
    ),
    preprocess=spec.preprocess,
    devices=["/device:CPU:0"],
  )
  results = loop.run(8)
  _, accuracy = simulation.loss_and_accuracy(results[-1].eval_metrics)
  # Chance is 0.1.
  assert accuracy > 0.8


# Targets of the module:function tests below.
def tiny_keras_model_fn():
  keras_model = tf.keras.Sequential([tf.keras.layers.Input([2]), tf.keras.layers.Dense(2)])
  return tff.learning.models.from_keras_model(
    keras_model,
    input_spec=collections.OrderedDict(
      x=tf.TensorSpec([None, 2], tf.float32), y=tf.TensorSpec([None], tf.int32)
    ),
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )


TINY_SPEC = models.ModelSpec("tiny", tiny_keras_model_fn, lambda d: d, "tiny")


def tiny_spec_factory():
  return TINY_SPEC


NOT_A_MODEL = 42


def returns_a_string():
  return "model"


def test_reference_to_a_model_spec():
  assert models.get_model("test_models:TINY_SPEC") is TINY_SPEC


def test_reference_to_a_spec_factory():
  assert models.get_model("test_models:tiny_spec_factory") is TINY_SPEC


def test_reference_to_a_model_fn_gets_identity_preprocessing():
  spec = models.get_model("test_models:tiny_keras_model_fn")
  assert spec.model_fn is tiny_keras_model_fn
  dataset = tf.data.Dataset.range(3)
  assert spec.preprocess(dataset) is dataset


@pytest.mark.parametrize(
  "reference,message",
  [
    ("no_such_module_xyz:fn", "cannot import module"),
    ("test_models:missing", "has no attribute"),
    ("test_models:NOT_A_MODEL", "not a ModelSpec or a callable"),
    ("test_models:returns_a_string", "returned str"),
    ("test_models:", "must look like"),
  ],
)
def test_bad_references_explain_themselves(reference, message):
  with pytest.raises(ValueError, match=message):
    models.get_model(reference)


def test_char_rnn_accuracy_leaves_out_padding_targets():
  # A model that always predicts one character: its accuracy is the share of
  # that character among the non-padding targets, never the padding share.
  model = models.get_model("char-rnn").model_fn()
  dense_kernel, dense_bias = model.trainable_variables[-2:]
  dense_kernel.assign(tf.zeros_like(dense_kernel))
  e_id = int(models.char_ids(tf.constant("e")).numpy()[1])
  dense_bias.assign(tf.one_hot(e_id, models.CHAR_VOCAB_SIZE) * 10.0)
  preprocess = models.char_rnn_preprocess()
  snippets = ["eel", "Made glorious summer", "e"]
  batch = next(
    iter(
      preprocess(
        tf.data.Dataset.from_tensor_slices(collections.OrderedDict(snippets=snippets))
      ).batch(8)
    )
  )
  targets = batch["y"].numpy()
  assert (targets == 0).mean() > 0.5  # Mostly padding: the case that misled.
  model.forward_pass(batch, training=False)
  # Finalized the way the simulation loop reports them.
  finalized = simulation_metrics.finalize_metrics(
    model.metric_finalizers(), model.report_local_unfinalized_metrics()
  )
  real = targets[targets != 0]
  assert finalized["num_tokens"] == real.size
  np.testing.assert_allclose(finalized["accuracy"], (real == e_id).mean(), rtol=1e-6)
  assert simulation.loss_and_accuracy(finalized)[1] == finalized["accuracy"]
