"""Built-in models for `fedbeam train`, and `module:function` user models.

A model is described by a `ModelSpec`: a `model_fn` building a new
`tff.learning.models.VariableModel` on each call, and a `preprocess` function
turning one client's dataset as a store holds it (unbatched elements keyed by
feature name) into unbatched model examples `OrderedDict(x=..., y=...)`. The
simulation loop shuffles, repeats and batches after `preprocess`.

A `preprocess` may also declare a batch form (`fedbeam.batch_form`:
`with_batch_form(preprocess, batch_fn)` sets `preprocess.fedbeam_batch_fn`),
`batch_fn(elements) -> examples`, the same preprocessing of a whole client at
once: `elements` holds
all of a client's elements stacked on axis 0, and
`Dataset.from_tensor_slices(examples)` must yield exactly the elements of
`preprocess(Dataset.from_tensor_slices(elements))`, in the same order. The
simulation loop then calls it once per client on the tensors a store reads
(`client_tensors_fn`) instead of mapping element by element, which costs a
small client more than its parse (the image preprocessing has it; tests pin
both forms to the same output).

Built-in models (`get_model(name)`):

- `digits-cnn`: 8x8 handwritten digits (scikit-learn's `load_digits`),
  features `pixels` float32 [8, 8] and `label` integer scalar, 10 classes.
- `emnist-cnn`: 28x28 EMNIST-like images, features `pixels` float32 [28, 28]
  and `label` integer scalar, 62 classes (digits, upper and lower case; the
  digits-only EMNIST uses the first 10).
- `char-rnn`: next-character prediction over a `snippets` string feature
  (Shakespeare-like), GRU over character ids. Its `accuracy` and `num_tokens`
  leave out padding targets, as TFF's Shakespeare baseline does.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import dataclasses
import importlib
from typing import Any

import tensorflow as tf
import tensorflow_federated as tff

from fedbeam.batch_form import with_batch_form

__all__ = [
  "CHAR_VOCAB_SIZE",
  "ModelSpec",
  "SEQUENCE_LENGTH",
  "builtin_model_names",
  "char_ids",
  "char_rnn_preprocess",
  "get_model",
  "image_preprocess",
]

Preprocess = Callable[[tf.data.Dataset], tf.data.Dataset]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A trainable model and the preprocessing its data needs.

  Attributes:
    name: Registry name or `module:function` reference.
    model_fn: No-arg callable returning a new
      `tff.learning.models.VariableModel` on each call.
    preprocess: Maps one client's unbatched store dataset to unbatched model
      examples (structure matching `model.input_spec` without the batch
      dimension). May carry `fedbeam_batch_fn`, its whole-client form (see
      the module docstring).
    description: One line for help texts.
  """

  name: str
  model_fn: Callable[[], tff.learning.models.VariableModel]
  preprocess: Preprocess
  description: str = ""


def _classifier_spec(height: int, width: int) -> collections.OrderedDict[str, tf.TensorSpec]:
  return collections.OrderedDict(
    x=tf.TensorSpec([None, height, width], tf.float32),
    y=tf.TensorSpec([None], tf.int32),
  )


def image_preprocess(height: int, width: int) -> Preprocess:
  """Preprocessing for `pixels`/`label` image stores.

  Each image is reshaped to [height, width] (so flat [height*width] pixels
  work too) and scaled to [0, 1] by its own maximum, so raw 0-16 digits as
  scikit-learn gives them and images already in [0, 1] both train well; the
  label is cast to int32.

  Args:
    height: Image height.
    width: Image width.

  Returns:
    A function from a dataset of `{'pixels', 'label', ...}` elements to a
    dataset of `OrderedDict(x=float32 [height, width], y=int32 [])`. It
    carries `fedbeam_batch_fn`, the same map on a client's elements stacked
    on axis 0 (`pixels` [n, height, width] or [n, height*width], `label` [n]
    or [n, 1]) giving `OrderedDict(x=float32 [n, height, width],
    y=int32 [n])`. Pixels that are not height*width values per element, or
    labels that are not one value, fail in either form: ValueError when
    traced with those shapes known, else InvalidArgumentError when run.
  """

  def to_examples(elements):
    pixels = tf.cast(elements["pixels"], tf.float32)
    count = tf.shape(pixels)[0]
    pixels = tf.reshape(pixels, [count, height, width])
    # Background pixels are 0 in load_digits but 1 in TFF's EMNIST; scaling
    # by the maximum keeps either convention in [0, 1].
    scale = tf.maximum(tf.reduce_max(tf.abs(pixels), axis=[1, 2], keepdims=True), 1e-6)
    return collections.OrderedDict(
      x=pixels / scale,
      y=tf.cast(tf.reshape(elements["label"], [count]), tf.int32),
    )

  def to_example(element):
    # One element is a batch of one, so both forms give the same numbers.
    one = to_examples({k: tf.expand_dims(element[k], 0) for k in ("pixels", "label")})
    return collections.OrderedDict((k, v[0]) for k, v in one.items())

  def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return with_batch_form(preprocess, to_examples)


