"""Partitioners: clients for input that has no client id (`fedbeam prepare --partition`).

The definitions follow Flower Datasets' partitioners of the same names
(`flwr_datasets.partitioner.IidPartitioner`, `DirichletPartitioner`,
`ShardPartitioner`) applied to a dataset shuffled with the seed, as
`FederatedDataset(shuffle=True, seed=...)` does before partitioning:

- `iid`: the examples in a seeded random order, cut into `num_clients`
  contiguous runs of Flower's sizes (the first `n % N` clients get
  `n // N + 1` examples, the others `n // N`);
- `dirichlet`: for each label in sorted order, the proportions of its examples
  per client are drawn from Dirichlet(alpha), with Flower's rounding
  (`cumsum(p) * count`, truncated), its optional self-balancing and its
  redraws (up to 10) until every client has `min_client_examples`; each
  label's examples, in a seeded random order, go to the clients in runs of
  those sizes;
- `shard`: the examples sorted by label (ties in a seeded random order) are
  cut into shards of `shard_size` (default `n // (num_clients *
  shards_per_client)`), and each client gets `shards_per_client` shards
  chosen by a seeded permutation of the whole shards; examples outside the
  chosen shards are dropped, as Flower drops them (the count is reported).

Client ids are the partition ids as decimal strings ("0" ... "N-1").
Differences from Flower: labels are visited in sorted order (Flower: order of
first appearance), so the result does not depend on how the input is split
into files; the random order within a label comes from a keyed permutation
(below), not from numpy's shuffle, so a store matches Flower's partition
sizes for the same seed (`numpy.random.default_rng(seed)` draws the same
proportions and shard permutation) but not which example lands where.

No step gathers examples. The reader's output elements (batches of
consecutive records of one file) are counted per label (`LabelCounts`); the
counts, one small dict per element, are gathered into the plan (`Plan`): the
Dirichlet proportions or the shard permutation, and the offset of each
element's records within each label. Each example's rank within its label is
then its element's offset plus its index among that label's records in the
element; a seeded permutation of [0, count) (a Feistel network over the
smallest even power of two above it, cycle-walked into range, keyed by
hashlib from the seed and the label) turns the rank into a position in a
random order, and the plan maps the position to a client (`Assign`). Ranks
depend only on file paths and record indices, so the result is the same on
any runner and worker count.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterable, Optional, Sequence, Union

import apache_beam as beam
import numpy as np

from fedbeam.format.codec import Example
from fedbeam.pipelines.example_records import ExampleBatch
from fedbeam.pipelines.records import BOOL, INT32, INT64, STRING, InputError, InputRecord

__all__ = [
  "PARTITIONERS",
  "PartitionConfig",
  "PartitionError",
  "PartitionClients",
  "PartitionPlan",
  "build_plan",
  "permute",
  "partition_sizes",
]

PARTITIONERS = ("iid", "dirichlet", "shard")
# Flower's DirichletPartitioner gives up after this many redraws.
MAX_DIRICHLET_REDRAWS = 10


class PartitionError(ValueError):
  """A partitioner that cannot run on this input or with these parameters."""


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
  """A partitioner and its parameters (the `fedbeam prepare --partition` flags)."""

  method: str
  num_clients: int
  label_key: Optional[str] = None
  seed: int = 0
  # dirichlet
  alpha: Optional[float] = None
  min_client_examples: int = 10
  self_balancing: bool = False
  # shard
  shards_per_client: Optional[int] = None
  shard_size: Optional[int] = None

  def validate(self) -> None:
    """Raises PartitionError naming the flag at fault."""
    if self.method not in PARTITIONERS:
      raise PartitionError(f"--partition {self.method!r}: use one of {list(PARTITIONERS)}")
    if self.num_clients is None or self.num_clients < 1:
      raise PartitionError(
        f"--partition {self.method} needs --num-clients >= 1, got {self.num_clients}"
      )
    if self.method == "iid":
      if self.label_key is not None:
        raise PartitionError("--label-key is not used by --partition iid")
    elif not self.label_key:
      raise PartitionError(f"--partition {self.method} needs --label-key")
    if self.method == "dirichlet":
      if self.alpha is None or not self.alpha > 0:
        raise PartitionError(f"--partition dirichlet needs --dirichlet-alpha > 0, got {self.alpha}")
      if self.min_client_examples < 0:
        raise PartitionError(f"--min-client-examples must be >= 0, got {self.min_client_examples}")
    else:
      if self.alpha is not None or self.self_balancing:
        raise PartitionError("--dirichlet-alpha and --self-balancing need --partition dirichlet")
      if self.min_client_examples != 10:
        raise PartitionError("--min-client-examples needs --partition dirichlet")
    if self.method == "shard":
      if self.shards_per_client is None or self.shards_per_client < 1:
        raise PartitionError(
          f"--partition shard needs --shards-per-client >= 1, got {self.shards_per_client}"
        )
      if self.shard_size is not None and self.shard_size < 1:
        raise PartitionError(f"--shard-size must be >= 1, got {self.shard_size}")
    elif self.shards_per_client is not None or self.shard_size is not None:
      raise PartitionError("--shards-per-client and --shard-size need --partition shard")

  def parameters(self) -> dict[str, Any]:
    """The parameters recorded in the store's metadata."""
    out: dict[str, Any] = {
      "partition": self.method,
      "num_clients": self.num_clients,
      "partition_seed": self.seed,
    }
    if self.label_key is not None:
      out["label_key"] = self.label_key
    if self.method == "dirichlet":
      out.update(
        dirichlet_alpha=float(self.alpha),
        min_client_examples=self.min_client_examples,
        self_balancing=self.self_balancing,
      )
    if self.method == "shard":
      out.update(shards_per_client=self.shards_per_client, shard_size=self.shard_size)
    return out


