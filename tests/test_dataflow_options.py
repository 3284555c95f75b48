"""The prepare pipeline, built for Dataflow, translates to a runner API proto and pickles.

Nothing here contacts a cloud service: Beam's `--dry_run=True` skips the GCS
bucket look-ups of option validation (without it, building a Pipeline with
DataflowRunner options blocks for minutes without a network), and makes the
DataflowRunner build the job and return instead of submitting it. The
documented commands are read from docs/dataflow.md.
"""

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import apache_beam as beam
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner
import numpy as np
import pytest

from fedbeam import testing
from fedbeam.cli import _check_beam_args, build_parser, main
from fedbeam.format.spec import ElementSpec
from fedbeam.pipelines.prepare import PrepareConfig, PrepareStore, job_key

DATAFLOW_ARGS = [
  "--runner=DataflowRunner",
  "--project=fedbeam-test-project",
  "--region=us-central1",
  "--temp_location=gs://fedbeam-test-bucket/tmp",
  "--sdk_container_image=us-docker.pkg.dev/fedbeam-test-project/images/fedbeam:0.1.0",
  "--save_main_session",
  "--dry_run=True",  # no GCS bucket look-ups while the options are validated
]
BUCKET = "gs://fedbeam-test-bucket"

_COMBINE_URNS = {
  common_urns.composites.COMBINE_PER_KEY.urn,
  common_urns.composites.COMBINE_GLOBALLY.urn,
  common_urns.combine_components.COMBINE_PER_KEY_PRECOMBINE.urn,
  common_urns.combine_components.COMBINE_PER_KEY_MERGE_ACCUMULATORS.urn,
  common_urns.combine_components.COMBINE_PER_KEY_EXTRACT_OUTPUTS.urn,
  common_urns.combine_components.COMBINE_GROUPED_VALUES.urn,
  common_urns.combine_components.COMBINE_PER_KEY_CONVERT_TO_ACCUMULATORS.urn,
}

_STANDARD_DOFN_URNS = {python_urns.KEY_WITH_NONE_DOFN}


def _configs(tmp_path):
  sqlite = testing.write_tff_sqlite_input(
    tmp_path / "in.sqlite",
    {"a": [{"x": np.float32(1.0)}], "b": [{"x": np.float32(2.0)}]},
    {"x": {"dtype": "float32", "shape": []}},
  )
  spec = ElementSpec.from_json(
    {"x": {"dtype": "float32", "shape": [2]}, "label": {"dtype": "int32", "shape": []}}
  )
  return {
    "tfrecord": (
      PrepareConfig(
        input=f"{BUCKET}/in/*.tfrecord",
        input_format="tfrecord",
        output=f"{BUCKET}/store",
        client_id_key="client_id",
      ),
      [f"{BUCKET}/in/part-0.tfrecord", f"{BUCKET}/in/part-1.tfrecord"],
    ),
    "avro": (
      PrepareConfig(
        input=f"{BUCKET}/in/*.avro",
        input_format="avro",
        output=f"{BUCKET}/store",
        client_id_key="user",
        element_spec=spec,
        order_by="label",
        num_shards=4,
      ),
      [f"{BUCKET}/in/part-0.avro"],
    ),
    # A local database: the launcher reads its row ranges; on Dataflow the
    # workers would need the file at the same path (docs/dataflow.md).
    "tff-sqlite": (
      PrepareConfig(
        input=sqlite, input_format="tff-sqlite", output=f"{BUCKET}/store", order_by="@input"
      ),
      [sqlite],
    ),
    "split": (
      PrepareConfig(
        input=f"{BUCKET}/in/*.tfrecord",
        input_format="tfrecord",
        output=f"{BUCKET}/store",
        client_id_key="client_id",
        num_test_clients=10,
        split_seed=3,
        empty_clients="drop",
      ),
      [f"{BUCKET}/in/part-0.tfrecord"],
    ),
  }


