"""Throughput and peak memory of building client datasets: `fedbeam prepare` vs peers.

Every contender runs in a fresh process (wall time and peak memory of its
whole process tree, Beam's worker processes included, polled with psutil every
0.2 s) on the same workload (bench/workload.py), at 1x (1,000 clients,
~91k examples), 3x and 10x (10,000 clients, ~884k examples):

- `fedbeam_full`: `fedbeam prepare` with 3x pseudo-client expansion
  (`--num-transformed-clients 3N --transform fedbeam.transforms:random_affine`)
  and a train/test split (`--test-fraction 0.1`): group + expand + split +
  write + manifest + commit; it writes 3x the input examples;
- `fedbeam_full_nofsync` (only when named in `--contenders`): the same with
  `--no-fsync` (no fsync of client files, manifest files and directories
  before the commit), to measure what durability costs;
- `fedbeam_group`: `fedbeam prepare` without expansion or split (group + write
  + manifest + commit), the like-for-like row;
- `plain_beam`: a plain Beam pipeline (below): ReadFromTFRecord -> key by the
  Example's `client_id` -> GroupByKey -> one TFRecord file per client;
- `plain_beam_tuned`: the same plain pipeline inside fedbeam's
  `local_runner_scope()` (the runner guard and allocator settings
  `fedbeam prepare` runs its pipeline in), to show how much of fedbeam's lead
  those account for;
- `grouper`: dataset_grouper 0.3.0's pipeline (bench/grouper_worker.py, in
  its own virtualenv) writing one SequenceExample per client;
- `tff_sqlite`: TFF's single-process `save_to_sql_client_data`, given every
  client's examples already in memory (`from_tensor_slices`); its peak RSS
  includes that copy of the input.

Beam contenders read the same TFRecord input files (Examples with a
`client_id` feature) on Beam's FnApiRunner with
`--direct_num_workers=2 --direct_running_mode=multi_processing`. Examples/s
is input examples / pipeline seconds (the time the contender reports for its
pipeline or writer call, without interpreter start and imports); the process
wall time is reported beside it, and peak memory as the summed PSS (shared
pages counted once) and summed RSS of the tree. Each measurement is one run. A
run is killed if the machine's available memory falls under 1.5 GB.

    .venv/bin/python -m bench.bench_pipeline > build/bench/logs/bench_pipeline.log 2>&1
    .venv/bin/python -m bench.bench_pipeline --full ...   # every contender at 10x too
    .venv/bin/python -m bench.bench_pipeline --scales 0.1 --no-write ...   # smoke run

Scales 1x, 3x and 10x; without `--full` the 10x rows (the slowest, and the
local runner needs most of the machine's memory for them) are not re-run and
the previous run's rows stay in bench/results/pipeline.json, marked with the
time they were measured. Writes bench/results/pipeline.json
and the "Pipeline" section of bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import statistics
import struct
import sys
import time

from bench import workload as wl

SECTION = "## Pipeline"
RESULT_FILE = "pipeline.json"
CONTENDERS = (
  "fedbeam_full",
  "fedbeam_group",
  "plain_beam",
  "plain_beam_tuned",
  "grouper",
  "tff_sqlite",
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--scales", default="1,3,10", help="data sizes in units of 1,000 clients")
  p.add_argument("--contenders", default=",".join(CONTENDERS))
  p.add_argument("--full", action="store_true", help="every contender at every scale")
  p.add_argument("--expansion", type=int, default=3)
  p.add_argument("--workdir", default=wl.DEFAULT_WORKDIR)
  p.add_argument("--no-write", action="store_true")
  p.add_argument(
    "--repeat",
    type=int,
    default=1,
    help="runs per contender and scale, contenders taking turns; rows give the "
    "median run and the min-max",
  )
  p.add_argument("--worker", choices=("plain", "tff"), help=argparse.SUPPRESS)
  p.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--input", help=argparse.SUPPRESS)
  p.add_argument("--output", help=argparse.SUPPRESS)
  p.add_argument("--clients", type=int, help=argparse.SUPPRESS)
  p.add_argument("--result", help=argparse.SUPPRESS)
  return p.parse_known_args(argv)


def log(msg: str) -> None:
  print(msg, flush=True)


# --- the plain Beam pipeline -------------------------------------------------------------


def _masked_crc(data: bytes) -> int:
  import google_crc32c  # pylint: disable=g-import-not-at-top

  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(record: bytes) -> bytes:
  header = struct.pack("<Q", len(record))
  return (
    header
    + struct.pack("<I", _masked_crc(header))
    + record
    + struct.pack("<I", _masked_crc(record))
  )


def client_id_of(record: bytes) -> str:
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top

  example = example_pb2.Example.FromString(record)
  return example.features.feature["client_id"].bytes_list.value[0].decode("utf-8")


def run_plain_pipeline(input_pattern: str, output: str, beam_args) -> dict:
  """ReadFromTFRecord -> (client_id, record) -> GroupByKey -> one TFRecord file per client.

  Records are written unchanged (client id feature included) with TFRecord
  framing computed in Python (google-crc32c), so workers need no TensorFlow.
  """
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # pylint: disable=g-import-not-at-top

  class WriteClientFile(beam.DoFn):
    def __init__(self, directory):
      self._directory = directory
      self._clients = beam.metrics.Metrics.counter("plain", "clients")
      self._records = beam.metrics.Metrics.counter("plain", "records")

    def process(self, keyed):
      client_id, records = keyed
      n = 0
      with open(os.path.join(self._directory, f"{client_id}.tfrecord"), "wb") as f:
        for record in records:
          f.write(tfrecord_frame(record))
          n += 1
      self._clients.inc()
      self._records.inc(n)

  os.makedirs(output, exist_ok=True)
  start = time.perf_counter()
  pipeline = beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(list(beam_args)))
  _ = (
    pipeline
    | "Read" >> beam.io.ReadFromTFRecord(input_pattern)
    | "KeyByClient" >> beam.Map(lambda r: (client_id_of(r), r))
    | "GroupByClient" >> beam.GroupByKey()
    | "WriteClientFiles" >> beam.ParDo(WriteClientFile(output))
  )
  result = pipeline.run()
  result.wait_until_finish()
  seconds = time.perf_counter() - start
  counters = {
    c.key.metric.name: c.committed
    for c in result.metrics().query(beam.metrics.MetricsFilter().with_namespace("plain"))[
      "counters"
    ]
  }
  return {
    "seconds": seconds,
    "clients": counters.get("clients"),
    "records": counters.get("records"),
  }


def plain_worker(args, beam_args) -> int:
  scope = contextlib.nullcontext()
  if args.tuned:
    from fedbeam.pipelines import local_runner  # pylint: disable=g-import-not-at-top

    scope = local_runner.local_runner_scope()
  with scope:
    result = run_plain_pipeline(args.input, args.output, beam_args)
  files = os.listdir(args.output)
  result["files"] = len(files)
  result["bytes"] = sum(os.path.getsize(os.path.join(args.output, f)) for f in files)
  with open(args.result, "w", encoding="utf-8") as f:
    json.dump(result, f)
  return 0


def tff_worker(args) -> int:
  """TFF's save_to_sql_client_data of the workload (data in memory before the clock starts)."""
  from fedbeam.runtime.tff_worker import stop_tff_workers  # pylint: disable=g-import-not-at-top

  try:
    workload = wl.Workload(num_clients=args.clients)
    result = wl.write_tff_sqlite(workload, args.output)
  finally:
    stop_tff_workers()
  with open(args.result, "w", encoding="utf-8") as f:
    json.dump(result, f)
  return 0


