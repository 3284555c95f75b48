"""Train/test client split with the semantics of the seed `ClientData.train_test_client_split`.

"Returns (train, test) ClientData with disjoint client ids. Every client in
the test ClientData is guaranteed to have a non-empty dataset; the training
ClientData may contain clients with no data. num_test_clients may be at most
len(client_data.client_ids) - 1 [...] Raises ValueError if num_test_clients
cannot be satisfied by client_data, or if too many clients have empty
datasets." -- the seed

Two selection methods, both deterministic from the seed whatever the runner:

- `hash` (default, scales to millions of clients): units (clients, or raw
  clients with `split_by="raw"`) are ranked by sha256(seed, unit id); the
  test units are the K first eligible ones in that order, found with a Top-K
  combiner over (rank key, id) pairs only; assignment needs one threshold.
- `tff`: the very clients TFF 0.87 picks: ids sorted, shuffled with
  `numpy.random.RandomState(seed)`, popped from the end, skipping ineligible
  ones. Gathers every (id, count) pair on one worker.

A unit is eligible when it (every pseudo-client of it, with `split_by="raw"`)
has at least `min_test_examples` examples (default 1: non-empty). As in the
reference, the job fails once more than 5*K + 10 ineligible candidates were
skipped before the K-th test unit.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import apache_beam as beam

from fedbeam.pipelines.ranking import SmallestN
from fedbeam.pipelines.records import ClientRecords
from fedbeam.seeded_hash import seeded_int

__all__ = [
  "SPLIT_METHODS",
  "SPLIT_BY",
  "TRAIN",
  "TEST",
  "SplitError",
  "SplitConfig",
  "rank_key",
  "tff_test_ids",
  "SplitTrainTest",
]

SPLIT_METHODS = ("hash", "tff")
SPLIT_BY = ("client", "raw")
TRAIN, TEST = "train", "test"


class SplitError(ValueError):
  """A split that cannot be made; the message has the numbers."""


@dataclasses.dataclass(frozen=True)
class SplitConfig:
  """How to choose test clients. Exactly one of num_test_clients and test_fraction."""

  num_test_clients: Optional[int] = None
  test_fraction: Optional[float] = None
  seed: int = 0
  method: str = "hash"
  split_by: str = "client"
  min_test_examples: int = 1

  def __post_init__(self):
    if (self.num_test_clients is None) == (self.test_fraction is None):
      raise SplitError("give exactly one of --num-test-clients and --test-fraction")
    if self.num_test_clients is not None and self.num_test_clients <= 0:
      raise SplitError(
        f"--num-test-clients must be > 0, got {self.num_test_clients} "
        "(Please specify num_test_clients > 0.)"
      )
    if self.test_fraction is not None and not 0.0 < self.test_fraction < 1.0:
      raise SplitError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
    if self.method not in SPLIT_METHODS:
      raise SplitError(f"--split-method {self.method!r}: use one of {list(SPLIT_METHODS)}")
    if self.split_by not in SPLIT_BY:
      raise SplitError(f"--split-by {self.split_by!r}: use one of {list(SPLIT_BY)}")
    if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
      raise SplitError(f"--split-seed must be an integer in [0, 2**32), got {self.seed!r}")
    if self.min_test_examples < 1:
      raise SplitError(f"--min-test-examples must be >= 1, got {self.min_test_examples}")

  def resolve_k(self, num_units: int) -> int:
    """K for `num_units` units; raises SplitError unless 1 <= K <= num_units - 1."""
    what = "raw clients" if self.split_by == "raw" else "clients"
    if num_units <= 0:
      raise SplitError(
        f"there are no {what} to split (the input holds none, or the runner lost them)"
      )
    if self.num_test_clients is not None:
      k = self.num_test_clients
    else:
      k = int(round(self.test_fraction * num_units))
      if k < 1:
        raise SplitError(
          f"--test-fraction {self.test_fraction} of {num_units} {what} selects no test client"
        )
    if num_units <= k:
      raise SplitError(
        f"The client_data supplied has only {num_units} {what}, but {k} test "
        f"clients were requested (at most {num_units - 1} can be test clients)"
      )
    return k


def rank_key(seed: int, unit_id: str) -> int:
  """The stable rank of a unit for the hash method (sha256 of seed and id)."""
  return seeded_int("fedbeam-split", seed, unit_id)


def tff_test_ids(units: list[tuple[str, bool]], k: int, seed: int) -> list[str]:
  """TFF 0.87's choice: `units` are (id, eligible); ids sorted, shuffled, popped from the end.

  Raises SplitError('Encountered too many clients with no data.') as TFF does.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  ids = sorted(u for u, _ in units)
  eligible = dict(units)
  np.random.RandomState(seed).shuffle(ids)
  skipped, test = [], []
  while len(test) < k:
    if not ids or len(skipped) > 5 * k + 10:
      raise SplitError(
        f"Encountered too many clients with no data: {len(skipped)} candidates had fewer "
        f"than the required examples before {k} test clients were found "
        f"({len(test)} found)"
      )
    cid = ids.pop()
    if eligible[cid]:
      test.append(cid)
    else:
      skipped.append(cid)
  return test


