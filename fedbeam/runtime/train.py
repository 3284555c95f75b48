"""`fedbeam train`: federated training over a store, resumable round by round.

    fedbeam train STORE --model NAME|module:function --rounds R \\
        --clients-per-round K --output DIR [--resume]

Writes into DIR:

- `metrics.csv`: one row per round (round, train_loss, train_accuracy,
  test_loss, test_accuracy, seconds, examples);
- `tensorboard/`: the same as TensorBoard scalars;
- `checkpoint.npz`: after every round, the model weights, the server
  optimizer state, the round number and the random state (seed), written to a
  temporary file and renamed into place;
- `config.json`: the flags that determine the result, checked on `--resume`.

Every random choice of a round is a function of (seed, round, client), so
`--resume` after a kill ends with exactly the weights of an uninterrupted
run.

Importing this module does not import TensorFlow: `fedbeam --help` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
  import tensorflow_federated as tff
  from fedbeam.runtime import models as models_lib

__all__ = [
    "METRICS_COLUMNS",
    "TrainError",
    "TrainOptions",
    "add_train_arguments",
    "options_from_args",
    "run_train",
    "run_training",
]

logger = logging.getLogger(__name__)

METRICS_COLUMNS = (
    "round",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "seconds",
    "examples",
)
CHECKPOINT_NAME = "checkpoint.npz"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"

# Options that change the trained weights; a resumed run must repeat them.
_RESULT_KEYS = (
    "model", "clients_per_round", "client_epochs", "batch_size",
    "client_optimizer", "client_lr", "server_optimizer", "server_lr",
    "server_momentum", "delta_l2", "client_weighting", "seed",
    "shuffle_buffer", "loop",
)


class TrainError(ValueError):
  """A flag, store or output directory that training cannot work with."""


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  """The settings of one training run (the flags of `fedbeam train`).

  Attributes mirror the flags; `devices` is None for the default (all GPUs,
  else the CPU).
  """

  model: str
  rounds: int
  clients_per_round: int
  output: str
  client_epochs: int = 1
  batch_size: int = 20
  client_optimizer: str = "sgd"
  client_lr: float = 0.1
  server_optimizer: str = "sgd"
  server_lr: float = 1.0
  server_momentum: float = 0.0
  delta_l2: float = 0.0
  client_weighting: str = "num_examples"
  eval_every: int = 1
  seed: int = 0
  shuffle_buffer: int = 1000
  loop: str = "iterator"
  devices: Optional[tuple[str, ...]] = None
  clients_per_device: int = 1
  resume: bool = False
  overwrite: bool = False
  progress: bool = True

  def __post_init__(self):
    for name in ("rounds", "clients_per_round", "client_epochs", "batch_size",
                 "clients_per_device"):
      _require(getattr(self, name), _positive_int, name)
    for name in ("eval_every", "seed", "shuffle_buffer"):
      _require(getattr(self, name), _nonnegative_int, name)
    for name in ("client_lr", "server_lr"):
      _require(getattr(self, name), _positive_float, name)
    for name in ("server_momentum", "delta_l2"):
      _require(getattr(self, name), _nonnegative_float, name)
    choices = {
        "client_optimizer": ("sgd", "adam"),
        "server_optimizer": ("sgd", "adam"),
        "client_weighting": ("num_examples", "uniform"),
        "loop": ("iterator", "reduce"),
    }
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise TrainError(
            f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
            f"got {getattr(self, name)!r}"
        )
    if self.server_optimizer == "adam" and self.server_momentum:
      raise TrainError("--server-momentum applies to --server-optimizer sgd only")
    if self.resume and self.overwrite:
      raise TrainError("--resume and --overwrite exclude each other")
    if not self.output:
      raise TrainError("--output must name a directory")

  def result_config(self) -> dict[str, Any]:
    """The options a resumed run must share with the run it continues."""
    return {key: getattr(self, key) for key in _RESULT_KEYS}


def _require(value: Any, check, name: str) -> None:
  try:
    check(str(value))
  except argparse.ArgumentTypeError as error:
    raise TrainError(f"--{name.replace('_', '-')}: {error}") from None


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  return value


def _nonnegative_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected a nonnegative integer, got {text!r}")
  if value < 0:
    raise argparse.ArgumentTypeError(
        f"expected a nonnegative integer, got {text!r}")
  return value


def _float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
  if value != value or value in (float("inf"), float("-inf")):
    raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
  return value


def _positive_float(text: str) -> float:
  value = _float(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
  return value


def _nonnegative_float(text: str) -> float:
  value = _float(text)
  if value < 0:
    raise argparse.ArgumentTypeError(
        f"expected a nonnegative number, got {text!r}")
  return value


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the flags of `fedbeam train` to `parser` (imports no TensorFlow)."""
  parser.description = (
      "Federated averaging (FedProx with --delta-l2) over a store's train "
      "split, evaluated on its test split; resumable with --resume."
  )
  parser.add_argument("store", help="a store written by `fedbeam prepare`")
  parser.add_argument(
      "--model", required=True,
      help="digits-cnn, emnist-cnn, char-rnn, or module:function returning a "
      "fedbeam.runtime.models.ModelSpec or a tff.learning VariableModel")
  parser.add_argument("--rounds", type=_positive_int, required=True,
                      help="total rounds (a resumed run stops at this round)")
  parser.add_argument("--clients-per-round", type=_positive_int, required=True,
                      help="clients sampled (seeded) for each round")
  parser.add_argument("--client-epochs", type=_positive_int, default=1,
                      help="local epochs per round (default 1)")
  parser.add_argument("--batch-size", type=_positive_int, default=20,
                      help="client batch size (default 20)")
  parser.add_argument("--client-optimizer", choices=("sgd", "adam"),
                      default="sgd", help="TFF client optimizer (default sgd)")
  parser.add_argument("--client-lr", type=_positive_float, default=0.1,
                      help="client learning rate (default 0.1)")
  parser.add_argument("--server-optimizer", choices=("sgd", "adam"),
                      default="sgd", help="TFF server optimizer (default sgd)")
  parser.add_argument("--server-lr", type=_positive_float, default=1.0,
                      help="server learning rate (default 1.0: FedAvg)")
  parser.add_argument("--server-momentum", type=_nonnegative_float,
                      default=0.0, help="server SGD momentum (default 0)")
  parser.add_argument("--delta-l2", type=_nonnegative_float, default=0.0,
                      help="FedProx L2 pull toward the round's initial "
                      "weights (default 0: FedAvg)")
  parser.add_argument("--client-weighting", choices=("num_examples", "uniform"),
                      default="num_examples",
                      help="weights of the mean of client deltas")
  parser.add_argument("--eval-every", type=_nonnegative_int, default=1,
                      help="evaluate on the test split every N rounds and "
                      "after the last (0: only after the last; default 1)")
  parser.add_argument("--seed", type=_nonnegative_int, default=0,
                      help="seeds initialization, client sampling, shuffles")
  parser.add_argument("--shuffle-buffer", type=_nonnegative_int, default=1000,
                      help="client shuffle buffer (0: stored order)")
  parser.add_argument("--loop", choices=("iterator", "reduce"),
                      default="iterator",
                      help="client training loop: dataset iterator (needed "
                      "for GPUs) or DatasetReduce")
  parser.add_argument("--devices", default=None,
                      help="comma-separated devices for clients, e.g. "
                      "/device:GPU:0,/device:GPU:1 (default: all GPUs, else "
                      "the CPU)")
  parser.add_argument("--clients-per-device", type=_positive_int, default=1,
                      help="clients each device trains at once, each on its "
                      "own model copy (default 1; results do not change)")
  parser.add_argument("--output", required=True,
                      help="directory for metrics.csv, tensorboard/, "
                      "checkpoint.npz")
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--resume", action="store_true",
                     help="continue from DIR's checkpoint")
  group.add_argument("--overwrite", action="store_true",
                     help="discard a previous run's outputs in DIR")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bar on stderr")


