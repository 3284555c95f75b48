"""`fedbeam prepare` passes every flag Beam accepts through to Beam, and refuses the rest.

The flags are found here independently of fedbeam.beam_flags: by walking
Beam's PipelineOptions classes and calling each one's `_add_argparse_args` on
a parser of the test's own.
"""

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

from apache_beam.options import pipeline_options
import pytest

from fedbeam import beam_flags, testing
from fedbeam.cli import _check_beam_args, build_parser, main
from fedbeam.format.metadata import read_metadata

PREPARE = [
  "prepare",
  "--input",
  "in.tfrecord",
  "--input-format",
  "tfrecord",
  "--client-id-key",
  "client_id",
  "--output",
  "out",
]
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
# The flags issue 15 found refused although Beam accepts them.
REFUSED_BEFORE = [
  "--extra_package",
  "--experiment",
  "--worker_machine_type",
  "--no_use_public_ips",
  "--label",
  "--resource_hint",
  "--environment_option",
  "--dataflow_service_option",
]


def _all_subclasses(cls):
  for sub in cls.__subclasses__():
    yield sub
    yield from _all_subclasses(sub)


def _walk_option_classes():
  """{flag: (class name, argparse action)} over every loaded PipelineOptions subclass."""
  # Every runner Beam names whose module imports here (the Dataflow runner's
  # needs the gcp extra, which the test extra includes).
  for path in pipeline_options.StandardOptions.ALL_KNOWN_RUNNERS:
    try:
      importlib.import_module(path.rsplit(".", 1)[0])
    except ImportError:
      pass
  flags = {}
  for cls in _all_subclasses(pipeline_options.PipelineOptions):
    if "_add_argparse_args" not in cls.__dict__:
      continue
    parser = pipeline_options._BeamArgumentParser(allow_abbrev=False)  # pylint: disable=protected-access
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
    for action in parser._actions:  # pylint: disable=protected-access
      if isinstance(action, argparse._HelpAction):  # pylint: disable=protected-access
        continue
      for name in action.option_strings:
        flags[name] = (cls.__name__, action)
  return flags


# A value the CLI's check reads (it imports the runner --runner names); any other flag gets "1".
VALUES = {"--runner": "FnApiRunner"}


def _spellings(name, action):
  """Every way argparse lets one pass the flag: bare, `=value`, ` value`, as its nargs allows."""
  if action.nargs == 0:
    return [[name]]
  value = VALUES.get(name, "1")
  forms = [[f"{name}={value}"], [name, value]]
  if action.nargs in ("?", "*"):
    forms.append([name])
  return forms


def _assert_passes_through(tokens, prefix=()):
  """The tokens reach Beam untouched by fedbeam's own parser, and the CLI's check accepts them."""
  args, extra = build_parser().parse_known_args(PREPARE + list(prefix) + tokens)
  assert args.command == "prepare"
  assert extra == list(prefix) + tokens, (tokens, extra)
  return _check_beam_args(extra)


def test_every_flag_of_every_beam_options_class_passes_the_cli():
  flags = _walk_option_classes()
  refused = {}
  for name, (cls_name, action) in sorted(flags.items()):
    for tokens in _spellings(name, action):
      error = _assert_passes_through(tokens)
      if error is not None:
        refused[" ".join(tokens)] = (cls_name, error)
  assert refused == {}
  classes = {cls_name for cls_name, _ in flags.values()}
  assert {
    "StandardOptions",
    "GoogleCloudOptions",
    "WorkerOptions",
    "SetupOptions",
    "DebugOptions",
    "DirectOptions",
    "PortableOptions",
    "TestOptions",
  } <= classes
  assert set(REFUSED_BEFORE) | {"--job-server-timeout", "--no_save_main_session"} <= set(flags)
  assert len(flags) > 150


def test_dask_flags_pass_with_the_dask_runner():
  pytest.importorskip("dask")
  pytest.importorskip("distributed")
  importlib.import_module(DASK_RUNNER.rsplit(".", 1)[0])
  dask_flags = {
    name: action
    for name, (cls_name, action) in _walk_option_classes().items()
    if cls_name == "DaskOptions"
  }
  assert "--dask_client_address" in dask_flags and len(dask_flags) >= 5
  for name, action in sorted(dask_flags.items()):
    for tokens in _spellings(name, action):
      assert _assert_passes_through(tokens, prefix=[f"--runner={DASK_RUNNER}"]) is None, tokens


