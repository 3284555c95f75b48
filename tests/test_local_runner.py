"""The local FnApiRunner guard: every element of a large materialized stage input arrives.

Each test puts the guard on with `local_runner_scope()` / `guarded_runner()`, as `run_prepare`
does around a run on the FnApiRunner; nothing else installs it (tests/test_pipeline_api.py
shows Beam is restored afterwards).
"""

import os
import subprocess
import sys
import textwrap
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to
import pytest

from fedbeam.pipelines import local_runner

# 400,000 elements of 3 KB (1.2 GB) reach the second stage in about 120 chunks
# over several seconds; unguarded, Beam 2.72 dropped some in 3 of 3 runs of this test.
NUM_FILES, PER_FILE, VALUE_BYTES = 40, 10_000, 3_000

_IMPORT_PROBE = """
import apache_beam as beam
from apache_beam.runners.portability.fn_api_runner import worker_handlers
from fedbeam.pipelines import local_runner
from fedbeam.pipelines.prepare import PrepareConfig, PrepareStore
before = (local_runner.is_guarded(), worker_handlers.DATA_BUFFER_TIME_LIMIT_MS)
config = PrepareConfig(input={input!r}, input_format="tfrecord", output={output!r},
                       client_id_key="client_id")
_ = beam.Pipeline() | "Prepare" >> PrepareStore(config, [config.input], "0" * 16)
print(before, (local_runner.is_guarded(), worker_handlers.DATA_BUFFER_TIME_LIMIT_MS))
with local_runner.local_runner_scope():
  print((local_runner.is_guarded(), worker_handlers.DATA_BUFFER_TIME_LIMIT_MS))
print((local_runner.is_guarded(), worker_handlers.DATA_BUFFER_TIME_LIMIT_MS))
"""


@pytest.fixture
def guarded():
  with local_runner.guarded_runner():
    yield


def test_importing_and_building_change_nothing_and_only_the_scope_guards(tmp_path):
  # A fresh interpreter: what importing fedbeam and building PrepareStore do on their own.
  script = _IMPORT_PROBE.format(input=str(tmp_path / "in.tfrecord"), output=str(tmp_path / "out"))
  out = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(script)],
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  ).stdout
  assert out.strip().splitlines()[-3:] == [
    "(False, 1000) (False, 1000)",
    "(True, 0)",
    "(False, 1000)",
  ]


def test_materialized_stage_input_arrives_whole_on_two_processes():
  with local_runner.local_runner_scope():
    _run_materialized_stage()