# ----------------------------------------------------------------------------
# The keyed permutation
# ----------------------------------------------------------------------------

_ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer on a uint64 array (wrapping arithmetic)."""
  x = (x ^ (x >> np.uint64(30))) * _M1
  x = (x ^ (x >> np.uint64(27))) * _M2
  return x ^ (x >> np.uint64(31))


def _round_keys(key: bytes) -> np.ndarray:
  digest = hashlib.blake2b(key, digest_size=8 * _ROUNDS).digest()
  return np.frombuffer(digest, "<u8").astype(np.uint64)


def permute(values: Union[np.ndarray, Sequence[int]], size: int, key: bytes) -> np.ndarray:
  """The images of `values` (ints in [0, size)) under a permutation of [0, size) keyed by `key`.

  The same (size, key) always gives the same permutation, on any machine.
  Raises ValueError for values outside [0, size).
  """
  x = np.asarray(values, dtype=np.int64)
  if x.size and (x.min() < 0 or x.max() >= size):
    raise ValueError(f"permute: values must be in [0, {size})")
  if size <= 1:
    return x.copy()
  bits = max(2, (size - 1).bit_length())
  bits += bits % 2
  half = np.uint64(bits // 2)
  low = np.uint64((1 << (bits // 2)) - 1)
  keys = _round_keys(key)

  def encrypt(v: np.ndarray) -> np.ndarray:
    left, right = v >> half, v & low
    with np.errstate(over="ignore"):
      for k in keys:
        left, right = right, left ^ (_mix(right ^ k) & low)
    return (left << half) | right

  y = encrypt(x.astype(np.uint64))
  # Cycle-walking: the Feistel network permutes [0, 2**bits) and 2**bits < 4 * size,
  # so a value leaves the range only a few times on average before it returns.
  out_of_range = y >= np.uint64(size)
  while out_of_range.any():
    y[out_of_range] = encrypt(y[out_of_range])
    out_of_range = y >= np.uint64(size)
  return y.astype(np.int64)


# ----------------------------------------------------------------------------
# Labels of the reader's elements
# ----------------------------------------------------------------------------


def _element_key(element) -> tuple[str, int]:
  if isinstance(element, ExampleBatch):
    return element.position(0)
  return element[0].position if isinstance(element, list) else element.position


def _records(element) -> list:
  if isinstance(element, (ExampleBatch, list)):
    return element.records if isinstance(element, ExampleBatch) else element
  return [element]


def _example_label(data: bytes, label_key: str, source: str):
  try:
    feature = Example.FromString(data).features.feature
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f"{source}: not a serialized tf.train.Example ({e})") from None
  if label_key not in feature:
    raise InputError(
      f"{source}: label feature {label_key!r} is missing "
      f"(features present: {sorted(feature.keys())})"
    )
  f = feature[label_key]
  kind = f.WhichOneof("kind")
  values = (
    f.int64_list.value
    if kind == "int64_list"
    else f.bytes_list.value
    if kind == "bytes_list"
    else None
  )
  if values is None:
    raise InputError(
      f"{source}: label feature {label_key!r} is a {kind or 'typeless feature'}; "
      "labels must be integers or strings"
    )
  if len(values) != 1:
    raise InputError(
      f"{source}: label feature {label_key!r} has {len(values)} values, expected exactly one"
    )
  return int(values[0]) if kind == "int64_list" else bytes(values[0])


def _record_label(record: InputRecord, label_key: str):
  raw = record.features.get(label_key)
  if raw is None:
    raise InputError(
      f"{record.source}: label feature {label_key!r} is missing "
      f"(features present: {sorted(record.features)})"
    )
  if raw.kind not in (INT32, INT64, BOOL, STRING):
    raise InputError(
      f"{record.source}: label feature {label_key!r} holds {raw.kind} values; "
      "labels must be integers or strings"
    )
  if raw.size != 1:
    raise InputError(
      f"{record.source}: label feature {label_key!r} has {raw.size} values, expected exactly one"
    )
  value = raw.values[0]
  return bytes(value) if raw.kind == STRING else int(value)


def _element_labels(element, label_key: Optional[str]) -> list:
  """The label of each record of a reader's output element (all None without `label_key`).

  Raises InputError naming the record whose label is missing or not one
  integer or string.
  """
  if label_key is None:
    return [None] * (len(element) if isinstance(element, (ExampleBatch, list)) else 1)
  if isinstance(element, ExampleBatch):
    return [
      _example_label(data, label_key, element.source(i)) for i, data in enumerate(element.records)
    ]
  return [_record_label(r, label_key) for r in _records(element)]


class _CountLabels(beam.DoFn):
  """A reader element -> (element key, ((label, count), ...)) in the labels' sorted order."""

  def __init__(self, label_key: Optional[str]):
    self._label_key = label_key

  def process(self, element):
    counts: dict = {}
    for label in _element_labels(element, self._label_key):
      counts[label] = counts.get(label, 0) + 1
    yield _element_key(element), tuple(sorted(counts.items(), key=lambda kv: _label_order(kv[0])))


