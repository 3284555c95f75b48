"""`fedbeam train`: federated training over a store, resumable round by round.

    fedbeam train STORE --model NAME|module:function --rounds R \\
        --clients-per-round K --output DIR [--resume]

Writes into DIR:

- `metrics.csv`: one row per round (round, train_loss, train_accuracy,
  test_loss, test_accuracy, seconds, examples), appended by
  `tff.program.CSVFileReleaseManager`;
- `tensorboard/`: the same as TensorBoard scalars, written by
  `tff.program.TensorBoardReleaseManager` (`fedbeam.runtime.round_releases`);
- `checkpoint.npz`: after every round, the model weights, the server
  optimizer state, the round number and the random state (seed), written to a
  temporary file and renamed into place
  (`fedbeam.runtime.simulation.checkpoint`);
- `config.json`: the flags that determine the result and the identity of the
  store (data directory, digest of its metadata, splits), checked on
  `--resume`;
- `train.lock`: held (`fcntl.flock`) while a run uses DIR, so a second run on
  the same DIR fails at once instead of interleaving its outputs.

Every random choice of a round is a function of (seed, round, client), so
`--resume` after a kill ends with exactly the weights of an uninterrupted
run.

Importing this module does not import TensorFlow: `fedbeam --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, Optional

from fedbeam.format import fs
from fedbeam.format.fs import atomic_write, is_remote
from fedbeam.runtime.option_checks import check_int, check_number, parse_int, parse_number
from fedbeam.runtime.round_releases import METRICS_COLUMNS

if TYPE_CHECKING:
  import tensorflow_federated as tff

  from fedbeam.runtime import models as models_lib
  from fedbeam.runtime import simulation

__all__ = [
  "METRICS_COLUMNS",
  "RunDirectoryError",
  "TrainError",
  "TrainOptions",
  "add_train_arguments",
  "options_from_args",
  "run_train",
  "run_training",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.npz"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
LOCK_NAME = "train.lock"

# Options that change the trained weights; a resumed run must repeat them.
_RESULT_KEYS = (
  "model",
  "clients_per_round",
  "client_epochs",
  "batch_size",
  "client_optimizer",
  "client_lr",
  "server_optimizer",
  "server_lr",
  "server_momentum",
  "delta_l2",
  "client_weighting",
  "seed",
  "shuffle_buffer",
  "loop",
)


class TrainError(ValueError):
  """A flag, store or output directory that training cannot work with."""


class RunDirectoryError(ValueError):
  """A file of the run directory (`config.json`) that is damaged or unreadable."""


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
    # The rules the flag parser applies (fedbeam.runtime.option_checks), for
    # options built in Python rather than parsed.
    try:
      for name in (
        "rounds",
        "clients_per_round",
        "client_epochs",
        "batch_size",
        "clients_per_device",
      ):
        check_int(_flag(name), getattr(self, name), 1)
      for name in ("eval_every", "seed", "shuffle_buffer"):
        check_int(_flag(name), getattr(self, name), 0)
      for name in ("client_lr", "server_lr"):
        check_number(_flag(name), getattr(self, name), positive=True)
      for name in ("server_momentum", "delta_l2"):
        check_number(_flag(name), getattr(self, name), positive=False)
    except ValueError as error:
      raise TrainError(str(error)) from None
    choices = {
      "client_optimizer": ("sgd", "adam"),
      "server_optimizer": ("sgd", "adam"),
      "client_weighting": ("num_examples", "uniform"),
      "loop": ("iterator", "reduce"),
    }
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise TrainError(
          f"{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
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


def _flag(name: str) -> str:
  return f"--{name.replace('_', '-')}"


# argparse types: the rules of fedbeam.runtime.option_checks, on flag text.
def _positive_int(text: str) -> int:
  return parse_int(text, 1)


def _nonnegative_int(text: str) -> int:
  return parse_int(text, 0)


def _positive_float(text: str) -> float:
  return parse_number(text, positive=True)


def _nonnegative_float(text: str) -> float:
  return parse_number(text, positive=False)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the flags of `fedbeam train` to `parser` (imports no TensorFlow)."""
  parser.description = (
    "Federated averaging (FedProx with --delta-l2) over a store's train "
    "split, evaluated on its test split; resumable with --resume."
  )
  parser.add_argument("store", help="a store written by `fedbeam prepare`")
  parser.add_argument(
    "--model",
    required=True,
    help="digits-cnn, emnist-cnn, char-rnn, or module:function returning a "
    "fedbeam.runtime.models.ModelSpec or a tff.learning VariableModel",
  )
  parser.add_argument(
    "--rounds",
    type=_positive_int,
    required=True,
    help="total rounds (a resumed run stops at this round)",
  )
  parser.add_argument(
    "--clients-per-round",
    type=_positive_int,
    required=True,
    help="clients sampled (seeded) for each round",
  )
  parser.add_argument(
    "--client-epochs", type=_positive_int, default=1, help="local epochs per round (default 1)"
  )
  parser.add_argument(
    "--batch-size", type=_positive_int, default=20, help="client batch size (default 20)"
  )
  parser.add_argument(
    "--client-optimizer",
    choices=("sgd", "adam"),
    default="sgd",
    help="TFF client optimizer (default sgd)",
  )
  parser.add_argument(
    "--client-lr", type=_positive_float, default=0.1, help="client learning rate (default 0.1)"
  )
  parser.add_argument(
    "--server-optimizer",
    choices=("sgd", "adam"),
    default="sgd",
    help="TFF server optimizer (default sgd)",
  )
  parser.add_argument(
    "--server-lr",
    type=_positive_float,
    default=1.0,
    help="server learning rate (default 1.0: FedAvg)",
  )
  parser.add_argument(
    "--server-momentum",
    type=_nonnegative_float,
    default=0.0,
    help="server SGD momentum (default 0)",
  )
  parser.add_argument(
    "--delta-l2",
    type=_nonnegative_float,
    default=0.0,
    help="FedProx L2 pull toward the round's initial weights (default 0: FedAvg)",
  )
  parser.add_argument(
    "--client-weighting",
    choices=("num_examples", "uniform"),
    default="num_examples",
    help="weights of the mean of client deltas",
  )
  parser.add_argument(
    "--eval-every",
    type=_nonnegative_int,
    default=1,
    help="evaluate on the test split every N rounds and "
    "after the last (0: only after the last; default 1)",
  )
  parser.add_argument(
    "--seed",
    type=_nonnegative_int,
    default=0,
    help="seeds initialization, client sampling, shuffles",
  )
  parser.add_argument(
    "--shuffle-buffer",
    type=_nonnegative_int,
    default=1000,
    help="client shuffle buffer (0: stored order)",
  )
  parser.add_argument(
    "--loop",
    choices=("iterator", "reduce"),
    default="iterator",
    help="client training loop: dataset iterator (needed for GPUs) or DatasetReduce",
  )
  parser.add_argument(
    "--devices",
    default=None,
    help="comma-separated devices for clients, e.g. "
    "/device:GPU:0,/device:GPU:1 (default: all GPUs, else "
    "the CPU)",
  )
  parser.add_argument(
    "--clients-per-device",
    type=_positive_int,
    default=1,
    help="clients each device trains at once, each on its "
    "own model copy (default 1; results do not change)",
  )
  parser.add_argument(
    "--output", required=True, help="directory for metrics.csv, tensorboard/, checkpoint.npz"
  )
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--resume", action="store_true", help="continue from DIR's checkpoint")
  group.add_argument(
    "--overwrite", action="store_true", help="discard a previous run's outputs in DIR"
  )
  parser.add_argument(
    "--plot",
    action="store_true",
    help="after training, write DIR/accuracy.png: train and test "
    "accuracy per round, from metrics.csv",
  )
  parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
  parser.add_argument(
    "--train-split",
    metavar="NAME",
    help="the store's split to train on (default: 'train', or the single split 'all')",
  )
  parser.add_argument(
    "--test-split", metavar="NAME", help="the split to evaluate on (default: 'test' when present)"
  )
  parser.add_argument(
    "--test-store",
    metavar="STORE",
    help="evaluate on a split of this store instead "
    "(--test-split, default its 'test', or its single "
    "split)",
  )


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