# --- contenders ------------------------------------------------------------------------


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


_FEDBEAM_SECONDS = re.compile(r"store written: .* in ([0-9.]+) s \(")


def run_fedbeam(workload, name: str, extra: list, args) -> dict:
  """`fedbeam prepare` into the workload's store `name` (reused by the other benchmarks)."""
  pattern = wl.ensure_input(workload, args.workdir, log)
  store = os.path.join(wl.workload_dir(workload, args.workdir), "stores", name)
  cmd = wl.prepare_command(pattern, store, wl.element_spec_file(args.workdir), extra)
  logf = os.path.join(args.workdir, "logs", f"pipeline-fedbeam-{name}-{workload.name}.log")
  run = wl.run_measured(cmd, logf)
  if run["returncode"] != 0:
    return _failed(run, "fedbeam prepare", cmd)
  with open(logf, encoding="utf-8") as f:
    found = _FEDBEAM_SECONDS.findall(f.read())
  with open(os.path.join(store, "metadata.json"), encoding="utf-8") as f:
    metadata = json.load(f)
  wl.stamp_store(
    store, {"command": cmd, "wall_s": run["wall_s"], "peak_pss_mb": run["peak_pss_mb"]}
  )
  run.update(
    pipeline_s=float(found[-1]),
    command=" ".join(_rel(c) for c in cmd),
    output_clients=sum(s["num_clients"] for s in metadata["splits"]),
    output_examples=sum(s["num_examples"] for s in metadata["splits"]),
    output_bytes=sum(s["num_bytes"] for s in metadata["splits"]),
    splits={s["name"]: s["num_clients"] for s in metadata["splits"]},
  )
  return run


