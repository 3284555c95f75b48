"""The allocator settings: applied in-process, passed on to worker processes, effective."""

import os
import resource
import subprocess
import sys
import textwrap

import numpy as np

from fedbeam.pipelines import allocator


def test_worker_environment_keeps_a_users_own_settings(monkeypatch):
  monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
  monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
  allocator.tune_worker_processes()
  assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"
  assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(allocator.MMAP_THRESHOLD_BYTES)


def _page_faults_of_reallocating(tuned: bool) -> int:
  script = textwrap.dedent(f"""
      import resource
      import numpy as np
      from fedbeam.pipelines import allocator
      if {tuned!r}:
        assert allocator.tune_allocator()
      def churn():
        for _ in range(50):
          # Several 300 KB buffers alive at once, then all freed: like one
          # client's decode, warp and encode.
          buffers = [np.ones(75_000, np.float32) for _ in range(8)]
          del buffers
      churn()
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      churn()
      print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      """)
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       check=True, timeout=120).stdout
  return int(out.strip().splitlines()[-1])


def test_tuned_allocator_reuses_freed_megabyte_buffers_without_page_faults():
  # With glibc's defaults the freed 2.4 MB goes back to the kernel every
  # round (past the adapted trim threshold), and 8 x 74 pages fault back in.
  untuned = _page_faults_of_reallocating(False)
  tuned = _page_faults_of_reallocating(True)
  assert untuned >= 50 * 8 * 50, untuned
  assert tuned < 50 * 5, tuned
