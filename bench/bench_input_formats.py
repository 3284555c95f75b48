"""`fedbeam prepare` throughput by input format: the same examples as TFRecord and as TFF SQLite.

The workload (bench/workload.py, EMNIST-like, lognormal client sizes) is
written once as TFRecord files of Examples with a `client_id` feature and once
as the database `tff.simulation.datasets.save_to_sql_client_data` writes
(`ensure_tff_sqlite`, byte-identical to TFF's). Each run is a fresh
`fedbeam prepare` process grouping the input into a store (no expansion, no
split) on the local runner with 2 worker processes; the formats take turns
(TFRecord, SQLite, TFRecord, ...), so a change in the machine's load hits
both alike. Examples/s is input examples / the pipeline seconds `fedbeam
prepare` prints. After the runs, the two stores' manifests are compared:
every client must have the same file bytes (CRC32C and size) from both
inputs. `--baseline-python` adds one SQLite run with another checkout's
`fedbeam` (e.g. the code before rows travelled as bytes).

    .venv/bin/python -m bench.bench_input_formats > build/bench/logs/bench_input_formats.log 2>&1

Writes bench/results/input_formats.json and the "Input formats" section of
bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys

from bench import workload as wl

SECTION = "## Input formats"
RESULT_FILE = "input_formats.json"
_SECONDS = re.compile(r"store written: .* in ([0-9.]+) s \(")


def log(msg: str) -> None:
  print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--clients", type=int, default=1000, help="workload clients (1000: ~91k examples)")
  p.add_argument("--repeat", type=int, default=3, help="runs per format, taking turns")
  p.add_argument(
    "--baseline-python",
    metavar="PYTHON",
    help="also time the SQLite input once with the fedbeam script next to this "
    "interpreter (another checkout's venv)",
  )
  p.add_argument("--workdir", default=wl.DEFAULT_WORKDIR)
  p.add_argument("--no-write", action="store_true", help="do not write results or README")
  return p.parse_args(argv)


def _command(fmt: str, path: str, store: str, spec: str, fedbeam: list[str]) -> list[str]:
  cmd = [
    *fedbeam,
    "prepare",
    "--input",
    path,
    "--input-format",
    fmt,
    "--element-spec",
    spec,
    "--output",
    store,
    "--overwrite",
    *wl.BEAM_LOCAL_ARGS,
  ]
  if fmt == "tfrecord":
    cmd[cmd.index("--element-spec") : cmd.index("--element-spec")] = [
      "--client-id-key",
      "client_id",
    ]
  return cmd


def _run(name: str, cmd: list[str], workload, args) -> dict:
  logf = os.path.join(args.workdir, "logs", f"input-formats-{name}.log")
  load = os.getloadavg()[0]
  env = None
  if name.endswith("baseline"):
    # Runs start in this checkout; without this, Beam's worker processes
    # (`python -m ...`) would import this checkout's fedbeam, not the baseline's.
    env = dict(os.environ, PYTHONSAFEPATH="1")
  run = wl.run_measured(cmd, logf, env=env)
  if run["returncode"] != 0:
    raise SystemExit(f"{name}: fedbeam prepare failed (log: {logf})")
  with open(logf, encoding="utf-8") as f:
    seconds = float(_SECONDS.findall(f.read())[-1])
  rate = workload.num_examples / seconds
  log(f"{name}: {seconds:.1f} s, {rate:,.0f} examples/s (load {load:.1f})")
  return {
    "pipeline_s": seconds,
    "examples_per_s": rate,
    "wall_s": run["wall_s"],
    "peak_pss_mb": run["peak_pss_mb"],
    "loadavg_1min_at_start": load,
  }


def _client_files(store: str) -> dict[str, tuple[int, int, int]]:
  from fedbeam.format.manifest import read_manifest  # pylint: disable=g-import-not-at-top
  from fedbeam.format.metadata import read_metadata  # pylint: disable=g-import-not-at-top

  metadata = read_metadata(store)
  return {
    r["client_id"]: (r["num_examples"], r["num_bytes"], r["crc32c"])
    for r in read_manifest(store, metadata)
  }


def main(argv=None) -> int:
  args = parse_args(argv)
  os.makedirs(os.path.join(args.workdir, "logs"), exist_ok=True)
  mach = wl.machine()
  workload = wl.Workload(num_clients=args.clients)
  tfrecord = wl.ensure_input(workload, args.workdir, log)
  sqlite = wl.ensure_tff_sqlite(workload, args.workdir, log)
  spec = wl.element_spec_file(args.workdir)
  stores = {
    fmt: os.path.join(wl.workload_dir(workload, args.workdir), "stores", f"input-formats-{fmt}")
    for fmt in ("tfrecord", "tff-sqlite")
  }
  contenders = {
    "tfrecord": _command("tfrecord", tfrecord, stores["tfrecord"], spec, [wl.FEDBEAM]),
    "tff-sqlite": _command("tff-sqlite", sqlite, stores["tff-sqlite"], spec, [wl.FEDBEAM]),
  }
  if args.baseline_python:
    # That interpreter's `fedbeam` script: `python -m fedbeam.cli` would import
    # the fedbeam of the current directory (this checkout) instead.
    contenders["tff-sqlite-baseline"] = _command(
      "tff-sqlite",
      sqlite,
      stores["tff-sqlite"] + "-baseline",
      spec,
      [args.baseline_python, os.path.join(os.path.dirname(args.baseline_python), "fedbeam")],
    )
  runs: dict[str, list] = {name: [] for name in contenders}
  for i in range(args.repeat):
    for name, cmd in contenders.items():
      if name.endswith("baseline") and i > 0:
        continue  # One baseline run: the old code is the slow one, and the machine is shared.
      runs[name].append(_run(name, cmd, workload, args))
  same = _client_files(stores["tfrecord"]) == _client_files(stores["tff-sqlite"])
  log(f"client files identical from both inputs: {same}")
  mach["loadavg_at_end"] = list(os.getloadavg())
  rows = {}
  for name, rs in runs.items():
    rates = [r["examples_per_s"] for r in rs]
    rows[name] = {
      "runs": rs,
      "median_examples_per_s": statistics.median(rates),
      "min_examples_per_s": min(rates),
      "max_examples_per_s": max(rates),
      "command": " ".join(
        os.path.relpath(c, wl.ROOT) if c.startswith(wl.ROOT) else c for c in contenders[name]
      ),
    }
  ratio = rows["tff-sqlite"]["median_examples_per_s"] / rows["tfrecord"]["median_examples_per_s"]
  result = {
    "workload": workload.size_summary(),
    "rows": rows,
    "sqlite_vs_tfrecord": ratio,
    "identical_client_files": same,
    "machine": mach,
    "versions": wl.versions(),
    "command": wl.command_line("bench.bench_input_formats", argv),
    "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
  }
  log(f"TFF SQLite / TFRecord examples/s (medians): {ratio:.2f}x")
  if not args.no_write:
    wl.write_json(RESULT_FILE, result)
    wl.write_readme_section(SECTION, readme_section(result))
  return 0 if same else 1


def _span(values: list) -> str:
  low, high = f"{min(values):.1f}", f"{max(values):.1f}"
  return low if low == high else f"{low}–{high}"


def readme_section(result: dict) -> str:
  w = result["workload"]
  lines = [
    SECTION,
    "",
    f"`fedbeam prepare` (group + write, no expansion or split; local runner, 2 worker "
    f"processes) of the same {w['examples']:,} EMNIST-like examples of {w['clients']:,} "
    "clients, read as TFRecord files and as the TFF SQLite database "
    "`save_to_sql_client_data` writes. Formats take turns in each round; examples/s is "
    "input examples / the pipeline seconds `fedbeam prepare` prints; medians, min–max over "
    "the runs. The machine is shared with other work and was heavily loaded (load "
    "averages below, 2 CPUs): absolute rates are low and noisy, the ratio of medians of "
    "interleaved runs is the figure to read.",
    "",
    "| input | runs | median examples/s | min–max examples/s | vs TFRecord | 1-min load "
    "at the starts |",
    "| --- | ---: | ---: | ---: | ---: | ---: |",
  ]
  base = result["rows"]["tfrecord"]["median_examples_per_s"]
  labels = {
    "tfrecord": "TFRecord (Examples with a `client_id` feature)",
    "tff-sqlite": "TFF SQLite (rows travel as `ExampleBatch`es of bytes)",
    "tff-sqlite-baseline": "TFF SQLite, the code before rows travelled as bytes (a "
    "parsed Example per row pickled between steps; main at "
    "6f4cf2a, one run)",
  }
  for name, row in result["rows"].items():
    lines.append(
      f"| {labels.get(name, name)} | {len(row['runs'])} | "
      f"{row['median_examples_per_s']:,.0f} | {row['min_examples_per_s']:,.0f}–"
      f"{row['max_examples_per_s']:,.0f} | "
      f"{row['median_examples_per_s'] / base:.2f}x | "
      + _span([r["loadavg_1min_at_start"] for r in row["runs"]])
      + " |"
    )
  loads = [r["loadavg_1min_at_start"] for row in result["rows"].values() for r in row["runs"]]
  lines += [
    "",
    f"TFF SQLite reaches {result['sqlite_vs_tfrecord']:.2f}x TFRecord's examples/s "
    "(target: at least 0.7x). Every client's file has the same bytes from both inputs: "
    f"{'yes' if result['identical_client_files'] else 'NO'}. 1-minute load average at "
    f"the start of the runs: {min(loads):.1f}–{max(loads):.1f}. Measured "
    f"{result['date']}; `{result['command']}`.",
    "",
  ]
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
