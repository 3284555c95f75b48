"""Model-delta client work (FedAvg, and FedProx through an L2 pull).

`build_model_delta_client_work` keeps the semantics of the reference page of
`tff.learning.templates.build_model_delta_client_work`:

  "This client work is constructed in slightly different manners depending on
  whether optimizer is a tff.learning.optimizers.Optimizer, or a no-arg
  callable returning a tf.keras.optimizers.Optimizer."

TFF 0.87 only kept the first kind, in
`tff.learning.templates.proximal_client_work`, with a `loop_implementation`
argument instead of the `use_experimental_simulation_loop` flag. This module
reuses that code for TFF optimizers and adds the Keras kind beside it, with
the same FedProx proximal term and the same loop implementations.

One exception: TFF 0.87's FedProx term has the wrong sign. Its
`build_model_delta_update_with_tff_optimizer` adds
`delta_l2_regularizer * (w_initial - w)` to the gradient, which pushes the
client away from the server model instead of holding it back (the gradient
of `mu/2 * ||w - w_initial||^2` is `mu * (w - w_initial)`;
tests/test_client_work.py computes both by hand). So TFF's code runs
unchanged for `delta_l2_regularizer == 0.0` (FedAvg), where it is right, and
a positive regularizer runs the same update with the sign corrected.

`build_client_update` exposes the very `tf.function` the client work runs, so
the simulation loop (`fedbeam.runtime.simulation`) can run it in Python
TensorFlow under `tf.device` (TFF's PyPI runtime has no CUDA) and get the same
numbers as TFF's own runtime.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import logging
import math
import numbers
from typing import Any, Optional, Union

import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.learning import loop_builder, tensor_utils
from tensorflow_federated.python.learning.templates import proximal_client_work

__all__ = [
  "ClientUpdate",
  "KerasOptimizerFn",
  "OptimizerArg",
  "build_client_update",
  "build_model_delta_client_work",
  "build_model_delta_update_with_keras_optimizer",
  "build_model_delta_update_with_tff_optimizer",
  "check_delta_l2_regularizer",
  "loop_implementation_for",
]

KerasOptimizerFn = Callable[[], Any]
"""A no-arg callable returning a `tf.keras.optimizers.Optimizer` (new or legacy)."""

OptimizerArg = Union[tff.learning.optimizers.Optimizer, KerasOptimizerFn]
"""What `optimizer` may be: a TFF optimizer, or a Keras optimizer factory."""

ModelFn = Callable[[], tff.learning.models.VariableModel]

_KERAS_OPTIMIZER_TYPES = (
  tf.keras.optimizers.Optimizer,
  tf.keras.optimizers.legacy.Optimizer,
)


def check_delta_l2_regularizer(value: Any) -> float:
  """Validates a FedProx `delta_l2_regularizer`.

  Args:
    value: The candidate strength of the L2 pull toward the initial weights.

  Returns:
    `value` as a Python float.

  Raises:
    ValueError: If `value` is not a finite, nonnegative real number (booleans
      are rejected too: `True` is almost certainly a mistake).
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(
      "delta_l2_regularizer must be a nonnegative float, got "
      f"{value!r} of type {type(value).__name__}"
    )
  as_float = float(value)
  if not math.isfinite(as_float) or as_float < 0.0:
    raise ValueError(f"delta_l2_regularizer must be a finite nonnegative float, got {value!r}")
  return as_float


def loop_implementation_for(
  use_experimental_simulation_loop: bool,
) -> tff.learning.LoopImplementation:
  """Maps `use_experimental_simulation_loop` onto TFF 0.87's `LoopImplementation`.

  Args:
    use_experimental_simulation_loop: True for the dataset-iterator loop
      ("currently necessary ... for performant GPU simulations"), False for
      the `DatasetReduce` loop.

  Returns:
    `DATASET_ITERATOR` or `DATASET_REDUCE`.

  Raises:
    TypeError: If the flag is not a bool.
  """
  if not isinstance(use_experimental_simulation_loop, bool):
    raise TypeError(
      f"use_experimental_simulation_loop must be a bool, got {use_experimental_simulation_loop!r}"
    )
  if use_experimental_simulation_loop:
    return tff.learning.LoopImplementation.DATASET_ITERATOR
  return tff.learning.LoopImplementation.DATASET_REDUCE


def _check_client_weighting(client_weighting: Any) -> None:
  if not isinstance(client_weighting, tff.learning.ClientWeighting):
    raise TypeError(
      f"client_weighting must be a tff.learning.ClientWeighting, got {client_weighting!r}"
    )


