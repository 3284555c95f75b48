"""The prepare job: input files -> committed store.

`PrepareStore` is the composite transform (read -> element spec -> group by
client -> optional pseudo-client expansion -> empty-client check -> optional
train/test split -> write); `PrepareStore(config)` can be applied in any
`beam.Pipeline`. `run_prepare` prepares the output directory, claims a data
directory, runs the pipeline on the chosen runner (the local FnApiRunner
unless `--runner` says otherwise, then inside `local_runner_scope()`) and
returns a summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineRunner, create_runner

import fedbeam
from fedbeam.format import fs
from fedbeam.format.layout import (
  DATA_DIR_PREFIX,
  METADATA_FILE,
  UNSPLIT,
  StoreFormatError,
  check_split_name,
)
from fedbeam.format.metadata import metadata_path, read_metadata
from fedbeam.format.spec import ElementSpec, ElementSpecError
from fedbeam.pipelines import sources
from fedbeam.pipelines.checks import EMPTY_POLICIES, CheckEmptyClients
from fedbeam.pipelines.data_dir_lease import claim_data_dir
from fedbeam.pipelines.example_records import input_size
from fedbeam.pipelines.expansion import (
  ExpandPseudoClients,
  ExpansionError,
  MakeTransformFn,
  PlanPseudoClients,
  PseudoClientSizes,
  load_transform,
)
from fedbeam.pipelines.grouping import GroupByClient, check_order_by
from fedbeam.pipelines.local_runner import BeamInternalsError, local_runner_scope
from fedbeam.pipelines.partition import PartitionClients, PartitionConfig, PartitionError
from fedbeam.pipelines.progress import (
  EXAMPLES_READ,
  CountProgress,
  ProgressChannel,
  ProgressMonitor,
)
from fedbeam.pipelines.records import ClientRecords, InputError
from fedbeam.pipelines.spec_inference import InferElementSpec
from fedbeam.pipelines.split import SplitConfig, SplitError, SplitTrainTest
from fedbeam.pipelines.store_writer import (
  REPLACES_ANY,
  RUNNER_FAULT,
  StoreStatsFn,
  StoreWriteError,
  WriteStore,
)
from fedbeam.pipelines.transform_check import check_transform_on_first_record, first_input_record
from fedbeam.transforms import identity

__all__ = [
  "PrepareConfig",
  "PrepareError",
  "PrepareResult",
  "PrepareStore",
  "RecordCountMismatchError",
  "default_runner_options",
  "explain_pipeline_error",
  "job_key",
  "match_inputs",
  "prepare_output_dir",
  "run_prepare",
  "runs_on_local_runner",
]


class PrepareError(ValueError):
  """A prepare job that cannot run or failed; the message says what and where.

  `committed` is True when the job's store was committed before the failure
  (only the clean-up after the commit failed): the store is valid.
  """

  def __init__(self, message: str, committed: bool = False):
    super().__init__(message)
    self.committed = committed


@dataclasses.dataclass
class PrepareConfig:
  """What a prepare job reads, does and writes (the `fedbeam prepare` flags)."""

  input: str
  input_format: str
  output: str
  client_id_key: Optional[str] = None
  element_spec: Optional[ElementSpec] = None
  element_spec_path: Optional[str] = None
  order_by: Optional[str] = None
  num_shards: Optional[int] = None
  overwrite: bool = False
  # TFF SQLite: the split_name(s) to read (one name or several); with
  # keep_sqlite_splits, each becomes a store split of that name.
  sqlite_split: Optional[Union[str, Sequence[str]]] = None
  keep_sqlite_splits: bool = False
  # Input without a client id: the partitioner that assigns examples to clients.
  partition: Optional[PartitionConfig] = None
  # Pseudo-client expansion: a make_transform_fn or its 'module:function'.
  num_transformed_clients: Optional[int] = None
  transform: Optional[Union[str, MakeTransformFn]] = None
  empty_clients: str = "keep"
  # Train/test split: exactly one of num_test_clients and test_fraction.
  num_test_clients: Optional[int] = None
  test_fraction: Optional[float] = None
  split_seed: int = 0
  split_method: str = "hash"
  # None: "raw" with expansion (no raw client on both sides), else "client".
  split_by: Optional[str] = None
  min_test_examples: int = 1
  # fsync client files, manifest files and their directories before the
  # commit (local disks). Not a parameter of the store: it changes no byte.
  fsync: bool = True

  @property
  def expands(self) -> bool:
    return self.transform is not None or self.num_transformed_clients is not None

  @property
  def splits(self) -> bool:
    return self.num_test_clients is not None or self.test_fraction is not None

  @property
  def effective_split_by(self) -> str:
    """`split_by`, or its default: "raw" with expansion, so no raw client is on both sides."""
    if self.split_by is not None:
      return self.split_by
    return "raw" if self.expands else "client"

  def split_config(self) -> SplitConfig:
    return SplitConfig(
      num_test_clients=self.num_test_clients,
      test_fraction=self.test_fraction,
      seed=self.split_seed,
      method=self.split_method,
      split_by=self.effective_split_by,
      min_test_examples=self.min_test_examples,
    )

  def transform_name(self) -> Optional[str]:
    if self.transform is None:
      return "fedbeam.transforms:identity" if self.expands else None
    if isinstance(self.transform, str):
      return self.transform
    module = getattr(self.transform, "__module__", None) or "?"
    name = getattr(self.transform, "__qualname__", None) or type(self.transform).__qualname__
    return f"{module}:{name}"

  def parameters(self) -> dict[str, Any]:
    """The parameters recorded in the store's metadata (JSON scalars only).

    A partitioner's parameters appear only when one is used, so stores of
    keyed input keep the metadata they had.
    """
    out = {
      "input": self.input,
      "input_format": self.input_format,
      "client_id_key": self.client_id_key,
      "element_spec": self.element_spec_path,
      "order_by": self.order_by,
      "num_shards": self.num_shards,
      "sqlite_split": (
        self.sqlite_split
        if self.sqlite_split is None or isinstance(self.sqlite_split, str)
        else ",".join(self.sqlite_split)
      ),
      "num_transformed_clients": self.num_transformed_clients,
      "transform": self.transform_name(),
      "empty_clients": self.empty_clients,
      "num_test_clients": self.num_test_clients,
      "test_fraction": self.test_fraction,
      "split_seed": self.split_seed if self.splits else None,
      "split_method": self.split_method if self.splits else None,
      "split_by": self.effective_split_by if self.splits else None,
      "min_test_examples": self.min_test_examples if self.splits else None,
    }
    if self.partition is not None:
      out.update(self.partition.parameters())
    if self.keep_sqlite_splits:
      out["keep_sqlite_splits"] = True
    return out

  def validate(self) -> None:
    if self.input_format not in sources.INPUT_FORMATS:
      raise PrepareError(
        f"--input-format {self.input_format!r}: use one of {list(sources.INPUT_FORMATS)}"
      )
    if self.partition is not None:
      if self.client_id_key:
        raise PrepareError(
          "--partition and --client-id-key exclude each other: the client id "
          "key is the natural partition"
        )
      if self.input_format not in ("tfrecord", "avro"):
        raise PrepareError(
          f"--partition needs input without client ids (tfrecord or avro), "
          f"not --input-format {self.input_format}"
        )
      try:
        self.partition.validate()
      except PartitionError as e:
        raise PrepareError(str(e)) from None
      if self.element_spec is not None and self.partition.label_key is not None:
        if self.partition.label_key not in self.element_spec:
          raise PrepareError(
            f"--label-key {self.partition.label_key!r} is not a feature of "
            f"--element-spec (features: {self.element_spec.names})"
          )
    elif sources.needs_client_id_key(self.input_format) and not self.client_id_key:
      raise PrepareError(
        f"--client-id-key is required with --input-format {self.input_format} "
        "(or --partition, for input without client ids)"
      )
    if self.input_format == "leaf" and self.client_id_key:
      raise PrepareError(
        "--client-id-key does not apply to --input-format leaf: the clients are the files' users"
      )
    names = sources.sqlite_split_names(self.sqlite_split)
    if names is not None and self.input_format != "tff-sqlite":
      raise PrepareError("--sqlite-split needs --input-format tff-sqlite")
    if names is not None and (not names or len(set(names)) != len(names)):
      raise PrepareError(f"--sqlite-split names each split once, got {list(names)}")
    if self.keep_sqlite_splits:
      if self.input_format != "tff-sqlite":
        raise PrepareError("--keep-sqlite-splits needs --input-format tff-sqlite")
      if self.splits:
        raise PrepareError(
          "--keep-sqlite-splits keeps TFF's splits; it excludes "
          "--num-test-clients and --test-fraction"
        )
      if self.expands:
        raise PrepareError(
          "--keep-sqlite-splits does not combine with pseudo-client expansion "
          "yet; expand one split at a time (--sqlite-split NAME)"
        )
      for name in names or ():
        try:
          check_split_name(name, f"--sqlite-split {name!r}")
        except StoreFormatError as e:
          raise PrepareError(
            f"{e}; with --keep-sqlite-splits a TFF split becomes a store split of that name"
          ) from None
    if self.num_shards is not None and self.num_shards < 1:
      raise PrepareError(f"--num-shards must be >= 1, got {self.num_shards}")
    if self.element_spec is not None and self.client_id_key in self.element_spec:
      raise PrepareError(
        f"--element-spec lists the client-id feature {self.client_id_key!r}; "
        "the id is not part of the elements"
      )
    if self.element_spec is not None:
      try:
        check_order_by(self.order_by, self.element_spec)
      except InputError as e:
        raise PrepareError(str(e)) from None
    if self.num_transformed_clients is not None and self.num_transformed_clients <= 0:
      raise PrepareError(
        f"--num-transformed-clients must be positive, got {self.num_transformed_clients}"
      )
    if isinstance(self.transform, str):
      try:
        load_transform(self.transform)
      except ExpansionError as e:
        raise PrepareError(str(e)) from None
    elif self.transform is not None and not callable(self.transform):
      raise PrepareError(f"transform must be callable or 'module:function', got {self.transform!r}")
    if self.empty_clients not in EMPTY_POLICIES:
      raise PrepareError(
        f"--empty-clients {self.empty_clients!r}: use one of {list(EMPTY_POLICIES)}"
      )
    if self.splits:
      try:
        self.split_config()
      except SplitError as e:
        raise PrepareError(str(e)) from None
    elif (self.split_method, self.split_by or "client", self.min_test_examples) != (
      "hash",
      "client",
      1,
    ):
      raise PrepareError(
        "--split-method, --split-by and --min-test-examples need "
        "--num-test-clients or --test-fraction"
      )


class PrepareStore(beam.PTransform):
  """The whole prepare job as one transform: the config's input files -> a committed store.

  In: the pipeline root (`pipeline | "Prepare" >> PrepareStore(config)`).
  Out: a singleton PCollection holding the committed store's metadata dict
  (what `metadata.json` says). The store is committed when the pipeline has
  run; the files are the same bytes whatever pipeline and runner it runs in.

  With only a config, `expand` validates it, matches `config.input`, refuses
  an output that holds input files or files that are not a store's, and
  derives the job key (`job_key`) itself; the store's data directory is the
  one the key names. `run_prepare` also claims that directory with a lease
  and removes a failed job's partial files; a pipeline of your own that
  fails leaves them to the next job that commits at the output. Nothing in
  this process or its workers is changed by building or running it (on
  Beam's local FnApiRunner with worker processes or threads, enter
  `fedbeam.pipelines.local_runner_scope()` around the run, as `run_prepare`
  does, against Beam 2.72's data-plane race).

  Args:
    config: What to read, do and write.
    paths, job_key: The matched input files and the job key, for callers
      that computed them (`run_prepare`); by default derived from `config`.
    data_dir, replaces: From `data_dir_lease.claim_data_dir` (see `WriteStore`).
    progress: A local `ProgressChannel` counting the examples read and the
      client files written while the job runs (local runners only).
    fault_steps: For fault-injection tests only (`run_prepare` never sets it):
      PTransforms inserted into the pipeline, under "encoded" on the
      encoder's output (see `GroupByClient`'s `after_encode`) and under
      "clients" on the clients after grouping and expansion, before the
      empty-client check. A step there that loses or duplicates data must
      fail the job.

  Raises (from `expand`, when the pipeline is built):
    PrepareError: a bad config, no input file, or an unusable output; the
      message names the flag or path.
  """

  def __init__(
    self,
    config: PrepareConfig,
    paths: Optional[Sequence[str]] = None,
    job_key: Optional[str] = None,
    data_dir: Optional[str] = None,
    replaces: Optional[str] = REPLACES_ANY,
    fault_steps: Optional[Mapping[str, beam.PTransform]] = None,
    progress: Optional[ProgressChannel] = None,
  ):
    super().__init__()
    self._config = config
    self._paths = None if paths is None else list(paths)
    self._job_key = job_key
    self._data_dir = data_dir
    self._replaces = replaces
    self._fault_steps = dict(fault_steps or {})
    self._progress = progress

  def _resolved(self) -> tuple[list[str], str]:
    """The input paths and the job key, derived from the config where not given."""
    if self._paths is not None and self._job_key is not None:
      return self._paths, self._job_key
    self._config.validate()
    inputs = match_inputs(self._config)
    paths = [path for path, _, _ in inputs] if self._paths is None else self._paths
    _check_output_is_not_input(self._config.output, paths)
    prepare_output_dir(self._config.output, self._config.overwrite, create=False)
    try:
      key = self._job_key or job_key(self._config, inputs)
    except ExpansionError as e:
      raise PrepareError(str(e)) from None
    return paths, key

  def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[dict[str, Any]]:
    c = self._config
    paths, key = self._resolved()
    faults = self._fault_steps
    inputs = pbegin | "Read" >> sources.ReadClientInput(
      paths,
      c.input_format,
      c.client_id_key,
      c.sqlite_split,
      unkeyed=c.partition is not None,
      keep_sqlite_splits=c.keep_sqlite_splits,
    )
    # Records are counted where they are read, by a step of their own, so no
    # fault of a later step (or of the runner around it) can change both this
    # figure and the ones it is checked against.
    num_read = (
      inputs["records"]
      | "CountRead" >> beam.Map(input_size)
      | "SumRead" >> beam.CombineGlobally(sum)
    )
    if self._progress is not None:
      _ = inputs["records"] | "ReportRead" >> beam.ParDo(
        CountProgress(self._progress, EXAMPLES_READ, input_size)
      )
    if c.element_spec is not None:
      spec = pbegin | "ElementSpec" >> beam.Create([c.element_spec])
    else:
      spec = inputs["records"] | "InferElementSpec" >> InferElementSpec()
    declares = sources.declares_clients(c.input_format)
    if c.partition is not None:
      # Every client the partitioner plans is declared, so one that got no
      # example is still a client (under --empty-clients); the records it
      # drops (shard) are subtracted from those read, which is what every
      # later figure is checked against.
      parted = inputs["records"] | "Partition" >> PartitionClients(c.partition)
      inputs = {"records": parted["records"], "clients": parted["clients"]}
      declares = True
      num_read = num_read | "LessDropped" >> beam.Map(
        lambda read, dropped: read - dropped, beam.pvalue.AsSingleton(parted["dropped"])
      )
    grouped = inputs | "GroupByClient" >> GroupByClient(
      spec, c.order_by, declared_clients=declares, after_encode=faults.get("encoded")
    )
    clients, record_counts = grouped["clients"], grouped["record_counts"]
    # What the steps after grouping need as side inputs (expansion counts, the
    # planned number of clients, the split) comes from ids and sizes alone, so
    # the grouped examples flow through expansion and writing in one pass.
    # The sizes are counted from the encoder's output, before the shuffle.
    if declares:
      declared = inputs["clients"] | "DeclaredIds" >> beam.Map(lambda cid: (cid, 0))
      record_counts = (record_counts, declared) | "MergeIds" >> beam.Flatten()
    raw_sizes = record_counts | "RawClientSizes" >> beam.CombinePerKey(sum)
    declared_rows = (
      sources.sqlite_row_count(paths[0], c.sqlite_split) if c.input_format == "tff-sqlite" else None
    )
    raw_ids = raw_sizes | "RawIds" >> beam.Keys()
    num_raw = None
    if c.expands:
      plan = raw_ids | "PlanPseudoClients" >> PlanPseudoClients(c.num_transformed_clients)
      num_raw = plan["num_raw"]
      clients = clients | "ExpandPseudoClients" >> ExpandPseudoClients(
        c.transform if c.transform is not None else identity,
        c.num_transformed_clients,
        spec,
        plan=plan,
      )
      n = c.num_transformed_clients
      planned_clients = plan["num_raw"] | "ExpandedCount" >> beam.Map(
        lambda raw: raw if n is None else max(n, raw)
      )
      sizes = raw_sizes | "PseudoClientSizes" >> PseudoClientSizes(
        c.num_transformed_clients, plan=plan
      )
    else:
      planned_clients = (
        raw_ids
        | "CountRawClients"
        >> beam.CombineGlobally(beam.combiners.CountCombineFn()).without_defaults()
      )
      sizes = raw_sizes | "UnexpandedSizes" >> beam.MapTuple(lambda cid, num: (cid, cid, num))
    accounted = _account_for_every_record(
      num_read, raw_sizes, grouped["clients"], declared_rows, num_raw
    )
    if "clients" in faults:
      clients = clients | "AfterExpansion" >> faults["clients"]
    if c.keep_sqlite_splits:
      # Grouped by (TFF split, id); from here on a client is its id in that split.
      clients = clients | "KeepSqliteSplits" >> beam.Map(_in_kept_split)
    checked = clients | "CheckEmptyClients" >> CheckEmptyClients(c.empty_clients)
    clients, reports = checked["clients"], [accounted]
    if c.partition is not None:
      # num_input_records (from `accounted`) counts the records kept.
      reports.append(
        parted["dropped"]
        | "DroppedReport" >> beam.Map(lambda dropped: {"partition_dropped_examples": dropped})
      )
    if c.empty_clients == "drop":
      sizes = sizes | "DropEmptySizes" >> beam.Filter(lambda size: size[2] > 0)
    if c.splits:
      # The split is chosen from the sizes the clients will have, so the
      # clients flow straight from expansion to the writer.
      split = clients | "SplitTrainTest" >> SplitTrainTest(c.split_config(), sizes=sizes)
      clients, planned = split["clients"], split["planned"]
      reports.append(split["report"])
    elif c.keep_sqlite_splits:
      planned = sizes | "KeptSplits" >> beam.MapTuple(
        lambda key, _, num: sources.kept_split_client(key)[::-1] + (num,)
      )
    else:
      planned = sizes | "Unsplit" >> beam.MapTuple(lambda cid, _, num: (cid, UNSPLIT, num))
    # What each split should hold, from the planned sizes alone; the commit
    # checks it against the manifest rows the writer produced.
    planned_splits = (
      planned
      | "PlannedRows"
      >> beam.MapTuple(
        lambda cid, name, num: {
          "client_id": cid,
          "split": name,
          "num_examples": num,
          "num_bytes": 0,
        }
      )
      | "PlannedSplits" >> beam.CombineGlobally(StoreStatsFn()).without_defaults()
    )
    return clients | "WriteStore" >> WriteStore(
      c.output,
      spec,
      num_shards=c.num_shards,
      parameters=c.parameters(),
      job_key=key,
      empty_report=checked["report"],
      empty_policy=c.empty_clients,
      reports=reports,
      overwrite=c.overwrite,
      planned_clients=planned_clients,
      planned_splits=planned_splits,
      input_records=num_read,
      data_dir=self._data_dir,
      replaces=self._replaces,
      fsync=c.fsync,
      progress=self._progress,
    )


def _in_kept_split(client: ClientRecords) -> ClientRecords:
  """A client grouped under `sources.kept_split_key` as its own id in that split."""
  split, client_id = sources.kept_split_client(client.client_id)
  return ClientRecords(client_id=client_id, records=client.records, split=split)


class RecordCountMismatchError(RuntimeError):
  """Records went missing between reading and grouping (a runner fault)."""


def _check_counts(
  num_read: int,
  num_counted: int,
  num_grouped: int,
  declared_rows: Optional[int],
  num_raw: Optional[int] = None,
) -> dict[str, int]:
  if declared_rows is not None and num_read != declared_rows:
    raise RecordCountMismatchError(
      f"the input database declares {declared_rows} example rows but {num_read} were read; "
      + RUNNER_FAULT
    )
  if num_read != num_grouped:
    raise RecordCountMismatchError(
      f"read {num_read} input records but grouped {num_grouped}; " + RUNNER_FAULT
    )
  if num_read != num_counted:
    raise RecordCountMismatchError(
      f"read {num_read} input records but the client sizes add up to {num_counted}; " + RUNNER_FAULT
    )
  if num_raw == 0:
    raise ExpansionError("the input has no client to expand")
  return {"num_input_records": num_read}


def _account_for_every_record(
  num_read, raw_sizes, clients, declared_rows: Optional[int] = None, num_raw=None
):
  """Singleton report {num_input_records}; fails the job if a step lost or duplicated records.

  Three figures from three different steps must agree: `num_read`
  (singleton: the records the readers output, counted by a step of its own),
  the sum of `raw_sizes` ((raw client id, size) counted from the encoder's
  output, which plans expansion, the split and the commit's checks) and the
  records in the grouped `clients`; `declared_rows`, when the input declares
  its size (TFF SQLite's examples table), is a fourth. The commit waits for
  the report, so a store is never committed with fewer examples than were
  read, whatever the runner did. `num_raw`, with expansion: singleton count
  of raw clients; none fails the job (after the checks above, so a runner
  fault is named as such).
  """
  # Without defaults (an empty sum is the side input's default, 0), so the
  # runner has no extra stage per figure; `num_read` keeps its default because
  # it is the main input that makes the check run at all.
  num_counted = (
    raw_sizes
    | "PlannedCounts" >> beam.Values()
    | "SumPlanned" >> beam.CombineGlobally(sum).without_defaults()
  )
  num_grouped = (
    clients
    | "ClientSizes" >> beam.Map(lambda c: len(c.records))
    | "CountGrouped" >> beam.CombineGlobally(sum).without_defaults()
  )
  extra = [] if num_raw is None else [beam.pvalue.AsSingleton(num_raw)]
  return num_read | "CheckRecordCounts" >> beam.Map(
    _check_counts,
    beam.pvalue.AsSingleton(num_counted, default_value=0),
    beam.pvalue.AsSingleton(num_grouped, default_value=0),
    declared_rows,
    *extra,
  )


def prepare_output_dir(output: str, overwrite: bool, create: bool = True) -> None:
  """Checks that `output` may receive a new store and creates it (unless `create` is False).

  A committed store is replaced only with `overwrite`, and only when the new
  one commits: until then the old metadata and data stay valid. Other data
  directories (an interrupted fedbeam write, a job still running) are fine;
  a job that commits removes the dead ones. Any other non-empty directory is
  refused.

  Raises:
    PrepareError: the path holds a store and `overwrite` is False, or holds
      files that are not fedbeam's, or cannot be created.
  """
  try:
    if fs.exists(metadata_path(output)):
      if not overwrite:
        raise PrepareError(
          f"--output {output} already holds a committed fedbeam store; "
          "pass --overwrite to replace it"
        )
      return
    if fs.exists(output):
      if not fs.isdir(output):
        raise PrepareError(f"--output {output} is a file, not a directory")
      foreign = sorted(
        n
        for n in fs.list_dir(output)
        if not n.startswith(DATA_DIR_PREFIX) and not n.startswith(f".{METADATA_FILE}.tmp-")
      )
      if foreign:
        raise PrepareError(
          f"--output {output} is not empty and holds no fedbeam store (it holds {foreign[0]!r}"
          f"{' and more' if len(foreign) > 1 else ''}); pick an empty or new directory"
        )
    elif create:
      fs.makedirs(output)
  except PrepareError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise PrepareError(f"--output {output}: cannot prepare the directory: {e}") from None


def _transform_code_digest(transform: Optional[Union[str, MakeTransformFn]]) -> Optional[str]:
  """SHA-256 of the source file defining the transform, or None (none, or no file to read).

  Cheap (one file read) and enough to tell an edited transform from the one
  that wrote a store; code the file imports is not covered.
  """
  if transform is None:
    return None
  fn = load_transform(transform) if isinstance(transform, str) else transform
  try:
    path = inspect.getsourcefile(fn) or inspect.getfile(fn)
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  except (TypeError, OSError):
    return None


def job_key(config: PrepareConfig, inputs: Sequence[tuple[str, int, float]]) -> str:
  """A stable key for this job: inputs (with sizes and times), parameters, code versions.

  Covers the fedbeam version and the transform's source file, so an upgrade
  or an edited transform is a different job. Names the job's data directory
  when the output holds no committed store (`data_dir_lease.claim_data_dir`),
  so a rerun over an interrupted run's leftovers writes byte-identical files
  to the same paths, and seeds the Avro sync markers of every attempt.

  Raises:
    ExpansionError: a `module:function` transform cannot be loaded.
  """
  payload = json.dumps(
    {
      "inputs": [list(i) for i in inputs],
      "parameters": config.parameters(),
      "spec": config.element_spec.to_json() if config.element_spec else None,
      "fedbeam": fedbeam.__version__,
      "transform_code": _transform_code_digest(config.transform),
    },
    sort_keys=True,
  )
  return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def default_runner_options(beam_args: Sequence[str]) -> tuple[PipelineOptions, PipelineRunner]:
  """Pipeline options from pass-through flags, and the runner to use.

  Without `--runner`, the local FnApiRunner (in-process, or multi-process with
  `--direct_running_mode=multi_processing`): the DirectRunner would first try
  the Prism runner, which downloads a binary. Otherwise the runner `--runner`
  names, made as `beam.Pipeline` would make it.
  """
  options = PipelineOptions(list(beam_args))
  name = options.view_as(StandardOptions).runner
  if name is None:
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # pylint: disable=g-import-not-at-top

    return options, FnApiRunner()
  return options, create_runner(name) if isinstance(name, str) else name


def runs_on_local_runner(runner: PipelineRunner) -> bool:
  """Whether `runner` runs a batch pipeline on Beam's FnApiRunner in this process.

  True for the FnApiRunner and for the DirectRunner (which hands batch
  pipelines to it when Prism is not available); False for Dataflow, Dask and
  other runners, whose workers run none of the code `local_runner_scope` changes.
  """
  from apache_beam.runners.direct.direct_runner import SwitchingDirectRunner  # pylint: disable=g-import-not-at-top
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # pylint: disable=g-import-not-at-top

  return isinstance(runner, (FnApiRunner, SwitchingDirectRunner))


def match_inputs(config: PrepareConfig) -> list[tuple[str, int, float]]:
  """(path, size, mtime) of every input file of the job, in a stable order.

  Raises:
    PrepareError: no file matches, or the TFF SQLite database is unusable.
  """
  try:
    if config.input_format == "tff-sqlite":
      sources.sqlite_row_ranges(config.input, config.sqlite_split)
      if config.keep_sqlite_splits and config.sqlite_split is None:
        for name in sources.sqlite_splits(config.input):
          try:
            check_split_name(name, f"{config.input}: TFF split_name {name!r}")
          except StoreFormatError as e:
            raise PrepareError(f"{e}; pick the splits to keep with --sqlite-split") from None
      stat = os.stat(config.input)
      return [(config.input, stat.st_size, stat.st_mtime)]
    return sources.match_input_files(config.input)
  except InputError as e:
    raise PrepareError(str(e)) from None


def _check_output_is_not_input(output: str, paths: Sequence[str]) -> None:
  out_prefix = output.rstrip("/") + "/"
  if any(p.startswith(out_prefix) or p.rstrip("/") == output.rstrip("/") for p in paths):
    raise PrepareError(f"--output {output} holds input files; write the store elsewhere")


_KNOWN_ERRORS = (
  "InputError",
  "ElementSpecError",
  "StoreWriteError",
  "CleanupError",
  "InvalidClientIdError",
  "PartitionError",
  "BeamInternalsError",
  "ExpansionError",
  "SplitError",
  "EmptyClientsError",
  "RecordCountMismatchError",
)


def explain_pipeline_error(error: BaseException) -> str:
  """The user-facing message of a failed pipeline: ours if one of our errors caused it."""
  seen = set()
  e: Optional[BaseException] = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if type(e).__name__ in _KNOWN_ERRORS:
      return str(e).split(" [while running")[0].strip()
    e = e.__cause__ or e.__context__
  text = str(error)
  for line in text.splitlines():
    for name in _KNOWN_ERRORS:
      marker = f"{name}: "
      if marker in line:
        return line.split(marker, 1)[1].split(" [while running")[0].strip()
  return text.strip().splitlines()[-1] if text.strip() else type(error).__name__


@dataclasses.dataclass
class PrepareResult:
  metadata: dict[str, Any]
  counters: dict[str, int]
  seconds: float

  def summary(self) -> str:
    m = self.metadata
    clients = sum(s["num_clients"] for s in m["splits"])
    examples = sum(s["num_examples"] for s in m["splits"])
    size = sum(s["num_bytes"] for s in m["splits"])
    rate = examples / self.seconds if self.seconds > 0 else float("inf")
    lines = [
      f"store written: {clients} clients, {examples} examples, {size} bytes "
      f"in {self.seconds:.1f} s ({rate:,.0f} examples/s)"
    ]
    for s in m["splits"]:
      lines.append(
        f"  split {s['name']}: {s['num_clients']} clients, {s['num_examples']} "
        f"examples, {s['num_empty_clients']} empty"
      )
    if self.counters:
      lines.append(
        "  beam metrics: "
        + ", ".join(f"{name}={value}" for name, value in sorted(self.counters.items()))
      )
    p = m.get("parameters", {})
    if p.get("split_by") == "client" and (
      p.get("num_transformed_clients") is not None or p.get("transform") is not None
    ):
      lines.append(
        "  note: --split-by client split pseudo-clients one by one: test clients "
        "share raw data with train (warped copies of test raw clients are in train)"
      )
    e = m["empty_clients"]
    if e["found"]:
      lines.append(
        f"  empty clients: {e['found']} found, policy {e['policy']}, {e['dropped']} dropped"
      )
    return "\n".join(lines)


_OWN_ERRORS = (
  ElementSpecError,
  InputError,
  StoreWriteError,
  ExpansionError,
  SplitError,
  PartitionError,
  BeamInternalsError,
)


def _failed_job_error(error: BaseException, lease) -> BaseException:
  """The error to raise for a failed pipeline, after removing the job's partial files.

  A job whose metadata was committed before the failure (its clean-up
  failed) keeps its data directory and says so. KeyboardInterrupt and the
  like are returned unchanged once the partial files are gone.
  """
  committed = lease.committed()
  cleanup_note = ""
  if not committed:
    try:
      lease.remove_data_dir()
    except Exception as e:  # pylint: disable=broad-except
      cleanup_note = f" (its partial files in {lease.path} could not be removed: {e})"
  if not isinstance(error, Exception):
    return error
  if isinstance(error, _OWN_ERRORS):
    message = str(error).split(" [while running")[0]
  else:
    message = explain_pipeline_error(error)
  return PrepareError(message + cleanup_note, committed=committed)


def _check_transform(config: PrepareConfig, paths: Sequence[str]) -> None:
  """Raises PrepareError when the transform fails on the input's first record."""
  fn = load_transform(config.transform) if isinstance(config.transform, str) else config.transform
  try:
    record = first_input_record(
      paths, config.input_format, config.client_id_key, config.sqlite_split
    )
    if record is not None:
      check_transform_on_first_record(
        fn, record, config.element_spec, config.num_transformed_clients, config.transform_name()
      )
  except (InputError, ExpansionError) as e:
    raise PrepareError(str(e)) from None


def job_url(result: Any, options: PipelineOptions) -> Optional[str]:
  """The Dataflow console URL of a submitted job, or None (a runner without job ids)."""
  job_id = getattr(result, "job_id", None)
  if not callable(job_id):
    return None
  from apache_beam.options.pipeline_options import GoogleCloudOptions  # pylint: disable=g-import-not-at-top

  gcp = options.view_as(GoogleCloudOptions)
  return (
    f"https://console.cloud.google.com/dataflow/jobs/{gcp.region}/{job_id()}?project={gcp.project}"
  )


def run_prepare(
  config: PrepareConfig,
  beam_args: Sequence[str] = (),
  report: Optional[Callable[[str], None]] = None,
) -> PrepareResult:
  """Runs a prepare job to completion and returns its result.

  `beam_args` are Beam pipeline flags (`--runner`, `--direct_num_workers`,
  ...). The job writes to a data directory it claims (`data_dir_lease`); a
  job that fails removes it, so its partial files do not stay on the disk,
  and a store the output held stays as it was. On the local FnApiRunner (no
  `--runner`, or the DirectRunner) the pipeline runs inside
  `local_runner_scope()`, which is left, and Beam restored, when it returns
  or raises; on other runners nothing in this process is changed.

  `report`, if given, receives progress lines while the job runs: on the
  local runner one every `progress.PROGRESS_INTERVAL_SECONDS` (stage,
  examples read, clients written, elapsed time); on a runner that names a
  job (Dataflow), the job's console URL once it is submitted.

  The job writes to a data directory it claims (`data_dir_lease`); a job
  that fails removes it, so its partial files do not stay on the disk, and a
  store the output held stays as it was.

  Raises:
    PrepareError: bad configuration or input, or a failed pipeline; the
      message names the flag, file, record or client at fault. The output
      then holds no store of this job, unless `committed` is set: then the
      store was committed and only the clean-up after the commit failed.
  """
  config.validate()
  inputs = match_inputs(config)
  paths = [path for path, _, _ in inputs]
  if config.transform is not None:
    _check_transform(config, paths)
  _check_output_is_not_input(config.output, paths)
  options, runner = default_runner_options(beam_args)
  scope = local_runner_scope() if runs_on_local_runner(runner) else contextlib.nullcontext()
  prepare_output_dir(config.output, config.overwrite)
  key = job_key(config, inputs)
  try:
    lease = claim_data_dir(config.output, key)
  except OSError as e:
    raise PrepareError(f"--output {config.output}: cannot claim a data directory: {e}") from None
  with lease, contextlib.ExitStack() as watching:
    start = time.monotonic()
    try:
      with scope:
        channel = None
        if report is not None and runs_on_local_runner(runner):  # workers share the disk
          channel = watching.enter_context(ProgressChannel())
        pipeline = beam.Pipeline(runner=runner, options=options)
        _ = pipeline | "Prepare" >> PrepareStore(
          config, paths, key, data_dir=lease.data_dir, replaces=lease.replaces, progress=channel
        )
        if channel is not None:
          watching.enter_context(ProgressMonitor(channel, report))
        result = pipeline.run()
        url = job_url(result, options)
        if report is not None and url:
          report(f"fedbeam prepare: job submitted: {url}")
        result.wait_until_finish()
    except BaseException as e:  # pylint: disable=broad-except
      error = _failed_job_error(e, lease)
      if error is e:
        raise
      raise error from (None if isinstance(e, _OWN_ERRORS) else e)
  seconds = time.monotonic() - start
  counters = {}
  try:
    for c in result.metrics().query(beam.metrics.MetricsFilter().with_namespace("fedbeam"))[
      "counters"
    ]:
      counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + int(
        c.committed or c.attempted or 0
      )
  except Exception:  # pylint: disable=broad-except
    pass  # Some runners do not report metrics; the metadata has the counts.
  try:
    metadata = read_metadata(config.output)
  except StoreFormatError as e:
    raise PrepareError(f"the pipeline finished but the store is not committed: {e}") from None
  return PrepareResult(metadata, counters, seconds)
