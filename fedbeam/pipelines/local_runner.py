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

Inside `local_runner_scope()` (`guarded_runner()` and the allocator settings
of `fedbeam.pipelines.allocator`), which `run_prepare` enters around a run on
the FnApiRunner and nothing else does, the guard makes those streams
size-based, so nothing flushes them from another thread, and has the runner
flush its input stream between chunks (each chunk holds whole elements),
so a stage's input still goes to
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

Nothing is changed on import or while a pipeline is built. The scope checks
every private name of Beam's it reads or replaces before it changes anything
(`check_beam_internals`) and raises `BeamInternalsError` naming the missing
one; on exit it puts Beam's original objects back (`patched_attributes()`
lists what it replaces; tests/test_local_runner.py checks their identity
after a `fedbeam prepare`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

from fedbeam.pipelines.allocator import tuned_allocator

__all__ = [
  "GROUPED_CHUNK_BYTES",
  "MAX_QUEUED_CHUNKS",
  "BeamInternalsError",
  "check_beam_internals",
  "guarded_runner",
  "is_guarded",
  "local_runner_scope",
  "patched_attributes",
]


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
  for byte_stream in byte_streams or []:
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
      target=self._run,
      args=(data_conn, data_out, byte_streams),
      name="fedbeam-input-sender",
      daemon=True,
    )
    self._thread.start()

  def _run(self, data_conn, data_out, byte_streams) -> None:
    try:
      _write_input(data_conn, data_out, byte_streams, lambda: not self._bundle_over.is_set())
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


def _send_input_in_background(
  self, process_bundle_id: str, read_transform_id: str, byte_streams
) -> None:
  # BundleManager._send_input_to_worker. Over gRPC the input goes on an
  # `_InputSender`; the in-memory worker runs the bundle inside the request
  # that follows, so its input must be written before it (here, in full).
  from apache_beam.runners.worker import data_plane  # pylint: disable=g-import-not-at-top

  data_conn = self._worker_handler.data_conn
  data_out = data_conn.output_stream(process_bundle_id, read_transform_id)
  if isinstance(data_conn, data_plane._GrpcDataChannel):  # pylint: disable=protected-access
    self.__dict__.setdefault("_fedbeam_senders", []).append(
      _InputSender(data_conn, data_out, byte_streams)
    )
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
        raise RuntimeError(
          "the local runner failed to send a bundle's input to its worker"
        ) from error
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
      self._encode_to_stream(self._in_window((self._key_decode(encoded_key), values)), stream, True)
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
      None,
      timestamp=window.GlobalWindow().max_timestamp(),
      pane_info=windowed_value.PaneInfo(
        is_first=True,
        is_last=True,
        timing=windowed_value.PaneInfoTiming.ON_TIME,
        index=0,
        nonspeculative_index=0,
      ),
    ).with_value
    items = list(self._table.items())
    self._table.clear()
    encode = self._post_grouped_coder.get_impl().encode_to_stream
    key_decode = self._key_coder.get_impl().decode
    # Key i goes to worker i % n, as in Beam's partition.
    self._grouped_output = [
      _EncodedShare(items[k::n], encode, key_decode, globally_window) for k in range(n)
    ]
    return self._grouped_output

  partition.fedbeam_original = original_partition
  return partition


class BeamInternalsError(RuntimeError):
  """This Beam version lacks a runner internal the guard relies on; the message names it."""


def _sets_attribute(cls: type, name: str) -> bool:
  """Whether an `__init__` of `cls` or a base class assigns `self.<name>`.

  Instance attributes exist only on instances, which the runner builds with
  servers and workers; the names an `__init__` stores are in its code object.
  """
  for klass in cls.__mro__:
    init = vars(klass).get("__init__")
    code = getattr(init, "__code__", None)
    if code is not None and name in code.co_names:
      return True
  return False


