"""The values that go into and come out of the simulation loop.

`SimulationConfig` (what a round does), `SimulationState` (what carries from
one round to the next, and what a checkpoint holds), `ClientReport` and
`RoundResult` (what a round did).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import tensorflow_federated as tff

from fedbeam.runtime import client_work
from fedbeam.runtime.option_checks import check_int

__all__ = ["ClientReport", "RoundResult", "SimulationConfig", "SimulationState"]


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
  """What a round does.

  Attributes:
    clients_per_round: Clients sampled (without replacement) each round.
    client_epochs: Passes over its data each client makes per round.
    batch_size: Client batch size.
    shuffle_buffer: Shuffle buffer of each client's examples (0: keep the
      stored order).
    seed: Nonnegative int; with the round number and client id it fixes every
      random choice.
    eval_every: Evaluate on the test data every this many rounds (0: never).
    eval_batch_size: Batch size of evaluation.
    client_weighting: `tff.learning.ClientWeighting` of the mean of deltas.
    delta_l2_regularizer: FedProx strength (0.0: FedAvg).
    use_experimental_simulation_loop: Dataset-iterator loop (True, needed to
      place work on GPUs) or `DatasetReduce` loop (False).
    prefetch_to_device: Copy each client's batches to its device ahead of
      use with `tf.data.experimental.prefetch_to_device`. None (default):
      for non-CPU devices only; the copy traces functions for every client
      (about 0.1 s), which buys nothing when the data is already in host
      memory.
    clients_per_device: Clients each device trains at the same time, each
      on its own copy of the model (one thread per copy). More than 1 keeps
      a device busy while another client's input is read; the numbers do
      not change.
  """

  clients_per_round: int
  client_epochs: int = 1
  batch_size: int = 20
  shuffle_buffer: int = 1000
  seed: int = 0
  eval_every: int = 1
  eval_batch_size: int = 256
  client_weighting: tff.learning.ClientWeighting = tff.learning.ClientWeighting.NUM_EXAMPLES
  delta_l2_regularizer: float = 0.0
  use_experimental_simulation_loop: bool = True
  prefetch_to_device: Optional[bool] = None
  clients_per_device: int = 1

  def __post_init__(self):
    for name in (
      "clients_per_round",
      "client_epochs",
      "batch_size",
      "eval_batch_size",
      "clients_per_device",
    ):
      check_int(name, getattr(self, name), 1)
    for name in ("shuffle_buffer", "seed", "eval_every"):
      check_int(name, getattr(self, name), 0)
    if self.prefetch_to_device not in (None, True, False):
      raise ValueError(
        f"prefetch_to_device must be None, True or False, got {self.prefetch_to_device!r}"
      )
    if not isinstance(self.client_weighting, tff.learning.ClientWeighting):
      raise ValueError(
        f"client_weighting must be a tff.learning.ClientWeighting, got {self.client_weighting!r}"
      )
    object.__setattr__(
      self,
      "delta_l2_regularizer",
      client_work.check_delta_l2_regularizer(self.delta_l2_regularizer),
    )


@dataclasses.dataclass
class SimulationState:
  """Everything that carries from one round to the next.

  Attributes:
    round_num: Rounds completed (0 before the first).
    model_weights: `tff.learning.models.ModelWeights` of numpy arrays.
    server_optimizer_state: The server optimizer's state, a structure of
      numpy values.
  """

  round_num: int
  model_weights: tff.learning.models.ModelWeights
  server_optimizer_state: Any


@dataclasses.dataclass(frozen=True)
class ClientReport:
  """What one client did in a round.

  Attributes:
    client_id: The client.
    device: The device the loop assigned (an entry of `SimulationLoop.devices`).
    ran_on: The full name of the device that holds the client's result
      (e.g. `/job:localhost/replica:0/task:0/device:GPU:1`).
    num_examples: Examples trained on, counting every epoch (from the
      model's `num_examples` metric, else the NUM_EXAMPLES weight; -1 when
      neither is available).
    weight: The client's weight in the mean of deltas.
    seconds: Wall time of the client's update, input included.
  """

  client_id: str
  device: str
  ran_on: str
  num_examples: int
  weight: float
  seconds: float


@dataclasses.dataclass(frozen=True)
class RoundResult:
  """The outcome of one round.

  Attributes:
    round_num: The round (1-based).
    clients: One report per sampled client, in sampling order.
    train_metrics: The model's metrics summed over the clients, then
      finalized (`tff.learning.metrics.sum_then_finalize` semantics).
    eval_metrics: Finalized metrics on the test data after the round, or
      None when the round did not evaluate.
    num_examples: Examples trained on in the round.
    seconds: Wall time of the round, evaluation included.
    eval_seconds: Wall time of the evaluation (0.0 if none).
    update_applied: False when the mean delta was non-finite and the server
      kept its weights (as TFF's finalizer does).
  """

  round_num: int
  clients: tuple[ClientReport, ...]
  train_metrics: dict[str, float]
  eval_metrics: Optional[dict[str, float]]
  num_examples: int
  seconds: float
  eval_seconds: float
  update_applied: bool
