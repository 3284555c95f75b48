"""`StoreClientData`: a fedbeam store loaded as a `tff.simulation.datasets.ClientData`.

The reading is `fedbeam.runtime.store_reader.StoreReader`'s (TensorFlow only);
this module makes it a TFF `ClientData`: TFF's `preprocess`, `datasets` and
`dataset_computation`, TFF's seed check, and a `train_test_client_split` from
manifest counts. Importing it imports TensorFlow Federated (the `fedbeam[tff]`
extra) and registers `stop_tff_workers` at exit.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedbeam.runtime.store_reader import (
  ClientFileError,
  StoreReader,
  client_dataset_builder,
  client_file_error,
)
from fedbeam.runtime.tff_worker import register_worker_cleanup

__all__ = [
  "ClientFileError",
  "StoreClientData",
  "client_dataset_builder",
  "client_file_error",
  "load_client_data",
]


class StoreClientData(StoreReader, tff.simulation.datasets.ClientData):
  """The clients of one or more splits of a store.

  Built by `load_client_data`. Beyond TFF's contract: O(1) membership checks,
  `num_examples(client_id)` from the manifest, and a `train_test_client_split`
  that reads manifest counts instead of opening datasets. Reading is
  `StoreReader`'s; TFF's `ClientData` supplies `preprocess`, `datasets` and
  `dataset_computation`.
  """

  def __init__(self, *args: Any, **kwargs: Any):
    # A loaded store is what TFF computations run on next, and TFF's first
    # computation starts a worker_binary its own clean-up leaves running: stop
    # it at exit. Registered here, on first use, not when the module is imported.
    register_worker_cleanup()
    super().__init__(*args, **kwargs)

  def create_tf_dataset_from_all_clients(
    self, seed: Optional[Union[int, Sequence[int]]] = None
  ) -> tf.data.Dataset:
    """Every client's examples, clients in TFF's seeded order, files read in parallel.

    Same order as TFF's implementation: clients shuffled by
    `np.random.RandomState(seed)`, each client's examples together.

    Raises:
      ValueError / TypeError: `seed` fails TFF's `check_numpy_random_seed`.
    """
    tff.simulation.datasets.client_data.check_numpy_random_seed(seed)
    return super().create_tf_dataset_from_all_clients(seed)

  @classmethod
  def train_test_client_split(
    cls,
    client_data: "tff.simulation.datasets.ClientData",
    num_test_clients: int,
    seed: Optional[Union[int, Sequence[int]]] = None,
  ) -> tuple[tff.simulation.datasets.ClientData, tff.simulation.datasets.ClientData]:
    """TFF's `train_test_client_split`, using manifest counts for StoreClientData.

    Same choice as TFF 0.87 for the same ids and seed: ids shuffled with
    `np.random.RandomState(seed)`, test clients popped from the end, clients
    without examples skipped; `ValueError` when `num_test_clients` is not in
    `1..len(client_ids)-1` or more than `5 * num_test_clients + 10` empty
    clients were skipped. Returns StoreClientData objects; never opens a
    dataset. As in TFF, the test ids keep the order they were drawn in and the
    train ids the shuffled order followed by the skipped empty clients, so
    `datasets(seed=...)` walks them as TFF's would. Other ClientData types go
    to TFF's implementation.
    """
    if not isinstance(client_data, StoreClientData):
      return tff.simulation.datasets.ClientData.train_test_client_split(
        client_data, num_test_clients, seed
      )
    if num_test_clients <= 0:
      raise ValueError("Please specify num_test_clients > 0.")
    if len(client_data.client_ids) <= num_test_clients:
      raise ValueError(
        f"The client_data supplied has only {len(client_data.client_ids)} clients, but "
        f"{num_test_clients} test clients were requested."
      )
    tff.simulation.datasets.client_data.check_numpy_random_seed(seed)
    train_ids = list(client_data.client_ids)
    np.random.RandomState(seed).shuffle(train_ids)
    skipped, test_ids = [], []
    while len(test_ids) < num_test_clients:
      if not train_ids or len(skipped) > 5 * num_test_clients + 10:
        raise ValueError("Encountered too many clients with no data.")
      cid = train_ids.pop()
      if client_data.num_examples(cid) == 0:
        skipped.append(cid)
        continue
      test_ids.append(cid)
    return client_data.subset(train_ids + skipped), client_data.subset(test_ids)


def load_client_data(path: str, split: Optional[str] = None) -> StoreClientData:
  """Loads a committed store as a `StoreClientData`.

  Args:
    path: the store directory (local or gs://...).
    split: a split name (e.g. "train", "test"), or None for every client of
      every split.

  Raises:
    StoreFormatError: no committed store at `path`, an unsupported format
      version, a damaged manifest, or manifest rows that disagree with the
      metadata's per-split figures (`StoreReader.from_store`).
    ValueError: `split` is not a split of the store, or it has no client, or
      (with `split` None) a client id is in several splits.
  """
  return StoreClientData.from_store(path, split)
