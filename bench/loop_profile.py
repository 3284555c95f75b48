"""Where a simulation round's client time goes: input or compute.

A profiler of `fedbeam.runtime.simulation.SimulationLoop`, used by
bench/bench_simulation.py and the training part of bench/bench_loading.py.
It drives the loop through its public methods (`sample_clients`,
`client_dataset`, `client_update_fn`) and leaves its state unchanged.
"""

from __future__ import annotations

import time
from typing import Optional

import tensorflow as tf

from fedbeam.runtime.simulation import SimulationLoop

__all__ = ["measure_input_and_compute"]


@tf.function
def _drain(dataset: tf.data.Dataset) -> tf.Tensor:
  """Produces every element of `dataset` in-graph; returns how many."""
  count = tf.constant(0, tf.int64)
  for _ in iter(dataset):
    count += 1
  return count


def measure_input_and_compute(
  loop: SimulationLoop, round_num: Optional[int] = None
) -> dict[str, float]:
  """Splits a round's client time into input and compute.

  For each client of `round_num` (default: the loop's next round), on the
  loop's first device, one client after another, without changing the
  loop's state:

  - `compute_seconds`: its update on its batches already in memory (a
    cached copy of its dataset, filled beforehand, untimed);
  - `input_seconds`: how much longer the same update takes on its dataset
    as the round builds it (reading, preprocessing, shuffling, batching):
    the time the round waits for data, summed over the clients (a client
    whose difference comes out negative, by timing noise, counts as 0);
  - `produce_seconds`: producing every batch alone, drained inside a
    `tf.function`; this includes setting up an in-graph iterator, which
    the update pays in both timings above as well.

  Args:
    loop: The loop to measure.
    round_num: 1-based round whose clients and shuffles to use.

  Returns:
    `{'input_seconds', 'compute_seconds', 'produce_seconds', 'num_clients'}`.
  """
  round_num = loop.state.round_num + 1 if round_num is None else round_num
  update = loop.client_update_fn()

  def timed_update(dataset: tf.data.Dataset) -> float:
    start = time.perf_counter()
    update(dataset)
    return time.perf_counter() - start

  input_seconds = compute_seconds = produce_seconds = 0.0
  client_ids = loop.sample_clients(round_num)
  for client_id in client_ids:
    start = time.perf_counter()
    _drain(loop.client_dataset(client_id, round_num)).numpy()
    produce_seconds += time.perf_counter() - start
    cached = loop.client_dataset(client_id, round_num).cache()
    _drain(cached).numpy()
    in_memory = timed_update(cached)
    fresh = timed_update(loop.client_dataset(client_id, round_num))
    compute_seconds += in_memory
    input_seconds += max(fresh - in_memory, 0.0)
  return {
    "input_seconds": input_seconds,
    "compute_seconds": compute_seconds,
    "produce_seconds": produce_seconds,
    "num_clients": float(len(client_ids)),
  }