def run_plain(workload, args, tuned: bool = False) -> dict:
  pattern = wl.ensure_input(workload, args.workdir, log)
  name = "plain-tuned" if tuned else "plain"
  out = os.path.join(args.workdir, "tmp", f"{name}-{workload.name}")
  shutil.rmtree(out, ignore_errors=True)
  result_path = out + ".json"
  cmd = [
    wl.PYTHON,
    "-m",
    "bench.bench_pipeline",
    "--worker",
    "plain",
    "--input",
    pattern,
    "--output",
    out,
    "--result",
    result_path,
    *(["--tuned"] if tuned else []),
    *wl.BEAM_LOCAL_ARGS,
  ]
  run = wl.run_measured(
    cmd, os.path.join(args.workdir, "logs", f"pipeline-{name}-{workload.name}.log")
  )
  if run["returncode"] != 0:
    return _failed(run, "the plain Beam pipeline", cmd)
  with open(result_path, encoding="utf-8") as f:
    res = json.load(f)
  shutil.rmtree(out, ignore_errors=True)
  if res["files"] != workload.num_clients or res["records"] != workload.num_examples:
    run["failed"] = (
      f"the plain Beam pipeline wrote {res['files']} files and {res['records']} "
      f"records for {workload.num_clients} clients and {workload.num_examples} "
      "input records (the runner lost data)"
    )
    log(run["failed"])
  run.update(
    pipeline_s=res["seconds"],
    command=" ".join(_rel(c) for c in cmd),
    output_clients=res["files"],
    output_examples=res["records"],
    output_bytes=res["bytes"],
  )
  return run


def run_grouper(workload, args) -> dict:
  if not os.path.exists(wl.GROUPER_PYTHON):
    return {"skipped": "build/grouper-venv is missing (bash bench/grouper_env.sh)"}
  pattern = wl.ensure_input(workload, args.workdir, log)
  directory = os.path.join(wl.workload_dir(workload, args.workdir), "grouper")
  shutil.rmtree(directory, ignore_errors=True)
  prefix = os.path.join(directory, "groups")
  if os.path.exists(prefix + ".done"):
    os.remove(prefix + ".done")
  cmd = [
    wl.GROUPER_PYTHON,
    os.path.join(wl.ROOT, "bench", "grouper_worker.py"),
    "write",
    "--input",
    pattern,
    "--output",
    prefix,
    "--result",
    prefix + ".write.json",
    *wl.BEAM_LOCAL_ARGS,
  ]
  run = wl.run_measured(
    cmd, os.path.join(args.workdir, "logs", f"pipeline-grouper-{workload.name}.log")
  )
  if run["returncode"] != 0:
    return _failed(run, "dataset_grouper's pipeline", cmd)
  with open(prefix + ".write.json", encoding="utf-8") as f:
    res = json.load(f)
  with open(prefix + ".done", "w", encoding="utf-8") as f:
    json.dump(run, f)
  run.update(
    pipeline_s=res["seconds"],
    command=" ".join(_rel(c) for c in cmd),
    output_bytes=res["bytes"],
    versions=res["versions"],
  )
  return run


