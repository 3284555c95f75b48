"""Model metrics as the loop reports them: summed over clients, then finalized.

The semantics of `tff.learning.metrics.sum_then_finalize`, in numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import tensorflow as tf

__all__ = ["finalize_metrics", "loss_and_accuracy", "sum_metrics", "to_numpy"]


def to_numpy(structure: Any) -> Any:
  """The same structure with every tensor (or value) as a numpy array."""
  return tf.nest.map_structure(lambda t: np.asarray(t), structure)


def sum_metrics(unfinalized: Sequence[dict[str, Any]]) -> Optional[dict[str, Any]]:
  """Sums clients' unfinalized metrics (numpy structures of one shape); None for no client."""
  summed = None
  for metrics in unfinalized:
    summed = metrics if summed is None else tf.nest.map_structure(np.add, summed, metrics)
  return summed


def finalize_metrics(
  finalizers: dict[str, Callable[[Any], Any]], unfinalized: dict[str, Any]
) -> dict[str, float]:
  """Applies a model's metric finalizers (`metric_finalizers()`) to unfinalized values.

  Args:
    finalizers: Metric name -> finalizer, as `VariableModel.metric_finalizers()`.
    unfinalized: Metric name -> numpy structure, as reported by a model
      (`report_local_unfinalized_metrics`) or summed over clients.

  Returns:
    Metric name -> a Python float (or nested lists for non-scalar metrics).
  """
  finalized = {}
  for name, finalizer in finalizers.items():
    # TFF's Keras finalizers are tf.functions that build a metric (variables)
    # on every trace, written for one trace per TFF computation; called
    # eagerly they fail on tf.function's second, variable-lifting trace. The
    # wrapped Python function runs them eagerly instead.
    finalize_fn = getattr(finalizer, "python_function", finalizer)
    value = np.asarray(finalize_fn(tf.nest.map_structure(tf.convert_to_tensor, unfinalized[name])))
    finalized[name] = value.item() if value.size == 1 else value.tolist()
  return finalized


def loss_and_accuracy(
  metrics: Optional[dict[str, float]],
) -> tuple[Optional[float], Optional[float]]:
  """Picks the loss and the accuracy out of finalized model metrics.

  Args:
    metrics: Finalized metrics, e.g. `RoundResult.train_metrics`, or None.

  Returns:
    `(metrics['loss'], first metric whose name contains 'accuracy')`, each
    None when absent.
  """
  if not metrics:
    return None, None
  loss = metrics.get("loss")
  accuracy = next((v for k, v in metrics.items() if "accuracy" in k.lower()), None)
  return loss, accuracy
