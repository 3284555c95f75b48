"""The empty-client check: count clients without examples and apply the policy.

Policies (`--empty-clients`): `keep` (default; like the seed, the training
split may hold empty clients while the test split never does), `drop`
(empty clients are written nowhere), `fail` (the job fails naming up to 20
of them). The report becomes the metadata's `empty_clients` entry.
"""

from __future__ import annotations

import apache_beam as beam

from fedbeam.pipelines.records import ClientRecords

EMPTY_POLICIES = ("keep", "drop", "fail")
REPORT_SAMPLE_SIZE = 20


class EmptyClientsError(ValueError):
  """Empty clients found under `--empty-clients fail`."""


class _EmptyIds(beam.CombineFn):
  """Client ids -> (count, the REPORT_SAMPLE_SIZE smallest ids)."""

  def create_accumulator(self):
    return (0, [])

  def add_input(self, acc, client_id):
    count, sample = acc
    return (count + 1, sorted(sample + [client_id])[:REPORT_SAMPLE_SIZE])

  def merge_accumulators(self, accs):
    count, sample = 0, []
    for c, s in accs:
      count += c
      sample.extend(s)
    return (count, sorted(sample)[:REPORT_SAMPLE_SIZE])

  def extract_output(self, acc):
    return acc


def _report(acc, policy: str) -> dict:
  count, sample = acc
  if policy == "fail" and count:
    raise EmptyClientsError(
      f"{count} client(s) have no examples (--empty-clients fail): "
      f"{', '.join(repr(s) for s in sample)}" + (" ..." if count > len(sample) else "")
    )
  return {
    "found": count,
    "policy": policy,
    "dropped": count if policy == "drop" else 0,
    "sample": sample,
  }


class CheckEmptyClients(beam.PTransform):
  """Applies the empty-client policy.

  Input: PCollection[ClientRecords]. Output: a dict with `clients` (the
  clients kept) and `report` (singleton dict: found, policy, dropped,
  sample). Raises (at run time) EmptyClientsError under `fail`.
  """

  def __init__(self, policy: str = "keep"):
    super().__init__()
    if policy not in EMPTY_POLICIES:
      raise ValueError(f"--empty-clients {policy!r}: use one of {list(EMPTY_POLICIES)}")
    self._policy = policy

  def expand(self, clients: beam.PCollection[ClientRecords]) -> dict[str, beam.PCollection]:
    policy = self._policy
    report = (
      clients
      | "EmptyIds" >> beam.FlatMap(lambda c: [c.client_id] if not c.records else [])
      | "CountEmpty" >> beam.CombineGlobally(_EmptyIds())
      | "Report" >> beam.Map(_report, policy)
    )
    if policy == "drop":
      kept = clients | "DropEmpty" >> beam.Filter(lambda c: bool(c.records))
    else:
      # Under `fail` the report raises before the commit, which depends on it.
      kept = clients
    return {"clients": kept, "report": report}


__all__ = ["CheckEmptyClients", "EmptyClientsError", "EMPTY_POLICIES", "ClientRecords"]