def _check_optimizer(optimizer: Any) -> None:
  if isinstance(optimizer, tff.learning.optimizers.Optimizer):
    return
  if isinstance(optimizer, _KERAS_OPTIMIZER_TYPES):
    raise TypeError(
      "optimizer must be a tff.learning.optimizers.Optimizer or a no-arg "
      "callable returning a tf.keras optimizer, not a Keras optimizer "
      "instance: its variables would be shared by every client (pass "
      "`lambda: tf.keras.optimizers.SGD(...)` instead)"
    )
  if not callable(optimizer):
    raise TypeError(
      "optimizer must be a tff.learning.optimizers.Optimizer or a no-arg "
      f"callable returning a tf.keras optimizer, got {optimizer!r}"
    )


def _checked_model_in_graph(
  model_fn: ModelFn, graph: tf.Graph
) -> tff.learning.models.VariableModel:
  """Calls `model_fn` twice inside `graph` and returns the first model.

  The reference page requires: "The model must be constructed entirely from
  scratch on each invocation, returning the same pre-constructed model each
  call will result in an error." TFF 0.87 builds such a process and fails
  only when it runs, inside its C++ runtime ("Unknown input node
  'dense/kernel'"); this check fails at build time and says why.
  """
  if not callable(model_fn):
    raise TypeError(f"model_fn must be a no-arg callable, got {model_fn!r}")
  first = model_fn()
  if not isinstance(first, tff.learning.models.VariableModel):
    raise TypeError(
      f"model_fn must return a tff.learning.models.VariableModel, got {type(first).__name__}"
    )
  second = model_fn()
  if second is first:
    raise ValueError(
      "model_fn returned the same model object on two calls; it must build "
      "a new model from scratch on each call (e.g. call "
      "tff.learning.models.from_keras_model on a newly built Keras model "
      "inside model_fn)"
    )
  for variable in list(first.trainable_variables) + list(first.non_trainable_variables):
    if getattr(variable, "graph", None) is not graph:
      raise ValueError(
        f"model_fn returned a model whose variable {variable.name!r} was "
        "created outside model_fn; model_fn must not capture variables "
        "(build the Keras model inside model_fn)"
      )
  return first


class _DropAbslMessage(logging.Filter):
  def __init__(self, prefix: str):
    super().__init__()
    self._prefix = prefix

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._prefix)


@contextlib.contextmanager
def _without_zero_regularizer_warning() -> Iterator[None]:
  # proximal_client_work warns whenever delta_l2_regularizer == 0.0, but here
  # 0.0 is the default and means plain FedAvg, not a forgotten setting.
  log_filter = _DropAbslMessage("delta_l2_regularizer is set to 0.0")
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(log_filter)
  try:
    yield
  finally:
    absl_logger.removeFilter(log_filter)


def _optimizer_variables(optimizer: Any) -> list[tf.Variable]:
  # The new Keras optimizer exposes `variables` as a property, the legacy one
  # as a method.
  variables = optimizer.variables
  if callable(variables):
    variables = variables()
  return list(variables)


def _create_keras_optimizer_variables(optimizer: Any, weights: Any) -> None:
  """Forces the creation of the optimizer's slot and step variables.

  They must exist before the training loop: a `DatasetReduce` function cannot
  create variables. Tracing (not running) a zero update creates them without
  touching their values, the same trick as TFF's `KerasOptimizer` adapter.
  """

  def zero_update(opt, variables):
    opt.apply_gradients([(tf.zeros_like(v), v) for v in tf.nest.flatten(variables)])

  tf.function(zero_update).get_concrete_function(optimizer, weights)


def _initial_values(variables: list[tf.Variable]) -> list[tf.Tensor]:
  if tf.executing_eagerly():
    return [tf.constant(v.numpy()) for v in variables]
  return [v.initial_value for v in variables]


def _add_proximal_term(gradients: Any, weights: Any, initial_weights: Any, strength: float) -> Any:
  """Adds the gradient of `strength/2 * ||w - w_initial||^2`: a pull back."""
  return tf.nest.map_structure(
    lambda g, w, w0: g + strength * (w - w0),
    gradients,
    weights,
    initial_weights,
  )


