"""The README's examples and docs/cli.md's commands run as written, on a small generated input.

The commands are extracted from the Markdown files; only their paths are
rewritten (`data/...` and `/tmp/...` to a temporary directory). The input is
TFRecord of 28x28 images written flat, as most image TFRecords are, with
the client id in `client_id`: nothing the README does not show is passed.
"""

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from fedbeam import testing as fbt
from fedbeam.format.manifest import read_manifest
from fedbeam.format.metadata import read_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEDBEAM = os.path.join(".venv", "bin", "fedbeam")
NUM_RAW_CLIENTS = 300  # --num-test-clients 100 counts raw clients (--split-by raw).
# The one numeric flag changed: 50 rounds, each evaluated on every test client,
# take minutes; two rounds run the same code.
TRAIN_ROUNDS = "2"

pytestmark = pytest.mark.slow


def _blocks(doc: str, language: str) -> list[str]:
  with open(os.path.join(REPO, doc), encoding="utf-8") as f:
    text = f.read()
  return re.findall(rf"^ *```{language}\n(.*?)^ *```", text, flags=re.S | re.M)


def _shell_commands(doc: str) -> list[list[str]]:
  """Every command of the doc's sh blocks, as argument lists (comments dropped)."""
  commands = []
  for block in _blocks(doc, "sh"):
    for line in block.replace("\\\n", " ").splitlines():
      words = shlex.split(line, comments=True)
      if words:
        commands.append(words)
  return commands


def _rewrite(word: str, tmp: str) -> str:
  """The paths of the docs (`data/...`, `/tmp/...`) moved under `tmp`; nothing else changes."""
  if word.startswith("data/"):
    return os.path.join(tmp, word)
  return word.replace("/tmp/", tmp + "/")


def _run(argv: list[str], tmp: str, log_name: str) -> tuple[int, str]:
  log_path = os.path.join(tmp, log_name)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  with open(log_path, "wb") as log:
    code = subprocess.call(
      argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=900
    )
  with open(log_path, encoding="utf-8", errors="replace") as f:
    return code, f.read()


def _write_images(directory: str, prefix: str = "part") -> None:
  """Two TFRecord files of 28x28 float images stored flat ([784]), labels 0..61."""
  rng = np.random.default_rng(0)
  clients = {
    f"f{i:04d}": [
      {"pixels": rng.random(784, dtype=np.float32), "label": np.int64(rng.integers(0, 62))}
      for _ in range(1 + i % 2)
    ]
    for i in range(NUM_RAW_CLIENTS)
  }
  ids = sorted(clients)
  for part in range(2):
    fbt.write_tfrecord_input(
      os.path.join(directory, f"{prefix}-{part}.tfrecord"),
      {cid: clients[cid] for cid in ids[part::2]},
    )


def _manifest(store: str) -> list[dict]:
  metadata = read_metadata(store)
  return list(read_manifest(store, metadata))


def test_readme_examples_run_as_written(tmp_path):
  tmp = str(tmp_path)
  _write_images(os.path.join(tmp, "data"))
  commands = [c for c in _shell_commands("README.md") if c[0] == FEDBEAM]
  assert [c[1] for c in commands] == ["prepare", "inspect", "validate", "train"]
  outputs = {}
  for i, command in enumerate(commands):
    argv = [_rewrite(w, tmp) for w in command]
    if command[1] == "train":
      argv[argv.index("--rounds") + 1] = TRAIN_ROUNDS
    code, output = _run(argv, tmp, f"readme-{i}.log")
    assert code == 0, (command, output)
    outputs[command[1]] = output
  store = os.path.join(tmp, "store")
  rows = _manifest(store)
  assert len(rows) == 3000
  test_raw = {r["raw_client_id"] for r in rows if r["split"] == "test"}
  train_raw = {r["raw_client_id"] for r in rows if r["split"] == "train"}
  # --num-test-clients 100 holds out 100 writers with all their pseudo-clients.
  assert len(test_raw) == 100 and not test_raw & train_raw
  assert "split test:" in outputs["inspect"] and "split train:" in outputs["inspect"]
  assert outputs["validate"].startswith("OK") or "\nOK" in outputs["validate"]
  with open(os.path.join(tmp, "run", "metrics.csv"), encoding="utf-8") as f:
    rounds = [line.split(",")[0] for line in f.read().splitlines()[1:]]
  assert rounds == ["1", "2"]
  (python_block,) = _blocks("README.md", "python")
  code, output = _run(
    [sys.executable, "-c", python_block.replace("/tmp/", tmp + "/")], tmp, "readme-python.log"
  )
  assert code == 0, output


def test_cli_doc_commands_that_run_offline_run_as_written(tmp_path):
  tmp = str(tmp_path)
  _write_images(os.path.join(tmp, "data"))
  commands = [c for c in _shell_commands("docs/cli.md") if c[0] == "fedbeam"]
  # Inputs this test does not generate: a Hugging Face Parquet export, LEAF's files, TFF's
  # cached databases, and the partitioner example's unkeyed digits (their formats are run by
  # test_input_formats.py, test_sqlite_splits.py and test_partition.py on inputs of their own).
  other_inputs = ("hf/", "leaf/", "~/.tff/", "digits-*")
  elsewhere = [c for c in commands if any(w.startswith(other_inputs) for w in c)]
  assert len(elsewhere) == 5
  commands = [c for c in commands if c not in elsewhere]
  offline = [c for c in commands if "..." not in c and not any(w.startswith("gs://") for w in c)]
  # The first prepare command; the gs:// one needs a bucket; the two with
  # '...' are fragments whose other flags are the first command's.
  assert len(commands) == 4 and len(offline) == 1
  fragments = [c for c in commands if "..." in c]
  local = [c for c in fragments if not any(w.startswith("--runner=") for w in c)]
  assert len(local) == 1
  base = offline[0]
  runs = {
    "plain": base,
    "multi_processing": [("/tmp/store-mp" if w == "/tmp/store" else w) for w in base]
    + local[0][local[0].index("...") + 1 :],
  }
  for name, command in runs.items():
    argv = [FEDBEAM] + [_rewrite(w, tmp) for w in command[1:]]
    code, output = _run(argv, tmp, f"cli-{name}.log")
    assert code == 0, (command, output)
  plain = os.path.join(tmp, "store")
  assert len(_manifest(plain)) == NUM_RAW_CLIENTS
  assert sorted((r["client_id"], r["num_examples"]) for r in _manifest(plain)) == sorted(
    (r["client_id"], r["num_examples"]) for r in _manifest(os.path.join(tmp, "store-mp"))
  )
  for synopsis in ("inspect", "validate"):
    code, output = _run([FEDBEAM, synopsis, plain], tmp, f"cli-{synopsis}.log")
    assert code == 0, output