def run_tff(workload, args) -> dict:
  out = os.path.join(args.workdir, "tmp", f"tff-{workload.name}.sqlite")
  result_path = out + ".json"
  cmd = [
    wl.PYTHON,
    "-m",
    "bench.bench_pipeline",
    "--worker",
    "tff",
    "--clients",
    str(workload.num_clients),
    "--output",
    out,
    "--result",
    result_path,
  ]
  run = wl.run_measured(
    cmd, os.path.join(args.workdir, "logs", f"pipeline-tff-{workload.name}.log")
  )
  if run["returncode"] != 0:
    return _failed(run, "TFF's save_to_sql_client_data", cmd)
  with open(result_path, encoding="utf-8") as f:
    res = json.load(f)
  # The benchmarks' direct writer must produce TFF's bytes exactly.
  cached = wl.ensure_tff_sqlite(workload, args.workdir, log)
  identical = _sha256(out) == _sha256(cached)
  os.remove(out)
  run.update(
    pipeline_s=res["seconds"],
    command=" ".join(_rel(c) for c in cmd),
    output_examples=res["examples"],
    identical_to_direct_writer=identical,
  )
  if not identical:
    raise AssertionError("TFF's database differs from bench.workload.write_tff_sqlite_direct's")
  return run


def _run_contender(name: str, workload, args) -> dict:
  load = os.getloadavg()
  if name == "fedbeam_full":
    run = run_fedbeam(
      workload,
      "expanded-split",
      [
        "--num-transformed-clients",
        str(args.expansion * workload.num_clients),
        "--transform",
        "fedbeam.transforms:random_affine",
        "--test-fraction",
        "0.1",
      ],
      args,
    )
  elif name == "fedbeam_full_nofsync":
    run = run_fedbeam(
      workload,
      "expanded-split-nofsync",
      [
        "--num-transformed-clients",
        str(args.expansion * workload.num_clients),
        "--transform",
        "fedbeam.transforms:random_affine",
        "--test-fraction",
        "0.1",
        "--no-fsync",
      ],
      args,
    )
  elif name == "fedbeam_group":
    run = run_fedbeam(workload, "plain", [], args)
  elif name == "plain_beam":
    run = run_plain(workload, args)
  elif name == "plain_beam_tuned":
    run = run_plain(workload, args, tuned=True)
  elif name == "grouper":
    run = run_grouper(workload, args)
  elif name == "tff_sqlite":
    run = run_tff(workload, args)
  else:
    raise SystemExit(f"unknown contender {name}")
  run["loadavg_before"] = list(load)
  return run