def _client_weight(
  weighting: tff.learning.ClientWeighting,
  has_non_finite_delta: tf.Tensor,
  num_examples: tf.Tensor,
) -> tf.Tensor:
  # TFF's rule (`_choose_client_weight`): a client whose delta is not finite
  # gets weight 0 (its delta was zeroed).
  if has_non_finite_delta > 0:
    return tf.constant(0.0, tf.float32)
  if weighting == tff.learning.ClientWeighting.NUM_EXAMPLES:
    return tf.cast(num_examples, tf.float32)
  return tf.constant(1.0, tf.float32)


def _count_examples(num_examples_sum: tf.Tensor, output: Any) -> tf.Tensor:
  if output.num_examples is None:
    return num_examples_sum + tf.shape(output.predictions, out_type=tf.int64)[0]
  return num_examples_sum + tf.cast(output.num_examples, tf.int64)


def build_model_delta_update_with_tff_optimizer(
  model_fn: ModelFn,
  *,
  weighting: tff.learning.ClientWeighting,
  delta_l2_regularizer: float,
  loop_implementation: tff.learning.LoopImplementation,
) -> Callable[[Any, Any, tf.data.Dataset], tuple[Any, Any]]:
  """Creates the FedAvg/FedProx client update for a TFF optimizer.

  With `delta_l2_regularizer == 0.0` this is TFF's own
  `proximal_client_work.build_model_delta_update_with_tff_optimizer`. With a
  positive value it is the same update (no optimizer variables; weights set
  from `optimizer.next`) whose proximal term pulls toward the initial weights,
  `gradient + mu * (w - w_initial)`, where TFF 0.87 adds
  `mu * (w_initial - w)`.

  Args:
    model_fn: No-arg callable returning a new `tff.learning.models.VariableModel`.
    weighting: A `tff.learning.ClientWeighting`.
    delta_l2_regularizer: Nonnegative float (0.0 for FedAvg).
    loop_implementation: A `tff.learning.LoopImplementation`.

  Returns:
    A `tf.function` `client_update(optimizer, initial_weights, data)`
    returning `(tff.learning.templates.ClientResult, unfinalized_metrics)`.
  """
  if delta_l2_regularizer == 0.0:
    return proximal_client_work.build_model_delta_update_with_tff_optimizer(
      model_fn,
      weighting=weighting,
      delta_l2_regularizer=0.0,
      loop_implementation=loop_implementation,
    )
  model = model_fn()
  dataset_reduce_fn = loop_builder.build_training_loop(loop_implementation=loop_implementation)

  @tf.function
  def client_update(optimizer, initial_weights, data):
    model_weights = tff.learning.models.ModelWeights.from_model(model)
    tf.nest.map_structure(lambda a, b: a.assign(b), model_weights, initial_weights)

    def reduce_fn(state, batch):
      num_examples_sum, optimizer_state = state
      with tf.GradientTape() as tape:
        output = model.forward_pass(batch, training=True)
      gradients = tape.gradient(output.loss, model_weights.trainable)
      gradients = _add_proximal_term(
        gradients,
        model_weights.trainable,
        initial_weights.trainable,
        delta_l2_regularizer,
      )
      optimizer_state, updated_weights = optimizer.next(
        optimizer_state,
        tuple(tf.nest.flatten(model_weights.trainable)),
        tuple(tf.nest.flatten(gradients)),
      )
      updated_weights = tf.nest.pack_sequence_as(model_weights.trainable, updated_weights)
      tf.nest.map_structure(lambda a, b: a.assign(b), model_weights.trainable, updated_weights)
      return _count_examples(num_examples_sum, output), optimizer_state

    def initial_state_for_reduce_fn():
      # Flat tuples: "for batch in data" would stack lists of tensors.
      trainable_tensor_specs = tf.nest.map_structure(
        lambda v: tf.TensorSpec(v.shape, v.dtype),
        tuple(tf.nest.flatten(model_weights.trainable)),
      )
      return (
        tf.zeros(shape=[], dtype=tf.int64),
        optimizer.initialize(trainable_tensor_specs),
      )

    num_examples, _ = dataset_reduce_fn(reduce_fn, data, initial_state_for_reduce_fn)
    client_delta = tf.nest.map_structure(
      tf.subtract, initial_weights.trainable, model_weights.trainable
    )
    client_delta, has_non_finite_delta = tensor_utils.zero_all_if_any_non_finite(client_delta)
    return (
      tff.learning.templates.ClientResult(
        update=client_delta,
        update_weight=_client_weight(weighting, has_non_finite_delta, num_examples),
      ),
      model.report_local_unfinalized_metrics(),
    )

  return client_update