def _label_order(label) -> tuple:
  # Integers before strings; the plan refuses a mix, this only keeps sorting total.
  if label is None:
    return (0, 0)
  return (1, label) if isinstance(label, int) else (2, label)


# ----------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------


def partition_sizes(total: int, num_clients: int) -> np.ndarray:
  """Flower's IidPartitioner sizes: `total // N`, one more for the first `total % N` clients."""
  div, mod = divmod(total, num_clients)
  return np.array([div + (1 if j < mod else 0) for j in range(num_clients)], np.int64)


def _dirichlet_cuts(counts: np.ndarray, config: PartitionConfig) -> np.ndarray:
  """[labels, clients - 1] cut points of each label's run, as Flower's DirichletPartitioner."""
  n_clients = config.num_clients
  alpha = np.array([float(config.alpha)]).repeat(n_clients)
  rng = np.random.default_rng(config.seed)
  average = counts.sum() / n_clients
  for _ in range(MAX_DIRICHLET_REDRAWS + 1):
    sizes = np.zeros(n_clients, np.int64)
    cuts = np.zeros((len(counts), max(n_clients - 1, 0)), np.int64)
    for k, count in enumerate(counts):
      proportions = rng.dirichlet(alpha)
      if config.self_balancing:
        proportions = np.where(sizes > average, 0.0, proportions)
        proportions = proportions / proportions.sum()
      points = (np.cumsum(proportions) * count).astype(int)[:-1]
      cuts[k] = points
      sizes += np.diff(np.concatenate([[0], points, [count]]))
    if sizes.min() >= config.min_client_examples:
      return cuts
  raise PartitionError(
    f"--partition dirichlet: no draw in {MAX_DIRICHLET_REDRAWS + 1} gave every client "
    f"--min-client-examples {config.min_client_examples} (alpha {config.alpha}, "
    f"{n_clients} clients, {int(counts.sum())} examples); raise --dirichlet-alpha or lower "
    "--min-client-examples or --num-clients"
  )


