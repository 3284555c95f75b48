"""`fedbeam prepare` before and after a change: bench_pipeline's fedbeam rows, two checkouts.

Runs bench_pipeline's `fedbeam_full` (group + 3x expansion + split + write)
and `fedbeam_group` (group + write) rows with the `fedbeam` of two checkouts
(`--before`, `--after`: worktree roots, each with its own `.venv`) on the
same input files (bench/workload.py's TFRecord workload, written once under
`--workdir`) and the same local runner flags (FnApiRunner, 2 worker
processes). The two sides alternate, before first (B, A, B, A, ...), row by
row, `--repeat` times, so that load from other work on the machine falls on
both sides alike.

Each run is a fresh process. Per run: the pipeline time `fedbeam prepare`
reports ("store written: ... in X s"), the wall time of the process, and its
CPU time: user + system of the process and every descendant it reaped
(`os.wait4` of the `fedbeam` process; Beam's worker processes are its
children), with a psutil poll of the live tree every 0.5 s as a cross-check
(the larger of the two is kept). The load average is recorded before each
run. Every run's store must have the same clients and examples as the first
run of its row on the other side, or the benchmark fails.

Writes bench/results/<--name>.json and the README section named by
`--section`.

    .venv/bin/python -m bench.bench_before_after --before /work/wt-base \\
        > build/bench/logs/bench_before_after.log 2>&1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

from bench import workload as wl

ROWS = ("fedbeam_full", "fedbeam_group")
_SECONDS = re.compile(r"store written: .* in ([0-9.]+) s \(")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--before", required=True, help="root of the checkout measured as 'before'")
  p.add_argument("--after", default=wl.ROOT, help="root of the 'after' checkout (this one)")
  p.add_argument("--scales", default="1,10", help="data sizes in units of 1,000 clients")
  p.add_argument("--rows", default=",".join(ROWS))
  p.add_argument("--repeat", type=int, default=3)
  p.add_argument("--expansion", type=int, default=3)
  p.add_argument("--workdir", default=wl.DEFAULT_WORKDIR)
  p.add_argument("--name", default="before_after", help="results file name, without .json")
  p.add_argument("--section", default="## Runner portability (before/after)")
  p.add_argument("--no-write", action="store_true")
  p.add_argument("--notes", help="a Markdown file whose text follows the table (with --merge)")
  p.add_argument(
    "--merge",
    default="",
    help="comma-separated results names (without .json) measured separately, e.g. "
    "one per scale: their rows are written together as --name and --section; "
    "nothing is run",
  )
  return p.parse_args(argv)


def log(msg: str) -> None:
  print(f"[before_after {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def git_commit(root: str) -> str:
  return subprocess.run(
    ["git", "-C", root, "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
  ).stdout.strip()


def run_timed(cmd: list[str], log_path: str, cwd: str) -> dict:
  """Runs `cmd`; returns its exit status, wall time and CPU time (user + sys, whole tree)."""
  import psutil  # pylint: disable=g-import-not-at-top

  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  seen: dict[int, float] = {}
  stop = threading.Event()
  with open(log_path, "w", encoding="utf-8") as out:
    start = time.perf_counter()
    proc = subprocess.Popen(
      cmd,
      stdout=out,
      stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL,
      cwd=cwd,
      start_new_session=True,
    )

    def poll():
      try:
        parent = psutil.Process(proc.pid)
      except psutil.NoSuchProcess:
        return
      while not stop.is_set():
        try:
          procs = [parent] + parent.children(recursive=True)
        except psutil.NoSuchProcess:
          break
        for p in procs:
          try:
            t = p.cpu_times()
            # A process's own time; its reaped children's time is counted when we see them.
            seen[p.pid] = t.user + t.system
          except psutil.Error:
            pass  # Ended between listing and reading.
        stop.wait(0.5)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
  proc.returncode = os.waitstatus_to_exitcode(status)
  cpu_reaped = usage.ru_utime + usage.ru_stime
  cpu_polled = sum(seen.values())
  return {
    "returncode": proc.returncode,
    "wall_s": wall,
    "cpu_s": max(cpu_reaped, cpu_polled),
    "cpu_reaped_s": cpu_reaped,
    "cpu_polled_s": cpu_polled,
    "log": log_path,
  }


def row_extra(name: str, workload, expansion: int) -> list[str]:
  if name == "fedbeam_full":
    return [
      "--num-transformed-clients",
      str(expansion * workload.num_clients),
      "--transform",
      "fedbeam.transforms:random_affine",
      "--test-fraction",
      "0.1",
    ]
  if name == "fedbeam_group":
    return []
  raise SystemExit(f"unknown row {name}")


def run_side(side: str, root: str, name: str, workload, args, repeat: int) -> dict:
  pattern = wl.input_pattern(workload, args.workdir)
  store = os.path.join(args.workdir, "before_after", f"{name}-{workload.name}-{side}")
  shutil.rmtree(store, ignore_errors=True)
  cmd = [
    os.path.join(root, ".venv", "bin", "fedbeam"),
    "prepare",
    "--input",
    pattern,
    "--input-format",
    "tfrecord",
    "--client-id-key",
    "client_id",
    "--element-spec",
    wl.element_spec_file(args.workdir),
    "--output",
    store,
    "--overwrite",
    *row_extra(name, workload, args.expansion),
    *wl.BEAM_LOCAL_ARGS,
  ]
  load = list(os.getloadavg())
  logf = os.path.join(
    args.workdir, "logs", f"before_after-{name}-{workload.name}-{side}-{repeat}.log"
  )
  run = run_timed(cmd, logf, root)
  run["loadavg_before"] = load
  if run["returncode"] != 0:
    raise SystemExit(f"{side} {name} failed (exit {run['returncode']}); see {logf}")
  with open(logf, encoding="utf-8") as f:
    run["pipeline_s"] = float(_SECONDS.findall(f.read())[-1])
  with open(os.path.join(store, "metadata.json"), encoding="utf-8") as f:
    metadata = json.load(f)
  run["clients"] = sum(s["num_clients"] for s in metadata["splits"])
  run["examples"] = sum(s["num_examples"] for s in metadata["splits"])
  shutil.rmtree(store, ignore_errors=True)
  return run


def summarize(runs: list[dict]) -> dict:
  out = {}
  for key in ("pipeline_s", "wall_s", "cpu_s"):
    values = [r[key] for r in runs]
    out[key] = {
      "median": statistics.median(values),
      "min": min(values),
      "max": max(values),
      "runs": values,
    }
  return out


def readme_section(result: dict) -> str:
  b, a = result["before"]["commit"], result["after"]["commit"]
  lines = [
    result["section"],
    "",
    f"bench_pipeline's fedbeam rows, before (`{b}`) and after (`{a}`), on the same input "
    "files: FnApiRunner with 2 worker processes (`--direct_num_workers=2 "
    "--direct_running_mode=multi_processing`). Sides alternate (before, after, before, ...), "
    "*runs* per side as given; medians with min–max. *pipeline s* is the time `fedbeam "
    "prepare` reports for its pipeline; *wall s* is the whole process (interpreter start and "
    "imports included); *CPU s* is user + system time of the process and its Beam worker "
    "processes (`os.wait4` rusage, cross-checked with a psutil poll of the tree). Ratios are "
    "after / before of the medians (above 1.00 = slower after).",
    "",
    "| data | row | runs | pipeline s before | pipeline s after | ratio | wall s before | "
    "wall s after | ratio | CPU s before | CPU s after | ratio |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]

  def cell(s):
    return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"

  for _key, row in result["rows"].items():
    bs, as_ = row["before"], row["after"]
    cells = []
    for m in ("pipeline_s", "wall_s", "cpu_s"):
      cells += [cell(bs[m]), cell(as_[m]), f"{as_[m]['median'] / bs[m]['median']:.2f}"]
    lines.append(
      f"| {row['scale']:g}x ({row['clients']:,} clients, {row['input_examples']:,} "
      f"examples) | `{row['name']}` | {len(row['after_runs'])} | " + " | ".join(cells) + " |"
    )
  loads = [
    r["loadavg_before"][0]
    for row in result["rows"].values()
    for side in ("before_runs", "after_runs")
    for r in row[side]
  ]
  lines += [
    "",
    f"1-minute load average seen before each run: {min(loads):.1f}–{max(loads):.1f} "
    f"(median {statistics.median(loads):.1f}) on {result['machine']['nproc']} CPUs: other "
    "work was running on the machine throughout, so wall times are inflated and noisy; CPU "
    "time is the steadier figure.",
    "",
    *([result["notes"].strip(), ""] if result.get("notes") else []),
    "Command (from the repository root):",
    "",
    "```sh",
    result["command"],
    "```",
    "",
    wl.machine_line(result["machine"], result["versions"]),
    f"Raw numbers: `bench/results/{result['name']}.json`. Measured {result['run_id']}.",
  ]
  return "\n".join(lines)


def main(argv=None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  args = parse_args(argv)
  if args.merge:
    return merge(args)
  sides = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
  mach = wl.machine()
  run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
  rows = {}
  for scale in [float(s) for s in args.scales.split(",")]:
    workload = wl.Workload(num_clients=int(round(1000 * scale)))
    wl.ensure_input(workload, args.workdir, log)
    for name in args.rows.split(","):
      key = f"{name}@{scale:g}"
      runs = {"before": [], "after": []}
      for repeat in range(args.repeat):
        for side, root in sides.items():
          run = run_side(side, root, name, workload, args, repeat)
          first = (runs["before"] + runs["after"] or [run])[0]
          if (run["clients"], run["examples"]) != (first["clients"], first["examples"]):
            raise SystemExit(
              f"{key}: {side} wrote {run['clients']} clients, {run['examples']} "
              f"examples; the first run wrote {first['clients']}, "
              f"{first['examples']}"
            )
          runs[side].append(run)
          log(
            f"{key} {side} {repeat + 1}/{args.repeat}: pipeline {run['pipeline_s']:.1f} s, "
            f"wall {run['wall_s']:.1f} s, cpu {run['cpu_s']:.1f} s (reaped "
            f"{run['cpu_reaped_s']:.1f}, polled {run['cpu_polled_s']:.1f}), load "
            f"{run['loadavg_before'][0]:.1f}"
          )
      rows[key] = {
        "name": name,
        "scale": scale,
        "clients": workload.num_clients,
        "input_examples": workload.num_examples,
        "output_clients": runs["after"][0]["clients"],
        "output_examples": runs["after"][0]["examples"],
        "before": summarize(runs["before"]),
        "after": summarize(runs["after"]),
        "before_runs": runs["before"],
        "after_runs": runs["after"],
      }
      for m in ("pipeline_s", "wall_s", "cpu_s"):
        log(
          f"{key} {m}: before {rows[key]['before'][m]['median']:.1f}, after "
          f"{rows[key]['after'][m]['median']:.1f}, ratio "
          f"{rows[key]['after'][m]['median'] / rows[key]['before'][m]['median']:.2f}"
        )
      if not args.no_write:
        write(args, argv, sides, rows, mach, run_id)
  return 0


def merge(args) -> int:
  """Writes the rows of several results files (same two commits) as one file and section."""
  parts = [wl.read_json(name + ".json") for name in args.merge.split(",")]
  if any(p is None for p in parts):
    raise SystemExit(f"missing results among {args.merge}")
  if len({(p["before"]["commit"], p["after"]["commit"]) for p in parts}) != 1:
    raise SystemExit("the results to merge measured different commits")
  result = dict(
    parts[0],
    name=args.name,
    section=args.section,
    command="\n".join(p["command"] for p in parts),
    run_id=", ".join(p["run_id"] for p in parts),
    rows={k: v for p in parts for k, v in p["rows"].items()},
    repeat=max(p["repeat"] for p in parts),
    machine=dict(parts[0]["machine"], loadavg_at_end=parts[-1]["machine"]["loadavg_at_end"]),
  )
  if args.notes:
    with open(args.notes, encoding="utf-8") as f:
      result["notes"] = f.read()
  wl.write_json(args.name + ".json", result)
  wl.write_readme_section(args.section, readme_section(result))
  return 0


def write(args, argv, sides, rows, mach, run_id) -> None:
  mach = dict(mach, loadavg_at_end=list(os.getloadavg()))
  result = {
    "benchmark": "fedbeam prepare before/after (bench_pipeline's fedbeam rows)",
    "run_id": run_id,
    "repeat": args.repeat,
    "section": args.section,
    "name": args.name,
    "command": wl.command_line("bench.bench_before_after", argv),
    "before": {"root": sides["before"], "commit": git_commit(sides["before"])},
    "after": {"root": sides["after"], "commit": git_commit(sides["after"])},
    "beam_args": list(wl.BEAM_LOCAL_ARGS),
    "rows": rows,
    "machine": mach,
    "versions": wl.versions(),
  }
  wl.write_json(args.name + ".json", result)
  wl.write_readme_section(args.section, readme_section(result))


if __name__ == "__main__":
  sys.exit(main())