def options_from_args(args: argparse.Namespace) -> TrainOptions:
  """Builds `TrainOptions` from parsed flags.

  Raises:
    TrainError: If a flag value is invalid.
  """
  devices = None
  if getattr(args, "devices", None):
    devices = tuple(d.strip() for d in args.devices.split(",") if d.strip())
    if not devices:
      raise TrainError("--devices must name at least one device")
  return TrainOptions(
      model=args.model,
      rounds=args.rounds,
      clients_per_round=args.clients_per_round,
      output=args.output,
      client_epochs=args.client_epochs,
      batch_size=args.batch_size,
      client_optimizer=args.client_optimizer,
      client_lr=args.client_lr,
      server_optimizer=args.server_optimizer,
      server_lr=args.server_lr,
      server_momentum=args.server_momentum,
      delta_l2=args.delta_l2,
      client_weighting=args.client_weighting,
      eval_every=args.eval_every,
      seed=args.seed,
      shuffle_buffer=args.shuffle_buffer,
      loop=args.loop,
      devices=devices,
      clients_per_device=getattr(args, "clients_per_device", 1),
      resume=args.resume,
      overwrite=args.overwrite,
      progress=not getattr(args, "no_progress", False),
  )


def _load_store_splits(store: str):
  """Returns `(train, test or None)` ClientData of a store.

  A store with a `train` split trains on it and evaluates on `test` when
  present; a store whose only split is `all` trains on it without
  evaluation.
  """
  from fedbeam.runtime.client_data import load_client_data  # pylint: disable=g-import-not-at-top

  everything = load_client_data(store)
  splits = tuple(everything.splits)
  if "train" in splits:
    test = load_client_data(store, split="test") if "test" in splits else None
    return load_client_data(store, split="train"), test
  if splits == ("all",):
    logger.warning("store %s has a single split 'all': training on it, "
                   "no evaluation", store)
    return everything, None
  raise TrainError(
      f"store {store} has splits {list(splits)}; training needs a 'train' "
      "split (and uses 'test' if present) or a single 'all' split"
  )


