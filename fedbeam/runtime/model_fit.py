"""Whether a model's preprocessing and input fit a store's element spec, before training.

`fedbeam train --model M` on a store whose features M cannot use (an image
model on a text store, an 8x8 model on 28x28 images) would otherwise fail
inside the first round with a long TensorFlow traceback. `check_model_fits`
runs the model's preprocessing on one synthetic element of the store's spec
and compares what comes out with the model's input spec.
"""

from __future__ import annotations

from collections.abc import Mapping
import random
from typing import Any

import tensorflow as tf

__all__ = ["ModelMismatchError", "check_model_fits", "describe_specs"]


class ModelMismatchError(ValueError):
  """The store's elements do not fit the model; the message holds both specs."""


def describe_specs(specs: Any) -> str:
  """`{name: dtype[shape], ...}` of a structure of `tf.TensorSpec`s (nested names dotted)."""
  if isinstance(specs, tf.TensorSpec):
    return f"{specs.dtype.name}{_shape(specs.shape)}"
  return (
    "{"
    + ", ".join(f"{path}: {s.dtype.name}{_shape(s.shape)}" for path, s in _with_paths(specs, ""))
    + "}"
  )


def _with_paths(specs: Any, prefix: str) -> list[tuple[str, Any]]:
  if isinstance(specs, Mapping):
    items = list(specs.items())
  elif isinstance(specs, (list, tuple)):
    items = [(getattr(specs, "_fields", range(len(specs)))[i], v) for i, v in enumerate(specs)]
  else:
    return [(prefix, specs)]
  out = []
  for key, value in items:
    out.extend(_with_paths(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


_GRAPH_NODE = " for '{{node"


def _cause(error: BaseException) -> str:
  """`Type: message` of an error, without autograph's 'in user code' frames or graph nodes."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  last = lines[-1] if lines else ""
  name = type(error).__name__
  for kind in ("KeyError", "ValueError", "TypeError", "InvalidArgumentError"):
    if last.startswith(kind + ": "):
      name, last = kind, last[len(kind) + 2 :]
  return f"{name}: {last.split(_GRAPH_NODE)[0]}"


def _shape(shape: tf.TensorShape) -> str:
  if shape.rank is None:
    return "[?]"
  return "[" + ", ".join("null" if d is None else str(d) for d in shape.as_list()) + "]"


def _synthetic(spec: tf.TensorSpec) -> tf.Tensor:
  # One value per variable dimension; strings hold a few characters so text
  # preprocessing has something to cut.
  shape = [1 if d is None else d for d in spec.shape.as_list()]
  if spec.dtype == tf.string:
    return tf.fill(shape, "abc")
  return tf.zeros(shape, spec.dtype)


def check_model_fits(model_name: str, model_fn: Any, preprocess: Any, element_spec: Any) -> None:
  """Raises ModelMismatchError unless the model can train on elements of `element_spec`.

  Args:
    model_name: the `--model` value, for the message.
    model_fn: builds the `tff.learning.models.VariableModel` (its
      `input_spec` is read).
    preprocess: the model's preprocessing (dataset of store elements ->
      dataset of unbatched model examples).
    element_spec: the store's element spec: a structure of `tf.TensorSpec`,
      or a `fedbeam.format.spec.ElementSpec` (`StoreClientData.element_spec`).

  Raises:
    ModelMismatchError: preprocessing fails on an element of the spec (a
      missing feature, a reshape that cannot hold the values), or its
      output does not match the model's input spec (structure, dtypes,
      shapes). The message names the model, the cause and both specs.
  """
  # Built in a private graph, with Python's random state (Keras draws
  # unseeded initializer seeds from it) put back: the check changes nothing
  # the run's own initialization depends on.
  state = random.getstate()
  try:
    with tf.Graph().as_default():
      input_spec = model_fn().input_spec
  finally:
    random.setstate(state)

  def refuse(reason: str) -> ModelMismatchError:
    return ModelMismatchError(
      f"--model {model_name} does not fit the store: {reason}; the store's element spec is "
      f"{describe_specs(element_spec)}, the model's input spec is "
      f"{describe_specs(input_spec)}"
    )

  if hasattr(element_spec, "to_tensor_specs"):  # a store's fedbeam ElementSpec
    element_spec = element_spec.to_tensor_specs()
  element = tf.nest.map_structure(_synthetic, element_spec)
  try:
    dataset = preprocess(tf.data.Dataset.from_tensors(element))
    for _ in dataset.take(1):
      pass
  except (KeyError, ValueError, TypeError, tf.errors.OpError) as e:
    raise refuse(f"its preprocessing failed on the store's elements ({_cause(e)})") from None
  batched = tf.nest.map_structure(
    lambda s: tf.TensorSpec([None] + s.shape.as_list(), s.dtype), dataset.element_spec
  )
  try:
    tf.nest.assert_same_structure(batched, input_spec, check_types=False)
  except (ValueError, TypeError):
    raise refuse(f"preprocessing yields {describe_specs(batched)}") from None
  for got, want in zip(tf.nest.flatten(batched), tf.nest.flatten(input_spec)):
    if got.dtype != want.dtype or not want.shape.is_compatible_with(got.shape):
      raise refuse(f"preprocessing yields {describe_specs(batched)}")