def _from_keras(
  keras_model: tf.keras.Model,
  input_spec: Any,
  metrics: Callable[[], list[tf.keras.metrics.Metric]] = lambda: [
    tf.keras.metrics.SparseCategoricalAccuracy()
  ],
) -> tff.learning.models.VariableModel:
  return tff.learning.models.from_keras_model(
    keras_model,
    input_spec=input_spec,
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=metrics(),
  )


def _digits_cnn() -> tff.learning.models.VariableModel:
  keras_model = tf.keras.Sequential(
    [
      tf.keras.layers.Input([8, 8]),
      tf.keras.layers.Reshape([8, 8, 1]),
      tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
      tf.keras.layers.MaxPool2D(2),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(32, activation="relu"),
      tf.keras.layers.Dense(10),
    ]
  )
  return _from_keras(keras_model, _classifier_spec(8, 8))


def _emnist_cnn() -> tff.learning.models.VariableModel:
  keras_model = tf.keras.Sequential(
    [
      tf.keras.layers.Input([28, 28]),
      tf.keras.layers.Reshape([28, 28, 1]),
      tf.keras.layers.Conv2D(32, 5, padding="same", activation="relu"),
      tf.keras.layers.MaxPool2D(2),
      tf.keras.layers.Conv2D(64, 5, padding="same", activation="relu"),
      tf.keras.layers.MaxPool2D(2),
      tf.keras.layers.Flatten(),
      tf.keras.layers.Dense(128, activation="relu"),
      tf.keras.layers.Dense(62),
    ]
  )
  return _from_keras(keras_model, _classifier_spec(28, 28))


# Character vocabulary: 0 pad, 1 beginning of snippet, 2 end of snippet,
# 3 out of vocabulary, then printable ASCII (32..126), newline and tab.
_PAD, _BOS, _EOS, _OOV = 0, 1, 2, 3
_FIRST_PRINTABLE, _LAST_PRINTABLE = 32, 126
_NEWLINE_ID = 4 + (_LAST_PRINTABLE - _FIRST_PRINTABLE + 1)
_TAB_ID = _NEWLINE_ID + 1
CHAR_VOCAB_SIZE = _TAB_ID + 1
SEQUENCE_LENGTH = 64


def char_ids(snippet: tf.Tensor) -> tf.Tensor:
  """Maps a UTF-8 string scalar to int32 ids, framed by BOS and EOS.

  Args:
    snippet: A scalar `tf.string`.

  Returns:
    An int32 vector `[BOS, id(c) for c in snippet, EOS]`; characters outside
    printable ASCII, newline and tab map to the out-of-vocabulary id.
  """
  code_points = tf.strings.unicode_decode(snippet, "UTF-8", errors="replace")
  printable = (code_points >= _FIRST_PRINTABLE) & (code_points <= _LAST_PRINTABLE)
  ids = tf.where(printable, code_points - _FIRST_PRINTABLE + 4, _OOV)
  ids = tf.where(tf.equal(code_points, ord("\n")), _NEWLINE_ID, ids)
  ids = tf.where(tf.equal(code_points, ord("\t")), _TAB_ID, ids)
  return tf.concat([[_BOS], tf.cast(ids, tf.int32), [_EOS]], axis=0)


def char_rnn_preprocess(
  sequence_length: int = SEQUENCE_LENGTH,
) -> Preprocess:
  """Turns `snippets` into next-character (x, y) id sequences.

  Each snippet becomes `[BOS] + ids + [EOS]`, padded with 0 to a multiple of
  `sequence_length + 1` and cut into chunks; each chunk gives
  `x = chunk[:-1]`, `y = chunk[1:]`.

  Args:
    sequence_length: Length of the x and y sequences.

  Returns:
    A function from a dataset of `{'snippets': string}` elements to a dataset
    of `OrderedDict(x=int32 [sequence_length], y=int32 [sequence_length])`.
  """
  chunk = sequence_length + 1

  def to_chunks(element):
    ids = char_ids(element["snippets"])
    padded_length = (tf.size(ids) + chunk - 1) // chunk * chunk
    ids = tf.pad(ids, [[0, padded_length - tf.size(ids)]])
    chunks = tf.reshape(ids, [-1, chunk])
    return tf.data.Dataset.from_tensor_slices(
      collections.OrderedDict(x=chunks[:, :-1], y=chunks[:, 1:])
    )

  def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.flat_map(to_chunks)

  return preprocess


