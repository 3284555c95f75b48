"""The pipeline's front door: `PrepareStore(config)` in a user's pipeline, `run_prepare`'s scope.

No global side effects: building a prepare pipeline changes nothing in Beam, `run_prepare` and
`fedbeam prepare` put the local-runner guard and the allocator settings on only while their
pipeline runs on the FnApiRunner, and a plain Beam pipeline run afterwards in the same process
runs on Beam's own classes.
"""

import os
import threading

import apache_beam as beam
from apache_beam.runners.direct.direct_runner import DirectRunner
from apache_beam.runners.portability.fn_api_runner import FnApiRunner, worker_handlers
from apache_beam.testing.util import assert_that, equal_to
import numpy as np
import pytest

from fedbeam import cli, testing
from fedbeam.format.metadata import data_root, read_metadata
import fedbeam.pipelines
from fedbeam.pipelines import allocator, local_runner
from fedbeam.pipelines.prepare import default_runner_options, runs_on_local_runner
from fedbeam.store_validation import validate_store


def _clients():
  rng = np.random.RandomState(3)
  return {
    f"client {i}/é": [
      {"label": int(rng.randint(0, 10)), "pixels": rng.uniform(size=16).astype(np.float32)}
      for _ in range(1 + i % 5)
    ]
    for i in range(12)
  }


@pytest.fixture(scope="module")
def tfrecord_input(tmp_path_factory):
  root = tmp_path_factory.mktemp("api")
  return testing.write_tfrecord_input(root / "in.tfrecord", _clients())


def _beams_attributes():
  """{(owner, name): the object Beam's class or module holds} for every attribute the guard sets."""
  return {(owner, name): vars(owner)[name] for owner, name in local_runner.patched_attributes()}


def _data_files(root):
  """{path relative to the data directory: bytes} of the client files and the manifest."""
  data = data_root(str(root), read_metadata(str(root)))
  out = {}
  for dirpath, _, names in os.walk(data):
    for name in names:
      path = os.path.join(dirpath, name)
      if name.endswith((".tfrecord", ".avro")):
        with open(path, "rb") as f:
          out[os.path.relpath(path, data)] = f.read()
  return out


def _cli_prepare(input_path, output, *flags):
  return cli.main(
    [
      "prepare",
      "--input",
      str(input_path),
      "--input-format",
      "tfrecord",
      "--client-id-key",
      "client_id",
      "--output",
      str(output),
      *flags,
    ]
  )


def test_front_door_exports_the_config_the_transform_the_runner_and_the_stages():
  assert fedbeam.pipelines.__all__ == sorted(
    [
      "CheckEmptyClients",
      "ExpandPseudoClients",
      "GroupByClient",
      "InferElementSpec",
      "PlanPseudoClients",
      "PrepareConfig",
      "PrepareError",
      "PrepareResult",
      "PrepareStore",
      "PseudoClientSizes",
      "ReadClientInput",
      "SplitTrainTest",
      "WriteStore",
      "local_runner_scope",
      "run_prepare",
    ]
  )
  for name in fedbeam.pipelines.__all__:
    exported = getattr(fedbeam.pipelines, name)
    assert exported.__doc__ and exported.__doc__.strip(), name
    if isinstance(exported, type) and issubclass(exported, beam.PTransform):
      assert "expand" in vars(exported), name


def test_prepare_store_in_a_users_own_pipeline_writes_the_clis_store_byte_for_byte(
  tfrecord_input, tmp_path
):
  assert _cli_prepare(tfrecord_input, tmp_path / "cli", "--test-fraction", "0.25") == 0
  config = fedbeam.pipelines.PrepareConfig(
    input=tfrecord_input,
    input_format="tfrecord",
    output=str(tmp_path / "own"),
    client_id_key="client_id",
    test_fraction=0.25,
  )
  with beam.Pipeline(runner=FnApiRunner()) as p:
    metadata = p | "Prepare" >> fedbeam.pipelines.PrepareStore(config)
    assert_that(
      metadata | beam.Map(lambda m: sorted((s["name"], s["num_clients"]) for s in m["splits"])),
      equal_to([[("test", 3), ("train", 9)]]),
    )
  own, from_cli = _data_files(tmp_path / "own"), _data_files(tmp_path / "cli")
  assert len([k for k in own if k.endswith(".tfrecord")]) == len(_clients())
  assert len([k for k in own if k.endswith(".avro")]) == 1
  assert sorted(own) == sorted(from_cli)
  assert [k for k in own if own[k] != from_cli[k]] == []
  assert (
    read_metadata(str(tmp_path / "own"))["data_dir"]
    == read_metadata(str(tmp_path / "cli"))["data_dir"]
  )
  report = validate_store(str(tmp_path / "own"), deep=True)
  assert report.ok, report.problems
  testing.assert_store_equals(str(tmp_path / "own"), _clients(), ordered=False)