def _median_run(runs: list) -> dict:
  """The run with the median pipeline time, carrying every run's time; a failed run wins."""
  failed = [r for r in runs if "pipeline_s" not in r]
  if failed:
    return dict(failed[0], repeats=len(runs), failed_runs=len(failed))
  ordered = sorted(runs, key=lambda r: r["pipeline_s"])
  row = dict(ordered[(len(ordered) - 1) // 2])
  row.update(
    repeats=len(runs),
    pipeline_s_runs=[r["pipeline_s"] for r in runs],
    pipeline_s=statistics.median(r["pipeline_s"] for r in runs),
  )
  row["examples_per_s"] = row["input_examples"] / row["pipeline_s"]
  return row


def _failed(run: dict, what: str, cmd: list) -> dict:
  why = (
    f"killed when the machine had {run['killed_low_memory']:,.0f} MB available, "
    f"peak PSS {run['peak_pss_mb']:,.0f} MB"
    if "killed_low_memory" in run
    else f"exit status {run['returncode']}, peak PSS {run['peak_pss_mb']:,.0f} MB"
  )
  run.update(
    failed=f"{what} failed ({why}, after {run['wall_s']:.0f} s); see {run['log']}",
    command=" ".join(_rel(c) for c in cmd),
  )
  log(run["failed"])
  return run


def _rel(c: str) -> str:
  return os.path.relpath(c, wl.ROOT) if c.startswith(wl.ROOT + "/") else c


# --- README -------------------------------------------------------------------------

LABELS = {
  "fedbeam_full": "`fedbeam prepare`: group + 3x expansion + split + write + manifest",
  "fedbeam_full_nofsync": "the same with `--no-fsync`",
  "fedbeam_group": "`fedbeam prepare`: group + write + manifest (no expansion, no split)",
  "plain_beam": "plain Beam: GroupByKey → one TFRecord file per client",
  "plain_beam_tuned": "plain Beam in fedbeam's `local_runner_scope()` (guard + allocator)",
  "grouper": "dataset_grouper 0.3.0 pipeline (one SequenceExample per client)",
  "tff_sqlite": "TFF `save_to_sql_client_data` (one process)",
}


def readme_section(result: dict) -> str:
  rows = result["rows"]
  scales = sorted({r["scale"] for r in rows.values()})
  lines = [
    SECTION,
    "",
    "Building client datasets from the same TFRecord input (Examples with a `client_id` "
    "feature). Beam rows: FnApiRunner, `--direct_num_workers=2 "
    "--direct_running_mode=multi_processing`. Examples/s = input examples / pipeline seconds "
    "(the contender's own timing of its pipeline or writer call); wall = the whole process "
    "(interpreter start and imports included); peak memory summed over the process tree, as PSS "
    "(shared pages such as the libraries every Beam worker loads count once) and as RSS (they "
    "count in every process). Rows with several runs (contenders taking turns) give the "
    "median pipeline time and its min–max, and the memory of the median run; a run is killed "
    "when the machine's available memory falls under 1.5 GB. "
    "![pipeline scaling](results/pipeline_scaling.png)",
    "",
    "| data | contender | input examples | pipeline s | examples/s | wall s | peak PSS MB | "
    "peak RSS MB | vs plain Beam (time) | measured |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
  ]
  for scale in scales:
    plain = rows.get(f"plain_beam@{scale:g}")
    for name in CONTENDERS:
      r = rows.get(f"{name}@{scale:g}")
      if not r:
        continue
      if "skipped" in r or "failed" in r:
        peak = f"{r['peak_pss_mb']:,.0f}" if "peak_pss_mb" in r else ""
        rss = f"{r['peak_rss_mb']:,.0f}" if "peak_rss_mb" in r else ""
        wall = f"{r['wall_s']:.1f}" if "wall_s" in r else ""
        lines.append(
          f"| {scale:g}x | {LABELS[name]} | | | | {wall} | {peak} | {rss} | | "
          f"{r.get('skipped') or wl.failure_reason(r)} |"
        )
        continue
      vs = (
        f"{r['pipeline_s'] / plain['pipeline_s']:.2f}x" if plain and "pipeline_s" in plain else ""
      )
      when = "this run" if r.get("run_id") == result["run_id"] else r.get("measured_at", "?")
      times = r.get("pipeline_s_runs") or [r["pipeline_s"]]
      spread = f" ({min(times):.1f}–{max(times):.1f}, {len(times)} runs)" if len(times) > 1 else ""
      lines.append(
        f"| {scale:g}x ({r['clients']:,} clients) | {LABELS[name]} | {r['input_examples']:,} | "
        f"{r['pipeline_s']:.1f}{spread} | {r['examples_per_s']:,.0f} | {r['wall_s']:.1f} | "
        f"{r.get('peak_pss_mb', float('nan')):,.0f} | {r['peak_rss_mb']:,.0f} | {vs} | {when} |"
      )
  growth = []
  for name in CONTENDERS:
    a = rows.get(f"{name}@1")
    for big in ("3", "10"):
      b = rows.get(f"{name}@{big}")
      if a and b and "pipeline_s" in a and "pipeline_s" in b and "peak_pss_mb" in a:
        growth.append(
          f"{name} 1x→{big}x: time {b['pipeline_s'] / a['pipeline_s']:.1f}x, peak PSS "
          f"{b['peak_pss_mb'] / a['peak_pss_mb']:.1f}x"
        )
  lines += [
    "",
    "Growth with the data: " + ("; ".join(growth) if growth else "n/a") + ".",
    "",
    "`fedbeam_full` writes 3x the input examples (the expanded pseudo-clients) and "
    "warps two thirds of them; its examples/s counts input examples. The TFF row's "
    "database is byte-identical to the one the other benchmarks use "
    "(`bench.workload.write_tff_sqlite_direct`, checked with SHA-256 in each run). "
    f"dataset_grouper runs in its own virtualenv (Beam "
    f"{result.get('grouper_versions', {}).get('apache_beam', '?')}, TensorFlow "
    f"{result.get('grouper_versions', {}).get('tensorflow', '?')}); it reads the input "
    "the way its TFDS source would hand examples over (a dict of tensors per example).",
    "",
    "Commands (from the repository root; each row was measured by one of them, at the "
    "time in its last column):",
    "",
    "```sh",
    *sorted(
      {result["command"]} | {r["bench_command"] for r in rows.values() if "bench_command" in r}
    ),
    "```",
    "",
    wl.machine_line(result["machine"], result["versions"]),
    f"Raw numbers: `bench/results/{RESULT_FILE}`.",
    "",
  ]
  return "\n".join(lines)


def main(argv=None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  args, beam_args = parse_args(argv)
  if args.worker == "plain":
    return plain_worker(args, beam_args)
  if args.worker == "tff":
    return tff_worker(args)
  if beam_args:
    raise SystemExit(f"unknown arguments: {beam_args}")
  mach = wl.machine()
  run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
  previous = (wl.read_json(RESULT_FILE) or {}).get("rows", {}) if not args.no_write else {}
  rows = {}
  wanted = args.contenders.split(",")
  for scale in [float(s) for s in args.scales.split(",")]:
    scale_key = f"{scale:g}"
    workload = wl.Workload(num_clients=int(round(1000 * scale)))
    wl.ensure_input(workload, args.workdir, log)
    runs: dict[str, list] = {}
    for repeat in range(args.repeat):
      for name in wanted:
        key = f"{name}@{scale_key}"
        if scale >= 10 and not args.full:
          if key in previous and repeat == 0:
            rows[key] = previous[key]
            log(f"{key}: kept from {previous[key].get('measured_at')}")
          continue
        run = _run_contender(name, workload, args)
        run.update(
          scale=scale,
          clients=workload.num_clients,
          input_examples=workload.num_examples,
          run_id=run_id,
          measured_at=run_id,
          bench_command=wl.command_line("bench.bench_pipeline", argv),
        )
        if "pipeline_s" in run:
          run["examples_per_s"] = workload.num_examples / run["pipeline_s"]
          log(
            f"{key} (run {repeat + 1}/{args.repeat}): {run['pipeline_s']:.1f} s pipeline, "
            f"{run['examples_per_s']:,.0f} ex/s, wall {run['wall_s']:.1f} s, peak PSS "
            f"{run['peak_pss_mb']:,.0f} MB, RSS {run['peak_rss_mb']:,.0f} MB"
          )
        else:
          log(f"{key}: {run}")
        runs.setdefault(key, []).append(run)
    for key, done in runs.items():
      rows[key] = _median_run(done)
  for key, row in previous.items():
    rows.setdefault(key, row)
  mach["loadavg_at_end"] = list(os.getloadavg())
  grouper_versions = next((r["versions"] for r in rows.values() if "versions" in r), {})
  result = {
    "benchmark": "pipeline throughput and peak memory",
    "run_id": run_id,
    "command": wl.command_line("bench.bench_pipeline", argv),
    "beam_args": list(wl.BEAM_LOCAL_ARGS),
    "rows": rows,
    "grouper_versions": grouper_versions,
    "machine": mach,
    "versions": wl.versions(),
  }
  if not args.no_write:
    wl.write_json(RESULT_FILE, result)
    wl.write_readme_section(SECTION, readme_section(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
