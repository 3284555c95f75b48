"""What `fedbeam train` publishes after each round: a metrics.csv row and TensorBoard scalars.

Both go through TFF's own release managers, `tff.program.CSVFileReleaseManager`
(keyed by the `round` column, appending) and
`tff.program.TensorBoardReleaseManager`. Their `release` methods are
coroutines; `RoundReleases` runs them on an event loop of its own, in a
thread it starts and stops, so training works the same inside a program that
already runs an event loop (a notebook). Importing this module does not
import TensorFlow.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Coroutine
import threading
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
  from fedbeam.runtime.simulation import RoundResult

__all__ = ["METRICS_COLUMNS", "RoundReleases", "metrics_row"]

# The columns of metrics.csv, in order; `round` is the release managers' key.
METRICS_COLUMNS = (
  "round",
  "train_loss",
  "train_accuracy",
  "test_loss",
  "test_accuracy",
  "seconds",
  "examples",
)

# A named tuple, not a dict: the CSV manager flattens a dict in sorted key
# order and a named tuple in field order, which keeps metrics.csv's columns.
_MetricsValues = collections.namedtuple("_MetricsValues", METRICS_COLUMNS[1:])


def _format(value: Optional[float]) -> str:
  return "" if value is None else repr(float(value))


def metrics_row(result: "RoundResult") -> dict[str, str]:
  """The metrics.csv row of a round, every value as the file holds it.

  Losses and accuracies are `repr` of the float (empty when the round did
  not measure them), seconds have six decimals, examples are an integer.
  """
  from fedbeam.runtime.simulation import loss_and_accuracy  # pylint: disable=g-import-not-at-top

  train_loss, train_accuracy = loss_and_accuracy(result.train_metrics)
  test_loss, test_accuracy = loss_and_accuracy(result.eval_metrics)
  return {
    "round": str(result.round_num),
    "train_loss": _format(train_loss),
    "train_accuracy": _format(train_accuracy),
    "test_loss": _format(test_loss),
    "test_accuracy": _format(test_accuracy),
    "seconds": f"{result.seconds:.6f}",
    "examples": str(result.num_examples),
  }


class RoundReleases:
  """Releases each round to `metrics.csv` and a TensorBoard directory.

  Use as a context manager: entering starts the managers' event loop,
  leaving stops it (the TensorBoard writer flushes after every release).
  """

  def __init__(self, metrics_path: str, tensorboard_dir: str):
    """Opens both managers.

    Args:
      metrics_path: The CSV file; if it exists, its header must hold the
        columns `METRICS_COLUMNS` (rows are appended under it).
      tensorboard_dir: Where the event files go (created if missing).

    Raises:
      tff.program.CSVKeyFieldnameNotFoundError: If the CSV file exists
        without a `round` column.
    """
    import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

    self._csv = tff.program.CSVFileReleaseManager(
      metrics_path, save_mode=tff.program.CSVSaveMode.APPEND, key_fieldname="round"
    )
    self._tensorboard = tff.program.TensorBoardReleaseManager(tensorboard_dir)
    self._loop: Optional[asyncio.AbstractEventLoop] = None
    self._thread: Optional[threading.Thread] = None

  def __enter__(self) -> "RoundReleases":
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(
      target=self._loop.run_forever, name="fedbeam-round-releases", daemon=True
    )
    self._thread.start()
    return self

  def __exit__(self, *exc_info: Any) -> None:
    assert self._loop is not None and self._thread is not None
    # On the loop's own thread: the caller's thread may run a loop itself.
    asyncio.run_coroutine_threadsafe(self._loop.shutdown_default_executor(), self._loop).result()
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join()
    self._loop.close()
    self._loop = self._thread = None

  def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
    if self._loop is None:
      raise RuntimeError("RoundReleases is used outside its `with` block")
    asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

  def release(self, result: "RoundResult") -> dict[str, str]:
    """Appends the round's metrics.csv row, then writes its TensorBoard scalars.

    The CSV manager first drops rows of this round and later ones (a round
    that runs again after a resume replaces its row). TensorBoard gets
    `train/loss`, `train/accuracy`, `test/loss`, `test/accuracy` (those the
    round measured), `round/seconds` and `round/examples` at step
    `result.round_num`.

    Returns:
      The row written (`metrics_row(result)`).
    """
    from fedbeam.runtime.simulation import loss_and_accuracy  # pylint: disable=g-import-not-at-top

    row = metrics_row(result)
    self._run(
      self._csv.release(
        _MetricsValues(**{k: row[k] for k in METRICS_COLUMNS[1:]}), result.round_num
      )
    )
    train_loss, train_accuracy = loss_and_accuracy(result.train_metrics)
    test_loss, test_accuracy = loss_and_accuracy(result.eval_metrics)
    # None (not measured) is skipped by the manager, as it releases numbers only.
    self._run(
      self._tensorboard.release(
        {
          "train": {"loss": train_loss, "accuracy": train_accuracy},
          "test": {"loss": test_loss, "accuracy": test_accuracy},
          "round": {"seconds": result.seconds, "examples": result.num_examples},
        },
        result.round_num,
      )
    )
    return row
