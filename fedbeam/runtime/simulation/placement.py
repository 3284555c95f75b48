"""Which device trains which client of a round, and the threads that run them.

Slot `s` runs on device `s % len(devices)` and takes clients `s`,
`s + num_slots`, ...; with one slot per device (and per extra client of
`clients_per_device`), client `i` of a round lands on device
`i % len(devices)`: round-robin. Results are returned in sampling order, so
placement never changes the numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import concurrent.futures
from typing import TypeVar

import tensorflow as tf

__all__ = ["default_devices", "run_in_slots", "slot_devices"]

T = TypeVar("T")


def default_devices() -> list[str]:
  """Returns the visible logical GPUs, or `['/device:CPU:0']` without one."""
  gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
  return gpus or [tf.config.list_logical_devices("CPU")[0].name]


def slot_devices(devices: Sequence[str], clients_per_device: int) -> list[str]:
  """The device of each slot: `devices` repeated `clients_per_device` times."""
  return list(devices) * clients_per_device


def run_in_slots(num_slots: int, num_items: int, run: Callable[[int, int], T]) -> list[T]:
  """Runs `run(slot, index)` for every item, one thread per slot.

  Args:
    num_slots: Slots (model copies); slot `s` takes items `s, s + num_slots, ...`
      one after another.
    num_items: Items (the round's clients, in sampling order).
    run: Does item `index` on slot `slot`.

  Returns:
    The results in item order, whichever thread finished first.
  """
  results: list[T] = [None] * num_items  # type: ignore[list-item]

  def run_slot(slot: int) -> None:
    for index in range(slot, num_items, num_slots):
      results[index] = run(slot, index)

  threads = min(num_slots, num_items)
  if threads == 1:
    run_slot(0)
  else:
    # One thread per slot: TF releases the GIL while a device computes, so
    # devices (and clients sharing one) work concurrently.
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for future in [pool.submit(run_slot, s) for s in range(threads)]:
        future.result()
  return results
