"""Evaluation of the loop's weights on all test examples, and the search for a bad test client.

The metrics are the model's own, finalized by its finalizers over every test
example (`ClientData.create_tf_dataset_from_all_clients`), with the weights
after the round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import tensorflow as tf
import tensorflow_federated as tff

from fedbeam.runtime.simulation.read_errors import READ_ERRORS, ClientReadError

__all__ = ["all_test_examples", "build_eval_fn", "unreadable_test_client"]


def build_eval_fn(
  model: tff.learning.models.VariableModel,
  weights_template: tff.learning.models.ModelWeights,
) -> Callable[[Any, tf.data.Dataset], Any]:
  """Returns `evaluate(weights, batches) -> unfinalized metrics`, a `tf.function`.

  It assigns `weights` (packed like `weights_template`, the model's own
  variables) to the model and runs its forward pass without training over
  every batch. Reset the model's metrics before each call.
  """

  @tf.function
  def evaluate(weights, data):
    tf.nest.map_structure(lambda v, w: v.assign(w), weights_template, weights)
    for batch in iter(data):
      model.forward_pass(batch, training=False)
    return model.report_local_unfinalized_metrics()

  return evaluate


def all_test_examples(
  test_data: tff.simulation.datasets.ClientData,
  preprocess: Optional[Callable[[tf.data.Dataset], tf.data.Dataset]],
  batch_size: int,
) -> tf.data.Dataset:
  """Every test example, preprocessed, in batches of `batch_size`, prefetched on the host."""
  dataset = test_data.create_tf_dataset_from_all_clients(seed=0)
  if preprocess is not None:
    dataset = preprocess(dataset)
  # One long dataset: here a host-side prefetch overlaps reading with
  # evaluation.
  return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def unreadable_test_client(
  test_data: tff.simulation.datasets.ClientData, round_num: int, error: BaseException
) -> ClientReadError:
  """The error of a failed evaluation, naming the first unreadable test client.

  Evaluation reads all test clients as one dataset, so TensorFlow's error
  names at most a file; each test client is read again alone (only on
  this failure path) to find the one at fault.

  Args:
    test_data: The test clients.
    round_num: The round that evaluated.
    error: What evaluation raised.

  Returns:
    A `ClientReadError` naming the first test client that fails alone, or
    naming none (`client_id` None) when each reads well alone.
  """
  for client_id in test_data.client_ids:
    try:
      # Iterated in Python, not drained in a graph: a store's client dataset
      # then raises its ClientFileError, which names the client and the fault.
      for _ in test_data.create_tf_dataset_for_client(client_id):
        pass
    except READ_ERRORS as client_error:
      return ClientReadError(client_id, round_num, client_error, evaluating=True)
  return ClientReadError(None, round_num, error, evaluating=True)
