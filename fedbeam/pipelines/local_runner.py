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

The guard also changes how the runner hands a grouped PCollection (the output
of a GroupByKey) to the stage that reads it. Beam's `GroupingBuffer.partition`
encodes each worker's whole share into one byte string before any of it is
sent, so the workers wait while the runner encodes, and that share then
travels as a single message of up to gigabytes (copied several times on
the way). With the guard each share is encoded when it is sent, in pieces
of about `GROUPED_CHUNK_BYTES`, so the workers start on the first keys while
the runner encodes the rest; keys, their order and their values are the same
(tests/test_local_runner.py compares both partitions element by element).

Last, the guard lets a worker start on a bundle while its input is still
being sent. Beam's runner sends all of a bundle's input before it asks the
worker to process the bundle; the worker reads a few messages ahead and no
more, so the rest waited, encoded, in the runner's memory while the workers
sat idle (`_InputSender`). With the guard the input of a bundle run on a
gRPC worker goes from a thread of its own, at most `MAX_QUEUED_CHUNKS`
messages ahead of the worker; an error there fails the bundle.
"""

from __future__ import annotations

import logging
import threading
import time

_LOGGER = logging.getLogger(__name__)
_lock = threading.Lock()
_guarded = False


# Chunks at least this large go to the data channel as they are, not through
# the stream's buffer (which would copy them twice more).
_DIRECT_SEND_BYTES = 1 << 20

# Messages a background sender lets wait in a worker's data-channel queue
# before it waits for the channel to take some (each up to GROUPED_CHUNK_BYTES).
MAX_QUEUED_CHUNKS = 16
_QUEUE_POLL_SECONDS = 0.002


def _write_input(data_conn, data_out, byte_streams, may_wait) -> None:
  """Writes a stage's input chunks to `data_out`, flushing on this thread after every chunk.

  Each chunk holds whole elements, so any chunk boundary is a message
  boundary. `may_wait`, when given, bounds the messages queued on
  `data_conn` (see `_InputSender`); it returns False once the bundle is over.
  """
  send = getattr(data_out, "_flush_callback", None)
  queue = getattr(data_conn, "_to_send", None) if may_wait else None
  for byte_stream in (byte_streams or []):
    if queue is not None:
      while queue.qsize() >= MAX_QUEUED_CHUNKS:
        if not may_wait():
          return
        time.sleep(_QUEUE_POLL_SECONDS)
    if send is not None and len(byte_stream) >= _DIRECT_SEND_BYTES:
      if data_out.size():
        data_out.flush()  # What was buffered goes first, to keep the order.
      send(byte_stream)
    else:
      data_out.write(byte_stream)
      data_out.maybe_flush()


class _InputSender:
  """Sends one bundle's input on its own thread, so the worker starts on it at once.

  Beam's BundleManager sends a bundle's whole input before it asks the
  worker to process the bundle, and the worker reads at most a few messages
  of a bundle it has not started; everything else waits, encoded, in the
  runner's memory. For a grouped stage of gigabytes the workers sat idle
  while the runner encoded all of it (about 9 s of a 70 s prepare job on
  10x data, docs/reliability.md). Sent from here, the input streams to a worker
  that is already processing it, at most MAX_QUEUED_CHUNKS messages ahead.
  """

  def __init__(self, data_conn, data_out, byte_streams):
    self.error: BaseException | None = None
    self._bundle_over = threading.Event()
    self._thread = threading.Thread(
        target=self._run, args=(data_conn, data_out, byte_streams),
        name="fedbeam-input-sender", daemon=True)
    self._thread.start()

  def _run(self, data_conn, data_out, byte_streams) -> None:
    try:
      _write_input(data_conn, data_out, byte_streams,
                   lambda: not self._bundle_over.is_set())
    except BaseException as e:  # pylint: disable=broad-except
      self.error = e
    finally:
      if not self._bundle_over.is_set():
        # Also after an error: the worker then ends the bundle, and
        # `finish` fails it instead of letting the worker wait for input forever.
        data_out.close()

  def finish(self) -> BaseException | None:
    """Called once the bundle has ended; returns the sender's error, if any."""
    self._bundle_over.set()
    self._thread.join()
    return self.error


def _send_input_in_background(self, process_bundle_id: str, read_transform_id: str,
                              byte_streams) -> None:
  # BundleManager._send_input_to_worker. Over gRPC the input goes on an
  # `_InputSender`; the in-memory worker runs the bundle inside the request
  # that follows, so its input must be written before it (here, in full).
  from apache_beam.runners.worker import data_plane  # pylint: disable=g-import-not-at-top
  data_conn = self._worker_handler.data_conn
  data_out = data_conn.output_stream(process_bundle_id, read_transform_id)
  if isinstance(data_conn, data_plane._GrpcDataChannel):  # pylint: disable=protected-access
    self.__dict__.setdefault("_fedbeam_senders", []).append(
        _InputSender(data_conn, data_out, byte_streams))
    return
  _write_input(data_conn, data_out, byte_streams, None)
  data_out.close()


