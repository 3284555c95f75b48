"""Federated training rounds in Python TensorFlow, on GPUs when present.

TFF's PyPI runtime (`worker_binary`) is built without CUDA, so a
`ClientWorkProcess` run through it uses the CPU only. `SimulationLoop` runs
the very client update `tf.function` the client work runs
(`fedbeam.runtime.client_work.build_client_update`) in Python TensorFlow
under `tf.device`, spreading the clients of a round round-robin over the
devices (one thread per device, so several GPUs work at once), and does the
server side itself: the weighted mean of the client deltas (as
`tff.aggregators.MeanFactory`) and one step of a TFF server optimizer (as
`tff.learning.templates.build_apply_optimizer_finalizer`, including its
rejection of non-finite updates). The numbers match TFF's runtime on the same
inputs to float tolerance (tests/test_simulation.py).

Every random choice of a round (which clients, the order of their examples)
is a pure function of `(seed, round number, client id)`, so a run resumed
from a checkpoint ends exactly where an uninterrupted run does.

Modules, one idea each (this package re-exports their public names):

- `types`: `SimulationConfig`, `SimulationState`, `ClientReport`, `RoundResult`;
- `loop`: `SimulationLoop`;
- `client_input`: a client's batches (read, preprocess, shuffle, repeat, batch);
- `placement`: devices, slots and the threads that run a round's clients;
- `aggregation`: the mean of client deltas and the server optimizer step;
- `metrics`: sum-then-finalize of model metrics, `loss_and_accuracy`;
- `evaluation`: metrics on all test examples; finding an unreadable test client;
- `seeding`: `initial_model_weights`, client sampling, shuffle seeds;
- `read_errors`: `ClientReadError`, naming the client whose data failed;
- `checkpoint`: `save_state`, `load_state`, `CheckpointError`.
"""

from fedbeam.runtime.simulation.checkpoint import CheckpointError, load_state, save_state
from fedbeam.runtime.simulation.loop import SimulationLoop
from fedbeam.runtime.simulation.metrics import loss_and_accuracy
from fedbeam.runtime.simulation.placement import default_devices
from fedbeam.runtime.simulation.read_errors import ClientReadError
from fedbeam.runtime.simulation.seeding import initial_model_weights
from fedbeam.runtime.simulation.types import (
  ClientReport,
  RoundResult,
  SimulationConfig,
  SimulationState,
)

__all__ = [
  "CheckpointError",
  "ClientReadError",
  "ClientReport",
  "RoundResult",
  "SimulationConfig",
  "SimulationLoop",
  "SimulationState",
  "default_devices",
  "initial_model_weights",
  "load_state",
  "loss_and_accuracy",
  "save_state",
]