def test_prepare_store_refuses_a_pattern_matching_no_file_when_the_pipeline_is_built(tmp_path):
  config = fedbeam.pipelines.PrepareConfig(
    input=str(tmp_path / "missing-*.tfrecord"),
    input_format="tfrecord",
    output=str(tmp_path / "out"),
    client_id_key="client_id",
  )
  with pytest.raises(fedbeam.pipelines.PrepareError, match="missing-"):
    _ = beam.Pipeline(runner=FnApiRunner()) | "Prepare" >> fedbeam.pipelines.PrepareStore(config)
  assert not os.path.exists(tmp_path / "out")


def test_building_prepare_store_changes_nothing_in_beam_or_the_environment(
  tfrecord_input, tmp_path
):
  before, environment = _beams_attributes(), dict(os.environ)
  config = fedbeam.pipelines.PrepareConfig(
    input=tfrecord_input,
    input_format="tfrecord",
    output=str(tmp_path / "out"),
    client_id_key="client_id",
    num_transformed_clients=20,
  )
  _ = beam.Pipeline(runner=FnApiRunner()) | "Prepare" >> fedbeam.pipelines.PrepareStore(config)
  assert _beams_attributes() == before
  assert not local_runner.is_guarded() and not allocator.is_tuned()
  assert dict(os.environ) == environment


def _runtime_view(_):
  """What a DoFn running in this process sees of Beam's runner and the allocator settings."""
  from apache_beam.runners.portability.fn_api_runner import fn_runner  # pylint: disable=g-import-not-at-top

  return (
    local_runner.is_guarded(),
    worker_handlers.DATA_BUFFER_TIME_LIMIT_MS,
    vars(fn_runner.BundleManager)["_send_input_to_worker"].__module__,
    os.environ.get("MALLOC_MMAP_THRESHOLD_"),
  )


SEEN_BY_TRANSFORMS = []


def recording_transform(raw_client_id, index):
  """A make_transform_fn (identity) that notes what the DoFn calling it sees."""
  SEEN_BY_TRANSFORMS.append(_runtime_view(None))
  return None


def test_fedbeam_prepare_guards_its_run_and_a_plain_pipeline_afterwards_runs_on_beams_classes(
  tfrecord_input, tmp_path, monkeypatch
):
  monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
  monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
  before = _beams_attributes()
  assert all(
    value.__module__.startswith("apache_beam.") for value in before.values() if callable(value)
  )
  del SEEN_BY_TRANSFORMS[:]
  assert (
    _cli_prepare(
      tfrecord_input,
      tmp_path / "store",
      "--num-transformed-clients",
      "24",
      "--transform",
      f"{__name__}:recording_transform",
    )
    == 0
  )
  # The launcher first tries the transform on the first input record for pseudo-clients 0
  # and 1, before the job and outside its scope: those two calls see Beam as it is.
  precheck, during_run = SEEN_BY_TRANSFORMS[:2], SEEN_BY_TRANSFORMS[2:]
  assert (
    precheck == [(False, 1000, "apache_beam.runners.portability.fn_api_runner.fn_runner", None)] * 2
  )
  # During the run (its DoFns run in this process on the in-memory runner): guarded, tuned.
  assert during_run and set(during_run) == {
    (True, 0, local_runner.__name__, str(allocator.MMAP_THRESHOLD_BYTES))
  }
  # Afterwards: every attribute the guard replaced is Beam's own object again.
  after = _beams_attributes()
  assert list(after) == list(before)
  for key, value in before.items():
    assert after[key] is value, key
  assert not local_runner.is_guarded() and not allocator.is_tuned()
  assert "MALLOC_MMAP_THRESHOLD_" not in os.environ
  with beam.Pipeline(runner=FnApiRunner()) as p:
    seen = p | beam.Create([0]) | beam.Map(_runtime_view)
    assert_that(
      seen,
      equal_to([(False, 1000, "apache_beam.runners.portability.fn_api_runner.fn_runner", None)]),
    )


def test_run_prepare_restores_beam_when_its_pipeline_fails(tmp_path):
  clients = {"a": [{"x": 1.0}], "": [{"x": 2.0}]}  # An empty client id fails the job.
  path = testing.write_tfrecord_input(tmp_path / "in.tfrecord", clients)
  before = _beams_attributes()
  config = fedbeam.pipelines.PrepareConfig(
    input=path, input_format="tfrecord", output=str(tmp_path / "out"), client_id_key="client_id"
  )
  with pytest.raises(fedbeam.pipelines.PrepareError):
    fedbeam.pipelines.run_prepare(config)
  after = _beams_attributes()
  assert all(after[key] is value for key, value in before.items())
  assert not local_runner.is_guarded() and not allocator.is_tuned()


