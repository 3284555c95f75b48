"""Stopping TFF's worker_binary: registered when a store is loaded, not on import."""

import subprocess
import sys
import textwrap

import pytest

from fedbeam import testing

_PROBE = """
import atexit
from fedbeam.runtime import tff_worker
import fedbeam.runtime.client_data as client_data
imported = (tff_worker._registered, atexit._ncallbacks())
store = client_data.load_client_data({store!r})
print("RESULT", imported[0], tff_worker._registered, atexit._ncallbacks() - imported[1])
"""


@pytest.mark.slow
def test_importing_the_runtime_registers_nothing_and_loading_a_store_registers_the_cleanup(
  tmp_path,
):
  store = testing.prepare_store({"a": [{"x": 1.0}], "b": [{"x": 2.0}]}, tmp_path)
  # A fresh interpreter: the first import of the runtime in the process.
  out = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(_PROBE.format(store=store))],
    capture_output=True,
    text=True,
    timeout=600,
    check=True,
  ).stdout
  result = [line for line in out.splitlines() if line.startswith("RESULT ")]
  assert result == ["RESULT False True 1"]