def _finishing_input_senders(original_process_bundle):
  """BundleManager.process_bundle that ends the bundle's `_InputSender`s and raises their errors."""

  def process_bundle(self, *args, **kwargs):
    try:
      result = original_process_bundle(self, *args, **kwargs)
    finally:
      errors = [sender.finish() for sender in self.__dict__.pop("_fedbeam_senders", ())]
    for error in errors:
      if error is not None:
        raise RuntimeError("the local runner failed to send a bundle's input to its worker") \
            from error
    return result

  process_bundle.fedbeam_original = original_process_bundle
  return process_bundle


# Encoded size of one piece of a grouped stage input sent to a worker.
GROUPED_CHUNK_BYTES = 8 << 20


class _EncodedShare:
  """One worker's share of a GroupingBuffer: its (key, values) pairs, encoded on iteration.

  Iterating yields byte strings of whole encoded elements, each about
  GROUPED_CHUNK_BYTES; iterating again encodes the same bytes again.
  """

  def __init__(self, items, encode_to_stream, key_decode, in_window):
    self._items = items
    self._encode_to_stream = encode_to_stream
    self._key_decode = key_decode
    self._in_window = in_window

  def __iter__(self):
    from apache_beam.coders.coder_impl import create_OutputStream  # pylint: disable=g-import-not-at-top
    stream = create_OutputStream()
    for encoded_key, values in self._items:
      self._encode_to_stream(self._in_window((self._key_decode(encoded_key), values)), stream,
                             True)
      if stream.size() >= GROUPED_CHUNK_BYTES:
        yield stream.get()
        stream = create_OutputStream()
    if stream.size():
      yield stream.get()


def _partition_lazily(original_partition):
  """GroupingBuffer.partition with `_EncodedShare`s, for the default (global) windowing."""

  def partition(self, n: int):
    if self._grouped_output or not self._windowing.is_default():
      return original_partition(self, n)
    from apache_beam.transforms import window  # pylint: disable=g-import-not-at-top
    from apache_beam.utils import windowed_value  # pylint: disable=g-import-not-at-top
    # What Beam's partition emits for each key under the global window.
    globally_window = window.GlobalWindows.windowed_value(
        None, timestamp=window.GlobalWindow().max_timestamp(),
        pane_info=windowed_value.PaneInfo(
            is_first=True, is_last=True, timing=windowed_value.PaneInfoTiming.ON_TIME,
            index=0, nonspeculative_index=0)).with_value
    items = list(self._table.items())
    self._table.clear()
    encode = self._post_grouped_coder.get_impl().encode_to_stream
    key_decode = self._key_coder.get_impl().decode
    # Key i goes to worker i % n, as in Beam's partition.
    self._grouped_output = [_EncodedShare(items[k::n], encode, key_decode, globally_window)
                            for k in range(n)]
    return self._grouped_output

  partition.fedbeam_original = original_partition
  return partition


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
      from apache_beam.runners.portability.fn_api_runner import execution  # pylint: disable=g-import-not-at-top
      from apache_beam.runners.portability.fn_api_runner import fn_runner  # pylint: disable=g-import-not-at-top
      from apache_beam.runners.portability.fn_api_runner import worker_handlers  # pylint: disable=g-import-not-at-top
      from apache_beam.runners.worker import data_plane  # pylint: disable=g-import-not-at-top
    except ImportError:
      return False
    manager = getattr(fn_runner, "BundleManager", None)
    if (manager is None or not hasattr(manager, "_send_input_to_worker")
        or not hasattr(worker_handlers, "DATA_BUFFER_TIME_LIMIT_MS")
        or not hasattr(data_plane, "_GrpcDataChannel")):
      _LOGGER.warning(
          "fedbeam could not guard the local FnApiRunner's data plane against dropped "
          "elements (this Beam version has no BundleManager._send_input_to_worker, "
          "DATA_BUFFER_TIME_LIMIT_MS or _GrpcDataChannel); the prepare job still checks its "
          "record counts")
      return False
    # 0 selects SizeBasedBufferingClosableOutputStream for the runner's data
    # server and for in-process (multi_threading) workers alike.
    worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = 0
    manager._send_input_to_worker = _send_input_in_background  # pylint: disable=protected-access
    manager.process_bundle = _finishing_input_senders(manager.process_bundle)
    grouping = getattr(execution, "GroupingBuffer", None)
    if grouping is not None and hasattr(grouping, "partition"):
      grouping.partition = _partition_lazily(grouping.partition)
    _guarded = True
    return True


def is_guarded() -> bool:
  """Whether `guard_local_runner()` has taken effect in this process."""
  return _guarded