def _char_rnn() -> tff.learning.models.VariableModel:
  keras_model = tf.keras.Sequential(
    [
      tf.keras.layers.Input([SEQUENCE_LENGTH], dtype=tf.int32),
      tf.keras.layers.Embedding(CHAR_VOCAB_SIZE, 32),
      tf.keras.layers.GRU(128, return_sequences=True),
      tf.keras.layers.Dense(CHAR_VOCAB_SIZE),
    ]
  )
  spec = collections.OrderedDict(
    x=tf.TensorSpec([None, SEQUENCE_LENGTH], tf.int32),
    y=tf.TensorSpec([None, SEQUENCE_LENGTH], tf.int32),
  )
  # Padding targets are not characters: counted, a model that predicts
  # padding after every snippet scores the padding share (about a fifth of
  # the targets on Shakespeare) for free. TFF's Shakespeare baseline
  # (`tff.simulation.baselines.shakespeare`) masks them with these metrics.
  keras_metrics = tff.simulation.baselines.keras_metrics
  return _from_keras(
    keras_model,
    spec,
    metrics=lambda: [
      keras_metrics.NumTokensCounter(masked_tokens=[_PAD]),
      keras_metrics.MaskedCategoricalAccuracy(masked_tokens=[_PAD]),
    ],
  )


_BUILTINS: dict[str, ModelSpec] = {
  "digits-cnn": ModelSpec(
    "digits-cnn",
    _digits_cnn,
    image_preprocess(8, 8),
    "small CNN for 8x8 digits (`pixels` [8,8], `label`), 10 classes",
  ),
  "emnist-cnn": ModelSpec(
    "emnist-cnn",
    _emnist_cnn,
    image_preprocess(28, 28),
    "CNN for 28x28 EMNIST-like images (`pixels` [28,28], `label`), 62 classes",
  ),
  "char-rnn": ModelSpec(
    "char-rnn",
    _char_rnn,
    char_rnn_preprocess(),
    "GRU next-character model over `snippets` strings",
  ),
}


def builtin_model_names() -> list[str]:
  """Returns the names `get_model` accepts besides `module:function`."""
  return sorted(_BUILTINS)


def _resolve_reference(reference: str) -> Any:
  module_name, _, attribute_path = reference.partition(":")
  if not module_name or not attribute_path:
    raise ValueError(f"model reference {reference!r} must look like 'package.module:function'")
  try:
    target: Any = importlib.import_module(module_name)
  except ImportError as error:
    raise ValueError(
      f"cannot import module {module_name!r} of model reference {reference!r}: {error}"
    ) from error
  for attribute in attribute_path.split("."):
    try:
      target = getattr(target, attribute)
    except AttributeError as error:
      raise ValueError(
        f"model reference {reference!r}: {module_name!r} has no attribute path {attribute_path!r}"
      ) from error
  return target


def _identity(dataset: tf.data.Dataset) -> tf.data.Dataset:
  return dataset


def get_model(name: str) -> ModelSpec:
  """Looks up a built-in model or loads a user model.

  Args:
    name: A built-in name (`digits-cnn`, `emnist-cnn`, `char-rnn`) or a
      `module:function` reference. The referenced object may be a
      `ModelSpec`, a no-arg callable returning a `ModelSpec`, or a no-arg
      model_fn returning a `tff.learning.models.VariableModel` (then the
      store's elements must already be the model's input structure: no
      preprocessing is applied).

  Returns:
    A `ModelSpec`.

  Raises:
    ValueError: If the name is unknown, the reference cannot be imported, or
      it resolves to something that is none of the above.
  """
  if name in _BUILTINS:
    return _BUILTINS[name]
  if ":" not in name:
    raise ValueError(
      f"unknown model {name!r}: choose one of "
      f"{', '.join(builtin_model_names())} or give 'module:function'"
    )
  target = _resolve_reference(name)
  if isinstance(target, ModelSpec):
    return target
  if not callable(target):
    raise ValueError(
      f"model reference {name!r} resolves to {type(target).__name__}, not a ModelSpec or a callable"
    )
  # A throwaway graph keeps the probe call from leaving eager variables.
  with tf.Graph().as_default():
    built = target()
  if isinstance(built, ModelSpec):
    return built
  if isinstance(built, tff.learning.models.VariableModel):
    return ModelSpec(name=name, model_fn=target, preprocess=_identity)
  raise ValueError(
    f"model reference {name!r} returned {type(built).__name__}; expected "
    "a ModelSpec or a tff.learning.models.VariableModel"
  )