def build_model_delta_update_with_keras_optimizer(
  model_fn: ModelFn,
  optimizer_fn: KerasOptimizerFn,
  *,
  weighting: tff.learning.ClientWeighting,
  delta_l2_regularizer: float,
  loop_implementation: tff.learning.LoopImplementation,
) -> Callable[[Any, tf.data.Dataset], tuple[Any, Any]]:
  """Creates the FedProx client update for a Keras optimizer factory.

  The Keras counterpart of `build_model_delta_update_with_tff_optimizer`: the
  same loss gradient plus `delta_l2_regularizer * (w - w_initial)`, the same loop
  implementations, the same non-finite handling and client weight; the
  weights are updated in place with `optimizer.apply_gradients`.

  Each call starts from fresh optimizer state (the values the optimizer's
  variables had when created), as in TFF's runtime where every client runs a
  new instance of the computation; this makes it safe to call the returned
  function for many clients in a row.

  Args:
    model_fn: No-arg callable returning a new `tff.learning.models.VariableModel`.
    optimizer_fn: No-arg callable returning a `tf.keras.optimizers.Optimizer`
      (new or legacy).
    weighting: A `tff.learning.ClientWeighting`.
    delta_l2_regularizer: Nonnegative float, strength of the L2 pull toward the
      initial weights (0.0 for FedAvg).
    loop_implementation: A `tff.learning.LoopImplementation`.

  Returns:
    A `tf.function` `client_update(initial_weights, data)` returning
    `(tff.learning.templates.ClientResult, unfinalized_metrics)`, where
    `initial_weights` is a `tff.learning.models.ModelWeights` of the model's
    structure and `data` a dataset of batches matching the model's input spec.

  Raises:
    TypeError: If `optimizer_fn` does not return a Keras optimizer.
  """
  model = model_fn()
  optimizer = optimizer_fn()
  if not isinstance(optimizer, _KERAS_OPTIMIZER_TYPES):
    raise TypeError(
      f"optimizer must return a tf.keras optimizer when called, got {type(optimizer).__name__}"
    )
  model_weights = tff.learning.models.ModelWeights.from_model(model)
  _create_keras_optimizer_variables(optimizer, model_weights.trainable)
  optimizer_variables = _optimizer_variables(optimizer)
  optimizer_initial_values = _initial_values(optimizer_variables)
  dataset_reduce_fn = loop_builder.build_training_loop(loop_implementation=loop_implementation)

  @tf.function
  def client_update(initial_weights, data):
    for variable, value in zip(optimizer_variables, optimizer_initial_values):
      variable.assign(value)
    tf.nest.map_structure(lambda a, b: a.assign(b), model_weights, initial_weights)
    trainable = tf.nest.flatten(model_weights.trainable)

    def reduce_fn(num_examples_sum, batch):
      with tf.GradientTape() as tape:
        output = model.forward_pass(batch, training=True)
      gradients = tape.gradient(output.loss, model_weights.trainable)
      if delta_l2_regularizer > 0.0:
        gradients = _add_proximal_term(
          gradients,
          model_weights.trainable,
          initial_weights.trainable,
          delta_l2_regularizer,
        )
      optimizer.apply_gradients(zip(tf.nest.flatten(gradients), trainable))
      return _count_examples(num_examples_sum, output)

    num_examples = dataset_reduce_fn(reduce_fn, data, lambda: tf.zeros(shape=[], dtype=tf.int64))
    client_delta = tf.nest.map_structure(
      tf.subtract, initial_weights.trainable, model_weights.trainable
    )
    client_delta, has_non_finite_delta = tensor_utils.zero_all_if_any_non_finite(client_delta)
    return (
      tff.learning.templates.ClientResult(
        update=client_delta,
        update_weight=_client_weight(weighting, has_non_finite_delta, num_examples),
      ),
      model.report_local_unfinalized_metrics(),
    )

  return client_update


@dataclasses.dataclass(frozen=True)
class ClientUpdate:
  """One model instance and the client update `tf.function` that trains it.

  Attributes:
    model: The `tff.learning.models.VariableModel` whose variables the update
      uses. Its metrics accumulate across calls: call `model.reset_metrics()`
      before each client when the update is reused.
    update_fn: `update_fn(initial_weights, data)` trains from
      `initial_weights` (a `ModelWeights` with the model's structure) on
      `data` (a dataset of batches) and returns
      `(tff.learning.templates.ClientResult, unfinalized_metrics)`; the
      result's `update` is `initial - trained` trainable weights.
  """

  model: tff.learning.models.VariableModel
  update_fn: Callable[[Any, tf.data.Dataset], tuple[Any, Any]]


