"""`SimulationLoop`: federated rounds in Python TensorFlow, on GPUs when present.

The loop samples a round's clients (`seeding`), trains each with the client
work's update `tf.function` under `tf.device` (`placement`, `client_input`),
averages their deltas and applies the server optimizer (`aggregation`),
sums and finalizes their metrics (`metrics`), and evaluates on the test data
(`evaluation`). Its state (`SimulationState`) is what `checkpoint` saves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import logging
import time
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedbeam.runtime import client_work
from fedbeam.runtime.simulation import (
  aggregation,
  client_input,
  evaluation,
  metrics,
  placement,
  seeding,
)
from fedbeam.runtime.simulation.client_input import Preprocess
from fedbeam.runtime.simulation.read_errors import READ_ERRORS, reading_client
from fedbeam.runtime.simulation.types import (
  ClientReport,
  RoundResult,
  SimulationConfig,
  SimulationState,
)

__all__ = ["SimulationLoop"]

# A child of the "fedbeam.runtime.simulation" logger that docs/training.md names.
logger = logging.getLogger(__name__)


class SimulationLoop:
  """Runs federated rounds over a `tff.simulation.datasets.ClientData`.

  The loop codes only against the `ClientData` interface (`client_ids`,
  `serializable_dataset_fn`, or `create_tf_dataset_for_client` without one,
  and `create_tf_dataset_from_all_clients` for the test data), so a store
  loaded with `fedbeam.runtime.client_data.load_client_data` and TFF's own
  ClientData classes both work.
  """

  def __init__(
    self,
    model_fn: Callable[[], tff.learning.models.VariableModel],
    client_optimizer: client_work.OptimizerArg,
    server_optimizer: tff.learning.optimizers.Optimizer,
    train_data: tff.simulation.datasets.ClientData,
    config: SimulationConfig,
    *,
    test_data: Optional[tff.simulation.datasets.ClientData] = None,
    preprocess: Optional[Preprocess] = None,
    devices: Optional[Sequence[str]] = None,
    initial_weights: Optional[tff.learning.models.ModelWeights] = None,
  ):
    """Builds one client model per device and the server state.

    Args:
      model_fn: No-arg callable returning a new VariableModel.
      client_optimizer: A `tff.learning.optimizers.Optimizer` or a no-arg
        callable returning a `tf.keras.optimizers.Optimizer`.
      server_optimizer: A `tff.learning.optimizers.Optimizer` applied to the
        mean delta (SGD with learning rate 1.0 is FedAvg).
      train_data: The clients to sample from.
      config: A `SimulationConfig`.
      test_data: Optional ClientData evaluated every `config.eval_every`
        rounds (all its examples).
      preprocess: Optional map from a client's unbatched dataset to unbatched
        model examples, applied before shuffling, repeating and batching.
        If it carries `fedbeam_batch_fn` (as the built-in models' do; see
        `fedbeam.runtime.models`), a ClientData with `client_tensors_fn`
        is preprocessed a whole client at a time with it; the batches are
        the same.
      devices: Device names to spread clients over, e.g. `['/device:GPU:0',
        '/device:GPU:1']`; default `default_devices()`.
      initial_weights: Starting `ModelWeights`; default
        `initial_model_weights(model_fn, config.seed)`.

    Raises:
      TypeError: If the data, optimizers or model are of the wrong kind.
      ValueError: If there are fewer clients than `clients_per_round`, no
        devices, or the preprocessed data does not match the model.
    """
    if not isinstance(config, SimulationConfig):
      raise TypeError(f"config must be a SimulationConfig, got {config!r}")
    if not isinstance(train_data, tff.simulation.datasets.ClientData):
      raise TypeError(
        f"train_data must be a tff.simulation.datasets.ClientData, got {type(train_data).__name__}"
      )
    if test_data is not None and not isinstance(test_data, tff.simulation.datasets.ClientData):
      raise TypeError(
        "test_data must be a tff.simulation.datasets.ClientData or None, "
        f"got {type(test_data).__name__}"
      )
    if not isinstance(server_optimizer, tff.learning.optimizers.Optimizer):
      raise TypeError(
        f"server_optimizer must be a tff.learning.optimizers.Optimizer, got {server_optimizer!r}"
      )
    self._config = config
    self._train_data = train_data
    self._test_data = test_data
    self._preprocess = preprocess
    # Sorted once so sampling does not depend on the order a ClientData
    # happens to list its ids in.
    self._client_ids = sorted(train_data.client_ids)
    if config.clients_per_round > len(self._client_ids):
      raise ValueError(
        f"clients_per_round={config.clients_per_round} exceeds the "
        f"{len(self._client_ids)} training clients"
      )
    self._make_batches = client_input.build_batches_fn(train_data, preprocess, config)
    self._devices = list(devices) if devices is not None else placement.default_devices()
    if not self._devices:
      raise ValueError("devices must name at least one device")

    if initial_weights is None:
      # Before the eager models below: Keras swaps its layer classes between
      # graph (v1) and eager (v2) versions on every construction, and a model
      # built in a `tf.Graph` invalidates the untraced eager ones.
      initial_weights = seeding.initial_model_weights(model_fn, config.seed)

    # Slot s runs on device s % len(devices), so client i (run by slot
    # i % len(slots)) lands on device i % len(devices): round-robin.
    self._slot_devices = placement.slot_devices(self._devices, config.clients_per_device)
    self._updates: list[client_work.ClientUpdate] = []
    for device in self._slot_devices:
      with tf.device(device):
        self._updates.append(
          client_work.build_client_update(
            model_fn,
            client_optimizer,
            config.client_weighting,
            config.delta_l2_regularizer,
            config.use_experimental_simulation_loop,
          )
        )
    first_model = self._updates[0].model
    self._weights_template = tff.learning.models.ModelWeights.from_model(first_model)
    self._finalizers = first_model.metric_finalizers()
    with reading_client(self._client_ids[0], None):
      first_batches = self._batched(self._client_ids[0], round_num=1)
    client_input.check_input_spec(first_batches.element_spec, first_model.input_spec)
    weights = self._checked_weights(initial_weights)

    trainable_specs = tuple(
      tf.TensorSpec(v.shape, v.dtype) for v in tf.nest.flatten(self._weights_template.trainable)
    )
    self._server_step = aggregation.ServerOptimizerStep(server_optimizer, trainable_specs)
    self._eval_fn = evaluation.build_eval_fn(first_model, self._weights_template)
    self._state = SimulationState(
      round_num=0,
      model_weights=weights,
      server_optimizer_state=self._server_step.initial_state(),
    )
    self._trace(first_batches.take(0))

  def _trace(self, no_batches: tf.data.Dataset) -> None:
    """Traces every device's functions now, on an empty dataset.

    Once traced, a function no longer calls Keras layers from Python, so
    Keras models built later in a `tf.Graph` (TFF computations do that)
    cannot invalidate the loop's models. Running on no batches changes no
    state the rounds depend on.
    """
    weights = self._packed_weights()
    for device, update in zip(self._slot_devices, self._updates):
      with tf.device(device):
        update.model.reset_metrics()
        update.update_fn(weights, self._prefetched(no_batches, device))
    with tf.device(self._devices[0]):
      self._eval_fn(weights, self._prefetched(no_batches, self._devices[0]))
      self._updates[0].model.reset_metrics()

  @property
  def devices(self) -> list[str]:
    """The devices clients are spread over, in round-robin order."""
    return list(self._devices)

  @property
  def config(self) -> SimulationConfig:
    return self._config

  @property
  def state(self) -> SimulationState:
    """The current state (a copy: mutating it does not affect the loop)."""
    return SimulationState(
      round_num=self._state.round_num,
      model_weights=tf.nest.map_structure(np.copy, self._state.model_weights),
      server_optimizer_state=tf.nest.map_structure(np.copy, self._state.server_optimizer_state),
    )

  def set_state(self, state: SimulationState) -> None:
    """Replaces the loop's state, e.g. with one loaded from a checkpoint.

    Raises:
      ValueError: If the weights or optimizer state do not fit this model.
    """
    weights = self._checked_weights(state.model_weights)
    expected = self._state.server_optimizer_state
    try:
      tf.nest.assert_same_structure(expected, state.server_optimizer_state, check_types=False)
    except (ValueError, TypeError) as error:
      raise ValueError(f"server optimizer state does not fit this optimizer: {error}") from error
    if (
      isinstance(state.round_num, bool)
      or not isinstance(state.round_num, (int, np.integer))
      or state.round_num < 0
    ):
      raise ValueError(f"round_num must be a nonnegative int: {state.round_num!r}")
    self._state = SimulationState(
      round_num=int(state.round_num),
      model_weights=weights,
      server_optimizer_state=tf.nest.map_structure(
        lambda old, new: np.asarray(new, dtype=np.asarray(old).dtype),
        expected,
        state.server_optimizer_state,
      ),
    )

  def _checked_weights(
    self, weights: tff.learning.models.ModelWeights
  ) -> tff.learning.models.ModelWeights:
    trainable = [np.asarray(w) for w in tf.nest.flatten(weights.trainable)]
    non_trainable = [np.asarray(w) for w in tf.nest.flatten(weights.non_trainable)]
    template = self._weights_template
    for got, variables, label in (
      (trainable, tf.nest.flatten(template.trainable), "trainable"),
      (non_trainable, tf.nest.flatten(template.non_trainable), "non_trainable"),
    ):
      if len(got) != len(variables) or any(
        g.shape != tuple(v.shape) or g.dtype != v.dtype.as_numpy_dtype
        for g, v in zip(got, variables)
      ):
        raise ValueError(
          f"{label} weights do not fit the model: got "
          f"{[(g.shape, g.dtype.name) for g in got]}, model has "
          f"{[(tuple(v.shape), v.dtype.name) for v in variables]}"
        )
    return tff.learning.models.ModelWeights(trainable=trainable, non_trainable=non_trainable)

  def _packed_weights(self) -> Any:
    # The update assigns with tf.nest over the model's own containers, which
    # must match exactly (a list is not a tuple to tf.nest).
    # Tensors, not numpy arrays, so every call matches the traced signature.
    weights = self._state.model_weights
    return tff.learning.models.ModelWeights(
      trainable=tf.nest.pack_sequence_as(
        self._weights_template.trainable,
        [tf.convert_to_tensor(w) for w in weights.trainable],
      ),
      non_trainable=tf.nest.pack_sequence_as(
        self._weights_template.non_trainable,
        [tf.convert_to_tensor(w) for w in weights.non_trainable],
      ),
    )

  def sample_clients(self, round_num: int) -> list[str]:
    """Returns the clients of round `round_num` (a function of seed and round).

    Args:
      round_num: 1-based round number.

    Returns:
      `clients_per_round` distinct client ids, in the order they are
      assigned to devices.
    """
    return seeding.sample_clients(
      self._client_ids, self._config.seed, round_num, self._config.clients_per_round
    )

  def shuffle_seed(self, client_id: str, round_num: int) -> int:
    """The shuffle seed of a client's examples in round `round_num`."""
    return seeding.shuffle_seed(self._config.seed, round_num, client_id)

  def _batched(self, client_id: str, round_num: int) -> tf.data.Dataset:
    return self._make_batches(
      tf.constant(client_id, tf.string),
      tf.constant(self.shuffle_seed(client_id, round_num), tf.int64),
    )

  def client_dataset(
    self, client_id: str, round_num: int, device: Optional[str] = None
  ) -> tf.data.Dataset:
    """The batches client `client_id` trains on in round `round_num`.

    Args:
      client_id: A training client id.
      round_num: 1-based round number (it seeds the shuffle).
      device: The device the client runs on, if any.

    Returns:
      A dataset: preprocess, shuffle (seeded), repeat for the local epochs,
      batch, and prefetch to `device` per `config.prefetch_to_device`.
    """
    return self._prefetched(self._batched(client_id, round_num), device)

  def _prefetched(self, dataset: tf.data.Dataset, device: Optional[str]) -> tf.data.Dataset:
    return client_input.prefetched(dataset, device, self._config.prefetch_to_device)

  def _run_client(
    self, index: int, client_id: str, round_num: int, weights: Any
  ) -> tuple[list[np.ndarray], float, dict[str, Any], ClientReport]:
    slot = index % len(self._slot_devices)
    device = self._slot_devices[slot]
    update = self._updates[slot]
    start = time.perf_counter()
    with reading_client(client_id, round_num), tf.device(device):
      dataset = self.client_dataset(client_id, round_num, device=device)
      update.model.reset_metrics()
      result, unfinalized = update.update_fn(weights, dataset)
      delta_tensors = tf.nest.flatten(result.update)
      delta = [t.numpy() for t in delta_tensors]
      weight = float(result.update_weight.numpy())
      unfinalized = metrics.to_numpy(unfinalized)
    ran_on = delta_tensors[0].device
    seconds = time.perf_counter() - start
    if "num_examples" in unfinalized:
      num_examples = int(np.sum(unfinalized["num_examples"]))
    elif self._config.client_weighting == tff.learning.ClientWeighting.NUM_EXAMPLES:
      num_examples = int(weight)
    else:
      num_examples = -1
    report = ClientReport(
      client_id=client_id,
      device=device,
      ran_on=ran_on,
      num_examples=num_examples,
      weight=weight,
      seconds=seconds,
    )
    logger.info(
      "round %d: client %r ran on %s (%d examples, %.3fs)",
      round_num,
      client_id,
      ran_on,
      num_examples,
      seconds,
    )
    return delta, weight, unfinalized, report

  def _run_clients(
    self, client_ids: list[str], round_num: int
  ) -> list[tuple[list[np.ndarray], float, dict[str, Any], ClientReport]]:
    weights = self._packed_weights()
    return placement.run_in_slots(
      len(self._slot_devices),
      len(client_ids),
      lambda slot, index: self._run_client(index, client_ids[index], round_num, weights),
    )

  def run_round(self, evaluate: Optional[bool] = None) -> RoundResult:
    """Runs the next round and advances the state.

    Args:
      evaluate: Evaluate on the test data after the round; None follows
        `config.eval_every`. Ignored without test data.

    Returns:
      A `RoundResult`.
    """
    start = time.perf_counter()
    round_num = self._state.round_num + 1
    client_ids = self.sample_clients(round_num)
    results = self._run_clients(client_ids, round_num)

    mean_delta, total_weight = aggregation.weighted_mean_delta(
      self._state.model_weights.trainable, [(delta, weight) for delta, weight, _, _ in results]
    )
    update_applied, server_state, trainable = self._server_step.apply(
      self._state.server_optimizer_state, self._state.model_weights.trainable, mean_delta
    )
    if update_applied:
      model_weights = tff.learning.models.ModelWeights(
        trainable=trainable,
        non_trainable=list(self._state.model_weights.non_trainable),
      )
    else:
      # TFF's finalizer rejects a non-finite update and keeps its state.
      logger.warning(
        "round %d: the mean client delta is not finite (total weight %s); "
        "the server keeps its weights",
        round_num,
        total_weight,
      )
      model_weights = self._state.model_weights
    self._state = SimulationState(round_num, model_weights, server_state)

    train_metrics = metrics.finalize_metrics(
      self._finalizers, metrics.sum_metrics([r[2] for r in results])
    )
    reports = tuple(r[3] for r in results)

    if evaluate is None:
      evaluate = self._config.eval_every > 0 and round_num % self._config.eval_every == 0
    eval_metrics = None
    eval_seconds = 0.0
    if evaluate and self._test_data is not None:
      eval_start = time.perf_counter()
      try:
        eval_metrics = self.evaluate()
      except READ_ERRORS as error:
        raise evaluation.unreadable_test_client(self._test_data, round_num, error) from error
      eval_seconds = time.perf_counter() - eval_start
    return RoundResult(
      round_num=round_num,
      clients=reports,
      train_metrics=train_metrics,
      eval_metrics=eval_metrics,
      num_examples=sum(max(r.num_examples, 0) for r in reports),
      seconds=time.perf_counter() - start,
      eval_seconds=eval_seconds,
      update_applied=update_applied,
    )

  def run(
    self,
    total_rounds: int,
    on_round: Optional[Callable[[RoundResult, SimulationLoop], None]] = None,
  ) -> list[RoundResult]:
    """Runs rounds until `total_rounds` are done (none if already there).

    The last round always evaluates (when there is test data).

    Args:
      total_rounds: The round number to stop after.
      on_round: Called after each round with its result and this loop (e.g.
        to write metrics and a checkpoint).

    Returns:
      The results of the rounds run by this call.
    """
    results = []
    while self._state.round_num < total_rounds:
      is_last = self._state.round_num + 1 == total_rounds
      result = self.run_round(evaluate=True if is_last else None)
      results.append(result)
      if on_round is not None:
        on_round(result, self)
    return results

  def client_update_fn(self) -> Callable[[tf.data.Dataset], Any]:
    """The first device's client update from the current weights, as a function of batches.

    For profiling (`bench/loop_profile.py`): `fn(batches)` resets the first
    model copy's metrics, runs its update on `batches` under the first
    device and returns the client output as numpy arrays. The loop's state
    does not change (a round resets a model's metrics before each client).
    """
    device = self._devices[0]
    update = self._updates[0]
    weights = self._packed_weights()

    def run(batches: tf.data.Dataset) -> Any:
      with tf.device(device):
        update.model.reset_metrics()
        result, _ = update.update_fn(weights, batches)
        return tf.nest.map_structure(lambda t: t.numpy(), result)

    return run

  def evaluate(self) -> Optional[dict[str, float]]:
    """Evaluates the current weights on all test examples (first device).

    Returns:
      Finalized metrics (e.g. `loss`, `sparse_categorical_accuracy`), or None
      without test data.
    """
    if self._test_data is None:
      return None
    device = self._devices[0]
    dataset = self._prefetched(
      evaluation.all_test_examples(self._test_data, self._preprocess, self._config.eval_batch_size),
      device,
    )
    model = self._updates[0].model
    with tf.device(device):
      model.reset_metrics()
      unfinalized = self._eval_fn(self._packed_weights(), dataset)
    return metrics.finalize_metrics(self._finalizers, metrics.to_numpy(unfinalized))
