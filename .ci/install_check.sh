#!/usr/bin/env bash
# Installs fedbeam the way the README's "Installing" section says, in fresh Python 3.11 venvs
# outside the checkout, and uses each install on a small input. Needs the package registry
# and nothing else. Stages (default: all, in this order):
#   core     pip install of the built wheel: fedbeam prepare/inspect/validate and the
#            TensorFlow reader (open_store), with no TensorFlow Federated installed;
#            `fedbeam train` then fails naming the extra it needs
#   pip      training with plain pip: fedbeam[tff-deps], then TFF 0.87 with --no-deps;
#            `fedbeam train` runs a round
#   uv       training with uv: fedbeam[tff] with the jax override; `fedbeam train` runs
#   project  a pyproject.toml project depending on fedbeam[tff] (uv override-dependencies,
#            `uv sync`); loads the store as a StoreClientData
# Usage: .ci/install_check.sh [core] [pip] [uv] [project]     (`make install-check`)
# uv comes from UV (default: make's .venv-tools/bin/uv, then uv on PATH).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3.11}
if [[ -z "${UV:-}" ]]; then
  if [[ -x "$ROOT/.venv-tools/bin/uv" ]]; then UV=$ROOT/.venv-tools/bin/uv; else UV=uv; fi
fi
[[ "$UV" != */* || "$UV" == /* ]] || UV=$PWD/$UV   # the stages run in other directories
STAGES=("$@")
[[ ${#STAGES[@]} -gt 0 ]] || STAGES=(core pip uv project)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fedbeam-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/fedbeam/__init__.py")
WHEEL=$WORK/dist/fedbeam-$VERSION-py3-none-any.whl

step() { echo "== install-check $(date +%T) $*"; }
fail() { echo "install-check: FAILED: $*" >&2; exit 1; }

# The wheel, built from a copy of the tracked files (the checkout is left as it is).
step "building the wheel"
mkdir -p "$WORK/src"
# -P keeps symlinks (fedbeam/schemas -> ../schemas) as they are in the checkout.
while IFS= read -r -d '' file; do
  if [[ -e "$ROOT/$file" || -L "$ROOT/$file" ]]; then
    (cd "$ROOT" && cp -P --parents "$file" "$WORK/src")
  fi
done < <(git -C "$ROOT" ls-files -z --cached --others --exclude-standard)
(cd "$WORK/src" && "$PYTHON" -m pip wheel --quiet --no-deps -w dist .)
mv "$WORK/src/dist" "$WORK/dist"
[[ -f "$WHEEL" ]] || fail "no wheel at $WHEEL"
"$PYTHON" - "$WHEEL" <<'EOF' || fail "the wheel lacks the Avro schemas"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert {"fedbeam/schemas/manifest.avsc", "fedbeam/schemas/metadata.avsc"} <= set(names), names
EOF


# A small input: 6 clients of 8x8 "images" with labels, as TFRecord of tf.train.Example.
make_input() {
  "$1" - "$WORK/input.tfrecord" <<'EOF'
import sys
import numpy as np
from fedbeam import testing
rng = np.random.default_rng(0)
clients = {f"writer {c}": [{"pixels": rng.random((8, 8), dtype=np.float32),
                             "label": int(rng.integers(10))} for _ in range(3 + c)]
           for c in range(6)}
testing.write_tfrecord_input(sys.argv[1], clients)
EOF
}

# The versions an install resolved to, for the log.
versions() {
  "$1/bin/python" - "$2" <<'EOF'
import importlib.metadata as m, sys
names = ("apache-beam", "tensorflow", "numpy", "protobuf", "pyarrow", "fastavro",
         "tensorflow-federated", "jax", "jaxlib")
found = []
for n in names:
  try:
    found.append(f"{n} {m.version(n)}")
  except m.PackageNotFoundError:
    pass
print(f"== install-check {sys.argv[1]} resolved: " + ", ".join(found))
EOF
}

# prepare, inspect and validate with the venv's `fedbeam`, into $WORK/store-$2.
prepare_store() {
  local venv=$1 store=$WORK/store-$2
  "$venv/bin/fedbeam" prepare --input "$WORK/input.tfrecord" --input-format tfrecord \
      --client-id-key client_id --output "$store" --num-test-clients 2 > "$WORK/prepare.log" 2>&1 \
    || { cat "$WORK/prepare.log"; fail "fedbeam prepare ($2)"; }
  "$venv/bin/fedbeam" inspect "$store" --json > "$WORK/inspect.json" \
    || fail "fedbeam inspect ($2)"
  "$venv/bin/python" - "$WORK/inspect.json" <<'EOF'
import json, sys
splits = json.load(open(sys.argv[1]))["splits"]
assert {n: s["num_clients"] for n, s in splits.items()} == {"train": 4, "test": 2}, splits
assert sum(s["num_examples"] for s in splits.values()) == sum(3 + c for c in range(6)), splits
EOF
  "$venv/bin/fedbeam" validate "$store" --deep > "$WORK/validate.log" \
    || { cat "$WORK/validate.log"; fail "fedbeam validate ($2)"; }
  grep -q '^OK' "$WORK/validate.log" || fail "fedbeam validate did not print OK ($2)"
}

train_one_round() {
  local venv=$1 store=$WORK/store-$2
  "$venv/bin/fedbeam" train "$store" --model digits-cnn --rounds 1 --clients-per-round 2 \
      --batch-size 4 --no-progress --output "$WORK/run-$2" > "$WORK/train.log" 2>&1 \
    || { cat "$WORK/train.log"; fail "fedbeam train ($2)"; }
  [[ $(wc -l < "$WORK/run-$2/metrics.csv") -eq 2 ]] || fail "metrics.csv has no round ($2)"
}

# Each stage runs the README's commands in its own directory, next to dist/ (the wheel).
enter() { mkdir -p "$WORK/$1" && cd "$WORK/$1" && ln -sfn ../dist dist; }

stage_core() {
  enter core
  step "core: pip install dist/$(basename "$WHEEL")"
  "$PYTHON" -m venv venv
  venv/bin/pip install --quiet "dist/fedbeam-$VERSION-py3-none-any.whl"
  versions venv core
  make_input venv/bin/python
  prepare_store venv core
  step "core: the TensorFlow reader, without TensorFlow Federated"
  venv/bin/python - "$WORK/store-core" <<'EOF'
import importlib.util, sys
import numpy as np
from fedbeam.runtime import open_store
assert importlib.util.find_spec("tensorflow_federated") is None, "TFF is installed"
for name in ("matplotlib", "sklearn", "tqdm", "psutil"):
  assert importlib.util.find_spec(name) is None, f"{name} is installed by the core"
reader = open_store(sys.argv[1])
assert len(reader.client_ids) == 6, reader.client_ids
assert sorted(reader.splits) == ["test", "train"], reader.splits
total = 0
for cid in reader.client_ids:
  elements = list(reader.create_tf_dataset_for_client(cid).as_numpy_iterator())
  assert len(elements) == reader.num_examples(cid) == 3 + int(cid.split()[-1]), cid
  # Example float_lists are flat: the spec inferred from TFRecord input is [64].
  assert elements[0]["pixels"].shape == (64,) and elements[0]["pixels"].dtype == np.float32
  total += len(elements)
assert total == sum(3 + c for c in range(6))
assert "tensorflow_federated" not in sys.modules
EOF
  step "core: pip install of the checkout's directory (the same build, from source)"
  venv/bin/pip install --quiet "$WORK/src"
  venv/bin/fedbeam validate "$WORK/store-core" > "$WORK/validate.log" || fail "validate (source)"
  step "core: fedbeam train names the extra it needs"
  if venv/bin/fedbeam train "$WORK/store-core" --model digits-cnn --rounds 1 \
      --clients-per-round 2 --output "$WORK/run-core" > "$WORK/train.log" 2>&1; then
    fail "fedbeam train ran without TensorFlow Federated"
  fi
  grep -q 'fedbeam\[tff\]' "$WORK/train.log" || { cat "$WORK/train.log"; fail "train message"; }
}

stage_pip() {
  enter pip
  step "pip: fedbeam[tff-deps], then tensorflow-federated with --no-deps"
  "$PYTHON" -m venv venv
  venv/bin/pip install --quiet "dist/fedbeam-$VERSION-py3-none-any.whl[tff-deps]"
  venv/bin/pip install --quiet --no-deps tensorflow-federated==0.87.0
  versions venv pip
  make_input venv/bin/python
  prepare_store venv pip
  train_one_round venv pip
}

stage_uv() {
  enter uv
  step "uv: fedbeam[tff] with the jax override"
  "$UV" venv --quiet --python "$PYTHON" venv
  printf 'jax==0.4.13\njaxlib==0.4.13\n' > overrides.txt
  "$UV" pip install --quiet --python venv/bin/python \
      "fedbeam[tff] @ ./dist/fedbeam-$VERSION-py3-none-any.whl" --override overrides.txt
  versions venv uv
  make_input venv/bin/python
  prepare_store venv uv
  train_one_round venv uv
}

stage_project() {
  enter myproject
  step "project: a pyproject.toml project with fedbeam[tff], uv sync"
  cat > pyproject.toml <<EOF
[project]
name = "myproject"
version = "0.1.0"
requires-python = ">=3.11,<3.12"
dependencies = ["fedbeam[tff]"]

[tool.uv]
# tensorflow-federated 0.87 pins jax==0.4.14, whose jaxlib wheels are no longer served.
override-dependencies = ["jax==0.4.13", "jaxlib==0.4.13"]

[tool.uv.sources]
fedbeam = { path = "dist/fedbeam-$VERSION-py3-none-any.whl" }
EOF
  "$UV" sync --quiet --python "$PYTHON"
  versions .venv project
  make_input .venv/bin/python
  prepare_store .venv project
  .venv/bin/python - "$WORK/store-project" <<'EOF'
import sys
import tensorflow_federated as tff
from fedbeam.runtime import load_client_data, stop_tff_workers
data = load_client_data(sys.argv[1], split="train")
assert isinstance(data, tff.simulation.datasets.ClientData)
assert len(data.client_ids) == 4, data.client_ids
stop_tff_workers()
EOF
}

for stage in "${STAGES[@]}"; do
  case "$stage" in
    core|pip|uv|project) start=$SECONDS; "stage_$stage"; step "$stage: passed in $((SECONDS - start)) s" ;;
    *) fail "unknown stage $stage (core, pip, uv, project)" ;;
  esac
done
step "passed: ${STAGES[*]}"