def build_client_update(
  model_fn: ModelFn,
  optimizer: OptimizerArg,
  client_weighting: tff.learning.ClientWeighting,
  delta_l2_regularizer: float = 0.0,
  use_experimental_simulation_loop: bool = False,
) -> ClientUpdate:
  """Builds the client update that `build_model_delta_client_work` runs.

  Call it in the context (eager, under `tf.device`) where the model's
  variables should live. For a TFF optimizer the update is
  `build_model_delta_update_with_tff_optimizer` (TFF's own function for
  FedAvg); for a Keras optimizer factory it is
  `build_model_delta_update_with_keras_optimizer`.

  Args:
    model_fn: No-arg callable returning a new `tff.learning.models.VariableModel`.
    optimizer: A `tff.learning.optimizers.Optimizer` or a no-arg callable
      returning a `tf.keras.optimizers.Optimizer`.
    client_weighting: A `tff.learning.ClientWeighting`.
    delta_l2_regularizer: Nonnegative float (FedProx strength, 0.0 = FedAvg).
    use_experimental_simulation_loop: Dataset-iterator loop if True,
      `DatasetReduce` loop if False.

  Returns:
    A `ClientUpdate`.

  Raises:
    TypeError: On an optimizer, weighting or model of the wrong kind.
    ValueError: On an invalid `delta_l2_regularizer`.
  """
  _check_client_weighting(client_weighting)
  _check_optimizer(optimizer)
  delta_l2_regularizer = check_delta_l2_regularizer(delta_l2_regularizer)
  loop_implementation = loop_implementation_for(use_experimental_simulation_loop)
  built: list[tff.learning.models.VariableModel] = []

  def recording_model_fn():
    model = model_fn()
    if not isinstance(model, tff.learning.models.VariableModel):
      raise TypeError(
        f"model_fn must return a tff.learning.models.VariableModel, got {type(model).__name__}"
      )
    built.append(model)
    return model

  if isinstance(optimizer, tff.learning.optimizers.Optimizer):
    tff_update = build_model_delta_update_with_tff_optimizer(
      recording_model_fn,
      weighting=client_weighting,
      delta_l2_regularizer=delta_l2_regularizer,
      loop_implementation=loop_implementation,
    )

    def update_fn(initial_weights, data):
      return tff_update(optimizer, initial_weights, data)

  else:
    update_fn = build_model_delta_update_with_keras_optimizer(
      recording_model_fn,
      optimizer,
      weighting=client_weighting,
      delta_l2_regularizer=delta_l2_regularizer,
      loop_implementation=loop_implementation,
    )
  return ClientUpdate(model=built[0], update_fn=update_fn)


