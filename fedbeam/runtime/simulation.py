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
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import stat
import time
import zipfile
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedbeam.batch_form import batch_form_of
from fedbeam.runtime import client_work

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

logger = logging.getLogger(__name__)

Preprocess = Callable[[tf.data.Dataset], tf.data.Dataset]


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
  client_weighting: tff.learning.ClientWeighting = (
      tff.learning.ClientWeighting.NUM_EXAMPLES
  )
  delta_l2_regularizer: float = 0.0
  use_experimental_simulation_loop: bool = True
  prefetch_to_device: Optional[bool] = None
  clients_per_device: int = 1

  def __post_init__(self):
    positive = ("clients_per_round", "client_epochs", "batch_size",
                "eval_batch_size", "clients_per_device")
    for name in positive:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name in ("shuffle_buffer", "seed", "eval_every"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a nonnegative int, got {value!r}")
    if self.prefetch_to_device not in (None, True, False):
      raise ValueError(
          "prefetch_to_device must be None, True or False, got "
          f"{self.prefetch_to_device!r}"
      )
    if not isinstance(self.client_weighting, tff.learning.ClientWeighting):
      raise ValueError(
          "client_weighting must be a tff.learning.ClientWeighting, got "
          f"{self.client_weighting!r}"
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


# What reading a client's file raises: TensorFlow's errors from graph-mode
# readers (a missing file, a CRC failure, a directory in its place, a record
# that does not parse) and, from eager readers, `ClientFileError` (an OSError).
_READ_ERRORS = (
    tf.errors.NotFoundError,
    tf.errors.DataLossError,
    tf.errors.FailedPreconditionError,
    tf.errors.PermissionDeniedError,
    tf.errors.InvalidArgumentError,
    OSError,
)


def _error_cause(error: BaseException) -> str:
  """One line of what went wrong, without TensorFlow's graph trace and node names."""
  if isinstance(error, tf.errors.OpError):
    # "Graph execution error:\n\nDetected at node ...\n\n<cause>\n\t [[{{node X}}]] [Op:Y]"
    text = error.message.rsplit("\n\n", 1)[-1].split("\n\t [[")[0]
    text = f"{type(error).__name__}: {text.split(' [Op:')[0]}"
  else:
    text = str(error) or type(error).__name__
  return " ".join(text.split())


class ClientReadError(RuntimeError):
  """A sampled client's data could not be read (or trained on) in a round.

  Raised by `SimulationLoop` at the round boundary instead of TensorFlow's
  raw error, which names a file path (or not even that) but not the client.

  Attributes:
    client_id: The client, or None when evaluation failed and no single
      test client could be found at fault.
    round_num: The round, or None while the loop was being built.
    cause: The original exception.
    evaluating: True for a test client (read for evaluation), False for a
      training client.
  """

  def __init__(self, client_id: Optional[str], round_num: Optional[int],
               cause: BaseException, evaluating: bool = False):
    self.client_id = client_id
    self.round_num = round_num
    self.cause = cause
    self.evaluating = evaluating
    when = "building the loop" if round_num is None else f"round {round_num}"
    if client_id is None:
      what = "evaluation on the test data failed"
    elif evaluating:
      what = f"test client {client_id!r} could not be read"
    else:
      what = f"client {client_id!r} could not be read or trained on"
    super().__init__(f"{when}: {what}: {_error_cause(cause)}")


@contextlib.contextmanager
def _reading_client(client_id: str, round_num: Optional[int]):
  """Turns a read error inside the block into a `ClientReadError` naming the client."""
  try:
    yield
  except _READ_ERRORS as error:
    raise ClientReadError(client_id, round_num, error) from error


def default_devices() -> list[str]:
  """Returns the visible logical GPUs, or `['/device:CPU:0']` without one."""
  gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
  return gpus or [tf.config.list_logical_devices("CPU")[0].name]


def _stable_int(*parts: Any, bits: int = 63) -> int:
  # hashlib, not hash(): Python salts str hashes per process.
  digest = hashlib.sha256(
      json.dumps([str(p) for p in parts]).encode("utf-8")
  ).digest()
  return int.from_bytes(digest[:8], "big") >> (64 - bits)


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
  accuracy = next(
      (v for k, v in metrics.items() if "accuracy" in k.lower()), None
  )
  return loss, accuracy


def _to_numpy(structure: Any) -> Any:
  return tf.nest.map_structure(lambda t: np.asarray(t), structure)


def _finalize(
    finalizers: dict[str, Callable[[Any], Any]], unfinalized: dict[str, Any]
) -> dict[str, float]:
  finalized = {}
  for name, finalizer in finalizers.items():
    # TFF's Keras finalizers are tf.functions that build a metric (variables)
    # on every trace, written for one trace per TFF computation; called
    # eagerly they fail on tf.function's second, variable-lifting trace. The
    # wrapped Python function runs them eagerly instead.
    finalize_fn = getattr(finalizer, "python_function", finalizer)
    value = np.asarray(finalize_fn(
        tf.nest.map_structure(tf.convert_to_tensor, unfinalized[name])
    ))
    finalized[name] = value.item() if value.size == 1 else value.tolist()
  return finalized


@tf.function
def _drain(dataset: tf.data.Dataset) -> tf.Tensor:
  """Produces every element of `dataset` in-graph; returns how many."""
  count = tf.constant(0, tf.int64)
  for _ in iter(dataset):
    count += 1
  return count


def _check_input_spec(element_spec: Any, input_spec: Any) -> None:
  try:
    tf.nest.assert_same_structure(element_spec, input_spec, check_types=False)
    compatible = all(
        e.dtype == i.dtype and i.shape.is_compatible_with(e.shape)
        for e, i in zip(tf.nest.flatten(element_spec),
                        tf.nest.flatten(input_spec))
    )
  except (ValueError, TypeError):
    compatible = False
  if not compatible:
    raise ValueError(
        "the preprocessed, batched client data does not match the model's "
        f"input spec: data {element_spec} vs model {input_spec}; check the "
        "model's preprocessing against the store's features"
    )


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
          "train_data must be a tff.simulation.datasets.ClientData, got "
          f"{type(train_data).__name__}"
      )
    if test_data is not None and not isinstance(
        test_data, tff.simulation.datasets.ClientData
    ):
      raise TypeError(
          "test_data must be a tff.simulation.datasets.ClientData or None, "
          f"got {type(test_data).__name__}"
      )
    if not isinstance(server_optimizer, tff.learning.optimizers.Optimizer):
      raise TypeError(
          "server_optimizer must be a tff.learning.optimizers.Optimizer, got "
          f"{server_optimizer!r}"
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
    self._make_batches = self._build_batches_fn()
    self._devices = list(devices) if devices is not None else default_devices()
    if not self._devices:
      raise ValueError("devices must name at least one device")

    if initial_weights is None:
      # Before the eager models below: Keras swaps its layer classes between
      # graph (v1) and eager (v2) versions on every construction, and a model
      # built in a `tf.Graph` invalidates the untraced eager ones.
      initial_weights = initial_model_weights(model_fn, config.seed)

    # Slot s runs on device s % len(devices), so client i (run by slot
    # i % len(slots)) lands on device i % len(devices): round-robin.
    self._slot_devices = self._devices * config.clients_per_device
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
    self._weights_template = tff.learning.models.ModelWeights.from_model(
        first_model
    )
    self._finalizers = first_model.metric_finalizers()
    with _reading_client(self._client_ids[0], None):
      first_batches = self._batched(self._client_ids[0], round_num=1)
    _check_input_spec(first_batches.element_spec, first_model.input_spec)
    weights = self._checked_weights(initial_weights)

    trainable_specs = tuple(
        tf.TensorSpec(v.shape, v.dtype)
        for v in tf.nest.flatten(self._weights_template.trainable)
    )
    # Traced, as in TFF's finalizer, so Python-number hyperparameters become
    # float32 tensors rather than float64 numpy values.
    server_state = tf.function(
        lambda: server_optimizer.initialize(trainable_specs)
    )()

    @tf.function
    def server_step(state, trainable, update):
      return server_optimizer.next(state, trainable, update)

    self._server_step = server_step
    self._eval_fn = self._build_eval_fn(first_model)
    self._state = SimulationState(
        round_num=0,
        model_weights=weights,
        server_optimizer_state=_to_numpy(server_state),
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
        model_weights=tf.nest.map_structure(
            np.copy, self._state.model_weights
        ),
        server_optimizer_state=tf.nest.map_structure(
            np.copy, self._state.server_optimizer_state
        ),
    )

  def set_state(self, state: SimulationState) -> None:
    """Replaces the loop's state, e.g. with one loaded from a checkpoint.

    Raises:
      ValueError: If the weights or optimizer state do not fit this model.
    """
    weights = self._checked_weights(state.model_weights)
    expected = self._state.server_optimizer_state
    try:
      tf.nest.assert_same_structure(
          expected, state.server_optimizer_state, check_types=False
      )
    except (ValueError, TypeError) as error:
      raise ValueError(
          f"server optimizer state does not fit this optimizer: {error}"
      ) from error
    if isinstance(state.round_num, bool) or not isinstance(
        state.round_num, (int, np.integer)
    ) or state.round_num < 0:
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
    non_trainable = [
        np.asarray(w) for w in tf.nest.flatten(weights.non_trainable)
    ]
    template = self._weights_template
    for got, variables, label in (
        (trainable, tf.nest.flatten(template.trainable), "trainable"),
        (non_trainable, tf.nest.flatten(template.non_trainable),
         "non_trainable"),
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
    return tff.learning.models.ModelWeights(
        trainable=trainable, non_trainable=non_trainable
    )

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
    rng = np.random.default_rng(
        [self._config.seed, round_num, _stable_int("sample")]
    )
    chosen = rng.choice(
        len(self._client_ids), size=self._config.clients_per_round,
        replace=False,
    )
    return [self._client_ids[i] for i in chosen]

  def shuffle_seed(self, client_id: str, round_num: int) -> int:
    """The shuffle seed of a client's examples in round `round_num`."""
    return _stable_int("shuffle", self._config.seed, round_num, client_id,
                       bits=31)

  def _build_batches_fn(self) -> Callable[[tf.Tensor, tf.Tensor], tf.data.Dataset]:
    """Returns `fn(client_id, shuffle_seed) -> batches`, traced once.

    Built inside one `tf.function` from the ClientData's
    `serializable_dataset_fn`, the preprocessing (often a `Dataset.map`,
    which traces its function on every call in Python) is traced once for
    all clients and rounds. A ClientData without a serializable dataset
    function falls back to `create_tf_dataset_for_client` in Python.

    A ClientData with `client_tensors_fn` (a store with fixed-shape
    features) is read a whole client at a time; a preprocess with a
    `fedbeam_batch_fn` (see `fedbeam.runtime.models`) is then applied once
    to those stacked tensors instead of element by element. Either way the
    batches are the same: the preprocessed elements, in the same order,
    through the same seeded shuffle, repeat and batch.
    """
    config = self._config
    preprocess = self._preprocess
    # A client's dataset is small and built anew every round: tf.data's
    # static graph rewrites and autotuning, done per dataset, cost more than
    # they save here (about half of a 45-example client's input time on the
    # digits store; bench/bench_simulation.py). They do not change elements.
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.autotune.enabled = False

    def per_element(dataset):
      return dataset if preprocess is None else preprocess(dataset)

    try:
      dataset_fn = self._train_data.serializable_dataset_fn
    except (NotImplementedError, AttributeError):
      dataset_fn = None
    # A store reads a whole client in one vectorized parse; slicing those
    # tensors costs less than decoding the file record by record.
    try:
      tensors_fn = getattr(self._train_data, "client_tensors_fn", None)
    except ValueError:  # Variable-length features cannot be stacked.
      tensors_fn = None
    batch_fn = batch_form_of(preprocess)

    def examples(client_id):
      """The client's preprocessed, unbatched elements."""
      if dataset_fn is None:
        return per_element(self._train_data.create_tf_dataset_for_client(
            client_id.numpy().decode("utf-8")))
      if tensors_fn is None:
        return per_element(dataset_fn(client_id))
      if batch_fn is None:
        return per_element(
            tf.data.Dataset.from_tensor_slices(tensors_fn(client_id)))
      # A per-element map instantiates its function for every client's
      # dataset, which costs several times the vectorized preprocessing of
      # the whole client (bench/bench_loading.py, training part).
      return tf.data.Dataset.from_tensor_slices(
          batch_fn(tensors_fn(client_id)))

    def make_batches(client_id, seed):
      dataset = examples(client_id)
      if config.shuffle_buffer > 0:
        # reshuffle_each_iteration gives each epoch its own order; all of
        # them follow from the seed, the dataset being built anew for every
        # client and round. The order depends only on the number of
        # elements, not on their values, so both forms of a preprocess
        # give the same batches.
        dataset = dataset.shuffle(
            config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True
        )
      if config.client_epochs > 1:
        dataset = dataset.repeat(config.client_epochs)
      return dataset.batch(config.batch_size).with_options(options)

    if dataset_fn is None:
      return make_batches  # Eager: create_tf_dataset_for_client needs the id in Python.
    return tf.function(make_batches)

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

  def _prefetched(
      self, dataset: tf.data.Dataset, device: Optional[str]
  ) -> tf.data.Dataset:
    # No host-side prefetch: its background thread, started per client,
    # costs more than it overlaps on small clients (a third of a CPU round
    # on the digits store).
    if device is None:
      return dataset
    to_device = self._config.prefetch_to_device
    if to_device is None:
      to_device = tf.DeviceSpec.from_string(device).device_type != "CPU"
    if to_device:
      dataset = dataset.apply(
          tf.data.experimental.prefetch_to_device(device, 2))
    return dataset

  def _run_client(
      self, index: int, client_id: str, round_num: int, weights: Any
  ) -> tuple[list[np.ndarray], float, dict[str, Any], ClientReport]:
    slot = index % len(self._slot_devices)
    device = self._slot_devices[slot]
    update = self._updates[slot]
    start = time.perf_counter()
    with _reading_client(client_id, round_num), tf.device(device):
      dataset = self.client_dataset(client_id, round_num, device=device)
      update.model.reset_metrics()
      result, unfinalized = update.update_fn(weights, dataset)
      delta_tensors = tf.nest.flatten(result.update)
      delta = [t.numpy() for t in delta_tensors]
      weight = float(result.update_weight.numpy())
      unfinalized = _to_numpy(unfinalized)
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
        round_num, client_id, ran_on, num_examples, seconds,
    )
    return delta, weight, unfinalized, report

  def _run_clients(
      self, client_ids: list[str], round_num: int
  ) -> list[tuple[list[np.ndarray], float, dict[str, Any], ClientReport]]:
    weights = self._packed_weights()
    num_slots = min(len(self._slot_devices), len(client_ids))
    results: list[Any] = [None] * len(client_ids)

    def run_slot(slot: int) -> None:
      for index in range(slot, len(client_ids), len(self._slot_devices)):
        results[index] = self._run_client(
            index, client_ids[index], round_num, weights
        )

    if num_slots == 1:
      run_slot(0)
    else:
      # One thread per slot: TF releases the GIL while a device computes, so
      # devices (and clients sharing one) work concurrently. Results are kept
      # in sampling order, so the aggregate does not depend on which thread
      # finishes first.
      with concurrent.futures.ThreadPoolExecutor(num_slots) as pool:
        for future in [pool.submit(run_slot, s) for s in range(num_slots)]:
          future.result()
    return results

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

    # MeanFactory's arithmetic: sum of weight * delta over clients, divided
    # by the sum of weights, in float32.
    total_weight = np.float32(0.0)
    weighted_sum = [np.zeros_like(w) for w in self._state.model_weights.trainable]
    for delta, weight, _, _ in results:
      weight32 = np.float32(weight)
      total_weight += weight32
      for acc, d in zip(weighted_sum, delta):
        acc += d * weight32.astype(d.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
      mean_delta = [acc / total_weight.astype(acc.dtype) for acc in weighted_sum]

    update_applied = all(np.all(np.isfinite(d)) for d in mean_delta)
    if update_applied:
      new_state, new_trainable = self._server_step(
          tf.nest.map_structure(tf.convert_to_tensor,
                                self._state.server_optimizer_state),
          tuple(tf.convert_to_tensor(w)
                for w in self._state.model_weights.trainable),
          tuple(tf.convert_to_tensor(d) for d in mean_delta),
      )
      model_weights = tff.learning.models.ModelWeights(
          trainable=[np.asarray(w) for w in new_trainable],
          non_trainable=list(self._state.model_weights.non_trainable),
      )
      server_state = _to_numpy(new_state)
    else:
      # TFF's finalizer rejects a non-finite update and keeps its state.
      logger.warning(
          "round %d: the mean client delta is not finite (total weight %s); "
          "the server keeps its weights", round_num, total_weight,
      )
      model_weights = self._state.model_weights
      server_state = self._state.server_optimizer_state
    self._state = SimulationState(round_num, model_weights, server_state)

    summed = None
    for _, _, unfinalized, _ in results:
      summed = unfinalized if summed is None else tf.nest.map_structure(
          np.add, summed, unfinalized
      )
    train_metrics = _finalize(self._finalizers, summed)
    reports = tuple(r[3] for r in results)

    if evaluate is None:
      evaluate = (self._config.eval_every > 0
                  and round_num % self._config.eval_every == 0)
    eval_metrics = None
    eval_seconds = 0.0
    if evaluate and self._test_data is not None:
      eval_start = time.perf_counter()
      try:
        eval_metrics = self.evaluate()
      except _READ_ERRORS as error:
        raise self._test_read_error(round_num, error) from error
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

  def _test_read_error(self, round_num: int,
                       error: BaseException) -> ClientReadError:
    """The error of a failed evaluation, naming the first unreadable test client.

    Evaluation reads all test clients as one dataset, so TensorFlow's error
    names at most a file; each test client is read again alone (only on
    this failure path) to find the one at fault.
    """
    for client_id in self._test_data.client_ids:
      try:
        # Iterated in Python, not drained in a graph: a store's client dataset
        # then raises its ClientFileError, which names the client and the fault.
        for _ in self._test_data.create_tf_dataset_for_client(client_id):
          pass
      except _READ_ERRORS as client_error:
        return ClientReadError(client_id, round_num, client_error,
                               evaluating=True)
    return ClientReadError(None, round_num, error, evaluating=True)

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

  def measure_input_and_compute(
      self, round_num: Optional[int] = None
  ) -> dict[str, float]:
    """Splits a round's client time into input and compute, for profiling.

    For each client of `round_num` (default: the next round), on the first
    device, one client after another, without changing the loop's state:

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
      round_num: 1-based round whose clients and shuffles to use.

    Returns:
      `{'input_seconds', 'compute_seconds', 'produce_seconds', 'num_clients'}`.
    """
    round_num = self._state.round_num + 1 if round_num is None else round_num
    device = self._devices[0]
    update = self._updates[0]
    weights = self._packed_weights()

    def timed_update(dataset) -> float:
      with tf.device(device):
        update.model.reset_metrics()
        start = time.perf_counter()
        result, _ = update.update_fn(weights, dataset)
        tf.nest.map_structure(lambda t: t.numpy(), result)
        return time.perf_counter() - start

    input_seconds = compute_seconds = produce_seconds = 0.0
    client_ids = self.sample_clients(round_num)
    for client_id in client_ids:
      start = time.perf_counter()
      _drain(self._batched(client_id, round_num)).numpy()
      produce_seconds += time.perf_counter() - start
      cached = self._batched(client_id, round_num).cache()
      _drain(cached).numpy()
      in_memory = timed_update(cached)
      fresh = timed_update(self._batched(client_id, round_num))
      compute_seconds += in_memory
      input_seconds += max(fresh - in_memory, 0.0)
    update.model.reset_metrics()
    return {
        "input_seconds": input_seconds,
        "compute_seconds": compute_seconds,
        "produce_seconds": produce_seconds,
        "num_clients": float(len(client_ids)),
    }

  def _build_eval_fn(self, model: tff.learning.models.VariableModel):
    weights_template = self._weights_template

    @tf.function
    def evaluate(weights, data):
      tf.nest.map_structure(
          lambda v, w: v.assign(w), weights_template, weights
      )
      for batch in iter(data):
        model.forward_pass(batch, training=False)
      return model.report_local_unfinalized_metrics()

    return evaluate

  def evaluate(self) -> Optional[dict[str, float]]:
    """Evaluates the current weights on all test examples (first device).

    Returns:
      Finalized metrics (e.g. `loss`, `sparse_categorical_accuracy`), or None
      without test data.
    """
    if self._test_data is None:
      return None
    device = self._devices[0]
    dataset = self._test_data.create_tf_dataset_from_all_clients(seed=0)
    if self._preprocess is not None:
      dataset = self._preprocess(dataset)
    # One long dataset: here a host-side prefetch overlaps reading with
    # evaluation.
    dataset = self._prefetched(
        dataset.batch(self._config.eval_batch_size).prefetch(tf.data.AUTOTUNE),
        device)
    model = self._updates[0].model
    with tf.device(device):
      model.reset_metrics()
      unfinalized = self._eval_fn(self._packed_weights(), dataset)
    return _finalize(self._finalizers, _to_numpy(unfinalized))


class CheckpointError(ValueError):
  """A checkpoint that cannot be resumed from; the message names the file and the fault.

  Raised for a missing, truncated or damaged file, something else in its
  place (a directory, a FIFO), and a file whose arrays do not fit the model
  and server optimizer (counts, shapes, dtypes).
  """


# Bytes a checkpoint holds beyond its arrays' data: the metadata document
# (settings, store identity), npy headers and zip records.
_CHECKPOINT_OVERHEAD_BYTES = 16 << 20
# Groups of numbered arrays in a checkpoint, with what a message calls them.
_ARRAY_GROUPS = (
    ("trainable", "trainable weights"),
    ("non_trainable", "non-trainable weights"),
    ("server_optimizer", "server optimizer values"),
)


def _state_arrays(state: SimulationState) -> dict[str, np.ndarray]:
  """The numbered arrays of a state, keyed as in the checkpoint (without the metadata)."""
  arrays: dict[str, np.ndarray] = {
      "round_num": np.asarray(state.round_num, np.int64)}
  values = (state.model_weights.trainable, state.model_weights.non_trainable,
            tf.nest.flatten(state.server_optimizer_state))
  for (prefix, _), group in zip(_ARRAY_GROUPS, values):
    for i, w in enumerate(group):
      arrays[f"{prefix}/{i}"] = np.asarray(w)
  return arrays


def save_state(
    path: str, state: SimulationState, metadata: Optional[dict[str, Any]] = None
) -> None:
  """Writes `state` to `path` atomically (a temporary file, then a rename).

  A reader never sees a partial file: a crash leaves the previous checkpoint
  or the new one. (On object stores such as `gs://` a rename is a copy; the
  file is still complete or absent.) The file is an uncompressed `.npz`
  (a zip of `.npy` arrays), whose per-entry CRC-32 `load_state` checks.

  Args:
    path: Destination file (any `tf.io.gfile` path).
    state: The state to save.
    metadata: JSON-serializable facts stored beside it (seed, flags...).
  """
  arrays = _state_arrays(state)
  arrays["metadata"] = np.asarray(json.dumps(metadata or {}, sort_keys=True))
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  temporary = f"{path}.tmp"
  with tf.io.gfile.GFile(temporary, "wb") as f:
    f.write(buffer.getvalue())
  tf.io.gfile.rename(temporary, path, overwrite=True)


def _checkpoint_bytes(path: str, limit: int) -> bytes:
  """The content of a checkpoint file that is a regular file of at most `limit` bytes."""
  try:
    if "://" in path:
      if tf.io.gfile.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
      size = tf.io.gfile.stat(path).length
    else:
      # Checked before opening: opening a FIFO would wait for a writer.
      info = os.stat(path)
      if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
      if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"checkpoint {path} is not a regular file")
      size = info.st_size
    if size > limit:
      raise CheckpointError(
          f"checkpoint {path} is {size} bytes, more than a checkpoint of this model "
          f"and server optimizer can be ({limit} bytes)")
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except (FileNotFoundError, tf.errors.NotFoundError):
    raise CheckpointError(f"checkpoint {path} does not exist") from None
  except (OSError, tf.errors.OpError) as error:
    raise CheckpointError(f"checkpoint {path} cannot be read: {_error_cause(error)}") from None


def _npy_header(entry) -> tuple[tuple[int, ...], np.dtype]:
  """`(shape, dtype)` from an `.npy` header, read before any array data is allocated."""
  version = np.lib.format.read_magic(entry)
  if version == (1, 0):
    shape, _, dtype = np.lib.format.read_array_header_1_0(entry)
  elif version == (2, 0):
    shape, _, dtype = np.lib.format.read_array_header_2_0(entry)
  else:
    raise ValueError(f"npy format version {version} is not one save_state writes")
  return shape, dtype


def _checkpoint_arrays(path: str, content: bytes,
                       expected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Reads the arrays of a checkpoint, each checked against `expected` before it is read.

  `expected` maps entry names (without `.npy`) to arrays of the wanted shape
  and dtype; `metadata` must be a 0-d unicode string.
  """
  try:
    archive = zipfile.ZipFile(io.BytesIO(content))
    damaged = archive.testzip()
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
    raise CheckpointError(
        f"checkpoint {path} is truncated or damaged (not a complete .npz file: "
        f"{_error_cause(error)})") from None
  if damaged is not None:
    raise CheckpointError(
        f"checkpoint {path} is damaged: its entry {damaged} fails its CRC-32 check")
  names = {n[:-len(".npy")] for n in archive.namelist() if n.endswith(".npy")}
  if len(names) != len(archive.namelist()):
    raise CheckpointError(f"checkpoint {path} holds entries that are not .npy arrays")
  for prefix, label in _ARRAY_GROUPS:
    have = sum(1 for n in names if n.startswith(prefix + "/"))
    want = sum(1 for n in expected if n.startswith(prefix + "/"))
    if have != want:
      raise CheckpointError(
          f"checkpoint {path} holds {have} {label}, this model and server optimizer "
          f"have {want}")
  wanted = set(expected) | {"metadata"}
  if names != wanted:
    raise CheckpointError(
        f"checkpoint {path} lacks entries {sorted(wanted - names)} and has unexpected "
        f"entries {sorted(names - wanted)}")
  arrays = {}
  for name in sorted(wanted):
    try:
      with archive.open(name + ".npy") as entry:
        shape, dtype = _npy_header(entry)
      if name == "metadata":
        fits = dtype.kind == "U" and shape == ()
        want = "a unicode string of shape ()"
      else:
        like = expected[name]
        fits = dtype == like.dtype and shape == like.shape
        want = f"{like.dtype.name} of shape {like.shape}"
      if not fits:
        raise CheckpointError(
            f"checkpoint {path}: {name} is {dtype.name} of shape {shape}, this model and "
            f"server optimizer need {want}")
      with archive.open(name + ".npy") as entry:
        arrays[name] = np.lib.format.read_array(entry, allow_pickle=False)
        trailing = len(entry.read())
    except CheckpointError:
      raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
      raise CheckpointError(
          f"checkpoint {path}: {name} is damaged ({_error_cause(error)})") from None
    if trailing:
      raise CheckpointError(
          f"checkpoint {path}: {name} has {trailing} bytes after its array data")
  return arrays


def load_state(
    path: str, like: SimulationState
) -> tuple[SimulationState, dict[str, Any]]:
  """Reads a state written by `save_state`, checked whole before it is returned.

  Every entry's CRC-32, count, shape and dtype are checked against `like`
  (the shapes before any array is read), so a damaged file never yields a
  half-read or misshapen state.

  Args:
    path: The checkpoint file.
    like: A state of the same model and server optimizer (e.g.
      `SimulationLoop.state`), which gives the arrays' shapes and dtypes and
      the optimizer state's structure.

  Returns:
    `(state, metadata)`.

  Raises:
    CheckpointError: (a ValueError) If the file is missing, not a regular
      file, truncated or damaged, or does not hold a state shaped like
      `like`; the message names the file and what is wrong.
  """
  expected = _state_arrays(like)
  limit = _CHECKPOINT_OVERHEAD_BYTES + sum(a.nbytes for a in expected.values())
  arrays = _checkpoint_arrays(path, _checkpoint_bytes(path, limit), expected)
  try:
    metadata = json.loads(str(arrays["metadata"]))
  except json.JSONDecodeError as error:
    raise CheckpointError(f"checkpoint {path}: its metadata is not JSON ({error})") from None
  if not isinstance(metadata, dict):
    raise CheckpointError(f"checkpoint {path}: its metadata is not a JSON object")
  round_num = int(arrays["round_num"])
  if round_num < 0:
    raise CheckpointError(f"checkpoint {path}: round number {round_num} is negative")
  if "round_num" in metadata and metadata["round_num"] != round_num:
    raise CheckpointError(
        f"checkpoint {path}: round number {round_num}, but its metadata says "
        f"{metadata['round_num']!r}")

  def group(prefix: str) -> list[np.ndarray]:
    count = sum(1 for n in expected if n.startswith(prefix + "/"))
    return [arrays[f"{prefix}/{i}"] for i in range(count)]

  state = SimulationState(
      round_num=round_num,
      model_weights=tff.learning.models.ModelWeights(
          trainable=group("trainable"),
          non_trainable=group("non_trainable"),
      ),
      server_optimizer_state=tf.nest.pack_sequence_as(
          like.server_optimizer_state, group("server_optimizer")
      ),
  )
  return state, metadata
