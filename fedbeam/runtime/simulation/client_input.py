"""A client's batches as a round trains on them: read, preprocess, shuffle, repeat, batch.

Built once per loop (`build_batches_fn`) so the preprocessing is traced once
for every client and round; a store's clients are read whole
(`client_tensors_fn`) and a preprocess with a batch form runs once on their
stacked tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import tensorflow as tf
import tensorflow_federated as tff

from fedbeam.batch_form import batch_form_of
from fedbeam.runtime.simulation.types import SimulationConfig

__all__ = ["Preprocess", "build_batches_fn", "check_input_spec", "prefetched"]

Preprocess = Callable[[tf.data.Dataset], tf.data.Dataset]


def build_batches_fn(
  train_data: tff.simulation.datasets.ClientData,
  preprocess: Optional[Preprocess],
  config: SimulationConfig,
) -> Callable[[tf.Tensor, tf.Tensor], tf.data.Dataset]:
  """Returns `fn(client_id, shuffle_seed) -> batches`, traced once.

  Built inside one `tf.function` from the ClientData's
  `serializable_dataset_fn`, the preprocessing (often a `Dataset.map`,
  which traces its function on every call in Python) is traced once for
  all clients and rounds. A ClientData without a serializable dataset
  function falls back to `create_tf_dataset_for_client` in Python.

  A ClientData with `client_tensors_fn` (a store with fixed-shape
  features) is read a whole client at a time; a preprocess with a
  `fedbeam_batch_fn` (see `fedbeam.runtime.models`) is then applied once
  to those stacked tensors instead of element by element. Either way the
  batches are the same: the preprocessed elements, in the same order,
  through the same seeded shuffle, repeat and batch.

  Args:
    train_data: The clients (any `ClientData`).
    preprocess: Optional map of a client's unbatched dataset to unbatched
      model examples, perhaps with a `fedbeam_batch_fn`.
    config: Gives the shuffle buffer, local epochs and batch size.

  Returns:
    `fn(client_id, shuffle_seed)` of two tensors: a `tf.function`, or a
    Python function when the ClientData has no serializable dataset
    function.
  """
  # A client's dataset is small and built anew every round: tf.data's
  # static graph rewrites and autotuning, done per dataset, cost more than
  # they save here (about half of a 45-example client's input time on the
  # digits store; bench/bench_simulation.py). They do not change elements.
  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = False
  options.autotune.enabled = False

  def per_element(dataset):
    return dataset if preprocess is None else preprocess(dataset)

  try:
    dataset_fn = train_data.serializable_dataset_fn
  except (NotImplementedError, AttributeError):
    dataset_fn = None
  # A store reads a whole client in one vectorized parse; slicing those
  # tensors costs less than decoding the file record by record.
  try:
    tensors_fn = getattr(train_data, "client_tensors_fn", None)
  except ValueError:  # Variable-length features cannot be stacked.
    tensors_fn = None
  batch_fn = batch_form_of(preprocess)

  def examples(client_id):
    """The client's preprocessed, unbatched elements."""
    if dataset_fn is None:
      return per_element(train_data.create_tf_dataset_for_client(client_id.numpy().decode("utf-8")))
    if tensors_fn is None:
      return per_element(dataset_fn(client_id))
    if batch_fn is None:
      return per_element(tf.data.Dataset.from_tensor_slices(tensors_fn(client_id)))
    # A per-element map instantiates its function for every client's
    # dataset, which costs several times the vectorized preprocessing of
    # the whole client (bench/bench_loading.py, training part).
    return tf.data.Dataset.from_tensor_slices(batch_fn(tensors_fn(client_id)))

  def make_batches(client_id, seed):
    dataset = examples(client_id)
    if config.shuffle_buffer > 0:
      # reshuffle_each_iteration gives each epoch its own order; all of
      # them follow from the seed, the dataset being built anew for every
      # client and round. The order depends only on the number of
      # elements, not on their values, so both forms of a preprocess
      # give the same batches.
      dataset = dataset.shuffle(config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if config.client_epochs > 1:
      dataset = dataset.repeat(config.client_epochs)
    return dataset.batch(config.batch_size).with_options(options)

  if dataset_fn is None:
    return make_batches  # Eager: create_tf_dataset_for_client needs the id in Python.
  return tf.function(make_batches)


def prefetched(
  dataset: tf.data.Dataset, device: Optional[str], prefetch_to_device: Optional[bool]
) -> tf.data.Dataset:
  """`dataset`, copied ahead to `device` per `SimulationConfig.prefetch_to_device`.

  None: for non-CPU devices only. No device: `dataset` unchanged.
  """
  # No host-side prefetch: its background thread, started per client,
  # costs more than it overlaps on small clients (a third of a CPU round
  # on the digits store).
  if device is None:
    return dataset
  to_device = prefetch_to_device
  if to_device is None:
    to_device = tf.DeviceSpec.from_string(device).device_type != "CPU"
  if to_device:
    dataset = dataset.apply(tf.data.experimental.prefetch_to_device(device, 2))
  return dataset


def check_input_spec(element_spec: Any, input_spec: Any) -> None:
  """Refuses batches whose structure, dtypes or shapes the model cannot take.

  Raises:
    ValueError: naming both specs.
  """
  try:
    tf.nest.assert_same_structure(element_spec, input_spec, check_types=False)
    compatible = all(
      e.dtype == i.dtype and i.shape.is_compatible_with(e.shape)
      for e, i in zip(tf.nest.flatten(element_spec), tf.nest.flatten(input_spec))
    )
  except (ValueError, TypeError):
    compatible = False
  if not compatible:
    raise ValueError(
      "the preprocessed, batched client data does not match the model's "
      f"input spec: data {element_spec} vs model {input_spec}; check the "
      "model's preprocessing against the store's features"
    )