def _build(config, paths):
  pipeline = beam.Pipeline(options=PipelineOptions(DATAFLOW_ARGS))
  inputs = [(p, 0, 0.0) for p in paths]
  _ = pipeline | "Prepare" >> PrepareStore(config, paths, job_key(config, inputs))
  return pipeline


def _shipped_functions(proto):
  """(transform name, unpickled DoFn or CombineFn) for every user function in the proto."""
  found = []
  for t in proto.components.transforms.values():
    urn = t.spec.urn
    if urn == common_urns.primitives.PAR_DO.urn:
      payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
      if payload.do_fn.urn != python_urns.PICKLED_DOFN_INFO:
        # Beam's own standard DoFns (e.g. KeyWithVoid) ship as a URN, not code.
        assert payload.do_fn.urn in _STANDARD_DOFN_URNS, (t.unique_name, payload.do_fn.urn)
        continue
      fn = pickler.loads(payload.do_fn.payload)[0]
      found.append((t.unique_name, fn))
    elif urn in _COMBINE_URNS:
      payload = beam_runner_api_pb2.CombinePayload.FromString(t.spec.payload)
      assert payload.combine_fn.urn == python_urns.PICKLED_COMBINE_FN, t.unique_name
      found.append((t.unique_name, pickler.loads(payload.combine_fn.payload)))
  return found


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
  return _configs(tmp_path_factory.mktemp("dataflow"))


@pytest.mark.parametrize("name", ["tfrecord", "avro", "tff-sqlite", "split"])
def test_prepare_pipeline_translates_to_a_runner_api_proto_for_dataflow(configs, name):
  config, paths = configs[name]
  pipeline = _build(config, paths)
  assert isinstance(pipeline.runner, DataflowRunner)
  proto = pipeline.to_runner_api()
  names = {t.unique_name for t in proto.components.transforms.values()}
  for label in [
    "Prepare",
    "Prepare/Read",
    "Prepare/GroupByClient",
    "Prepare/WriteStore",
    "Prepare/WriteStore/WriteClientFiles",
    "Prepare/WriteStore/Commit",
  ]:
    assert label in names, label
  if name == "split":
    assert "Prepare/SplitTrainTest" in names
  # The proto is self-contained: a pipeline rebuilt from it translates to the same graph.
  rebuilt = beam.Pipeline.from_runner_api(proto, pipeline.runner, pipeline.options)
  again = rebuilt.to_runner_api()
  assert {t.unique_name for t in again.components.transforms.values()} == names
  assert (
    json.loads(json.dumps(pipeline.options.get_all_options()))["project"] == "fedbeam-test-project"
  )


@pytest.mark.parametrize("name", ["tfrecord", "avro", "tff-sqlite", "split"])
def test_every_shipped_function_pickles_and_unpickles_with_beams_pickler(configs, name):
  config, paths = configs[name]
  proto = _build(config, paths).to_runner_api()
  functions = _shipped_functions(proto)
  fedbeam_classes = set()
  for unique_name, fn in functions:
    again = pickler.loads(pickler.dumps(fn))
    assert type(again) is type(fn), unique_name
    if type(fn).__module__.startswith("fedbeam"):
      fedbeam_classes.add(type(fn).__name__)
  assert {
    "_WriteClientFile",
    "_WriteManifestFile",
    "_CommitStore",
    "StoreStatsFn",
  } <= fedbeam_classes
  if name == "tfrecord":
    assert {"_ReadTFRecordFile", "_EncodeAndPregroup", "InferElementSpecFn"} <= fedbeam_classes


@pytest.mark.parametrize("name", ["tfrecord", "avro", "tff-sqlite", "split"])
def test_every_fedbeam_ptransform_pickles(configs, name):
  config, paths = configs[name]
  pipeline = _build(config, paths)
  transforms = []

  class Collect(beam.pipeline.PipelineVisitor):
    def enter_composite_transform(self, node):
      self.visit_transform(node)

    def visit_transform(self, node):
      if node.transform is not None and type(node.transform).__module__.startswith("fedbeam"):
        transforms.append((node.full_label, node.transform))

  pipeline.visit(Collect())
  assert {label for label, _ in transforms} >= {"Prepare", "Prepare/Read", "Prepare/WriteStore"}
  for label, transform in transforms:
    again = pickler.loads(pickler.dumps(transform))
    assert type(again) is type(transform), label


