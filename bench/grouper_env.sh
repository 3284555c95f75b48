#!/usr/bin/env bash
# Creates the virtualenv of Google's dataset_grouper 0.3.0 under build/grouper-venv.
#
# dataset_grouper pins tensorflow 2.12 (fedbeam's stack has 2.14), so it cannot
# share fedbeam's virtualenv. Its wheel imports only with tensorflow-metadata
# 1.16.1 and a CRC32C implementation (google-crc32c) for Beam's TFRecord IO,
# which it does not declare. bench/bench_pipeline.py runs its side in this
# environment through bench/grouper_worker.py.
#
#   bash bench/grouper_env.sh            # idempotent: does nothing when ready
#   PYTHON=python3.11 bash bench/grouper_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
VENV=build/grouper-venv
STAMP="$VENV/.grouper-installed"
if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import dataset_grouper" >/dev/null 2>&1; then
  exit 0
fi
mkdir -p build
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet \
    dataset-grouper==0.3.0 tensorflow-metadata==1.16.1 google-crc32c
"$VENV/bin/python" -c "import dataset_grouper, apache_beam, tensorflow as tf; \
print('dataset_grouper ready: tensorflow', tf.__version__, 'apache_beam', apache_beam.__version__)"
touch "$STAMP"