@dataclasses.dataclass
class PartitionPlan:
  """What `Assign` needs: small, computed from label counts only.

  `labels`: sorted distinct labels; `counts[k]`: examples of label k;
  `offsets[element key][k]`: label-k records in the elements before it.
  iid and dirichlet: `cuts[k]`, the run boundaries of label k (iid has one
  pseudo-label); shard: `label_starts[k]` (sorted position of label k's first
  example), `shard_size` and `shard_client` (client of each whole shard, -1
  for a shard no client got). `dropped`: examples no client gets.
  """

  method: str
  seed: int
  labels: list
  counts: np.ndarray
  offsets: dict
  cuts: Optional[np.ndarray] = None
  label_starts: Optional[np.ndarray] = None
  shard_size: int = 0
  shard_client: Optional[np.ndarray] = None
  dropped: int = 0

  def permutation_key(self, k: int) -> bytes:
    label = self.labels[k]
    text = "-" if label is None else f"i{label}" if isinstance(label, int) else "s" + label.hex()
    return f"fedbeam.partition/{self.method}/{self.seed}/{text}".encode("utf-8")

  def clients(self, k: int, ranks: np.ndarray) -> np.ndarray:
    """Client of each rank (ints) within label k; -1 for a dropped example."""
    shuffled = permute(ranks, int(self.counts[k]), self.permutation_key(k))
    if self.method == "shard":
      shard = (self.label_starts[k] + shuffled) // self.shard_size
      out = np.full(shard.shape, -1, np.int64)
      usable = shard < len(self.shard_client)
      out[usable] = self.shard_client[shard[usable]]
      return out
    return np.searchsorted(self.cuts[k], shuffled, side="right").astype(np.int64)


def build_plan(
  element_counts: Iterable[tuple[tuple[str, int], tuple]], config: PartitionConfig
) -> PartitionPlan:
  """The plan from (element key, ((label, count), ...)) pairs, in any order.

  Raises:
    PartitionError: more clients than examples, labels of mixed types, or
      parameters this input cannot satisfy (see the module docstring).
  """
  items = sorted(element_counts, key=lambda kv: kv[0])
  for (a, _), (b, _) in zip(items, items[1:]):
    if a == b:
      raise PartitionError(
        f"two input elements start at {a[0]} record {a[1]}; a runner delivered a batch twice"
      )
  all_labels = {label for _, counts in items for label, _ in counts}
  if len({type(label) for label in all_labels}) > 1:
    raise PartitionError(f"label feature {config.label_key!r} holds both integers and strings")
  labels = sorted(all_labels, key=_label_order)
  index = {label: k for k, label in enumerate(labels)}
  running = np.zeros(len(labels), np.int64)
  offsets = {}
  for key, counts in items:
    offsets[key] = tuple(int(v) for v in running)
    for label, count in counts:
      running[index[label]] += count
  total = int(running.sum())
  n = config.num_clients
  if n > total:
    raise PartitionError(f"--num-clients {n} is more than the {total} examples of the input")
  plan = PartitionPlan(config.method, config.seed, labels, running, offsets)
  if config.method == "iid":
    plan.cuts = np.cumsum(partition_sizes(total, n))[:-1][None, :]
  elif config.method == "dirichlet":
    plan.cuts = _dirichlet_cuts(running, config)
  else:
    _plan_shards(plan, total, config)
  return plan