# ----------------------------------------------------------------------------
# The documented commands, and the Dataflow job they build (--dry_run=True)
# ----------------------------------------------------------------------------

DATAFLOW_DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "dataflow.md")
DOC_SPEC = ElementSpec.from_json(
  {"pixels": {"dtype": "float32", "shape": [28, 28]}, "label": {"dtype": "int32", "shape": []}}
)


def _documented_commands():
  """Every `fedbeam prepare` command in docs/dataflow.md, as the argument list `fedbeam` gets."""
  with open(DATAFLOW_DOC, encoding="utf-8") as f:
    text = f.read()
  commands = []
  for block in re.findall(r"^ *```sh\n(.*?)^ *```", text, flags=re.S | re.M):
    words = shlex.split(block.replace("\\\n", " "), comments=True)
    if words[:2] == [".venv/bin/fedbeam", "prepare"]:
      commands.append(words[1:])
  return commands


def _parse(argv):
  """(fedbeam's parsed flags, the pass-through Beam flags) as `fedbeam` splits them."""
  args, beam_args = build_parser().parse_known_args(argv)
  assert args.command == "prepare"
  return args, beam_args


def _config(args):
  """The PrepareConfig `fedbeam prepare` builds from its flags, with DOC_SPEC for the spec file."""
  fields = {f.name for f in dataclasses.fields(PrepareConfig)}
  # The partitioner's flags become a PartitionConfig; the documented Dataflow jobs have none.
  partition_flags = (
    "partition",
    "num_clients",
    "label_key",
    "partition_seed",
    "dirichlet_alpha",
    "min_client_examples",
    "self_balancing",
    "shards_per_client",
    "shard_size",
  )
  assert args.partition is None
  flags = {
    k: v
    for k, v in vars(args).items()
    if k not in ("command", "verbose", "element_spec") + partition_flags
  }
  assert set(flags) <= fields, set(flags) - fields
  return PrepareConfig(
    **flags,
    element_spec=DOC_SPEC if args.element_spec else None,
    element_spec_path=args.element_spec,
  )


def _command(input_format, *, expansion):
  """The documented command for this input format, with or without expansion."""
  found = [
    argv
    for argv in _documented_commands()
    if _parse(argv)[0].input_format == input_format
    and (_parse(argv)[0].num_transformed_clients is not None) == expansion
    and _parse(argv)[0].element_spec
  ]
  assert len(found) == 1, found
  return found[0]


def test_documented_commands_pass_the_cli():
  commands = _documented_commands()
  assert len(commands) == 4  # TFRecord, Avro, expansion + split, staged wheel
  for argv in commands:
    args, beam_args = _parse(argv)
    assert args.output.startswith("gs://my-bucket/stores/")
    assert "--runner=DataflowRunner" in beam_args
    assert _check_beam_args(beam_args) is None, (argv, _check_beam_args(beam_args))
  staged = [_parse(argv)[1] for argv in commands if "--extra_package" in argv]
  assert staged and staged[0][-2:] == ["--extra_package", "dist/fedbeam-0.1.0-py3-none-any.whl"]