def run_train(args: argparse.Namespace) -> int:
  """Runs `fedbeam train` with parsed flags.

  Exit codes follow the `fedbeam` command's: 0 success; 1 the store is
  missing, damaged, has no usable split, or its data does not fit the model
  (or has fewer clients than --clients-per-round); 2 bad usage: flag values,
  an unknown model, or an --output that needs --resume/--overwrite or holds
  a run with other settings. The reason goes to stderr as
  `fedbeam train: error: ...`.

  Args:
    args: The namespace of a parser set up by `add_train_arguments`.

  Returns:
    The exit code.
  """

  def fail(error: Exception, code: int) -> int:
    print(f"fedbeam train: error: {error}", file=sys.stderr)
    return code

  try:
    options = options_from_args(args)
  except TrainError as error:
    return fail(error, 2)
  from fedbeam.runtime.tff_worker import register_worker_cleanup  # pylint: disable=g-import-not-at-top

  register_worker_cleanup()
  from fedbeam.runtime import models as models_lib  # pylint: disable=g-import-not-at-top

  try:
    spec = models_lib.get_model(options.model)
  except ValueError as error:
    return fail(error, 2)
  try:
    train_data, test_data = _load_store_splits(args.store)
  except ValueError as error:
    # StoreFormatError and the loader's errors are ValueErrors.
    return fail(error, 1)
  try:
    outcome = run_training(train_data, test_data, spec, options)
  except TrainError as error:
    return fail(error, 2)
  except ValueError as error:
    # Raised before the first round: data that does not fit the model, too
    # few clients.
    return fail(error, 1)
  if outcome.final is not None:
    print(outcome.summary_line(), file=sys.stderr)
  return 0


@dataclasses.dataclass
class TrainingOutcome:
  """What `run_training` did.

  Attributes:
    start_round: Rounds already done when this call started (from a
      checkpoint).
    rounds: Results of the rounds this call ran.
    state: The final `SimulationState`.
  """

  start_round: int
  rounds: list[Any]
  state: Any

  @property
  def final(self):
    return self.rounds[-1] if self.rounds else None

  def summary_line(self) -> str:
    from fedbeam.runtime.simulation import loss_and_accuracy  # pylint: disable=g-import-not-at-top

    final = self.final
    loss, accuracy = loss_and_accuracy(final.eval_metrics or final.train_metrics)
    where = "test" if final.eval_metrics else "train"
    return (f"round {final.round_num}: {where} loss {loss:.4f}, "
            f"{where} accuracy {accuracy:.4f}" if loss is not None
            and accuracy is not None else f"round {final.round_num} done")


def _build_optimizers(options: TrainOptions):
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  if options.client_optimizer == "adam":
    client = tff.learning.optimizers.build_adam(options.client_lr)
  else:
    client = tff.learning.optimizers.build_sgdm(options.client_lr)
  if options.server_optimizer == "adam":
    server = tff.learning.optimizers.build_adam(options.server_lr)
  else:
    server = tff.learning.optimizers.build_sgdm(
        options.server_lr, momentum=options.server_momentum or None
    )
  return client, server