def build_model_delta_client_work(
  model_fn: ModelFn,
  optimizer: OptimizerArg,
  client_weighting: tff.learning.ClientWeighting,
  delta_l2_regularizer: float = 0.0,
  metrics_aggregator: Optional[Callable[..., Any]] = None,
  use_experimental_simulation_loop: bool = False,
) -> tff.learning.templates.ClientWorkProcess:
  """Creates a `ClientWorkProcess` for federated averaging (and FedProx).

  From the reference page: "If it is a tff.learning.optimizers.Optimizer, we
  avoid creating tf.Variables associated with the optimizer state within the
  scope of the client work, as they are not necessary. This also means that
  the client's model weights are updated by computing optimizer.next and then
  assigning the result to the model weights (while a
  tf.keras.optimizers.Optimizer will modify the model weight in place using
  optimizer.apply_gradients)."

  For a TFF optimizer and `delta_l2_regularizer == 0.0` the process is TFF's
  own `proximal_client_work.build_model_delta_client_work`; otherwise it has
  the same structure around `build_model_delta_update_with_tff_optimizer`
  (sign-corrected FedProx) or `build_model_delta_update_with_keras_optimizer`.

  The process has empty server state; `next(state, weights@CLIENTS,
  data@CLIENTS)` returns `ClientResult(update=initial - trained trainable
  weights, update_weight)` at clients and `{'train': metrics}` at the server,
  so it plugs into `tff.learning.templates.compose_learning_process`.

  Args:
    model_fn: A no-arg function that returns a
      `tff.learning.models.VariableModel`. "This method must not capture
      TensorFlow tensors or variables and use them. The model must be
      constructed entirely from scratch on each invocation, returning the same
      pre-constructed model each call will result in an error."
    optimizer: A `tff.learning.optimizers.Optimizer`, or a no-arg callable
      that returns a `tf.keras.optimizers.Optimizer` (new or legacy).
    client_weighting: A `tff.learning.ClientWeighting` value.
    delta_l2_regularizer: "A nonnegative float representing the parameter of
      the L2-regularization term applied to the delta from initial model
      weights during training. Values larger than 0.0 prevent clients from
      moving too far from the server model during local training." 0.0 (the
      default) is plain FedAvg.
    metrics_aggregator: A function that takes the metric finalizers
      (`model.metric_finalizers()`) and returns a `tff.Computation`
      aggregating the unfinalized metrics (TFF 0.87 passes only the
      finalizers). Defaults to `tff.learning.metrics.sum_then_finalize`.
    use_experimental_simulation_loop: "Controls the reduce loop function for
      input dataset. An experimental reduce loop is used for simulation. It
      is currently necessary to set this flag to True for performant GPU
      simulations." True selects `LoopImplementation.DATASET_ITERATOR`, False
      `LoopImplementation.DATASET_REDUCE`.

  Returns:
    A `tff.learning.templates.ClientWorkProcess`.

  Raises:
    TypeError: If `model_fn` does not return a VariableModel, or
      `optimizer`, `client_weighting` or the flag are of the wrong kind.
    ValueError: If `delta_l2_regularizer` is negative or not a finite number,
      or `model_fn` returns the same model object twice or a model built on
      captured variables.
  """
  _check_client_weighting(client_weighting)
  _check_optimizer(optimizer)
  delta_l2_regularizer = check_delta_l2_regularizer(delta_l2_regularizer)
  loop_implementation = loop_implementation_for(use_experimental_simulation_loop)
  if metrics_aggregator is None:
    metrics_aggregator = tff.learning.metrics.sum_then_finalize

  with tf.Graph().as_default() as graph:
    # A throwaway graph, as in TFF: the checks build models without leaving
    # variables in the eager context.
    model = _checked_model_in_graph(model_fn, graph)
    if not isinstance(optimizer, tff.learning.optimizers.Optimizer):
      keras_optimizer = optimizer()
      if not isinstance(keras_optimizer, _KERAS_OPTIMIZER_TYPES):
        raise TypeError(
          "optimizer must return a tf.keras optimizer when called, got "
          f"{type(keras_optimizer).__name__}"
        )
    metrics_aggregation_fn = metrics_aggregator(model.metric_finalizers())

  is_tff_optimizer = isinstance(optimizer, tff.learning.optimizers.Optimizer)
  if is_tff_optimizer and delta_l2_regularizer == 0.0:
    with _without_zero_regularizer_warning():
      return proximal_client_work.build_model_delta_client_work(
        model_fn=model_fn,
        optimizer=optimizer,
        client_weighting=client_weighting,
        delta_l2_regularizer=delta_l2_regularizer,
        metrics_aggregator=metrics_aggregator,
        loop_implementation=loop_implementation,
      )

  element_type = tff.types.tensorflow_to_type(model.input_spec)
  data_type = tff.SequenceType(element_type)
  weights_type = tff.learning.models.weights_type_from_model(model)

  @tff.tensorflow.computation(weights_type, data_type)
  def client_update_computation(initial_model_weights, dataset):
    if is_tff_optimizer:
      client_update = build_model_delta_update_with_tff_optimizer(
        model_fn,
        weighting=client_weighting,
        delta_l2_regularizer=delta_l2_regularizer,
        loop_implementation=loop_implementation,
      )
      return client_update(optimizer, initial_model_weights, dataset)
    client_update = build_model_delta_update_with_keras_optimizer(
      model_fn,
      optimizer,
      weighting=client_weighting,
      delta_l2_regularizer=delta_l2_regularizer,
      loop_implementation=loop_implementation,
    )
    return client_update(initial_model_weights, dataset)

  @tff.federated_computation
  def init_fn():
    return tff.federated_value((), tff.SERVER)

  @tff.federated_computation(
    init_fn.type_signature.result,
    tff.FederatedType(weights_type, tff.CLIENTS),
    tff.FederatedType(data_type, tff.CLIENTS),
  )
  def next_fn(state, weights, client_data):
    client_result, model_outputs = tff.federated_map(
      client_update_computation, (weights, client_data)
    )
    train_metrics = metrics_aggregation_fn(model_outputs)
    measurements = tff.federated_zip(collections.OrderedDict(train=train_metrics))
    return tff.templates.MeasuredProcessOutput(state, client_result, measurements)

  return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)