# Runs in a fresh interpreter (not this module): loads every pickled payload of
# a pipeline proto the way a Beam worker does, with the given pickle library.
_LOAD_JOB = r'''
import json, sys, types
from apache_beam.internal import pickler
from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners import pipeline_context
from apache_beam.transforms import core

library, proto_paths = sys.argv[1], sys.argv[2:]
pickler.set_library(library)
combine_urns = {u for u in (common_urns.composites.COMBINE_PER_KEY.urn,
                            common_urns.composites.COMBINE_GLOBALLY.urn)}
combine_urns |= {getattr(common_urns.combine_components, n).urn
                 for n in dir(common_urns.combine_components) if n.isupper()}


def describe(obj):
  """module.name of a function or class, else of the object's class; Map/FlatMap's function."""
  if type(obj).__name__ == "CallableWrapperDoFn":
    obj = obj._fn
  if isinstance(obj, (types.FunctionType, type)):
    return f"{obj.__module__}.{obj.__qualname__}"
  return f"{type(obj).__module__}.{type(obj).__qualname__}"


def load(kind, where, fn):
  try:
    loaded.append([kind, where, describe(fn())])
  except Exception as e:
    failed.append([kind, where, f"{type(e).__name__}: {e}"])


def load_all(proto):
  context = pipeline_context.PipelineContext(proto.components)
  for tid, t in sorted(proto.components.transforms.items()):
    if t.spec.urn == common_urns.primitives.PAR_DO.urn:
      payload = beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload)
      if payload.do_fn.urn == python_urns.PICKLED_DOFN_INFO:
        load("dofn", tid, lambda: pickler.loads(payload.do_fn.payload)[0])
      for tag, si in sorted(payload.side_inputs.items()):
        load("view_fn", f"{tid}/{tag}", lambda: pickler.loads(si.view_fn.payload))
        load("window_mapping_fn", f"{tid}/{tag}", lambda: pickler.loads(si.window_mapping_fn.payload))
    elif t.spec.urn in combine_urns:
      payload = beam_runner_api_pb2.CombinePayload.FromString(t.spec.payload)
      load("combine_fn", tid, lambda: core.CombineFn.from_runner_api(payload.combine_fn, context))
    elif t.spec.urn == python_urns.PICKLED_TRANSFORM:
      load("transform", tid, lambda: pickler.loads(t.spec.payload))
  for cid, c in sorted(proto.components.coders.items()):
    if c.spec.urn == python_urns.PICKLED_CODER:
      load("coder", cid, lambda: context.coders.get_by_id(cid))
  for wid, w in sorted(proto.components.windowing_strategies.items()):
    if w.window_fn.urn == python_urns.PICKLED_WINDOWFN:
      load("window_fn", wid, lambda: context.windowing_strategies.get_by_id(wid))


results = []
for path in proto_paths:
  loaded, failed = [], []
  with open(path, "rb") as f:
    load_all(beam_runner_api_pb2.Pipeline.FromString(f.read()))
  results.append({"loaded": loaded, "failed": failed})
test_modules = sorted(m for m in sys.modules if m.startswith(("tests", "test_", "conftest")))
print(json.dumps({"jobs": results, "test_modules": test_modules}))
'''


def _load_in_fresh_process(protos, library, tmp_path):
  """What `_LOAD_JOB` loaded from each proto, in one new interpreter started outside the repository.

  Returns ({name: {"loaded": [[kind, where, type]], "failed": [...]}}, test modules it imported).
  """
  paths = []
  for name, proto in protos.items():
    path = tmp_path / f"{name}-{library}.pb"
    path.write_bytes(proto.SerializeToString())
    paths.append(str(path))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run(
    [sys.executable, "-c", _LOAD_JOB, library] + paths,
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  return dict(zip(protos, out["jobs"])), out["test_modules"]


def _pickled_dofn_transforms(proto):
  return {
    tid
    for tid, t in proto.components.transforms.items()
    if t.spec.urn == common_urns.primitives.PAR_DO.urn
    and beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload).do_fn.urn
    == python_urns.PICKLED_DOFN_INFO
  }