def _load_store_splits(
  store: str,
  train_split: Optional[str] = None,
  test_split: Optional[str] = None,
  test_store: Optional[str] = None,
):
  """Returns `(train, test or None)` ClientData of a store.

  By default a store with a `train` split trains on it and evaluates on
  `test` when present; a store whose only split is `all` trains on it
  without evaluation. `train_split`, `test_split` name the splits instead;
  `test_store` evaluates on a split of another store (`test_split`, else its
  `test`, else its single split). Splits are loaded one at a time, so a
  store whose splits share client ids (TFF's splits kept) loads too.
  """
  from fedbeam.format.metadata import read_metadata  # pylint: disable=g-import-not-at-top
  from fedbeam.runtime.client_data import load_client_data  # pylint: disable=g-import-not-at-top

  splits = tuple(s["name"] for s in read_metadata(store)["splits"])
  if train_split is None and "train" not in splits and splits != ("all",):
    raise TrainError(
      f"store {store} has splits {list(splits)}; training needs a 'train' "
      "split (and uses 'test' if present), a single 'all' split, or "
      "--train-split NAME"
    )
  if train_split is None:
    train_split = "train" if "train" in splits else "all"
    if train_split == "all" and test_split is None and test_store is None:
      logger.warning("store %s has a single split 'all': training on it, no evaluation", store)
  train = load_client_data(store, split=train_split)
  if test_store is not None:
    names = tuple(s["name"] for s in read_metadata(test_store)["splits"])
    if test_split is None:
      test_split = "test" if "test" in names else (names[0] if len(names) == 1 else None)
    if test_split is None:
      raise TrainError(
        f"--test-store {test_store} has splits {list(names)}; name one with --test-split"
      )
    return train, load_client_data(test_store, split=test_split)
  if test_split is None and train_split != "test" and "test" in splits:
    test_split = "test"
  if test_split is None:
    return train, None
  if test_split == train_split:
    raise TrainError(f"--test-split {test_split!r} is the split trained on")
  return train, load_client_data(store, split=test_split)