def _read_json(path: str) -> Any:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  with tf.io.gfile.GFile(path, "r") as f:
    return json.load(f)


def _write_atomically(path: str, text: str) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  temporary = f"{path}.tmp"
  with tf.io.gfile.GFile(temporary, "w") as f:
    f.write(text)
  tf.io.gfile.rename(temporary, path, overwrite=True)


def _prepare_output(options: TrainOptions, has_test: bool) -> bool:
  """Checks and prepares the output directory; True when resuming."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  output = options.output
  checkpoint = os.path.join(output, CHECKPOINT_NAME)
  config_path = os.path.join(output, CONFIG_NAME)
  has_checkpoint = tf.io.gfile.exists(checkpoint)
  if options.overwrite:
    for name in (CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME):
      if tf.io.gfile.exists(os.path.join(output, name)):
        tf.io.gfile.remove(os.path.join(output, name))
    if tf.io.gfile.isdir(os.path.join(output, TENSORBOARD_DIR)):
      tf.io.gfile.rmtree(os.path.join(output, TENSORBOARD_DIR))
    has_checkpoint = False
  elif has_checkpoint and not options.resume:
    raise TrainError(
        f"{output} already holds a training run (checkpoint.npz); pass "
        "--resume to continue it or --overwrite to start over"
    )
  tf.io.gfile.makedirs(output)
  wanted = dict(options.result_config(), has_test_split=has_test)
  if has_checkpoint:
    try:
      recorded = _read_json(config_path)
    except (tf.errors.NotFoundError, json.JSONDecodeError) as error:
      raise TrainError(
          f"{output} has a checkpoint but no readable {CONFIG_NAME}: {error}"
      ) from error
    differing = sorted(
        k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k)
    )
    if differing:
      details = ", ".join(
          f"{k}: was {recorded.get(k)!r}, now {wanted.get(k)!r}"
          for k in differing
      )
      raise TrainError(
          f"--resume with different settings than the run in {output} "
          f"({details}); use the same flags or another --output"
      )
    return True
  if options.resume:
    logger.warning("no checkpoint in %s: starting from round 0", output)
  _write_atomically(config_path, json.dumps(wanted, indent=2, sort_keys=True))
  return False


def _metrics_rows_up_to(path: str, last_round: int) -> list[dict[str, str]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if not tf.io.gfile.exists(path):
    return []
  with tf.io.gfile.GFile(path, "r") as f:
    rows = list(csv.DictReader(f))
  return [r for r in rows if r.get("round", "").isdigit()
          and int(r["round"]) <= last_round]


def _format(value: Optional[float]) -> str:
  return "" if value is None else repr(float(value))


def run_training(
    train_data: "tff.simulation.datasets.ClientData",
    test_data: Optional["tff.simulation.datasets.ClientData"],
    spec: "models_lib.ModelSpec",
    options: TrainOptions,
) -> TrainingOutcome:
  """Trains, writing metrics, TensorBoard summaries and a checkpoint per round.

  The core of `fedbeam train`, on ClientData objects (a loaded store or any
  `tff.simulation.datasets.ClientData`).

  Args:
    train_data: Clients to train on.
    test_data: Clients to evaluate on, or None.
    spec: The model and its preprocessing.
    options: The run's settings; `options.output` receives the outputs.

  Returns:
    A `TrainingOutcome`.

  Raises:
    TrainError: If the output directory holds another run (without
      `--resume`/`--overwrite`) or a run with different settings.
    ValueError: If the data does not fit the model or there are too few
      clients.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  from fedbeam.runtime import simulation  # pylint: disable=g-import-not-at-top
  from fedbeam.runtime.tff_worker import register_worker_cleanup  # pylint: disable=g-import-not-at-top

  register_worker_cleanup()
  resuming = _prepare_output(options, has_test=test_data is not None)
  client_optimizer, server_optimizer = _build_optimizers(options)
  weighting = (tff.learning.ClientWeighting.UNIFORM
               if options.client_weighting == "uniform"
               else tff.learning.ClientWeighting.NUM_EXAMPLES)
  config = simulation.SimulationConfig(
      clients_per_round=options.clients_per_round,
      client_epochs=options.client_epochs,
      batch_size=options.batch_size,
      shuffle_buffer=options.shuffle_buffer,
      seed=options.seed,
      eval_every=options.eval_every,
      client_weighting=weighting,
      delta_l2_regularizer=options.delta_l2,
      use_experimental_simulation_loop=options.loop == "iterator",
      clients_per_device=options.clients_per_device,
  )
  loop = simulation.SimulationLoop(
      spec.model_fn, client_optimizer, server_optimizer, train_data, config,
      test_data=test_data, preprocess=spec.preprocess,
      devices=list(options.devices) if options.devices else None,
  )
  checkpoint_path = os.path.join(options.output, CHECKPOINT_NAME)
  metrics_path = os.path.join(options.output, METRICS_NAME)
  if resuming:
    state, metadata = simulation.load_state(checkpoint_path, loop.state)
    if metadata.get("seed") != options.seed:
      raise TrainError(
          f"checkpoint seed {metadata.get('seed')!r} differs from --seed "
          f"{options.seed}"
      )
    loop.set_state(state)
    logger.info("resuming %s after round %d", options.output, state.round_num)
  start_round = loop.state.round_num

  # Rows of rounds after the checkpoint came from a run killed before it
  # could checkpoint them; those rounds run again.
  kept_rows = _metrics_rows_up_to(metrics_path, start_round)
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS)
  writer.writeheader()
  writer.writerows({k: r.get(k, "") for k in METRICS_COLUMNS} for r in kept_rows)
  _write_atomically(metrics_path, buffer.getvalue())

  summary_writer = tf.summary.create_file_writer(
      os.path.join(options.output, TENSORBOARD_DIR)
  )
  progress = tqdm(
      total=options.rounds, initial=min(start_round, options.rounds),
      unit="round", desc="train", file=sys.stderr,
      disable=not options.progress, dynamic_ncols=True,
  )

  def on_round(result: "simulation.RoundResult",
               current: "simulation.SimulationLoop") -> None:
    train_loss, train_accuracy = simulation.loss_and_accuracy(
        result.train_metrics)
    test_loss, test_accuracy = simulation.loss_and_accuracy(
        result.eval_metrics)
    row = {
        "round": str(result.round_num),
        "train_loss": _format(train_loss),
        "train_accuracy": _format(train_accuracy),
        "test_loss": _format(test_loss),
        "test_accuracy": _format(test_accuracy),
        "seconds": f"{result.seconds:.6f}",
        "examples": str(result.num_examples),
    }
    with tf.io.gfile.GFile(metrics_path, "a") as f:
      csv.DictWriter(f, fieldnames=METRICS_COLUMNS).writerow(row)
    with summary_writer.as_default(step=result.round_num):
      for name, value in (("train/loss", train_loss),
                          ("train/accuracy", train_accuracy),
                          ("test/loss", test_loss),
                          ("test/accuracy", test_accuracy)):
        if value is not None:
          tf.summary.scalar(name, value)
      tf.summary.scalar("round/seconds", result.seconds)
      tf.summary.scalar("round/examples", result.num_examples)
    summary_writer.flush()
    # Last, so every round a checkpoint covers has its metrics row.
    simulation.save_state(
        checkpoint_path,
        current.state,
        metadata={
            "seed": options.seed,
            "round_num": result.round_num,
            # The per-round random state: generators are keyed by
            # (seed, round), so these two numbers are all of it.
            "rng": {"seed": options.seed, "next_round": result.round_num + 1},
            "config": options.result_config(),
            "saved_at": time.time(),
        },
    )
    postfix = {}
    if train_loss is not None:
      postfix["loss"] = f"{train_loss:.3f}"
    if test_accuracy is not None:
      postfix["test_acc"] = f"{test_accuracy:.3f}"
    progress.set_postfix(postfix, refresh=False)
    progress.update(1)
    line = f"round {result.round_num}: {result.seconds:.2f} s"
    if train_loss is not None:
      line += f", train loss {train_loss:.4f}"
    if train_accuracy is not None:
      line += f", train accuracy {train_accuracy:.4f}"
    if test_accuracy is not None:
      line += f", test accuracy {test_accuracy:.4f}"
    # Above the progress bar, on stdout, so a log keeps every round.
    progress.write(line, file=sys.stdout)

  try:
    rounds = loop.run(options.rounds, on_round=on_round)
  finally:
    progress.close()
    summary_writer.close()
  return TrainingOutcome(start_round=start_round, rounds=rounds,
                         state=loop.state)