def test_only_beams_local_runners_get_the_scope():
  from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner  # pylint: disable=g-import-not-at-top

  from fedbeam.pipelines.dask import DaskRunner  # pylint: disable=g-import-not-at-top

  assert runs_on_local_runner(FnApiRunner())
  assert runs_on_local_runner(DirectRunner())
  assert not runs_on_local_runner(DataflowRunner())
  assert not runs_on_local_runner(DaskRunner())


@pytest.mark.parametrize(
  "flags, local",
  [
    ([], True),
    (["--runner=DirectRunner"], True),
    (["--runner=DataflowRunner"], False),
    (["--runner=fedbeam.pipelines.dask.DaskRunner"], False),
  ],
)
def test_run_prepare_picks_the_runner_its_flags_name_and_scopes_only_local_ones(flags, local):
  options, runner = default_runner_options(flags)
  assert runs_on_local_runner(runner) is local
  if flags:
    assert type(runner).__name__ == flags[0].split("=")[1].split(".")[-1].replace(
      "DirectRunner", "SwitchingDirectRunner"
    )


def test_scopes_nest_and_the_last_one_out_restores_beam():
  before = _beams_attributes()
  with local_runner.local_runner_scope():
    inside = _beams_attributes()
    assert all(inside[key] is not value for key, value in before.items())
    with local_runner.local_runner_scope():
      assert _beams_attributes() == inside
    assert _beams_attributes() == inside and local_runner.is_guarded()
  after = _beams_attributes()
  assert all(after[key] is value for key, value in before.items())


def test_a_scope_left_by_an_exception_restores_beam():
  before = _beams_attributes()
  with pytest.raises(KeyError):
    with local_runner.local_runner_scope():
      raise KeyError("in the block")
  after = _beams_attributes()
  assert all(after[key] is value for key, value in before.items())
  assert not local_runner.is_guarded()


def test_concurrent_scopes_share_one_guard_until_the_last_exits():
  before = _beams_attributes()
  entered, release = threading.Barrier(3), threading.Event()
  seen = []

  def run():
    with local_runner.local_runner_scope():
      entered.wait()
      release.wait()
    seen.append(local_runner.is_guarded())

  threads = [threading.Thread(target=run) for _ in range(2)]
  for t in threads:
    t.start()
  entered.wait()
  assert local_runner.is_guarded()
  release.set()
  for t in threads:
    t.join()
  after = _beams_attributes()
  assert all(after[key] is value for key, value in before.items())
  assert not local_runner.is_guarded() and len(seen) == 2


@pytest.mark.parametrize(
  "owner, name",
  [
    ("worker_handlers", "DATA_BUFFER_TIME_LIMIT_MS"),
    ("BundleManager", "_send_input_to_worker"),
    ("GroupingBuffer", "partition"),
  ],
)
def test_the_guard_names_a_missing_beam_internal_and_changes_nothing(monkeypatch, owner, name):
  from apache_beam.runners.portability.fn_api_runner import execution, fn_runner  # pylint: disable=g-import-not-at-top

  before = _beams_attributes()
  target = {
    "worker_handlers": worker_handlers,
    "BundleManager": fn_runner.BundleManager,
    "GroupingBuffer": execution.GroupingBuffer,
  }[owner]
  monkeypatch.delattr(target, name)  # What a Beam without it looks like; undone after the test.
  with pytest.raises(local_runner.BeamInternalsError, match=f"{owner}.{name}"):
    with local_runner.local_runner_scope():
      pass
  assert not local_runner.is_guarded()
  for (o, n), value in before.items():
    if (o, n) != (target, name):
      assert vars(o)[n] is value


def test_instance_attributes_are_found_in_the_init_that_sets_them():
  from apache_beam.runners.worker import data_plane  # pylint: disable=g-import-not-at-top

  assert local_runner._sets_attribute(data_plane._GrpcDataChannel, "_to_send")
  # Set by the base class's __init__: found through the MRO.
  assert local_runner._sets_attribute(
    data_plane.TimeBasedBufferingClosableOutputStream, "_flush_callback"
  )
  assert not local_runner._sets_attribute(data_plane._GrpcDataChannel, "_flush_callback")
  assert not local_runner._sets_attribute(data_plane._GrpcDataChannel, "_no_such_attribute")
