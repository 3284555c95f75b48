"""Shared pytest fixtures."""

import os

import pytest

# TensorFlow's C++ start-up chatter buries test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(autouse=True, scope="session")
def _stop_tff_workers_at_exit():
  """Stops the TFF `worker_binary` children this test process started.

  TFF starts one on the first computation and never stops it; left running it
  keeps the test run's stdout/stderr open.
  """
  yield
  from fedbeam.runtime.tff_worker import stop_tff_workers  # pylint: disable=g-import-not-at-top

  stop_tff_workers()
