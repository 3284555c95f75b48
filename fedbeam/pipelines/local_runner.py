"""Makes Beam's local FnApiRunner deliver every element to its workers.

The FnApiRunner (what the DirectRunner runs batch pipelines on, and what
`fedbeam prepare` runs on without `--runner`) sends each stage's input to its
SDK workers over a gRPC data stream. In apache-beam 2.72 the runner opens
those streams as `TimeBasedBufferingClosableOutputStream`s
(`worker_handlers.DATA_BUFFER_TIME_LIMIT_MS`, 1 s), whose background thread
flushes the buffer by copying it (`get()`), handing the copy on, then
clearing it (`_clear()`), while the runner thread keeps writing the stage's
input into the same buffer. A chunk written between the copy and the clear is
dropped, with no error. A stage whose input is large and arrives in many
chunks (a PCollection that a later stage reads after a side input is ready)
then loses elements at random: 8,985 to 87,426 of 400,000 in each of three
runs of `bench/beam_data_plane_loss.py` with
`--direct_running_mode=multi_processing`, none with the guard below
(bench/README.md). In-memory mode (one worker) has no such stream.

`guard_local_runner()` makes those streams size-based, so nothing flushes
them from another thread, and has the runner flush its input stream between
chunks (each chunk holds whole elements), so a stage's input still goes to
the worker in pieces of about 10 MB rather than one message that could pass
gRPC's 2 GB limit. It changes nothing for Dataflow, whose workers do not use
this code. The record-count checks of the prepare pipeline stay in place
whatever runner is used.
"""

from __future__ import annotations

import logging
import threading

_LOGGER = logging.getLogger(__name__)
_lock = threading.Lock()
_guarded = False


def _send_input_in_flushed_chunks(self, process_bundle_id: str, read_transform_id: str,
                                  byte_streams) -> None:
  # BundleManager._send_input_to_worker, flushing after every chunk on the
  # writing thread (the only thread that touches the stream).
  data_out = self._worker_handler.data_conn.output_stream(process_bundle_id, read_transform_id)
  for byte_stream in (byte_streams or []):
    data_out.write(byte_stream)
    data_out.maybe_flush()
  data_out.close()


def guard_local_runner() -> bool:
  """Installs the fix in this process (once); safe to call any number of times.

  Call it before a local pipeline runs; `fedbeam prepare` and `PrepareStore`
  call it for you. Returns True when the guard is in place, False when this
  Beam version lacks the runner internals it adjusts (a warning is logged;
  the prepare pipeline's count checks still refuse to commit a short store).
  """
  global _guarded
  with _lock:
    if _guarded:
      return True
    try:
      from apache_beam.runners.portability.fn_api_runner import fn_runner  # pylint: disable=g-import-not-at-top
      from apache_beam.runners.portability.fn_api_runner import worker_handlers  # pylint: disable=g-import-not-at-top
    except ImportError:
      return False
    manager = getattr(fn_runner, "BundleManager", None)
    if (manager is None or not hasattr(manager, "_send_input_to_worker")
        or not hasattr(worker_handlers, "DATA_BUFFER_TIME_LIMIT_MS")):
      _LOGGER.warning(
          "fedbeam could not guard the local FnApiRunner's data plane against dropped "
          "elements (this Beam version has no BundleManager._send_input_to_worker or "
          "DATA_BUFFER_TIME_LIMIT_MS); the prepare job still checks its record counts")
      return False
    # 0 selects SizeBasedBufferingClosableOutputStream for the runner's data
    # server and for in-process (multi_threading) workers alike.
    worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = 0
    manager._send_input_to_worker = _send_input_in_flushed_chunks  # pylint: disable=protected-access
    _guarded = True
    return True


def is_guarded() -> bool:
  """Whether `guard_local_runner()` has taken effect in this process."""
  return _guarded
