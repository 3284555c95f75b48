"""Elements Beam's local FnApiRunner drops from a stage's input, with and without the guard.

A pure-Beam pipeline (no fedbeam code in it) on the FnApiRunner with
`--direct_num_workers=2 --direct_running_mode=multi_processing`:

    Create(40 "files") -> Reshuffle -> FlatMap: 10,000 elements (int id, 3,000 bytes) per file
      -> Count.Globally, used as an AsSingleton side input of
      -> Map(id) over the same 400,000 elements -> count, sum and sum of squares of the ids

The side input keeps the Map out of the stage that produces the elements, so
the runner buffers the 400,000 elements (1.2 GB) and sends them to a second
stage over its data plane. In apache-beam 2.72 that stream is a
`TimeBasedBufferingClosableOutputStream` whose background flush can drop a
chunk the runner thread writes between its copy and its clear of the buffer
(see fedbeam/pipelines/local_runner.py). A guarded run calls
builds and runs the pipeline inside `fedbeam.pipelines.local_runner.guarded_runner()`;
an unguarded run does not import fedbeam at all.

Each run is a fresh process (so the guard is in place in it or not), one
after another (each holds about 1.2 GB), unguarded and guarded runs taking
turns. A run reports the elements expected, the elements the second stage
counted, the elements lost, whether every id arrived exactly once (count, sum
and sum of squares of the ids all equal those of 0..N-1) and its pipeline
seconds. The loss is a race: a run may lose nothing.

    .venv/bin/python -m bench.beam_data_plane_loss > build/bench/logs/beam_data_plane_loss.log 2>&1
    .venv/bin/python -m bench.beam_data_plane_loss --modes multi_processing,multi_threading
    .venv/bin/python -m bench.beam_data_plane_loss --runs 1 --no-write   # smoke run
    .venv/bin/python -m bench.beam_data_plane_loss --beam-patch runner   # a proposed Beam fix

`--beam-patch runner|lock` applies one of the patches proposed to Beam in
docs/upstream/beam-data-plane-race.md (in the child process, instead of
fedbeam's guard, in the runs otherwise guarded) and only logs the results.

Writes bench/results/data_plane_loss.json and the "Beam data-plane loss
(local runner)" section of bench/README.md. About 2 minutes with the defaults
(an unguarded run takes ~25 s, a guarded one ~10 s, plus interpreter start).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

from bench import workload as wl

SECTION = "## Beam data-plane loss (local runner)"
RESULT_FILE = "data_plane_loss.json"
RESULT_TAG = "DATA_PLANE_LOSS_RESULT "
MODES = ("multi_processing", "multi_threading")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--runs", type=int, default=3, help="runs per mode and guard setting")
  p.add_argument(
    "--modes",
    default="multi_processing",
    help=f"comma-separated --direct_running_mode values ({', '.join(MODES)})",
  )
  p.add_argument("--workers", type=int, default=2, help="--direct_num_workers")
  p.add_argument("--files", type=int, default=40)
  p.add_argument("--per-file", type=int, default=10_000)
  p.add_argument("--value-bytes", type=int, default=3_000)
  p.add_argument("--timeout", type=float, default=600, help="seconds before a run is killed")
  p.add_argument("--workdir", default=wl.DEFAULT_WORKDIR)
  p.add_argument("--no-write", action="store_true")
  p.add_argument(
    "--beam-patch",
    choices=sorted(UPSTREAM_PATCHES),
    help="instead of fedbeam's guard, apply this patch proposed to Beam "
    "(docs/upstream/beam-data-plane-race.md); implies --no-write",
  )
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
  p.add_argument("--guard", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--result", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def log(msg: str) -> None:
  print(msg, flush=True)


# --- one run (a fresh process) ---------------------------------------------------------


def _patch_runner_streams() -> None:
  """The runner-side patch: size-based runner streams, flushed between chunks by the writer."""
  from apache_beam.runners.portability.fn_api_runner import fn_runner, worker_handlers  # pylint: disable=g-import-not-at-top

  worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = 0

  def _send_input_to_worker(self, process_bundle_id, read_transform_id, byte_streams):
    assert self._worker_handler is not None
    data_out = self._worker_handler.data_conn.output_stream(process_bundle_id, read_transform_id)
    for byte_stream in byte_streams or []:
      data_out.write(byte_stream)
      data_out.maybe_flush()
    data_out.close()

  fn_runner.BundleManager._send_input_to_worker = _send_input_to_worker  # pylint: disable=protected-access


def _patch_stream_lock() -> None:
  """The class patch: TimeBasedBufferingClosableOutputStream.write holds the flush lock."""
  from apache_beam.runners.worker import data_plane  # pylint: disable=g-import-not-at-top

  def write(self, b, nested=False):
    with self._flush_lock:  # pylint: disable=protected-access
      data_plane.SizeBasedBufferingClosableOutputStream.write(self, b, nested)

  data_plane.TimeBasedBufferingClosableOutputStream.write = write


# What --beam-patch applies in a child process (this process only; it exits after one run).
UPSTREAM_PATCHES = {"runner": _patch_runner_streams, "lock": _patch_stream_lock}


def child(args) -> int:
  """Runs the pipeline once and prints one `DATA_PLANE_LOSS_RESULT {json}` line.

  With --guard, the pipeline is built and run inside fedbeam's `guarded_runner()`;
  with --beam-patch, on Beam with that patch applied.
  """
  if args.beam_patch:
    UPSTREAM_PATCHES[args.beam_patch]()
    return _run_pipeline(args, f"beam-patch:{args.beam_patch}")
  if not args.guard:
    return _run_pipeline(args, None)
  from fedbeam.pipelines.local_runner import guarded_runner  # pylint: disable=g-import-not-at-top

  with guarded_runner():
    return _run_pipeline(args, True)


def _run_pipeline(args, guarded) -> int:
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  from apache_beam.runners.portability.fn_api_runner import (
    FnApiRunner,  # pylint: disable=g-import-not-at-top
    worker_handlers,  # pylint: disable=g-import-not-at-top
  )

  per_file, value = args.per_file, b"x" * args.value_bytes
  result_path = args.result

  # Nested functions and classes: the workers unpickle them by value.
  def rows(i):
    for j in range(per_file):
      yield i * per_file + j, value

  class IdStats(beam.CombineFn):
    """(count, sum, sum of squares) of the ids."""

    def create_accumulator(self):
      return 0, 0, 0

    def add_input(self, acc, x):
      return acc[0] + 1, acc[1] + x, acc[2] + x * x

    def merge_accumulators(self, accs):
      n = s = q = 0
      for a in accs:
        n, s, q = n + a[0], s + a[1], q + a[2]
      return n, s, q

    def extract_output(self, acc):
      return acc

  def write_result(stats, side_count):
    with open(result_path, "w", encoding="utf-8") as f:
      json.dump(
        {"side_count": side_count, "count": stats[0], "id_sum": stats[1], "id_sum_sq": stats[2]}, f
      )

  if os.path.exists(result_path):
    os.remove(result_path)
  options = PipelineOptions(
    [f"--direct_num_workers={args.workers}", f"--direct_running_mode={args.mode}"]
  )
  start = time.perf_counter()
  with beam.Pipeline(runner=FnApiRunner(), options=options) as p:
    data = p | beam.Create(list(range(args.files))) | beam.Reshuffle() | beam.FlatMap(rows)
    num_side = data | "CountSide" >> beam.combiners.Count.Globally()
    ids = data | "UseSide" >> beam.Map(lambda kv, _: kv[0], beam.pvalue.AsSingleton(num_side))
    _ = (
      ids
      | "IdStats" >> beam.CombineGlobally(IdStats())
      | "WriteResult" >> beam.Map(write_result, beam.pvalue.AsSingleton(num_side))
    )
  seconds = time.perf_counter() - start
  with open(result_path, encoding="utf-8") as f:
    got = json.load(f)
  expected = args.files * per_file
  out = {
    "mode": args.mode,
    "workers": args.workers,
    "guard": bool(args.guard),
    "guard_installed": guarded,
    "data_buffer_time_limit_ms": worker_handlers.DATA_BUFFER_TIME_LIMIT_MS,
    "expected": expected,
    "side_count": got["side_count"],
    "counted": got["count"],
    "lost": expected - got["count"],
    "each_id_once": (
      got["count"] == expected
      and got["id_sum"] == expected * (expected - 1) // 2
      and got["id_sum_sq"] == (expected - 1) * expected * (2 * expected - 1) // 6
    ),
    "id_sum": got["id_sum"],
    "id_sum_sq": got["id_sum_sq"],
    "seconds": seconds,
  }
  print(RESULT_TAG + json.dumps(out), flush=True)
  return 0


def run_once(args, mode: str, guard: bool, index: int) -> dict:
  """One run in a fresh process; its output goes to a log file, read back afterwards."""
  name = f"data_plane_loss-{mode}-{_label(args, guard)}-{index}"
  logs = os.path.join(args.workdir, "logs")
  tmp = os.path.join(args.workdir, "tmp")
  os.makedirs(tmp, exist_ok=True)
  cmd = [
    wl.PYTHON,
    "-m",
    "bench.beam_data_plane_loss",
    "--child",
    "--mode",
    mode,
    "--workers",
    str(args.workers),
    "--files",
    str(args.files),
    "--per-file",
    str(args.per_file),
    "--value-bytes",
    str(args.value_bytes),
    "--result",
    os.path.join(tmp, name + ".json"),
  ] + (["--guard"] if guard else [])
  if guard and args.beam_patch:
    cmd[cmd.index("--guard")] = "--beam-patch=" + args.beam_patch
  env = dict(os.environ, PYTHONPATH=wl.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  run = wl.run_measured(cmd, os.path.join(logs, name + ".log"), env=env, timeout_s=args.timeout)
  with open(os.path.join(wl.ROOT, run["log"]), encoding="utf-8", errors="replace") as f:
    found = [json.loads(line[len(RESULT_TAG) :]) for line in f if line.startswith(RESULT_TAG)]
  row = {
    "mode": mode,
    "guard": guard,
    "run": index,
    "returncode": run["returncode"],
    "wall_s": run["wall_s"],
    "peak_pss_mb": run["peak_pss_mb"],
    "log": run["log"],
  }
  if run["returncode"] != 0 or not found:
    why = (
      f"killed when the machine had {run['killed_low_memory']:,.0f} MB available"
      if "killed_low_memory" in run
      else f"exit status {run['returncode']}"
    )
    row["failed"] = f"{why} after {run['wall_s']:.0f} s; see {run['log']}"
    return row
  row.update(found[-1])
  row["guard"] = guard  # A --beam-patch run takes the guarded runs' place.
  return row


# --- report ------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> list[dict]:
  groups = []
  for mode in dict.fromkeys(r["mode"] for r in runs):
    for guard in (False, True):
      rs = [r for r in runs if r["mode"] == mode and r["guard"] == guard]
      if not rs:
        continue
      ok = [r for r in rs if "failed" not in r]
      lost = [r["lost"] for r in ok]
      groups.append(
        {
          "mode": mode,
          "guard": guard,
          "runs": len(rs),
          "completed": len(ok),
          "lost_per_run": lost,
          "runs_with_loss": sum(1 for x in lost if x),
          "expected": ok[0]["expected"] if ok else None,
          "each_id_once_runs": sum(1 for r in ok if r["each_id_once"]),
          "median_s": statistics.median(r["seconds"] for r in ok) if ok else None,
          "min_s": min(r["seconds"] for r in ok) if ok else None,
          "max_s": max(r["seconds"] for r in ok) if ok else None,
          "median_peak_pss_mb": statistics.median(r["peak_pss_mb"] for r in ok) if ok else None,
        }
      )
  return groups


def readme_section(result: dict) -> str:
  p = result["parameters"]
  expected = p["files"] * p["per_file"]
  lines = [
    SECTION,
    "",
    f"A pure-Beam pipeline on the local FnApiRunner with `--direct_num_workers={p['workers']}`: "
    f"`Create({p['files']})` → `Reshuffle` → `FlatMap` of {p['per_file']:,} elements "
    f"(int id, {p['value_bytes']:,} bytes) per file ({expected:,} elements, "
    f"{expected * p['value_bytes'] / 1e9:.1f} GB) → `Count.Globally` used as an `AsSingleton` "
    "side input of a `Map` over the same elements, whose output is counted (count, sum and sum "
    "of squares of the ids). The side input makes the runner buffer the elements and send them "
    "to a second stage over its data plane, where Beam 2.72's "
    "`TimeBasedBufferingClosableOutputStream` (apache_beam/runners/worker/data_plane.py) "
    "flushes from a background thread by copying and then clearing its buffer while the runner "
    "thread (`BundleManager._send_input_to_worker`) keeps writing to it: a chunk written in "
    'between is dropped without an error. "guarded" runs run the pipeline inside '
    "`fedbeam.pipelines.local_runner.guarded_runner()` (size-based streams, flushed "
    'on the writing thread between chunks); "unguarded" runs do not import fedbeam. Each run '
    "is a fresh process; runs go one after another, unguarded and guarded taking turns. "
    'Lost = expected − elements the second stage counted; "each id once" = count, sum and sum '
    "of squares of the ids equal those of 0..N−1. Seconds = the pipeline alone (no interpreter "
    "start).",
    "",
    "| mode | guard | runs | lost per run (of {:,}) | runs with loss | each id once | "
    "median s | min–max s | median peak PSS MB |".format(expected),
    "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
  ]
  for g in result["groups"]:
    lost = ", ".join(f"{x:,}" for x in g["lost_per_run"])
    failed = g["runs"] - g["completed"]
    if failed:
      lost += f" ({failed} run{'s' if failed > 1 else ''} failed)"
    secs = (
      f"{g['median_s']:.1f} | {g['min_s']:.1f}–{g['max_s']:.1f} | {g['median_peak_pss_mb']:,.0f}"
      if g["completed"]
      else " | | "
    )
    lines.append(
      f"| {g['mode']} | {'guarded' if g['guard'] else 'unguarded'} | {g['runs']} | "
      f"{lost} | {g['runs_with_loss']}/{g['completed']} | "
      f"{g['each_id_once_runs']}/{g['completed']} | {secs} |"
    )
  lines.append("")
  for g in result["groups"]:
    if not g["guard"] and g["completed"] and not g["runs_with_loss"]:
      lines += [
        f"No unguarded {g['mode']} run lost an element this time: the loss is a race "
        "between two threads and does not happen in every run.",
        "",
      ]
  for mode in dict.fromkeys(g["mode"] for g in result["groups"]):
    pair = {g["guard"]: g for g in result["groups"] if g["mode"] == mode and g["completed"]}
    if len(pair) == 2:
      u, g = pair[False], pair[True]
      lines += [
        f"{mode}: guarded runs took {g['median_s']:.1f} s (median) against "
        f"{u['median_s']:.1f} s unguarded, with a median peak PSS of "
        f"{g['median_peak_pss_mb']:,.0f} MB against {u['median_peak_pss_mb']:,.0f} MB. "
        "Unguarded, the runner's input stream is flushed only by its 1 s timer, so each "
        "message carries whatever was written in that second; guarded, it is flushed "
        "every ~10 MB on the writing thread.",
        "",
      ]
  failures = [r for r in result["runs"] if "failed" in r]
  for r in failures:
    lines += [
      f"Run {r['run']} ({r['mode']}, {'guarded' if r['guard'] else 'unguarded'}) "
      f"failed: {r['failed']}.",
      "",
    ]
  lines += [
    "The same check runs in the test suite: "
    "`tests/test_local_runner.py::test_materialized_stage_input_arrives_whole_on_two_processes` "
    "(docs/reliability.md).",
    "",
    "Command (from the repository root):",
    "",
    "```sh",
    result["command"],
    "```",
    "",
    wl.machine_line(result["machine"], result["versions"]) + f" Measured {result['run_id']}.",
    f"Raw numbers: `bench/results/{RESULT_FILE}`.",
    "",
  ]
  return "\n".join(lines)


def _label(args, guard: bool) -> str:
  if not guard:
    return "unguarded"
  return f"beam-patch-{args.beam_patch}" if args.beam_patch else "guarded"


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.child:
    return child(args)
  if args.beam_patch:
    args.no_write = True  # The README section and JSON hold fedbeam's guard.
  modes = [m for m in args.modes.split(",") if m]
  for m in modes:
    if m not in MODES:
      raise SystemExit(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
  mach = wl.machine()
  run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
  runs = []
  for mode in modes:
    for i in range(args.runs):
      for guard in (False, True):
        row = run_once(args, mode, guard, i + 1)
        runs.append(row)
        what = f"{mode} {_label(args, guard)} run {i + 1}"
        if "failed" in row:
          log(f"{what}: failed: {row['failed']}")
        else:
          log(
            f"{what}: lost {row['lost']:,} of {row['expected']:,} (side input saw "
            f"{row['side_count']:,}), each id once: {row['each_id_once']}, "
            f"{row['seconds']:.1f} s, peak PSS {row['peak_pss_mb']:,.0f} MB"
          )
  mach["loadavg_at_end"] = list(os.getloadavg())
  groups = summarize(runs)
  result = {
    "benchmark": "elements dropped by the local FnApiRunner's data plane",
    "run_id": run_id,
    "command": wl.command_line("bench.beam_data_plane_loss", argv),
    "parameters": {
      "files": args.files,
      "per_file": args.per_file,
      "value_bytes": args.value_bytes,
      "workers": args.workers,
      "modes": modes,
      "runs": args.runs,
    },
    "groups": groups,
    "runs": runs,
    "machine": mach,
    "versions": wl.versions(),
  }
  for g in groups:
    log(
      f"{g['mode']} {_label(args, g['guard'])}: lost {g['lost_per_run']}, median {g['median_s']} s"
    )
  if not args.no_write:
    wl.write_json(RESULT_FILE, result)
    wl.write_readme_section(SECTION, readme_section(result))
  guarded_ok = all(r.get("each_id_once") for r in runs if r["guard"])
  return 0 if guarded_ok else 1


if __name__ == "__main__":
  sys.exit(main())
