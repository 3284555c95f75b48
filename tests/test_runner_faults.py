"""A runner that loses or duplicates data fails the job; it never commits a wrong store.

Each test runs the real prepare pipeline on Beam's FnApiRunner with one
deliberately lossy step inserted through `PrepareStore`'s `fault_steps`
(the step a faulty runner would be), and checks the exact error and that no
metadata was written. The checks compare figures produced by different
steps (docs/reliability.md, "Faults while writing").
"""

from __future__ import annotations

import dataclasses
import os

import apache_beam as beam
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
import numpy as np
import pytest

from fedbeam import testing
from fedbeam.format.manifest import read_manifest
from fedbeam.format.metadata import metadata_path, read_metadata
from fedbeam.format.spec import ElementSpec
from fedbeam.pipelines import prepare, sources
from fedbeam.pipelines.local_runner import local_runner_scope
from fedbeam.pipelines.records import ClientRecords
from fedbeam.pipelines.store_writer import WriteStore


class _LoseAtFinishBundle(beam.DoFn):
  """Holds every element of a bundle and loses them all when the bundle ends.

  What Beam 2.72's DaskRunner does to a DoFn that emits from `finish_bundle`.
  """

  def start_bundle(self):
    self._held = []

  def process(self, element):
    self._held.append(element)

  def finish_bundle(self):
    self._held = []


class _DropLastRecord(beam.DoFn):
  """Drops the last record of one client: a runner losing one element after expansion."""

  def __init__(self, client_id: str):
    self._client_id = client_id

  def process(self, client: ClientRecords):
    if client.client_id == self._client_id:
      client = dataclasses.replace(client, records=client.records[:-1])
    yield client


def _clients(num: int = 12) -> dict:
  rng = np.random.default_rng(7)
  return {
    f"c{i:02d}": [
      {"x": rng.normal(size=3).astype(np.float32), "y": np.int64(j)} for j in range(2 + i % 5)
    ]
    for i in range(num)
  }


@pytest.fixture(scope="module")
def tfrecord_input(tmp_path_factory):
  root = tmp_path_factory.mktemp("faults")
  clients = _clients()
  path = testing.write_tfrecord_input(root / "input.tfrecord", clients)
  return path, sum(len(v) for v in clients.values())


def _run(config: prepare.PrepareConfig, fault_steps=None) -> None:
  """Runs PrepareStore as `run_prepare` does, with `fault_steps` inserted."""
  inputs = sources.match_input_files(config.input)
  prepare.prepare_output_dir(config.output, config.overwrite)
  key = prepare.job_key(config, inputs)
  with local_runner_scope():
    pipeline = beam.Pipeline(runner=FnApiRunner())
    _ = pipeline | "Prepare" >> prepare.PrepareStore(
      config, [p for p, _, _ in inputs], key, fault_steps=fault_steps
    )
    pipeline.run().wait_until_finish()


def _failure(config: prepare.PrepareConfig, fault_steps) -> str:
  with pytest.raises(Exception) as info:
    _run(config, fault_steps)
  return prepare.explain_pipeline_error(info.value)


def _config(path: str, output, **flags) -> prepare.PrepareConfig:
  return prepare.PrepareConfig(
    input=path, input_format="tfrecord", output=str(output), client_id_key="client_id", **flags
  )


# The pseudo-clients are split one by one (--split-by client, no longer the
# default with expansion) as when these figures were taken.
@pytest.mark.parametrize(
  "flags",
  [{}, {"num_transformed_clients": 30, "test_fraction": 0.25, "split_by": "client"}],
  ids=["plain", "expanded-split"],
)
def test_losing_the_encoders_output_fails_the_job_and_commits_nothing(
  tfrecord_input, tmp_path, flags
):
  # Everything the encoder emits is lost, before the counts and the shuffle
  # read it: the reader's own count still says how many records there were.
  path, num_records = tfrecord_input
  config = _config(path, tmp_path / "store", **flags)
  message = _failure(config, {"encoded": beam.ParDo(_LoseAtFinishBundle())})
  if flags:  # The split's choice, which needs the clients' sizes, is the first to see none.
    assert (
      message == "there are no clients to split (the input holds none, or the runner lost them)"
    )
  else:
    assert message == (
      f"read {num_records} input records but grouped 0; the runner lost or "
      "duplicated data, so the store was not committed (rerun the job)"
    )
  assert not os.path.exists(metadata_path(config.output))


@pytest.mark.parametrize(
  "flags",
  [
    {"num_transformed_clients": 30},
    {"num_transformed_clients": 30, "test_fraction": 0.25, "split_by": "client"},
  ],
  ids=["expanded", "expanded-split"],
)
def test_a_record_lost_after_expansion_fails_the_commit(tfrecord_input, tmp_path, flags):
  path, _ = tfrecord_input
  sound = testing.prepare_store(
    path,
    tmp_path,
    output=str(tmp_path / "sound"),
    input_format="tfrecord",
    client_id_key="client_id",
    **flags,
  )
  metadata = read_metadata(sound)
  splits = {s["name"]: s for s in metadata["splits"]}
  victim = "c03_01"  # Five records, so it is eligible for the test split either way.
  victim_split = next(
    row["split"] for row in read_manifest(sound, metadata) if row["client_id"] == victim
  )
  s = splits[victim_split]
  config = _config(path, tmp_path / "store", **flags)
  message = _failure(config, {"clients": beam.ParDo(_DropLastRecord(victim))})
  assert message == (
    f"split {victim_split!r}: wrote {s['num_clients']} clients with {s['num_examples'] - 1} "
    f"examples but the job planned {s['num_clients']} clients with {s['num_examples']} "
    "examples; the runner lost or duplicated data, so the store was not committed "
    "(rerun the job)"
  )
  assert not os.path.exists(metadata_path(config.output))


def test_the_commit_refuses_an_empty_store_when_records_were_read(tmp_path):
  # The writer is given no client although the readers counted records.
  root = str(tmp_path / "store")
  prepare.prepare_output_dir(root, False)
  spec = ElementSpec.from_json({"y": {"dtype": "int64", "shape": []}})
  pipeline = beam.Pipeline(runner=FnApiRunner())
  clients = pipeline | "NoClients" >> beam.Create([], reshuffle=False).with_output_types(
    ClientRecords
  )
  _ = clients | WriteStore(
    root,
    pipeline | "Spec" >> beam.Create([spec]),
    job_key="k" * 64,
    input_records=pipeline | "Read" >> beam.Create([5]),
  )
  with pytest.raises(Exception) as info:
    pipeline.run().wait_until_finish()
  assert prepare.explain_pipeline_error(info.value) == (
    "the readers read 5 input records but no client file was written; the runner lost or "
    "duplicated data, so the store was not committed (rerun the job)"
  )
  assert not os.path.exists(metadata_path(root))