def _beam_internals():
  """Beam's runner modules, after checking every private name the guard reads or replaces.

  Raises:
    BeamInternalsError: naming the first attribute this Beam version lacks.
  """
  try:
    from apache_beam.runners.portability.fn_api_runner import (
      execution,  # pylint: disable=g-import-not-at-top
      fn_runner,  # pylint: disable=g-import-not-at-top
      worker_handlers,  # pylint: disable=g-import-not-at-top
    )
    from apache_beam.runners.worker import data_plane  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise BeamInternalsError(
      f"fedbeam's local-runner guard cannot import Beam's FnApiRunner modules: {e}"
    ) from e
  missing = []

  def need(owner, name: str, where: str, instance: bool = False) -> None:
    found = owner is not None and (
      _sets_attribute(owner, name) if instance else hasattr(owner, name)
    )
    if not found:
      missing.append(f"{where}.{name}")

  fr, ex, wh, dp = (m.__name__ for m in (fn_runner, execution, worker_handlers, data_plane))
  need(worker_handlers, "DATA_BUFFER_TIME_LIMIT_MS", wh)
  manager = getattr(fn_runner, "BundleManager", None)
  need(fn_runner, "BundleManager", fr)
  need(manager, "_send_input_to_worker", fr + ".BundleManager")
  need(manager, "process_bundle", fr + ".BundleManager")
  need(manager, "_worker_handler", fr + ".BundleManager", instance=True)
  for handler in ("GrpcWorkerHandler", "EmbeddedWorkerHandler"):
    need(worker_handlers, handler, wh)
    need(getattr(worker_handlers, handler, None), "data_conn", f"{wh}.{handler}", instance=True)
  need(data_plane, "_GrpcDataChannel", dp)
  channel = getattr(data_plane, "_GrpcDataChannel", None)
  need(channel, "output_stream", dp + "._GrpcDataChannel")
  need(channel, "_to_send", dp + "._GrpcDataChannel", instance=True)
  need(data_plane, "SizeBasedBufferingClosableOutputStream", dp)
  stream = getattr(data_plane, "SizeBasedBufferingClosableOutputStream", None)
  need(stream, "maybe_flush", dp + ".SizeBasedBufferingClosableOutputStream")
  need(stream, "_flush_callback", dp + ".SizeBasedBufferingClosableOutputStream", instance=True)
  need(execution, "GroupingBuffer", ex)
  grouping = getattr(execution, "GroupingBuffer", None)
  need(grouping, "partition", ex + ".GroupingBuffer")
  for name in ("_grouped_output", "_windowing", "_table", "_post_grouped_coder", "_key_coder"):
    need(grouping, name, ex + ".GroupingBuffer", instance=True)
  if missing:
    raise BeamInternalsError(
      f"fedbeam's local-runner guard relies on {missing[0]}, which this Beam version lacks"
      + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else "")
      + "; fedbeam is tested with apache-beam 2.72. Run with another --runner, or use the "
      "Beam version fedbeam pins"
    )
  return execution, fn_runner, worker_handlers


def check_beam_internals() -> None:
  """Checks that this Beam has every runner internal the guard reads or replaces.

  Raises:
    BeamInternalsError: naming the first attribute it lacks (and the others).
  """
  _beam_internals()


def patched_attributes() -> list[tuple[object, str]]:
  """(owner, name) of every attribute the guard replaces while it is in place."""
  execution, fn_runner, worker_handlers = _beam_internals()
  return [
    (worker_handlers, "DATA_BUFFER_TIME_LIMIT_MS"),
    (fn_runner.BundleManager, "_send_input_to_worker"),
    (fn_runner.BundleManager, "process_bundle"),
    (execution.GroupingBuffer, "partition"),
  ]


_lock = threading.Lock()
_depth = 0
# (owner, name, what its __dict__ held, or _ABSENT) for each replaced attribute.
_saved: list[tuple[object, str, object]] = []
_ABSENT = object()


def _install() -> None:
  execution, fn_runner, worker_handlers = _beam_internals()  # Checks before changing anything.
  manager, grouping = fn_runner.BundleManager, execution.GroupingBuffer
  replacements = [
    # 0 selects SizeBasedBufferingClosableOutputStream for the runner's data
    # server and for in-process (multi_threading) workers alike.
    (worker_handlers, "DATA_BUFFER_TIME_LIMIT_MS", 0),
    (manager, "_send_input_to_worker", _send_input_in_background),
    (manager, "process_bundle", _finishing_input_senders(manager.process_bundle)),
    (grouping, "partition", _partition_lazily(grouping.partition)),
  ]
  for owner, name, value in replacements:
    _saved.append((owner, name, vars(owner).get(name, _ABSENT)))
    setattr(owner, name, value)


def _restore() -> None:
  while _saved:
    owner, name, original = _saved.pop()
    if original is _ABSENT:
      delattr(owner, name)
    else:
      setattr(owner, name, original)


@contextlib.contextmanager
def guarded_runner() -> Iterator[None]:
  """Puts the guard on Beam's local FnApiRunner until the block ends.

  Inside the block, FnApiRunner pipelines run with the guard (size-based
  data streams flushed on the writing thread, grouped input encoded as it is
  sent, bundle input sent from a thread of its own); on exit, also after an
  exception, every replaced attribute of Beam's (`patched_attributes()`) is
  the original object again. Re-entrant and thread-safe: nested or
  concurrent scopes share one installation, made when the first is entered
  and undone when the last exits. While a scope is open the guard applies to
  every FnApiRunner in the process, so another pipeline run at that moment
  in another thread gets it too. Dataflow and Dask workers never run this.

  Raises:
    BeamInternalsError: this Beam version lacks an internal the guard relies
      on (the message names it); nothing was changed.
  """
  global _depth
  with _lock:
    if _depth == 0:
      try:
        _install()
      except BaseException:
        _restore()
        raise
    _depth += 1
  try:
    yield
  finally:
    with _lock:
      _depth -= 1
      if _depth == 0:
        _restore()


@contextlib.contextmanager
def local_runner_scope() -> Iterator[None]:
  """The guard (`guarded_runner`) and the allocator settings (`tuned_allocator`) for one run.

  `run_prepare` enters it around a pipeline it runs on the local FnApiRunner
  (and only then). Worker processes the runner starts inside the scope get
  the allocator settings through their environment. Everything is undone on
  exit, also on exceptions.

  Raises:
    BeamInternalsError: see `guarded_runner`.
  """
  with guarded_runner(), tuned_allocator():
    yield


def is_guarded() -> bool:
  """Whether a `guarded_runner()` scope is open in this process."""
  return _depth > 0
