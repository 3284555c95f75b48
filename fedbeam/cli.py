"""The `fedbeam` command: prepare, inspect, validate, train.

`prepare` passes every flag it does not know to Beam as a pipeline option
(`--runner`, `--direct_num_workers`, `--project`, ...) after checking that
Beam knows it. Exit codes: 0 success, 1 the job or input failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from typing import Iterator, Optional, Sequence

from fedbeam.command_logging import CommandLogging

__all__ = [
  "build_parser",
  "main",
]


def _check_beam_args(args: Sequence[str]) -> Optional[str]:
  """Returns an error message for a pass-through argument Beam would not use, else None.

  The check is built from Beam's own flag strings, including those of the
  runner module `--runner` names (fedbeam.beam_flags.check_beam_args).
  """
  from fedbeam.beam_flags import check_beam_args  # pylint: disable=g-import-not-at-top

  return check_beam_args(args)


def _add_prepare_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--input",
    required=True,
    help="input file pattern (comma-separated patterns allowed; one file for tff-sqlite)",
  )
  p.add_argument(
    "--input-format",
    required=True,
    choices=["tfrecord", "avro", "tff-sqlite", "parquet", "csv", "jsonl", "leaf"],
    help="tfrecord: tf.train.Example records; avro, parquet, csv (with a header "
    "row), jsonl (one JSON object per line): records with a client-id field; "
    "tff-sqlite: a TFF client-data SQLite database; leaf: LEAF's JSON files "
    "(clients are the users, features x and y)",
  )
  p.add_argument(
    "--client-id-key",
    help="feature, field, column or member holding the client id (a string, or an "
    "integer stored as its decimal string; the natural partition); required "
    "except for tff-sqlite and leaf, or when --partition is given",
  )
  p.add_argument(
    "--element-spec",
    metavar="FILE",
    help='JSON {"feature": {"dtype": "float32", "shape": [28, 28]}, ...}; '
    "null marks a variable-length leading dimension. Default: inferred",
  )
  p.add_argument(
    "--order-by",
    metavar="FEATURE",
    help="order examples inside a client by this feature; '@input' keeps input "
    "order; default: by serialized content",
  )
  p.add_argument(
    "--sqlite-split",
    metavar="NAME",
    nargs="+",
    help="with tff-sqlite: read only rows of these split_names (one or more)",
  )
  p.add_argument(
    "--keep-sqlite-splits",
    action="store_true",
    help="with tff-sqlite: each TFF split_name read becomes a store split of that "
    "name (an id of several splits is a client of each)",
  )
  p.add_argument("--output", required=True, help="store directory (local or gs://)")
  p.add_argument(
    "--num-shards", type=int, help="shard directories per split (default: one per ~4096 clients)"
  )
  p.add_argument("--overwrite", action="store_true", help="replace a committed store at --output")
  p.add_argument(
    "--no-fsync",
    dest="fsync",
    action="store_false",
    help="do not make the store's files durable (syncfs, fsync) before the commit (faster "
    "on slow local disks; a power loss after the commit can then damage the store)",
  )
  pa = p.add_argument_group(
    "partitioners, for input without a client id (Flower Datasets' partitioners of the "
    "same names; docs/cli.md)"
  )
  pa.add_argument(
    "--partition",
    choices=["iid", "dirichlet", "shard"],
    help="assign the examples to --num-clients clients named 0..N-1: iid (equal "
    "shares of a seeded shuffle), dirichlet (label mix per client ~ "
    "Dirichlet(alpha)), shard (each client gets S label-sorted shards)",
  )
  pa.add_argument("--num-clients", type=int, metavar="N", help="clients to create (--partition)")
  pa.add_argument(
    "--label-key",
    metavar="FEATURE",
    help="feature holding each example's label: one integer or string (dirichlet, shard)",
  )
  pa.add_argument(
    "--partition-seed",
    type=int,
    default=0,
    metavar="S",
    help="seed of the partitioner's random choices (default 0)",
  )
  pa.add_argument(
    "--dirichlet-alpha",
    type=float,
    metavar="A",
    help="dirichlet: concentration; small values give clients few labels",
  )
  pa.add_argument(
    "--min-client-examples",
    type=int,
    default=10,
    metavar="M",
    help="dirichlet: redraw (up to 10 times) until every client has M examples "
    "(default 10, as Flower's min_partition_size)",
  )
  pa.add_argument(
    "--self-balancing",
    action="store_true",
    help="dirichlet: a client above the average size gets no more examples",
  )
  pa.add_argument(
    "--shards-per-client", type=int, metavar="S", help="shard: shards each client gets"
  )
  pa.add_argument(
    "--shard-size",
    type=int,
    metavar="K",
    help="shard: examples per shard (default: examples // (N * S)); examples "
    "outside the chosen shards are dropped",
  )
  g = p.add_argument_group("pseudo-client expansion (TransformingClientData semantics)")
  g.add_argument(
    "--num-transformed-clients",
    type=int,
    metavar="N",
    help="expand the raw clients into N clients named '{raw_id}_{index}'",
  )
  g.add_argument(
    "--transform",
    metavar="MODULE:FUNCTION",
    help="make_transform_fn(raw_client_id, index) -> fn or None, e.g. "
    "fedbeam.transforms:random_affine (default with N: identity)",
  )
  g.add_argument(
    "--empty-clients",
    choices=["keep", "drop", "fail"],
    default="keep",
    help="what to do with clients that have no example (default keep; never in the test split)",
  )
  s = p.add_argument_group("train/test client split (train_test_client_split semantics)")
  s.add_argument("--num-test-clients", type=int, metavar="K", help="number of test clients")
  s.add_argument(
    "--test-fraction",
    type=float,
    metavar="F",
    help="fraction of clients in the test split (instead of K)",
  )
  s.add_argument("--split-seed", type=int, default=0, metavar="S", help="default 0")
  s.add_argument(
    "--split-method",
    choices=["hash", "tff"],
    default="hash",
    help="hash: scalable seeded ranking (default); tff: exactly TFF 0.87's choice",
  )
  s.add_argument(
    "--split-by",
    choices=["client", "raw"],
    default=None,
    help="raw (default with expansion): all pseudo-clients of a raw client land "
    "on the same side; client: pseudo-clients are split one by one, so test "
    "clients then share raw data with train (default without expansion, "
    "where the two are the same)",
  )
  s.add_argument(
    "--min-test-examples",
    type=int,
    default=1,
    metavar="M",
    help="test clients hold at least M examples (default 1)",
  )


@contextlib.contextmanager
def _current_directory_importable(transform: Optional[str]) -> Iterator[None]:
  """During the run, a `--transform` module in the current directory can be imported.

  `python -m` puts the current directory on `sys.path`, the `fedbeam` script
  does not; Beam's local worker processes start with `python -m`, so they
  find the module too. `sys.path` is restored afterwards.
  """
  cwd = os.getcwd()
  added = transform is not None and not ({cwd, ""} & set(sys.path))
  if added:
    sys.path.insert(0, cwd)
  try:
    yield
  finally:
    if added and cwd in sys.path:
      sys.path.remove(cwd)


def _print_progress(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _run_prepare(args, beam_args) -> int:
  from fedbeam.format.spec import ElementSpec, ElementSpecError  # pylint: disable=g-import-not-at-top
  from fedbeam.pipelines.prepare import PrepareConfig, PrepareError, run_prepare  # pylint: disable=g-import-not-at-top

  error = _check_beam_args(beam_args)
  if error:
    print(f"fedbeam prepare: error: {error}", file=sys.stderr)
    return 2
  try:
    spec = ElementSpec.from_json_file(args.element_spec) if args.element_spec else None
  except ElementSpecError as e:
    print(f"fedbeam prepare: error: --element-spec: {e}", file=sys.stderr)
    return 2
  partition = None
  if args.partition is not None:
    from fedbeam.pipelines.partition import PartitionConfig  # pylint: disable=g-import-not-at-top

    partition = PartitionConfig(
      method=args.partition,
      num_clients=args.num_clients,
      label_key=args.label_key,
      seed=args.partition_seed,
      alpha=args.dirichlet_alpha,
      min_client_examples=args.min_client_examples,
      self_balancing=args.self_balancing,
      shards_per_client=args.shards_per_client,
      shard_size=args.shard_size,
    )
  else:
    used = [
      flag
      for flag, value in (
        ("--num-clients", args.num_clients),
        ("--label-key", args.label_key),
        ("--dirichlet-alpha", args.dirichlet_alpha),
        ("--shards-per-client", args.shards_per_client),
        ("--shard-size", args.shard_size),
      )
      if value is not None
    ]
    used += [
      flag
      for flag, on in (
        ("--self-balancing", args.self_balancing),
        ("--partition-seed", args.partition_seed != 0),
        ("--min-client-examples", args.min_client_examples != 10),
      )
      if on
    ]
    if used:
      print(f"fedbeam prepare: error: {', '.join(used)} need --partition", file=sys.stderr)
      return 2
  if args.input_format not in ("tff-sqlite", "leaf") and not args.client_id_key and not partition:
    # A flag missing for the chosen format is bad usage, like a missing required flag.
    print(
      f"fedbeam prepare: error: --client-id-key is required with --input-format "
      f"{args.input_format} (or --partition, for input without client ids)",
      file=sys.stderr,
    )
    return 2
  config = PrepareConfig(
    input=args.input,
    input_format=args.input_format,
    output=args.output,
    client_id_key=args.client_id_key,
    element_spec=spec,
    element_spec_path=args.element_spec,
    order_by=args.order_by,
    num_shards=args.num_shards,
    overwrite=args.overwrite,
    sqlite_split=args.sqlite_split,
    keep_sqlite_splits=args.keep_sqlite_splits,
    partition=partition,
    num_transformed_clients=args.num_transformed_clients,
    transform=args.transform,
    empty_clients=args.empty_clients,
    num_test_clients=args.num_test_clients,
    test_fraction=args.test_fraction,
    split_seed=args.split_seed,
    split_method=args.split_method,
    split_by=args.split_by,
    min_test_examples=args.min_test_examples,
    fsync=args.fsync,
  )
  try:
    with _current_directory_importable(args.transform):
      result = run_prepare(config, beam_args, report=_print_progress)
  except PrepareError as e:
    print(f"fedbeam prepare: error: {e}", file=sys.stderr)
    if e.committed:
      print(
        f"fedbeam prepare: the store at {args.output} was committed and is valid; only the "
        "clean-up after the commit failed",
        file=sys.stderr,
      )
    else:
      print("fedbeam prepare: no store was committed", file=sys.stderr)
    return 1
  print(result.summary())
  return 0


def _run_inspect(args) -> int:
  from fedbeam.format.layout import StoreFormatError  # pylint: disable=g-import-not-at-top
  from fedbeam.store_summary import format_summary, summarize_store  # pylint: disable=g-import-not-at-top

  try:
    summary = summarize_store(args.store)
  except StoreFormatError as e:
    print(f"fedbeam inspect: error: {e}", file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(summary, indent=2, ensure_ascii=False))
  else:
    print(format_summary(summary))
  if args.plot:
    from fedbeam.format.manifest import read_manifest  # pylint: disable=g-import-not-at-top
    from fedbeam.format.metadata import read_metadata  # pylint: disable=g-import-not-at-top
    from fedbeam.plots import plot_client_sizes  # pylint: disable=g-import-not-at-top

    try:
      sizes: dict[str, list[int]] = {}
      for row in read_manifest(args.store, read_metadata(args.store)):
        sizes.setdefault(row["split"], []).append(int(row["num_examples"]))
      plot_client_sizes(sizes, args.plot, title=f"Client sizes of {args.store}")
    except (StoreFormatError, ValueError, OSError) as e:
      print(f"fedbeam inspect: error: --plot {args.plot}: {e}", file=sys.stderr)
      return 1
    print(f"client-size histogram: {args.plot}", file=sys.stderr if args.json else sys.stdout)
    if args.label_feature:
      return _plot_labels(args)
  elif args.label_feature:
    print("fedbeam inspect: error: --label-feature needs --plot FILE.png", file=sys.stderr)
    return 2
  return 0


def label_plot_path(plot: str) -> str:
  """Where `--label-feature` writes its figure: FILE-labels.png beside `--plot FILE.png`."""
  stem = plot[: -len(".png")] if plot.lower().endswith(".png") else plot
  return f"{stem}-labels.png"


def _plot_labels(args) -> int:
  from fedbeam.format.layout import StoreFormatError  # pylint: disable=g-import-not-at-top
  from fedbeam.label_distribution import read_label_distribution  # pylint: disable=g-import-not-at-top
  from fedbeam.plots import plot_label_distribution  # pylint: disable=g-import-not-at-top

  path = label_plot_path(args.plot)
  try:
    distribution = read_label_distribution(args.store, args.label_feature, args.plot_clients)
    plot_label_distribution(distribution, path)
  except ValueError as e:  # StoreFormatError is one
    code = 1 if isinstance(e, StoreFormatError) else 2
    print(f"fedbeam inspect: error: {e}", file=sys.stderr)
    return code
  except OSError as e:
    print(f"fedbeam inspect: error: {path}: {e}", file=sys.stderr)
    return 1
  out = sys.stderr if args.json else sys.stdout
  n = len(distribution.client_ids)
  print(
    f"label distribution of the first {n} clients: {path}; mean per-client entropy of "
    f"{args.label_feature!r} {distribution.mean_client_entropy:.3f} bits, their pooled labels "
    f"{distribution.pooled_entropy:.3f} bits ({len(distribution.labels)} labels)",
    file=out,
  )
  return 0


def _run_validate(args) -> int:
  from fedbeam.store_validation import validate_store  # pylint: disable=g-import-not-at-top

  report = validate_store(args.store, deep=args.deep)
  for note in report.notes:
    print(f"  note: {note}")
  if report.ok:
    print(report.summary())
    return 0
  for problem in report.problems:
    print(f"  {problem}")
  print(report.summary(), file=sys.stderr)
  return 1


# What `fedbeam train` imports beyond the core install: the `tff` (or `tff-deps`) extra.
_TRAINING_MODULES = (
  ("tensorflow_federated", "tensorflow-federated"),
  ("psutil", "psutil"),
  ("tqdm", "tqdm"),
)


def _missing_training_packages() -> list[str]:
  """The packages of `_TRAINING_MODULES` that cannot be imported (found without importing)."""
  missing = []
  for module, package in _TRAINING_MODULES:
    try:
      found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
      found = False
    if not found:
      missing.append(package)
  return missing


def _run_train(args) -> int:
  missing = _missing_training_packages()
  if missing:
    print(
      f"fedbeam train: error: training needs {', '.join(missing)}, which this Python "
      "does not have: install fedbeam[tff] (with uv and the jax override), or "
      "fedbeam[tff-deps] and then `pip install --no-deps tensorflow-federated==0.87.0` "
      "(README: Installing)",
      file=sys.stderr,
    )
    return 1
  from fedbeam.runtime import train as train_module  # pylint: disable=g-import-not-at-top

  return train_module.run_train(args)


def build_parser() -> argparse.ArgumentParser:
  # No abbreviations: `--num-test-client 10` must not quietly mean `--num-test-clients`.
  parser = argparse.ArgumentParser(
    prog="fedbeam",
    allow_abbrev=False,
    description="Prepare federated client datasets with Apache Beam and train on them.",
  )
  parser.add_argument("--verbose", action="store_true", help="log at INFO level")
  sub = parser.add_subparsers(dest="command", required=True)
  prepare = sub.add_parser(
    "prepare",
    allow_abbrev=False,
    help="input files -> a store of one TFRecord file per client",
    description="Runs the prepare pipeline. Unknown --flags go to Beam as pipeline options.",
  )
  _add_prepare_arguments(prepare)
  inspect = sub.add_parser("inspect", allow_abbrev=False, help="summarize a store")
  inspect.add_argument("store", help="store directory (local or gs://)")
  inspect.add_argument("--json", action="store_true", help="print one JSON object")
  inspect.add_argument(
    "--plot",
    metavar="FILE.png",
    help="also write a histogram of examples per client, per split "
    "(log count axis), to this PNG file",
  )
  inspect.add_argument(
    "--label-feature",
    metavar="NAME",
    help="with --plot FILE.png: also write FILE-labels.png, each client's examples by the "
    "values of this feature (a stacked bar per client), and print the mean per-client label "
    "entropy next to that of the same clients' pooled labels",
  )
  inspect.add_argument(
    "--plot-clients",
    metavar="N",
    type=int,
    default=30,
    help="clients --label-feature reads and plots, the first N by id (default 30)",
  )
  validate = sub.add_parser(
    "validate",
    allow_abbrev=False,
    help="check that a store's metadata, manifest and client files agree",
  )
  validate.add_argument("store", help="store directory (local or gs://)")
  validate.add_argument(
    "--deep", action="store_true", help="also parse every record against the element spec"
  )
  try:
    from fedbeam.runtime import train as train_module  # pylint: disable=g-import-not-at-top
  except ImportError:
    train_module = None
  if train_module is not None and hasattr(train_module, "add_train_arguments"):
    train = sub.add_parser("train", allow_abbrev=False, help="federated training over a store")
    train_module.add_train_arguments(train)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  # TensorFlow's C++ start-up chatter (CUDA plugin registration on a CPU-only
  # machine) would bury the job's own messages; errors still raise in Python.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if args.command != "prepare" and extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  with CommandLogging(args.verbose, keep_file=args.command == "prepare") as log:
    if args.command == "prepare":
      code = _run_prepare(args, extra)
    elif args.command == "inspect":
      code = _run_inspect(args)
    elif args.command == "validate":
      code = _run_validate(args)
    else:
      code = _run_train(args)
    if code != 0 and log.deferred:
      # fedbeam's own error is printed; Beam's traceback comes after it, or
      # stays in the log file.
      if args.verbose:
        log.show_deferred()
      else:
        where = f"is in {log.path}" if log.path else "is hidden"
        print(
          f"fedbeam {args.command}: Beam's log of the failure, with its traceback, {where} "
          "(rerun with fedbeam --verbose to see it here)",
          file=sys.stderr,
        )
    return code


if __name__ == "__main__":
  sys.exit(main())