def run_train(args: argparse.Namespace) -> int:
  """Runs `fedbeam train` with parsed flags.

  Exit codes follow the `fedbeam` command's: 0 success; 1 the store is
  missing, damaged, has no usable split, or its data does not fit the model
  in a way only training shows (or has fewer clients than
  --clients-per-round), a client file cannot be read during training (the
  message names the client and the store), or the checkpoint or config.json
  to resume from is damaged; 2 bad usage: flag values, an unknown model, a
  model the store's element spec does not fit (`model_fit.check_model_fits`,
  before the first round), or an --output that needs --resume/--overwrite,
  holds a run with other settings or of another store, or is in use by
  another run. The reason goes to stderr, on one line, as
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
  from fedbeam.runtime import simulation  # pylint: disable=g-import-not-at-top

  try:
    spec = models_lib.get_model(options.model)
  except ValueError as error:
    return fail(error, 2)
  try:
    train_data, test_data = _load_store_splits(
      args.store,
      getattr(args, "train_split", None),
      getattr(args, "test_split", None),
      getattr(args, "test_store", None),
    )
  except ValueError as error:
    # StoreFormatError and the loader's errors are ValueErrors.
    return fail(error, 1)
  from fedbeam.runtime.model_fit import ModelMismatchError, check_model_fits  # pylint: disable=g-import-not-at-top

  try:
    check_model_fits(options.model, spec.model_fn, spec.preprocess, train_data.element_spec)
  except ModelMismatchError as error:
    return fail(error, 2)
  try:
    outcome = run_training(train_data, test_data, spec, options)
  except TrainError as error:
    return fail(error, 2)
  except simulation.ClientReadError as error:
    hint = (
      ""
      if "fedbeam validate" in str(error)
      else f"; `fedbeam validate {args.store}` checks every client file"
    )
    return fail(f"{error} (store {args.store}){hint}", 1)
  except ValueError as error:
    # Raised before the first round: data that does not fit the model, too
    # few clients, a damaged checkpoint (CheckpointError) or config.json
    # (RunDirectoryError).
    return fail(error, 1)
  if outcome.final is not None:
    print(outcome.summary_line(), file=sys.stderr)
  if getattr(args, "plot", False):
    from fedbeam.plots import plot_accuracy  # pylint: disable=g-import-not-at-top

    plot = os.path.join(options.output, "accuracy.png")
    try:
      plot_accuracy(
        os.path.join(options.output, METRICS_NAME),
        plot,
        title=f"--model {options.model} on {args.store}",
      )
    except (ValueError, OSError) as error:
      return fail(f"--plot: {error}", 1)
    print(f"accuracy plot: {plot}", file=sys.stderr)
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
  def final(self) -> Optional["simulation.RoundResult"]:
    """The last round this call ran, or None if it ran none."""
    return self.rounds[-1] if self.rounds else None

  def summary_line(self) -> str:
    from fedbeam.runtime.simulation import loss_and_accuracy  # pylint: disable=g-import-not-at-top

    final = self.final
    loss, accuracy = loss_and_accuracy(final.eval_metrics or final.train_metrics)
    where = "test" if final.eval_metrics else "train"
    return (
      f"round {final.round_num}: {where} loss {loss:.4f}, {where} accuracy {accuracy:.4f}"
      if loss is not None and accuracy is not None
      else f"round {final.round_num} done"
    )


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
  with fs.open_read(path, encoding="utf-8") as f:
    return json.load(f)


def _store_identity(
  data: Optional["tff.simulation.datasets.ClientData"],
) -> Optional[dict[str, Any]]:
  """What identifies the store `data` was loaded from; None if it is no store.

  The data directory changes with every prepare job that writes the store
  and the metadata digest with its content (counts, spec, parameters); the
  path is recorded for messages only, so a store that was moved or copied
  whole is still the same store.
  """
  from fedbeam.runtime.client_data import StoreClientData  # pylint: disable=g-import-not-at-top

  if not isinstance(data, StoreClientData):
    return None
  metadata = data.metadata
  digest = hashlib.sha256(
    json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode("utf-8")
  ).hexdigest()
  return {
    "path": data.root,
    "data_dir": metadata.get("data_dir"),
    "metadata_sha256": digest,
    "splits": list(data.splits),
  }


def _same_store(a: Optional[dict[str, Any]], b: Optional[dict[str, Any]]) -> bool:
  def key(identity):
    return None if identity is None else {k: v for k, v in identity.items() if k != "path"}

  return key(a) == key(b)


def _describe_store(identity: Optional[dict[str, Any]]) -> str:
  if identity is None:
    return "a ClientData that is not a store"
  return (
    f"store {identity.get('path')} (data dir {identity.get('data_dir')}, metadata "
    f"sha256 {str(identity.get('metadata_sha256'))[:16]}, splits "
    f"{identity.get('splits')})"
  )


def _check_same_stores(
  recorded: dict[str, Any], wanted: dict[str, Any], where: str
) -> Optional[str]:
  """What differs between two `{'train': identity, 'test': identity}`; None if nothing."""
  differing = [
    f"{role} data: the run used {_describe_store(recorded.get(role))}, this is "
    f"{_describe_store(wanted.get(role))}"
    for role in ("train", "test")
    if not _same_store(recorded.get(role), wanted.get(role))
  ]
  return f"{where} ({'; '.join(differing)})" if differing else None


@contextlib.contextmanager
def _locked_run_directory(output: str):
  """Holds `OUTPUT/train.lock` (an exclusive `fcntl.flock`) for the block.

  The kernel drops the lock when its holder exits, however it exits, so a
  lock file left by a killed run never blocks the next one. The file names
  its holder (pid, host, start time) for the message of a run refused
  because of it. Object stores (`gs://...`) offer no lock: runs there are
  not locked (a warning says so).

  Raises:
    TrainError: Another process holds the lock.
  """
  if is_remote(output):
    logger.warning(
      "%s is not on a local file system: it cannot be locked, so make sure no other run uses it",
      output,
    )
    yield
    return
  os.makedirs(output, exist_ok=True)
  path = os.path.join(output, LOCK_NAME)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
      os.close(fd)
      try:
        owner = json.loads(holder)
        holder = f"pid {owner['pid']} on host {owner['host']}, started {owner['started']}"
      except (ValueError, KeyError, TypeError):
        holder = "holder unknown"
      raise TrainError(
        f"{output} is in use by another fedbeam train ({holder}; lock {path}); wait "
        "for it to finish or use another --output"
      ) from None
    try:
      same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same_file = False
    if same_file:
      break
    # The previous holder removed the file between our open and our lock:
    # this lock is on a file no one else will see; take the new one.
    os.close(fd)
  try:
    owner = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode("utf-8"), 0)
    yield
  finally:
    # Removed while still locked, so no other run locks this file after it.
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)
    os.close(fd)


def _prepare_output(options: TrainOptions, has_test: bool, stores: dict[str, Any]) -> bool:
  """Checks and prepares the output directory; True when resuming.

  `stores` is `{'train': identity, 'test': identity}` (`_store_identity`),
  recorded in config.json and compared on `--resume`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  output = options.output
  checkpoint = os.path.join(output, CHECKPOINT_NAME)
  config_path = os.path.join(output, CONFIG_NAME)
  has_checkpoint = fs.exists(checkpoint)
  if options.overwrite:
    for name in (CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME):
      if fs.exists(os.path.join(output, name)):
        fs.remove(os.path.join(output, name))
    if fs.isdir(os.path.join(output, TENSORBOARD_DIR)):
      fs.remove_tree(os.path.join(output, TENSORBOARD_DIR))
    has_checkpoint = False
  elif has_checkpoint and not options.resume:
    raise TrainError(
      f"{output} already holds a training run (checkpoint.npz); pass "
      "--resume to continue it or --overwrite to start over"
    )
  fs.makedirs(output)
  wanted = dict(options.result_config(), has_test_split=has_test, stores=stores)
  if has_checkpoint:
    try:
      recorded = _read_json(config_path)
    except (FileNotFoundError, tf.errors.NotFoundError):
      raise TrainError(
        f"{output} has a checkpoint but no {CONFIG_NAME}; use --overwrite to start over"
      ) from None
    except (OSError, tf.errors.OpError, ValueError) as error:
      # ValueError: JSONDecodeError, UnicodeDecodeError.
      raise RunDirectoryError(
        f"{config_path} is damaged ({error}); use --overwrite to start over"
      ) from None
    if not isinstance(recorded, dict):
      raise RunDirectoryError(
        f"{config_path} is damaged (not a JSON object); use --overwrite to start over"
      )
    if "stores" in recorded:
      mismatch = _check_same_stores(
        recorded["stores"] or {},
        stores,
        f"--resume against another store than the run in {output} was trained on",
      )
      if mismatch:
        raise TrainError(f"{mismatch}; pass the run's store or use another --output")
    else:
      logger.warning(
        "%s records no store (written by an older fedbeam): cannot check "
        "that this is the run's store",
        config_path,
      )
    differing = sorted(
      k for k in (set(recorded) | set(wanted)) - {"stores"} if recorded.get(k) != wanted.get(k)
    )
    if differing:
      details = ", ".join(f"{k}: was {recorded.get(k)!r}, now {wanted.get(k)!r}" for k in differing)
      raise TrainError(
        f"--resume with different settings than the run in {output} "
        f"({details}); use the same flags or another --output"
      )
    return True
  if options.resume:
    logger.warning("no checkpoint in %s: starting from round 0", output)
  atomic_write(config_path, json.dumps(wanted, indent=2, sort_keys=True).encode("utf-8"))
  return False