def _hash_threshold(top: list, k: int, ineligible_before: int) -> tuple:
  if len(top) < k:
    raise SplitError(
      f"Encountered too many clients with no data: only {len(top)} clients have enough "
      f"examples for the {k} test clients requested"
    )
  if ineligible_before > 5 * k + 10:
    raise SplitError(
      f"Encountered too many clients with no data: {ineligible_before} candidates had "
      f"fewer than the required examples before {k} test clients were found "
      f"(limit 5*{k}+10 = {5 * k + 10})"
    )
  return top[k - 1]


class SplitTrainTest(beam.PTransform):
  """Assigns each client to the `train` or `test` split.

  Input: PCollection[ClientRecords]. Output: a dict with `clients` (the same
  clients with `split` set) and `report` (singleton dict: num_test_units,
  split_method, split_by, split_seed). Only ids and counts are combined;
  examples stay where they are. Raises (at run time) SplitError.

  `sizes`, optional PCollection[(client id, raw client id, number of
  examples)] with one entry per client of the input, gives the counts ahead
  of the clients (see `PseudoClientSizes`): the choice is then made while
  the clients are still being built, and no client waits for it. The output
  then also has `planned`: PCollection[(client id, split, number of
  examples)], the split each size lands in by the same choice.
  """

  def __init__(
    self, config: SplitConfig, sizes: Optional[beam.PCollection[tuple[str, str, int]]] = None
  ):
    super().__init__()
    self._config = config
    self._sizes = sizes

  def expand(self, clients: beam.PCollection[ClientRecords]) -> dict[str, beam.PCollection]:
    c = self._config
    by_raw = c.split_by == "raw"
    m = c.min_test_examples
    if self._sizes is not None:
      unit_counts = self._sizes | "UnitCounts" >> beam.Map(
        lambda s: (s[1] if by_raw else s[0], s[2])
      )
    else:
      unit_counts = clients | "UnitCounts" >> beam.Map(
        lambda cl: (cl.raw_client_id if by_raw else cl.client_id, len(cl.records))
      )
    units = (
      unit_counts
      | "MinPerUnit" >> beam.CombinePerKey(min)
      | "Eligibility" >> beam.MapTuple(lambda u, n: (u, n >= m))
    )
    num_units = units | "CountUnits" >> beam.combiners.Count.Globally()
    k = num_units | "ResolveK" >> beam.Map(c.resolve_k)
    k_side = beam.pvalue.AsSingleton(k)

    if c.method == "tff":
      test_ids = (
        units
        | "GatherUnits" >> beam.combiners.ToList()
        | "TffChoice" >> beam.Map(lambda us, kk: sorted(tff_test_ids(us, kk, c.seed)), k_side)
      )
      # A set makes the per-client membership check O(1) on the workers.
      chosen_side = beam.pvalue.AsSingleton(test_ids | "AsSet" >> beam.Map(frozenset))
    else:
      keyed = units | "RankKey" >> beam.MapTuple(lambda u, ok: ((rank_key(c.seed, u), u), ok))
      top = (
        keyed
        | "Eligible" >> beam.Filter(lambda kv: kv[1])
        | "TagWithK" >> beam.Map(lambda kv, kk: (kk, kv[0]), k_side)
        | "TopK" >> beam.CombineGlobally(SmallestN())
      )
      provisional = top | "ProvisionalThreshold" >> beam.Map(
        lambda t, kk: t[kk - 1] if len(t) >= kk else None, k_side
      )
      skipped = (
        keyed
        | "Ineligible" >> beam.Filter(lambda kv: not kv[1])
        | "BeforeThreshold"
        >> beam.Filter(
          lambda kv, th: th is None or kv[0] < th, beam.pvalue.AsSingleton(provisional)
        )
        | "CountSkipped" >> beam.CombineGlobally(beam.combiners.CountCombineFn()).without_defaults()
      )
      # An empty count is the side input's default, 0, at one stage less.
      threshold = top | "Threshold" >> beam.Map(
        _hash_threshold, k_side, beam.pvalue.AsSingleton(skipped, default_value=0)
      )
      chosen_side = beam.pvalue.AsSingleton(threshold)

    def split_of(unit: str, count: int, chosen) -> str:
      if c.method == "tff":
        return TEST if unit in chosen else TRAIN
      # Expansion maps records one to one, so every pseudo-client of a raw
      # client has the raw client's count: the client's own eligibility is
      # its unit's, and all pseudo-clients of a unit land on one side.
      return TEST if count >= m and (rank_key(c.seed, unit), unit) <= chosen else TRAIN

    def assign(cl: ClientRecords, chosen):
      unit = cl.raw_client_id if by_raw else cl.client_id
      return dataclasses.replace(cl, split=split_of(unit, len(cl.records), chosen))

    assigned = clients | "Assign" >> beam.Map(assign, chosen_side)
    report = k | "Report" >> beam.Map(
      lambda kk: {
        "num_test_units": kk,
        "split_method": c.method,
        "split_by": c.split_by,
        "split_seed": c.seed,
        "min_test_examples": m,
      }
    )
    outputs = {"clients": assigned, "report": report}
    if self._sizes is not None:
      # The same choice applied to the planned sizes: what each split should
      # hold, for the commit to check against what was written.
      outputs["planned"] = self._sizes | "PlannedSplits" >> beam.Map(
        lambda s, chosen: (s[0], split_of(s[1] if by_raw else s[0], s[2], chosen), s[2]),
        chosen_side,
      )
    return outputs
