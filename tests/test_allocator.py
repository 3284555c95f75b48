"""The allocator settings: applied in-process and to worker processes inside the scope only."""

import os
import subprocess
import sys
import textwrap

from fedbeam.pipelines import allocator


def test_worker_environment_keeps_a_users_own_settings(monkeypatch):
  monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
  monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
  with allocator.tuned_allocator():
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(allocator.MMAP_THRESHOLD_BYTES)
  assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"
  assert "MALLOC_MMAP_THRESHOLD_" not in os.environ


def test_worker_processes_started_inside_the_scope_get_the_settings_and_later_ones_do_not(
  monkeypatch,
):
  for name in allocator.ALLOCATOR_ENVIRONMENT:
    monkeypatch.delenv(name, raising=False)
  probe = [
    sys.executable,
    "-c",
    "import os; print(os.environ.get('MALLOC_MMAP_THRESHOLD_'), "
    "os.environ.get('MALLOC_TRIM_THRESHOLD_'))",
  ]
  with allocator.tuned_allocator():
    with allocator.tuned_allocator():  # Nested: one setting, undone by the outer exit.
      pass
    inside = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()
  after = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()
  assert inside == [str(allocator.MMAP_THRESHOLD_BYTES), str(allocator.TRIM_THRESHOLD_BYTES)]
  assert after == ["None", "None"]
  assert not allocator.is_tuned()


def _page_faults_of_reallocating(tuned: bool, after_scope: bool = False) -> int:
  script = textwrap.dedent(f"""
      import contextlib
      import resource
      import numpy as np
      from fedbeam.pipelines import allocator
      scope = allocator.tuned_allocator() if {tuned!r} else contextlib.nullcontext(True)
      if {after_scope!r}:
        with scope:
          pass
        scope = contextlib.nullcontext(True)
      def churn():
        for _ in range(50):
          # Several 300 KB buffers alive at once, then all freed: like one
          # client's decode, warp and encode.
          buffers = [np.ones(75_000, np.float32) for _ in range(8)]
          del buffers
      with scope as accepted:
        assert accepted
        churn()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        churn()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      """)
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  out = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True, timeout=120
  ).stdout
  return int(out.strip().splitlines()[-1])


def test_tuned_allocator_reuses_freed_megabyte_buffers_without_page_faults():
  # With glibc's defaults the freed 2.4 MB goes back to the kernel every
  # round (past the adapted trim threshold), and 8 x 74 pages fault back in.
  untuned = _page_faults_of_reallocating(False)
  tuned = _page_faults_of_reallocating(True)
  assert untuned >= 50 * 8 * 50, untuned
  assert tuned < 50 * 5, tuned


def test_leaving_the_scope_gives_freed_megabyte_buffers_back_again():
  # glibc's default thresholds are set again on exit: the churn faults as untuned.
  assert _page_faults_of_reallocating(True, after_scope=True) >= 50 * 8 * 50
