"""The server side of a round: the mean of client deltas and one server optimizer step.

`weighted_mean_delta` is `tff.aggregators.MeanFactory`'s arithmetic;
`ServerOptimizerStep` applies a TFF optimizer to the mean delta as
`tff.learning.templates.build_apply_optimizer_finalizer` does, including its
rejection of a non-finite update. tests/test_simulation.py pins both to TFF's
runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedbeam.runtime.simulation.metrics import to_numpy

__all__ = ["ServerOptimizerStep", "weighted_mean_delta"]


def weighted_mean_delta(
  like: Sequence[np.ndarray], deltas: Sequence[tuple[Sequence[np.ndarray], float]]
) -> tuple[list[np.ndarray], np.float32]:
  """The weighted mean of client deltas, in float32 as `MeanFactory` computes it.

  Args:
    like: Arrays of the trainable weights' shapes and dtypes.
    deltas: `(delta, weight)` per client, in sampling order (the order of
      the float additions, so the result does not depend on which client
      finished first).

  Returns:
    `(mean delta, total weight)`; the mean is not finite when the total
    weight is 0 or a delta is not finite.
  """
  # MeanFactory's arithmetic: sum of weight * delta over clients, divided
  # by the sum of weights, in float32.
  total_weight = np.float32(0.0)
  weighted_sum = [np.zeros_like(w) for w in like]
  for delta, weight in deltas:
    weight32 = np.float32(weight)
    total_weight += weight32
    for acc, d in zip(weighted_sum, delta):
      acc += d * weight32.astype(d.dtype)
  with np.errstate(divide="ignore", invalid="ignore"):
    mean_delta = [acc / total_weight.astype(acc.dtype) for acc in weighted_sum]
  return mean_delta, total_weight


class ServerOptimizerStep:
  """A TFF server optimizer applied to the mean delta, as TFF's finalizer applies it."""

  def __init__(
    self, optimizer: tff.learning.optimizers.Optimizer, trainable_specs: Sequence[tf.TensorSpec]
  ):
    """Traces the optimizer's `initialize` and `next`.

    Args:
      optimizer: The server optimizer (SGD with learning rate 1.0 is FedAvg).
      trainable_specs: Specs of the model's trainable weights.
    """
    specs = tuple(trainable_specs)
    # Traced, as in TFF's finalizer, so Python-number hyperparameters become
    # float32 tensors rather than float64 numpy values.
    self._initial_state = tf.function(lambda: optimizer.initialize(specs))

    @tf.function
    def step(state, trainable, update):
      return optimizer.next(state, trainable, update)

    self._step = step

  def initial_state(self) -> Any:
    """The optimizer's initial state, a structure of numpy values."""
    return to_numpy(self._initial_state())

  def apply(
    self, state: Any, trainable: Sequence[np.ndarray], mean_delta: Sequence[np.ndarray]
  ) -> tuple[bool, Any, list[np.ndarray]]:
    """One server step.

    Args:
      state: The optimizer state (numpy structure).
      trainable: The current trainable weights.
      mean_delta: The round's mean client delta.

    Returns:
      `(applied, new state, new trainable weights)`. A non-finite mean delta
      is not applied (TFF's finalizer rejects it): `state` and `trainable`
      come back unchanged with `applied` False.
    """
    if not all(np.all(np.isfinite(d)) for d in mean_delta):
      return False, state, list(trainable)
    new_state, new_trainable = self._step(
      tf.nest.map_structure(tf.convert_to_tensor, state),
      tuple(tf.convert_to_tensor(w) for w in trainable),
      tuple(tf.convert_to_tensor(d) for d in mean_delta),
    )
    return True, to_numpy(new_state), [np.asarray(w) for w in new_trainable]