def _dry_run(argv, library):
  """The Dataflow job the documented command builds: DataflowRunner with --dry_run=True."""
  args, beam_args = _parse(argv)
  config = _config(args)
  paths = [config.input.replace("*", "00000")]
  options = PipelineOptions(beam_args + ["--dry_run=True", f"--pickle_library={library}"])
  pipeline = beam.Pipeline(options=options)
  assert isinstance(pipeline.runner, DataflowRunner)
  _ = pipeline | "Prepare" >> PrepareStore(config, paths, job_key(config, [(paths[0], 0, 0.0)]))
  result = pipeline.run()
  job = result.job
  # The staged main session (Dataflow with cloudpickle saves it) is written to a
  # local temporary directory Beam leaves behind in a dry run.
  for env in job.proto_pipeline.components.environments.values():
    for dep in env.dependencies:
      if dep.type_urn == common_urns.artifact_types.FILE.urn:
        local = beam_runner_api_pb2.ArtifactFilePayload.FromString(dep.type_payload).path
        if local.startswith(tempfile.gettempdir()):
          shutil.rmtree(os.path.dirname(local), ignore_errors=True)
  return job


@pytest.fixture
def restore_pickler():
  """Beam's Pipeline sets the process's pickle library from its options; put it back after."""
  before = "dill" if pickler.is_currently_dill() else "cloudpickle"
  yield
  pickler.set_library(before)


@pytest.mark.parametrize("library", ["cloudpickle", "dill"])
def test_dataflow_dry_run_job_loads_in_a_fresh_process(library, tmp_path, restore_pickler):
  jobs = {
    "tfrecord": _dry_run(_command("tfrecord", expansion=False), library),
    "avro": _dry_run(_command("avro", expansion=False), library),
    "expansion+split": _dry_run(_command("tfrecord", expansion=True), library),
  }
  assert pickler.is_currently_dill() == (library == "dill")
  results, test_modules = _load_in_fresh_process(
    {name: job.proto_pipeline for name, job in jobs.items()}, library, tmp_path
  )
  assert test_modules == []
  for name, job in jobs.items():
    proto = job.proto_pipeline
    assert job.options.view_as(beam.options.pipeline_options.SetupOptions).pickle_library == library
    assert job.proto.name and job.google_cloud_options.project == "my-project"
    assert [e.urn for e in proto.components.environments.values()] == [
      common_urns.environments.DOCKER.urn
    ]
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {
      "Prepare/Read",
      "Prepare/GroupByClient",
      "Prepare/WriteStore/WriteClientFiles",
      "Prepare/WriteStore/Commit",
    } <= names, name
    assert results[name]["failed"] == [], (name, results[name]["failed"])
    loaded = results[name]["loaded"]
    # Every ParDo with a pickled DoFn, as counted here from the proto, loaded there.
    assert {where for kind, where, _ in loaded if kind == "dofn"} == _pickled_dofn_transforms(
      proto
    ), name
    kinds = {kind for kind, _, _ in loaded}
    assert {"dofn", "combine_fn", "view_fn", "window_mapping_fn", "coder"} <= kinds, (name, kinds)
    fedbeam_types = {t.rsplit(".", 1)[1] for _, _, t in loaded if t.startswith("fedbeam.")}
    assert {
      "_WriteClientFile",
      "_WriteManifestFile",
      "_CommitStore",
      "StoreStatsFn",
      "_EncodeAndPregroup",
    } <= fedbeam_types, (name, fedbeam_types)
    if name == "expansion+split":
      assert "Prepare/SplitTrainTest" in names
      assert "_ExpandClient" in fedbeam_types
      assert any(
        "Prepare-SplitTrainTest-" in where for kind, where, _ in loaded if kind == "dofn"
      ), loaded


def test_tff_sqlite_input_on_gcs_is_refused(tmp_path, capsys):
  argv = [
    "prepare",
    "--input",
    "gs://my-bucket/emnist.sqlite",
    "--input-format",
    "tff-sqlite",
    "--output",
    str(tmp_path / "out"),
  ] + DATAFLOW_ARGS
  assert main(argv) == 1
  err = capsys.readouterr().err
  assert "--input gs://my-bucket/emnist.sqlite: TFF SQLite databases must be local files" in err
  assert "no store was committed" in err
  assert not (tmp_path / "out").exists()