def _metrics_rows_up_to(path: str, last_round: int) -> list[dict[str, str]]:
  if not fs.exists(path):
    return []
  with fs.open_read(path, encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  return [r for r in rows if r.get("round", "").isdigit() and int(r["round"]) <= last_round]


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
      `--resume`/`--overwrite`), a run with different settings or of
      another store, or is in use by another run (`train.lock`).
    fedbeam.runtime.simulation.CheckpointError: (a ValueError) If the
      checkpoint to resume from is damaged or belongs to another run;
      nothing has been trained or written then.
    RunDirectoryError: If config.json is damaged.
    fedbeam.runtime.simulation.ClientReadError: If a client's data cannot
      be read during training or evaluation (names the client).
    ValueError: If the data does not fit the model or there are too few
      clients.
  """
  # The lock is taken before anything in the directory is read or removed.
  with _locked_run_directory(options.output):
    return _train_in_locked_directory(train_data, test_data, spec, options)


def _check_checkpoint_belongs(
  path: str, metadata: dict[str, Any], options: TrainOptions, stores: dict[str, Any]
) -> None:
  """Refuses a checkpoint whose own record of settings or stores is not config.json's.

  config.json is written when a run starts and the checkpoint after every
  round: a checkpoint copied in from another run directory disagrees.
  """
  from fedbeam.runtime import simulation  # pylint: disable=g-import-not-at-top

  if metadata.get("seed") != options.seed:
    raise TrainError(f"checkpoint seed {metadata.get('seed')!r} differs from --seed {options.seed}")
  if "config" in metadata and metadata["config"] != options.result_config():
    raise simulation.CheckpointError(
      f"checkpoint {path} was written with other settings than {CONFIG_NAME} records; "
      "it belongs to another run (use --overwrite to start over)"
    )
  if "stores" in metadata:
    mismatch = _check_same_stores(
      metadata["stores"] or {},
      stores,
      f"checkpoint {path} was written for another store than {CONFIG_NAME} records",
    )
    if mismatch:
      raise simulation.CheckpointError(f"{mismatch}; use --overwrite to start over")


def _train_in_locked_directory(
  train_data: "tff.simulation.datasets.ClientData",
  test_data: Optional["tff.simulation.datasets.ClientData"],
  spec: "models_lib.ModelSpec",
  options: TrainOptions,
) -> TrainingOutcome:
  """`run_training`'s work, while it holds the run directory's lock."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  from fedbeam.runtime import simulation  # pylint: disable=g-import-not-at-top
  from fedbeam.runtime.round_releases import RoundReleases  # pylint: disable=g-import-not-at-top
  from fedbeam.runtime.tff_worker import register_worker_cleanup  # pylint: disable=g-import-not-at-top

  register_worker_cleanup()
  stores = {"train": _store_identity(train_data), "test": _store_identity(test_data)}
  resuming = _prepare_output(options, has_test=test_data is not None, stores=stores)
  client_optimizer, server_optimizer = _build_optimizers(options)
  weighting = (
    tff.learning.ClientWeighting.UNIFORM
    if options.client_weighting == "uniform"
    else tff.learning.ClientWeighting.NUM_EXAMPLES
  )
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
    spec.model_fn,
    client_optimizer,
    server_optimizer,
    train_data,
    config,
    test_data=test_data,
    preprocess=spec.preprocess,
    devices=list(options.devices) if options.devices else None,
  )
  checkpoint_path = os.path.join(options.output, CHECKPOINT_NAME)
  metrics_path = os.path.join(options.output, METRICS_NAME)
  if resuming:
    # Read and checked whole before the loop takes it: a damaged file
    # raises CheckpointError and nothing is trained or written.
    state, metadata = simulation.load_state(checkpoint_path, loop.state)
    _check_checkpoint_belongs(checkpoint_path, metadata, options, stores)
    loop.set_state(state)
    logger.info("resuming %s after round %d", options.output, state.round_num)
  start_round = loop.state.round_num

  # Rows of rounds after the checkpoint came from a run killed before it
  # could checkpoint them; those rounds run again. The file is rewritten
  # before the first round (the CSV manager would only drop them when a
  # round replaces them), keeping well-formed rows only.
  kept_rows = _metrics_rows_up_to(metrics_path, start_round)
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS)
  writer.writeheader()
  writer.writerows({k: r.get(k, "") for k in METRICS_COLUMNS} for r in kept_rows)
  atomic_write(metrics_path, buffer.getvalue().encode("utf-8"))

  releases = RoundReleases(metrics_path, os.path.join(options.output, TENSORBOARD_DIR))
  progress = tqdm(
    total=options.rounds,
    initial=min(start_round, options.rounds),
    unit="round",
    desc="train",
    file=sys.stderr,
    disable=not options.progress,
    dynamic_ncols=True,
  )

  def on_round(result: "simulation.RoundResult", current: "simulation.SimulationLoop") -> None:
    releases.release(result)
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
        "stores": stores,
        "saved_at": time.time(),
      },
    )
    train_loss, train_accuracy = simulation.loss_and_accuracy(result.train_metrics)
    _, test_accuracy = simulation.loss_and_accuracy(result.eval_metrics)
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
    with releases:
      rounds = loop.run(options.rounds, on_round=on_round)
  finally:
    progress.close()
  return TrainingOutcome(start_round=start_round, rounds=rounds, state=loop.state)