@pytest.mark.parametrize(
  "tokens",
  [
    ["--experiment", "use_runner_v2", "--experiment=shuffle_mode=service", "--experiments=a,b"],
    ["--label", "team=fl", "--label=run=3", "--labels", "x=y"],
    ["--extra_package", "dist/fedbeam-0.1.0-py3-none-any.whl", "--extra_package=dist/b.whl"],
    ["--no_use_public_ips", "--save_main_session", "--no_save_main_session"],
    ["--resource_hint=min_ram=4GB", "--environment_option", "docker_container_image=x"],
    ["--dataflow_service_option=enable_prime", "--worker_machine_type", "n1-standard-4"],
    ["--update_compatibility_version", "--update_compatibility_version=2.60.0"],
    ["--num_workers", "-1"],  # argparse reads a negative number as a value
  ],
)
def test_value_forms_and_repeated_flags_pass(tokens):
  assert _assert_passes_through(tokens) is None


@pytest.mark.parametrize(
  "tokens,message",
  [
    (
      ["--extra_pakage=dist/x.whl"],
      "unknown flag --extra_pakage (neither a fedbeam prepare flag nor a Beam pipeline option; "
      "did you mean --extra_package?)",
    ),
    (
      ["--extra-package", "dist/x.whl"],
      "unknown flag --extra-package (neither a fedbeam prepare "
      "flag nor a Beam pipeline option; did you mean --extra_package?)",
    ),
    (["--no_use_public_ip"], "did you mean --no_use_public_ips?"),
    (["--dataflow-service-option=x"], "did you mean --dataflow_service_option?"),
    (["--experimnt=a"], "did you mean --experiment?"),
    (["--zzqq"], "unknown flag --zzqq (neither a fedbeam prepare flag nor a Beam pipeline option)"),
    (["stray"], "unexpected argument 'stray'"),
    (["--runner=DataflowRunner", "gs://bucket/x"], "unexpected argument 'gs://bucket/x'"),
    (
      ["--save_main_session", "yes"],
      "unexpected argument 'yes' (after --save_main_session, which takes no value)",
    ),
    (
      ["--no_use_public_ips=true"],
      "--no_use_public_ips takes no value (got '--no_use_public_ips=true')",
    ),
    (["--project"], "--project needs a value (--project=VALUE or --project VALUE)"),
    (["--project", "--region=us-central1"], "--project needs a value"),
    (["-p", "x"], "unexpected argument '-p'"),
    (["--"], "unexpected argument '--'"),
  ],
)
def test_misspelled_flags_and_stray_words_are_refused(tokens, message):
  error = _assert_passes_through(tokens)
  assert error is not None and message in error, error


def test_cli_exits_2_naming_a_misspelled_flag_and_writes_nothing(tmp_path, capsys):
  path = testing.write_tfrecord_input(tmp_path / "in.tfrecord", {"a": [{"x": 1.0}]})
  out = tmp_path / "out"
  code = main(
    [
      "prepare",
      "--input",
      path,
      "--input-format",
      "tfrecord",
      "--client-id-key",
      "client_id",
      "--output",
      str(out),
      "--experiment=a",
      "--extra_pakage=x.whl",
    ]
  )
  assert code == 2
  assert capsys.readouterr().err == (
    "fedbeam prepare: error: unknown flag --extra_pakage (neither a fedbeam prepare flag nor a "
    "Beam pipeline option; did you mean --extra_package?)\n"
  )
  assert not out.exists()


def test_beam_flags_the_issue_found_refused_run_a_job(tmp_path, capsys):
  clients = {"a": [{"x": 1.0}, {"x": 2.0}], "b": [{"x": 3.0}]}
  path = testing.write_tfrecord_input(tmp_path / "in.tfrecord", clients)
  out = tmp_path / "out"
  code = main(
    [
      "prepare",
      "--input",
      path,
      "--input-format",
      "tfrecord",
      "--client-id-key",
      "client_id",
      "--output",
      str(out),
      "--experiment",
      "a",
      "--experiment=b",
      "--no_use_public_ips",
      "--label=team=fl",
      "--worker_machine_type",
      "n1-standard-4",
      "--resource_hint=min_ram=1GB",
      "--environment_option=k=v",
      "--dataflow_service_option=x",
    ]
  )
  assert code == 0, capsys.readouterr().err
  assert [(s["name"], s["num_clients"]) for s in read_metadata(str(out))["splits"]] == [("all", 2)]
  testing.assert_store_equals(str(out), clients, ordered=False)


