"""Every random choice of a simulated run, as a pure function of the seed.

The initial weights depend on the seed only; the clients of a round on
(seed, round); a client's shuffle on (seed, round, client id). The numbers
come from `fedbeam.seeded_hash.seeded_int` over JSON keys, never from
Python's `hash()`, worker order or time, so a run resumed from a checkpoint
ends exactly where an uninterrupted run does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import random
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedbeam.seeded_hash import seeded_int

__all__ = ["initial_model_weights", "sample_clients", "shuffle_seed"]


def _stable_int(*parts: Any, bits: int = 63) -> int:
  # hashlib, not hash(): Python salts str hashes per process.
  return seeded_int(*parts, bits=bits, key_form="json")


def initial_model_weights(
  model_fn: Callable[[], tff.learning.models.VariableModel], seed: int
) -> tff.learning.models.ModelWeights:
  """Initializes a model's weights deterministically from `seed`.

  The model is built in a private graph whose graph-level seed and Python
  `random` state (Keras draws unseeded initializer seeds from it) are set
  from `seed`; the global TF and Python random states are left unchanged.

  Args:
    model_fn: No-arg callable returning a new VariableModel.
    seed: Nonnegative int.

  Returns:
    `ModelWeights` of numpy arrays (lists of trainable and non-trainable).
  """
  python_random_state = random.getstate()
  random.seed(_stable_int("init", seed))
  try:
    with tf.Graph().as_default() as graph:
      graph.seed = _stable_int("init-graph", seed, bits=31)
      model = model_fn()
      weights = tff.learning.models.ModelWeights.from_model(model)
      variables = list(weights.trainable) + list(weights.non_trainable)
      with tf.compat.v1.Session(graph=graph) as session:
        session.run(tf.compat.v1.variables_initializer(variables))
        trainable, non_trainable = session.run(
          (list(weights.trainable), list(weights.non_trainable))
        )
  finally:
    random.setstate(python_random_state)
  return tff.learning.models.ModelWeights(
    trainable=list(trainable), non_trainable=list(non_trainable)
  )


def sample_clients(
  client_ids: Sequence[str], seed: int, round_num: int, clients_per_round: int
) -> list[str]:
  """The clients of round `round_num`, drawn without replacement.

  Args:
    client_ids: The candidates, in a fixed order (the loop sorts them).
    seed: The run's seed.
    round_num: 1-based round number.
    clients_per_round: How many to draw (at most `len(client_ids)`).

  Returns:
    Distinct ids of `client_ids`, in the order they are drawn.
  """
  rng = np.random.default_rng([seed, round_num, _stable_int("sample")])
  chosen = rng.choice(len(client_ids), size=clients_per_round, replace=False)
  return [client_ids[i] for i in chosen]


def shuffle_seed(seed: int, round_num: int, client_id: str) -> int:
  """The 31-bit seed of a client's example shuffle in round `round_num`."""
  return _stable_int("shuffle", seed, round_num, client_id, bits=31)
