"""What `pip install fedbeam` promises: the core without TFF, the extras, the lock in range.

The install itself, from a built wheel into fresh venvs, is `.ci/install_check.sh`
(`make install-check`), run by CI after the test suite.
"""

import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib

import numpy as np
from packaging.requirements import Requirement
import pytest

from fedbeam import testing as fbt
from fedbeam.runtime.client_data import StoreClientData, load_client_data
from fedbeam.runtime.store_reader import StoreReader, open_store

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Imported by training or the demo only; the core must not import them. (tqdm is left out:
# google-cloud-bigquery, which apache-beam[gcp] brings into this environment, imports it when
# Beam's BigQuery IO loads. .ci/install_check.sh runs the core where tqdm is not installed.)
NOT_CORE = ("tensorflow_federated", "matplotlib", "sklearn", "psutil")


def _clients():
  rng = np.random.default_rng(3)
  return {
    f"c{i}/ü": [
      {"pixels": rng.random((4, 4), dtype=np.float32), "label": i + j} for j in range(i + 1)
    ]
    for i in range(5)
  }


def _locked() -> dict[str, str]:
  pins = {}
  for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
    if "==" in line and not line.startswith("#"):
      name, version = line.split("==")
      pins[_name(name)] = version.strip()
  return pins


def _name(name: str) -> str:
  return name.strip().lower().replace("_", "-").replace(".", "-")


def _run_hiding_tff(code: str, tmp_path) -> dict:
  """Runs `code` in a fresh Python where `import tensorflow_federated` raises ImportError.

  `code` sets `result` (JSON-able); returns it with `"modules"`: which of
  NOT_CORE the process imported.
  """
  script = tmp_path / "hiding_tff.py"
  script.write_text(
    "import json, sys\n"
    "sys.modules['tensorflow_federated'] = None  # any import of it raises ImportError\n"
    + textwrap.dedent(code)
    + f"\nresult['modules'] = [m for m in {NOT_CORE!r} if sys.modules.get(m) is not None]\n"
    f"open({str(tmp_path / 'result.json')!r}, 'w').write(json.dumps(result))\n"
  )
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  with open(tmp_path / "hiding_tff.log", "w") as log:
    done = subprocess.run(
      [sys.executable, str(script)],
      stdout=log,
      stderr=subprocess.STDOUT,
      cwd=tmp_path,
      env=env,
      timeout=600,
      check=False,
    )
  output = (tmp_path / "hiding_tff.log").read_text()
  assert done.returncode == 0, output[-4000:]
  return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.slow
def test_prepare_inspect_validate_run_without_tensorflow_federated(tmp_path):
  fbt.write_tfrecord_input(tmp_path / "in.tfrecord", _clients())
  result = _run_hiding_tff(
    f"""
    import contextlib, io
    from fedbeam.cli import main
    store = {str(tmp_path / "store")!r}
    result = {{}}
    result["prepare"] = main(["prepare", "--input", {str(tmp_path / "in.tfrecord")!r},
                              "--input-format", "tfrecord", "--client-id-key", "client_id",
                              "--output", store, "--num-test-clients", "2"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      result["inspect"] = main(["inspect", store, "--json"])
    result["summary"] = json.loads(out.getvalue())
    result["validate"] = main(["validate", store, "--deep"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      result["train"] = main(["train", store, "--model", "digits-cnn", "--rounds", "1",
                              "--clients-per-round", "1", "--output", "run"])
    result["train_error"] = err.getvalue()
    """,
    tmp_path,
  )
  assert (result["prepare"], result["inspect"], result["validate"]) == (0, 0, 0)
  assert result["modules"] == []
  splits = result["summary"]["splits"]
  assert {name: s["num_clients"] for name, s in splits.items()} == {"train": 3, "test": 2}
  assert sum(s["num_examples"] for s in splits.values()) == 1 + 2 + 3 + 4 + 5
  # Training needs the extra, and says which one.
  assert result["train"] == 1
  assert "tensorflow-federated" in result["train_error"]
  assert "fedbeam[tff]" in result["train_error"]


@pytest.mark.slow
def test_store_reader_reads_a_store_without_tensorflow_federated(tmp_path):
  clients = _clients()
  store = fbt.prepare_store(clients, tmp_path, order_by="@input")
  result = _run_hiding_tff(
    f"""
    import tensorflow as tf
    from fedbeam.runtime import open_store
    reader = open_store({store!r})
    result = {{"ids": reader.client_ids,
               "counts": [reader.num_examples(c) for c in reader.client_ids],
               "labels": {{c: [int(e["label"]) for e in
                              reader.create_tf_dataset_for_client(c).as_numpy_iterator()]
                          for c in reader.client_ids}},
               "pixels": {{c: reader.client_tensors_fn(c)["pixels"].numpy().tolist()
                          for c in reader.client_ids}}}}

    @tf.function
    def total(cid):
      return reader.serializable_dataset_fn(cid).reduce(
          tf.constant(0, tf.int64), lambda acc, e: acc + tf.cast(e["label"], tf.int64))

    result["traced"] = {{c: int(total(tf.constant(c))) for c in reader.client_ids}}
    """,
    tmp_path,
  )
  assert result["modules"] == []
  assert result["ids"] == sorted(clients)
  assert result["counts"] == [len(clients[c]) for c in sorted(clients)]
  for cid, elements in clients.items():
    assert result["labels"][cid] == [e["label"] for e in elements]
    assert result["traced"][cid] == sum(e["label"] for e in elements)
    np.testing.assert_array_equal(
      np.asarray(result["pixels"][cid], np.float32),
      np.stack([e["pixels"].ravel() for e in elements]),
    )


def test_store_client_data_is_the_store_reader_as_a_tff_client_data(tmp_path):
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  store = fbt.prepare_store(_clients(), tmp_path, num_test_clients=2)
  reader, data = open_store(store), load_client_data(store)
  assert type(reader) is StoreReader and not isinstance(reader, tff.simulation.datasets.ClientData)
  assert isinstance(data, (StoreReader, tff.simulation.datasets.ClientData))
  assert reader.client_ids == data.client_ids
  assert reader.element_type_structure == data.element_type_structure
  for cid in reader.client_ids:
    assert reader.num_examples(cid) == data.num_examples(cid)
    assert reader.split_of(cid) == data.split_of(cid)
    fbt.assert_elements_equal(
      fbt.dataset_elements(reader.create_tf_dataset_for_client(cid)),
      fbt.dataset_elements(data.create_tf_dataset_for_client(cid)),
      ordered=True,
      where=cid,
    )
  fbt.assert_elements_equal(
    fbt.dataset_elements(reader.create_tf_dataset_from_all_clients(seed=5)),
    fbt.dataset_elements(data.create_tf_dataset_from_all_clients(seed=5)),
    ordered=True,
  )
  # A subset keeps the type it was taken from.
  some = reader.client_ids[:2]
  assert type(reader.subset(some)) is StoreReader
  assert type(data.subset(some)) is StoreClientData
  assert (
    StoreReader.from_store(store, split="test").client_ids
    == load_client_data(store, split="test").client_ids
  )


def test_core_dependencies_leave_out_training_and_demo_packages():
  core = {_name(Requirement(r).name) for r in PYPROJECT["dependencies"]}
  assert core.isdisjoint(
    {"tensorflow-federated", "matplotlib", "scikit-learn", "tqdm", "psutil", "jax", "jaxlib"}
  ), core
  assert {"apache-beam", "tensorflow", "fastavro", "google-crc32c"} <= core
  extras = PYPROJECT["optional-dependencies"]
  assert {_name(Requirement(r).name) for r in extras["demo"]} == {"matplotlib", "scikit-learn"}
  assert "tensorflow-federated" in {_name(Requirement(r).name) for r in extras["tff"]}


def test_every_locked_version_is_in_the_declared_ranges():
  locked = _locked()
  declared = list(PYPROJECT["dependencies"])
  for requirements in PYPROJECT["optional-dependencies"].values():
    declared += requirements
  for line in declared:
    requirement = Requirement(line)
    name = _name(requirement.name)
    assert name in locked, f"{name} is declared but not in requirements/lock.txt"
    assert requirement.specifier.contains(locked[name], prereleases=True), (
      f"requirements/lock.txt pins {name}=={locked[name]}, outside {line!r}"
    )
  # Lower bounds are what is tested: the core's are the locked versions.
  for line in PYPROJECT["dependencies"]:
    requirement = Requirement(line)
    lower = [s.version for s in requirement.specifier if s.operator == ">="]
    assert lower == [locked[_name(requirement.name)]], line


def _specifiers(lines) -> dict:
  """name -> SpecifierSet, the specifiers of one name intersected."""
  out = {}
  for line in lines:
    requirement = Requirement(line)
    name = _name(requirement.name)
    out[name] = out[name] & requirement.specifier if name in out else requirement.specifier
  return out


def test_tff_deps_extra_is_tff_requirements_with_the_jax_override():
  # fedbeam[tff-deps] is what pip needs before `pip install --no-deps tensorflow-federated`:
  # TFF's own requirements (jax/jaxlib overridden) and the rest of fedbeam[tff].
  overrides = _specifiers((ROOT / "requirements" / "overrides.txt").read_text().split())
  assert {n: str(s) for n, s in overrides.items()} == {"jax": "==0.4.13", "jaxlib": "==0.4.13"}
  tff = importlib.metadata.requires("tensorflow-federated")
  expected = {**_specifiers(tff), **overrides}
  for name, spec in _specifiers(PYPROJECT["optional-dependencies"]["tff"]).items():
    if name != "tensorflow-federated":
      expected[name] = expected[name] & spec if name in expected else spec
  assert _specifiers(PYPROJECT["optional-dependencies"]["tff-deps"]) == expected


def _commands(text: str) -> list[str]:
  """Shell commands, one per line or `&&` part: continuations joined, quotes, --quiet,
  subshell parentheses and comments dropped."""
  text = text.replace("\\\n", " ")
  commands = []
  for line in text.splitlines():
    line = re.sub(r"\s+#.*$", "", line).replace('"', "").replace(" --quiet", "")
    for part in line.split("&&"):
      part = " ".join(part.split()).strip("() ")
      if part:
        commands.append(part)
  return commands


def test_readme_install_commands_are_the_ones_the_install_check_runs():
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Installing fedbeam", 1)[1].split("\n## ", 1)[0]
  version = importlib.metadata.version("fedbeam")
  script = (ROOT / ".ci" / "install_check.sh").read_text()
  script = (
    script.replace('"$PYTHON"', "python3.11").replace('"$UV"', "uv").replace("$VERSION", version)
  )
  checked = set(_commands(script))
  blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
  assert len(blocks) == 4, blocks
  for block in blocks:
    for command in _commands(block):
      assert command in checked, f"README command not run by .ci/install_check.sh: {command}"
  toml = re.findall(r"```toml\n(.*?)```", section, re.S)
  assert len(toml) == 1 and toml[0] in script, "README's pyproject.toml is not the one checked"