_RUNNER_MODULE = """
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner


class ClusterOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument("--cluster_address")
    parser.add_argument("--cluster_local", action="store_true")


class ClusterRunner(FnApiRunner):
  pass
"""

_CHECK = """
import json, sys
from fedbeam.cli import _check_beam_args
print(json.dumps([_check_beam_args(args) for args in json.loads(sys.argv[1])]))
"""


def _has_dask():
  return all(importlib.util.find_spec(m) is not None for m in ("dask", "distributed"))


RUNNER_CASES = [
  ["--cluster_address=tcp://h:1"],
  ["--runner=my_cluster.ClusterRunner", "--cluster_address=tcp://h:1", "--cluster_local"],
  ["--cluster_local", "--runner", "my_cluster:ClusterRunner"],
  ["--runner=my_cluster.NoSuchRunner"],
  ["--runner=my_cluster.ClusterOptions"],
  ["--runner=no_such_package.runners.Runner", "--num_workers=2"],
  ["--runner=Flink"],
  ["--runner=Bogus"],
]
DASK_CASES = [
  ["--dask_client_address=tcp://127.0.0.1:8786"],
  [
    f"--runner={DASK_RUNNER}",
    "--dask_client_address",
    "tcp://127.0.0.1:8786",
    "--dask_connection_timeout=5",
  ],
]


@pytest.fixture(scope="module")
def fresh_process_checks(tmp_path_factory):
  """The CLI's check of RUNNER_CASES (and DASK_CASES with dask installed) in one fresh process.

  That process has imported no runner module, and finds `my_cluster`, a
  runner module with options of its own, on its PYTHONPATH.
  """
  root = tmp_path_factory.mktemp("runner_module")
  (root / "my_cluster.py").write_text(textwrap.dedent(_RUNNER_MODULE))
  cases = RUNNER_CASES + (DASK_CASES if _has_dask() else [])
  env = dict(os.environ, PYTHONPATH=str(root))
  out = subprocess.run(
    [sys.executable, "-c", _CHECK, json.dumps(cases)],
    env=env,
    cwd=root,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  ).stdout
  results = json.loads(out.strip().splitlines()[-1])
  return results[: len(RUNNER_CASES)], results[len(RUNNER_CASES) :]


def test_runner_module_named_by_runner_is_imported_first(fresh_process_checks):
  results, _ = fresh_process_checks
  assert results[0].startswith("unknown flag --cluster_address ")
  assert results[1:4] == [
    None,
    None,
    "--runner my_cluster.NoSuchRunner: module my_cluster has no PipelineRunner class NoSuchRunner",
  ]
  assert results[4] == (
    "--runner my_cluster.ClusterOptions: module my_cluster has no "
    "PipelineRunner class ClusterOptions"
  )
  assert results[5] == (
    "--runner no_such_package.runners.Runner: cannot import module "
    "no_such_package.runners (ModuleNotFoundError: No module named "
    "'no_such_package')"
  )
  assert results[6] is None  # Beam's short runner names resolve as Beam resolves them
  assert results[7].startswith("--runner Bogus: not a Beam runner name (DataflowRunner, ")


def test_dask_runner_flags_need_the_dask_runner_module(fresh_process_checks):
  if not _has_dask():
    pytest.skip("dask and distributed are not installed")
  _, results = fresh_process_checks
  assert results[0].startswith("unknown flag --dask_client_address ")
  assert results[1] is None


def test_beam_flags_table_is_beams_own_parser():
  flags = beam_flags.beam_flags()
  assert flags["--experiment"] is flags["--experiments"]
  assert flags["--experiment"].dest == "experiments"
  assert flags["--no_use_public_ips"].dest == "use_public_ips"
  assert flags["--no_use_public_ips"].nargs == 0
  assert "--help" not in flags and "-h" not in flags
