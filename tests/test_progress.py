"""Progress of a running prepare job: counts from the job's own steps, a line every interval."""

import os
import re
import tempfile
import threading

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from fedbeam import testing
from fedbeam.pipelines import prepare, progress
from fedbeam.pipelines.progress import (
  CLIENTS_WRITTEN,
  EXAMPLES_READ,
  CountProgress,
  ProgressChannel,
  ProgressMonitor,
  format_progress,
)

LINE = re.compile(
  r"^fedbeam prepare: (reading and grouping|writing clients): [\d,]+ examples "
  r"read, [\d,]+ clients written, \d+ s$"
)


def _channels():
  return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("fedbeam-progress-")}


def test_counts_from_every_bundle_add_up_in_the_channel():
  with ProgressChannel() as channel:
    with beam.Pipeline(runner=FnApiRunner()) as p:
      _ = (
        p
        | beam.Create([[1, 2], [3], [4, 5, 6]])
        | beam.Reshuffle()
        | beam.ParDo(CountProgress(channel, EXAMPLES_READ, len))
      )
    assert channel.totals() == {EXAMPLES_READ: 6, CLIENTS_WRITTEN: 0}
    directory = channel.directory
  assert not os.path.exists(directory)


def test_format_progress_names_stage_counts_and_time():
  assert format_progress({EXAMPLES_READ: 12345}, 3.4) == (
    "fedbeam prepare: reading and grouping: 12,345 examples read, 0 clients written, 3 s"
  )
  assert format_progress({EXAMPLES_READ: 10, CLIENTS_WRITTEN: 4}, 61.0) == (
    "fedbeam prepare: writing clients: 10 examples read, 4 clients written, 61 s"
  )


def test_monitor_reports_every_interval_until_stopped():
  lines = []
  reported = threading.Event()

  def report(line):
    lines.append(line)
    if len(lines) >= 3:
      reported.set()

  with ProgressChannel() as channel:
    with ProgressMonitor(channel, report, interval=0.05):
      assert reported.wait(10)
    count = len(lines)
  assert all(LINE.match(line) for line in lines), lines
  assert len(lines) == count  # Nothing after the monitor stopped.


def test_run_prepare_reports_progress_lines_while_the_job_runs(tmp_path, monkeypatch):
  monkeypatch.setattr(progress, "PROGRESS_INTERVAL_SECONDS", 0.2)
  clients = {f"c{i:02d}": [{"x": float(i)}] * (1 + i % 3) for i in range(20)}
  path = testing.write_tfrecord_input(tmp_path / "in.tfrecord", clients)
  lines = []
  before = _channels()
  config = prepare.PrepareConfig(
    input=path, input_format="tfrecord", client_id_key="client_id", output=str(tmp_path / "store")
  )
  result = prepare.run_prepare(config, report=lines.append)
  assert sum(s["num_clients"] for s in result.metadata["splits"]) == 20
  assert lines and all(LINE.match(line) for line in lines), lines
  numbers = [
    tuple(int(n.replace(",", "")) for n in re.findall(r"(\d[\d,]*) (?:examples|clients)", line))
    for line in lines
  ]
  assert all(read <= 40 and written <= 20 for read, written in numbers), lines
  assert numbers == sorted(numbers)  # counts only grow
  assert _channels() <= before  # the job's channel is gone


def test_job_url_of_a_runner_without_jobs_is_none():
  options = PipelineOptions([])
  assert prepare.job_url(object(), options) is None


def test_job_url_of_a_dataflow_job_names_region_project_and_id():

  class SubmittedJob:  # what DataflowPipelineResult offers: job_id()
    def job_id(self):
      return "2026-01-01_00_00_00-123"

  options = PipelineOptions(["--project=my-project", "--region=us-central1"])
  assert options.view_as(GoogleCloudOptions).project == "my-project"
  assert prepare.job_url(SubmittedJob(), options) == (
    "https://console.cloud.google.com/dataflow/jobs/us-central1/2026-01-01_00_00_00-123"
    "?project=my-project"
  )
