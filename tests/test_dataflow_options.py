"""The prepare pipeline, built for Dataflow, translates to a runner API proto and pickles.

Nothing here runs the pipeline or contacts a cloud service: building a
Pipeline with DataflowRunner options only validates the options, and
`to_runner_api` is what the Dataflow runner submits.
"""

import json

import apache_beam as beam
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner
import numpy as np
import pytest

from fedbeam import testing
from fedbeam.element_spec import ElementSpec
from fedbeam.pipelines.prepare import PrepareConfig, PrepareStore, job_key

DATAFLOW_ARGS = [
    "--runner=DataflowRunner",
    "--project=fedbeam-test-project",
    "--region=us-central1",
    "--temp_location=gs://fedbeam-test-bucket/tmp",
    "--sdk_container_image=us-docker.pkg.dev/fedbeam-test-project/images/fedbeam:0.1.0",
    "--save_main_session",
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
      tmp_path / "in.sqlite", {"a": [{"x": np.float32(1.0)}], "b": [{"x": np.float32(2.0)}]},
      {"x": {"dtype": "float32", "shape": []}})
  spec = ElementSpec.from_json({"x": {"dtype": "float32", "shape": [2]},
                                "label": {"dtype": "int32", "shape": []}})
  return {
      "tfrecord": (PrepareConfig(input=f"{BUCKET}/in/*.tfrecord", input_format="tfrecord",
                                 output=f"{BUCKET}/store", client_id_key="client_id"),
                   [f"{BUCKET}/in/part-0.tfrecord", f"{BUCKET}/in/part-1.tfrecord"]),
      "avro": (PrepareConfig(input=f"{BUCKET}/in/*.avro", input_format="avro",
                             output=f"{BUCKET}/store", client_id_key="user", element_spec=spec,
                             order_by="label", num_shards=4),
               [f"{BUCKET}/in/part-0.avro"]),
      # A local database: the launcher reads its row ranges; on Dataflow the
      # workers would need the file at the same path (docs/dataflow.md).
      "tff-sqlite": (PrepareConfig(input=sqlite, input_format="tff-sqlite",
                                   output=f"{BUCKET}/store", order_by="@input"), [sqlite]),
      "split": (PrepareConfig(input=f"{BUCKET}/in/*.tfrecord", input_format="tfrecord",
                              output=f"{BUCKET}/store", client_id_key="client_id",
                              num_test_clients=10, split_seed=3, empty_clients="drop"),
                [f"{BUCKET}/in/part-0.tfrecord"]),
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
  for label in ["Prepare", "Prepare/Read", "Prepare/GroupByClient", "Prepare/WriteStore",
                "Prepare/WriteStore/WriteClientFiles", "Prepare/WriteStore/Commit"]:
    assert label in names, label
  if name == "split":
    assert "Prepare/SplitTrainTest" in names
  # The proto is self-contained: a pipeline rebuilt from it translates to the same graph.
  rebuilt = beam.Pipeline.from_runner_api(proto, pipeline.runner, pipeline.options)
  again = rebuilt.to_runner_api()
  assert {t.unique_name for t in again.components.transforms.values()} == names
  assert json.loads(json.dumps(pipeline.options.get_all_options()))["project"] == \
      "fedbeam-test-project"


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
  assert {"_WriteClientFile", "_WriteManifestFile", "_CommitStore", "StoreStatsFn"} <= fedbeam_classes
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