def _run_materialized_stage():
  expected = NUM_FILES * PER_FILE
  per_file, value = PER_FILE, b"x" * VALUE_BYTES

  def rows(i):  # Nested, so the workers unpickle it by value.
    for j in range(per_file):
      yield i * per_file + j, value

  options = PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
  with beam.Pipeline(runner=FnApiRunner(), options=options) as p:
    data = p | beam.Create(list(range(NUM_FILES))) | beam.Reshuffle() | beam.FlatMap(rows)
    # The side input keeps "UseSide" out of the reading stage, so the runner
    # buffers `data` and sends it on to a second stage: the path that dropped elements.
    num_side = data | "CountSide" >> beam.combiners.Count.Globally()
    ids = data | "UseSide" >> beam.Map(lambda kv, _: kv[0], beam.pvalue.AsSingleton(num_side))
    assert_that(num_side, equal_to([expected]), label="SideSawAll")
    assert_that(
      ids | "CountIds" >> beam.combiners.Count.Globally(),
      equal_to([expected]),
      label="EveryIdArrived",
    )
    assert_that(
      ids | "SumIds" >> beam.CombineGlobally(sum),
      equal_to([expected * (expected - 1) // 2]),
      label="EachIdOnce",
    )


def _grouping_buffer(num_keys: int, values_per_key: int, value_bytes: int):
  from apache_beam import coders  # pylint: disable=g-import-not-at-top
  from apache_beam.coders.coder_impl import create_OutputStream  # pylint: disable=g-import-not-at-top
  from apache_beam.runners.portability.fn_api_runner import execution  # pylint: disable=g-import-not-at-top
  from apache_beam.transforms import core, window  # pylint: disable=g-import-not-at-top

  kv = coders.TupleCoder([coders.StrUtf8Coder(), coders.BytesCoder()])
  pre = coders.WindowedValueCoder(kv, coders.coders.GlobalWindowCoder())
  post = coders.WindowedValueCoder(
    coders.TupleCoder([coders.StrUtf8Coder(), coders.IterableCoder(coders.BytesCoder())]),
    coders.coders.GlobalWindowCoder(),
  )
  buffer = execution.GroupingBuffer(pre, post, core.Windowing(window.GlobalWindows()))
  stream = create_OutputStream()
  for j in range(values_per_key):
    for k in range(num_keys):
      value = bytes([k % 251, j % 251]) * (value_bytes // 2)
      pre.get_impl().encode_to_stream(
        window.GlobalWindows.windowed_value((f"key-{k}", value)), stream, True
      )
  buffer.append(stream.get())
  return buffer, post


def _decoded(parts, coder):
  from apache_beam.coders.coder_impl import create_InputStream  # pylint: disable=g-import-not-at-top

  out = []
  for part in parts:
    elements = []
    for chunk in part:
      stream = create_InputStream(chunk)
      while stream.size() > 0:
        wv = coder.get_impl().decode_from_stream(stream, True)
        elements.append((wv.windows, wv.timestamp, wv.pane_info, wv.value[0], list(wv.value[1])))
    out.append(elements)
  return out


def test_grouped_input_is_sent_in_pieces_with_beams_elements_and_order(monkeypatch, guarded):
  monkeypatch.setattr(local_runner, "GROUPED_CHUNK_BYTES", 1 << 20)
  from apache_beam.runners.portability.fn_api_runner import execution  # pylint: disable=g-import-not-at-top

  original = execution.GroupingBuffer.partition.fedbeam_original
  # 300 keys x 40 values x 2 KB: 24 MB, several 1 MB pieces per worker.
  buffer, coder = _grouping_buffer(300, 40, 2048)
  reference, _ = _grouping_buffer(300, 40, 2048)
  parts = buffer.partition(3)
  expected = _decoded(original(reference, 3), coder)
  assert _decoded(parts, coder) == expected
  assert _decoded(parts, coder) == expected  # A share can be sent again.
  sizes = [len(chunk) for part in parts for chunk in part]
  assert len(sizes) > 3 * 6 and max(sizes) < (1 << 20) + 100_000
  assert buffer.partition(3) is parts
  assert [e[3] for e in expected[0][:2]] == ["key-0", "key-3"]


@pytest.mark.parametrize("mode", ["multi_processing", "multi_threading"])
def test_grouped_stage_gets_every_value_on_two_workers(mode, guarded):
  num_keys, per_key = 500, 200

  def values(i):  # Nested, so the workers unpickle it by value.
    for j in range(per_key):
      yield f"k{(i * per_key + j) % num_keys}", (i * per_key + j, b"v" * 1000)

  options = PipelineOptions(["--direct_num_workers=2", f"--direct_running_mode={mode}"])
  with beam.Pipeline(runner=FnApiRunner(), options=options) as p:
    grouped = (
      p
      | beam.Create(list(range(num_keys)))
      | beam.Reshuffle()
      | beam.FlatMap(values)
      | beam.GroupByKey()
      | beam.MapTuple(lambda key, vs: (key, sorted(i for i, _ in vs)))
    )
    total = num_keys * per_key
    assert_that(
      grouped, equal_to([(f"k{k}", list(range(k, total, num_keys))) for k in range(num_keys)])
    )


def _grouped_pipeline(p, num_keys: int, per_key: int, value_bytes: int):
  def values(i):  # Nested, so the workers unpickle it by value.
    for j in range(per_key):
      yield f"k{(i * per_key + j) % num_keys}", b"v" * value_bytes

  return (
    p
    | beam.Create(list(range(num_keys)))
    | beam.Reshuffle()
    | beam.FlatMap(values)
    | beam.GroupByKey()
  )


def test_workers_start_a_grouped_bundle_while_its_input_is_still_being_sent(
  monkeypatch, tmp_path, guarded
):
  monkeypatch.setattr(local_runner, "GROUPED_CHUNK_BYTES", 256 << 10)
  shares_sent = []
  encode = local_runner._EncodedShare.__iter__

  def slowly_encoded(self):
    for chunk in encode(self):
      time.sleep(0.02)
      yield chunk
    shares_sent.append(time.time())

  monkeypatch.setattr(local_runner._EncodedShare, "__iter__", slowly_encoded)
  out_dir = str(tmp_path)

  def note_first_key(key, _, seen=[]):  # noqa: B006 (state kept per worker process)
    if not seen:  # One file per worker process, for the first key it processes.
      seen.append(key)
      with open(os.path.join(out_dir, f"first-{os.getpid()}"), "w") as f:
        f.write(repr(time.time()))
    return key

  options = PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
  with beam.Pipeline(runner=FnApiRunner(), options=options) as p:
    # 400 keys x 50 values x 2 KB: 40 MB, about 80 pieces, 1.6 s to send.
    _ = _grouped_pipeline(p, 400, 50, 2000) | beam.MapTuple(note_first_key)
  first_processed = [float(open(tmp_path / name).read()) for name in os.listdir(tmp_path)]
  assert len(shares_sent) == 2 and len(first_processed) == 2
  # Beam's runner sends a bundle's whole input before the worker may start on it.
  assert max(first_processed) < min(shares_sent) - 0.5


def test_a_failure_to_send_a_bundles_input_fails_the_pipeline(monkeypatch, guarded):
  monkeypatch.setattr(local_runner, "GROUPED_CHUNK_BYTES", 256 << 10)
  encode = local_runner._EncodedShare.__iter__

  def failing(self):
    for n, chunk in enumerate(encode(self)):
      if n == 3:
        raise ValueError("cannot encode this share")
      yield chunk

  monkeypatch.setattr(local_runner._EncodedShare, "__iter__", failing)
  options = PipelineOptions(["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
  started = time.monotonic()
  with pytest.raises(Exception, match="failed to send a bundle's input") as raised:
    with beam.Pipeline(runner=FnApiRunner(), options=options) as p:
      _ = _grouped_pipeline(p, 400, 50, 2000) | beam.MapTuple(lambda k, vs: (k, len(list(vs))))
  assert "cannot encode this share" in repr(raised.value.__cause__)
  assert time.monotonic() - started < 120