def _plan_shards(plan: PartitionPlan, total: int, config: PartitionConfig) -> None:
  """Flower's ShardPartitioner with num_shards_per_partition given, keep_incomplete_shard False."""
  n, per_client = config.num_clients, config.shards_per_client
  size = config.shard_size or total // (n * per_client)
  if size < 1:
    raise PartitionError(
      f"--partition shard: {total} examples cannot fill {n * per_client} "
      f"shards (--num-clients {n} x --shards-per-client {per_client})"
    )
  usable = total // size
  if usable < n:
    raise PartitionError(
      f"--partition shard: --shard-size {size} makes {usable} whole shards, "
      f"fewer than --num-clients {n}"
    )
  rng = np.random.default_rng(config.seed)
  chosen = rng.permutation(usable)[: n * per_client]
  shard_client = np.full(usable, -1, np.int64)
  shard_client[chosen] = np.arange(len(chosen)) // per_client
  plan.label_starts = np.concatenate([[0], np.cumsum(plan.counts)[:-1]]).astype(np.int64)
  plan.shard_size = size
  plan.shard_client = shard_client
  plan.dropped = total - len(chosen) * size


# ----------------------------------------------------------------------------
# Assignment
# ----------------------------------------------------------------------------


class _Assign(beam.DoFn):
  """A reader element -> the same records with client ids (dropped records left out)."""

  def __init__(self, label_key: Optional[str]):
    self._label_key = label_key

  def process(self, element, plan: PartitionPlan):
    labels = _element_labels(element, self._label_key)
    index = {label: k for k, label in enumerate(plan.labels)}
    ks = np.array([index[label] for label in labels], np.int64)
    offsets = np.array(plan.offsets[_element_key(element)], np.int64)
    clients = np.empty(len(ks), np.int64)
    for k in np.unique(ks):
      rows = np.flatnonzero(ks == k)
      ranks = offsets[k] + np.arange(len(rows))
      clients[rows] = plan.clients(int(k), ranks)
    kept = np.flatnonzero(clients >= 0)
    if not len(kept):
      return
    ids = tuple(str(c) for c in clients[kept].tolist())
    if isinstance(element, ExampleBatch):
      yield ExampleBatch(
        element.path,
        element.position(int(kept[0]))[1],
        [element.records[i] for i in kept],
        None,
        client_ids=ids,
        indices=tuple(element.position(int(i))[1] for i in kept),
        index_name=element.index_name,
      )
    else:
      records = _records(element)
      yield [dataclasses.replace(records[i], client_id=cid) for i, cid in zip(kept, ids)]


def _client_ids(plan: PartitionPlan, num_clients: int) -> Iterable[str]:
  del plan  # Only orders the step after the plan; every client exists whatever it holds.
  return (str(j) for j in range(num_clients))


class PartitionClients(beam.PTransform):
  """Reader elements without client ids -> the same records with the partitioner's ids.

  Input: PCollection of reader elements (`ExampleBatch`es without ids, lists
  of `InputRecord`s with empty ids). Output: a dict with `records` (the
  elements, with ids), `clients` (every client id "0".."N-1", so a client
  that got no example is still declared) and `dropped` (singleton: examples
  no client got; non-zero only for `shard`). Raises (at run time)
  PartitionError or InputError naming the record at fault.
  """

  def __init__(self, config: PartitionConfig):
    super().__init__()
    config.validate()
    self._config = config

  def expand(
    self, records: beam.PCollection[Union[ExampleBatch, list[InputRecord]]]
  ) -> dict[str, beam.PCollection]:
    c = self._config
    plan = (
      records
      | "LabelCounts" >> beam.ParDo(_CountLabels(c.label_key))
      | "GatherCounts" >> beam.combiners.ToList()
      | "Plan" >> beam.Map(build_plan, c)
    )
    assigned = records | "Assign" >> beam.ParDo(_Assign(c.label_key), beam.pvalue.AsSingleton(plan))
    clients = plan | "Clients" >> beam.FlatMap(_client_ids, c.num_clients)
    dropped = plan | "Dropped" >> beam.Map(lambda p: p.dropped)
    return {"records": assigned, "clients": clients, "dropped": dropped}
