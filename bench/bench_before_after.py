"""`fedbeam prepare` before and after a change: bench_pipeline's fedbeam rows, several checkouts.

Runs bench_pipeline's `fedbeam_full` (group + 3x expansion + split + write)
and `fedbeam_group` (group + write) rows with the `fedbeam` of several sides
on the same input files (bench/workload.py's TFRecord workload, written once
under `--workdir`) and the same local runner flags (FnApiRunner, 2 worker
processes). Sides: each `--before` checkout (a worktree root; repeatable),
the `--after` checkout (this one), and each `--after-variant` (the after
checkout with extra `fedbeam prepare` flags, e.g. `--no-fsync`). The sides
take turns in that order, row by row, `--repeat` times, so that load from
other work on the machine falls on all of them alike.

`--env after` (the default) runs every side with the after checkout's
virtualenv (`python -m fedbeam.cli` with `PYTHONPATH=<side root>`, checked
before the runs: each side must import `fedbeam` from its own root), so a
difference is the code's, not the installed packages'. `--env own` runs each
side's own `.venv/bin/fedbeam`.

Each run is a fresh process. Per run: the pipeline time `fedbeam prepare`
reports ("store written: ... in X s"), the wall time of the process, and its
CPU time: user + system of the process and every descendant it reaped
(`os.wait4` of the `fedbeam` process; Beam's worker processes are its
children), with a psutil poll of the live tree every 0.5 s as a cross-check
(the larger of the two is kept). The load average is recorded before each
run. Every run's store must have the same clients and examples as the first
run of its row, or the benchmark fails.

Writes bench/results/<--name>.json and the README section named by
`--section`; ratios there are after / that side (above 1.00: after is slower).

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
  p.add_argument(
    "--before",
    action="append",
    required=True,
    help="root of a checkout measured as 'before' (repeatable)",
  )
  p.add_argument("--after", default=wl.ROOT, help="root of the 'after' checkout (this one)")
  p.add_argument(
    "--after-variant",
    action="append",
    default=[],
    help="extra fedbeam prepare flags for one more side on the after checkout "
    "(repeatable; e.g. --after-variant=--no-fsync)",
  )
  p.add_argument(
    "--env",
    choices=("after", "own"),
    default="after",
    help="after: every side runs in the after checkout's .venv; own: each in its own",
  )
  p.add_argument("--scales", default="1,10", help="data sizes in units of 1,000 clients")
  p.add_argument("--rows", default=",".join(ROWS))
  p.add_argument("--repeat", type=int, default=3)
  p.add_argument("--expansion", type=int, default=3)
  p.add_argument("--workdir", default=wl.DEFAULT_WORKDIR)
  p.add_argument("--name", default="before_after", help="results file name, without .json")
  p.add_argument(
    "--section", default="## Before/after: runner portability, format package, durability"
  )
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


def run_timed(cmd: list[str], log_path: str, cwd: str, env: dict | None = None) -> dict:
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
      env=env,
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


def make_sides(
  befores: list[str], after: str, variants: list[str] = (), env: str = "after"
) -> list[dict]:
  """The sides in the order they take turns: `befores` (checkout roots), `after`, then one
  side per entry of `variants` (extra `fedbeam prepare` flags on the after checkout).

  Each side: label, kind (before/after/variant), root, flags, commit, and the command
  and environment `side_command` gives for `env`.
  """
  after = os.path.abspath(after)
  sides = [{"kind": "before", "root": os.path.abspath(r), "flags": []} for r in befores]
  sides.append({"kind": "after", "root": after, "flags": []})
  sides += [{"kind": "variant", "root": after, "flags": f.split()} for f in variants]
  for side in sides:
    side["commit"] = git_commit(side["root"])
    side["label"] = {
      "before": f"before {side['commit']}",
      "after": "after",
      "variant": "after " + " ".join(side["flags"]),
    }[side["kind"]]
    side["command"] = side_command(side, after, env)
  return sides


def side_command(side: dict, after_root: str, env: str) -> dict:
  """The `fedbeam` command and environment of a side; checks which fedbeam it imports."""
  if env == "own":
    return {"argv": [os.path.join(side["root"], ".venv", "bin", "fedbeam")], "env": None}
  python = os.path.join(after_root, ".venv", "bin", "python")
  environ = dict(os.environ, PYTHONPATH=side["root"])
  found = subprocess.run(
    [python, "-c", "import fedbeam, os; print(os.path.realpath(fedbeam.__file__))"],
    check=True,
    capture_output=True,
    text=True,
    env=environ,
    cwd=side["root"],
  ).stdout.strip()
  if not found.startswith(os.path.realpath(side["root"]) + os.sep):
    raise SystemExit(f"{side['label']}: fedbeam imports from {found}, not from {side['root']}")
  return {"argv": [python, "-m", "fedbeam.cli"], "env": environ}


def run_side(side: dict, name: str, workload, args, repeat: int) -> dict:
  pattern = wl.input_pattern(workload, args.workdir)
  tag = side["label"].replace(" ", "_").replace("-", "")
  store = os.path.join(args.workdir, "before_after", f"{name}-{workload.name}-{tag}")
  shutil.rmtree(store, ignore_errors=True)
  cmd = [
    *side["command"]["argv"],
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
    *side["flags"],
    *wl.BEAM_LOCAL_ARGS,
  ]
  load = list(os.getloadavg())
  logf = os.path.join(
    args.workdir, "logs", f"before_after-{name}-{workload.name}-{tag}-{repeat}.log"
  )
  run = run_timed(cmd, logf, side["root"], side["command"]["env"])
  run["loadavg_before"] = load
  if run["returncode"] != 0:
    raise SystemExit(f"{side['label']} {name} failed (exit {run['returncode']}); see {logf}")
  with open(logf, encoding="utf-8") as f:
    run["pipeline_s"] = float(_SECONDS.findall(f.read())[-1])
  with open(os.path.join(store, "metadata.json"), encoding="utf-8") as f:
    metadata = json.load(f)
  run["clients"] = sum(s["num_clients"] for s in metadata["splits"])
  run["examples"] = sum(s["num_examples"] for s in metadata["splits"])
  shutil.rmtree(store, ignore_errors=True)
  return run


def spread(values: list[float]) -> dict:
  """Median, min, max and the values themselves."""
  return {
    "median": statistics.median(values),
    "min": min(values),
    "max": max(values),
    "runs": list(values),
  }


def summarize(runs: list[dict]) -> dict:
  return {key: spread([r[key] for r in runs]) for key in ("pipeline_s", "wall_s", "cpu_s")}


def _side_text(side: dict) -> str:
  if side["kind"] == "variant":
    return f"after with `{' '.join(side['flags'])}`"
  return f"{side['kind']} (`{side['commit']}`)"


def readme_section(result: dict) -> str:
  sides = result["sides"]
  env = (
    "every side in the after checkout's virtualenv (`python -m fedbeam.cli` with "
    "`PYTHONPATH` at the side's checkout), so the installed packages are the same"
    if result.get("env", "own") == "after"
    else "each side in its own checkout's virtualenv"
  )
  lines = [
    result["section"],
    "",
    "bench_pipeline's fedbeam rows on the same input files, sides: "
    + ", ".join(_side_text(s) for s in sides)
    + f"; {env}. FnApiRunner with 2 worker processes (`--direct_num_workers=2 "
    "--direct_running_mode=multi_processing`). Sides take turns in that order, "
    "*runs* per side as given; medians with min–max. *pipeline s* is the time `fedbeam "
    "prepare` reports for its pipeline; *wall s* is the whole process (interpreter start and "
    "imports included); *CPU s* is user + system time of the process and its Beam worker "
    "processes (`os.wait4` rusage, cross-checked with a psutil poll of the tree). Ratios are "
    "after / that side, of the medians (above 1.00 = after is slower).",
    "",
    "| data | row | side | runs | pipeline s | after / side | wall s | after / side | "
    "CPU s | after / side |",
    "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]

  def cell(s):
    return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"

  for _key, row in result["rows"].items():
    after = row["sides"]["after"]["summary"]
    for side in sides:
      got = row["sides"][side["label"]]
      cells = []
      for m in ("pipeline_s", "wall_s", "cpu_s"):
        ratio = (
          ""
          if side["kind"] == "after"
          else f"{after[m]['median'] / got['summary'][m]['median']:.2f}"
        )
        cells += [cell(got["summary"][m]), ratio]
      lines.append(
        f"| {row['scale']:g}x ({row['clients']:,} clients, {row['input_examples']:,} "
        f"examples) | `{row['name']}` | {_side_text(side)} | {len(got['runs'])} | "
        + " | ".join(cells)
        + " |"
      )
  loads = [
    r["loadavg_before"][0]
    for row in result["rows"].values()
    for got in row["sides"].values()
    for r in got["runs"]
  ]
  lines += [
    "",
    f"1-minute load average seen before each run: {min(loads):.1f}–{max(loads):.1f} "
    f"(median {statistics.median(loads):.1f}) on {result['machine']['nproc']} CPUs.",
    "",
    *wl.section_footer(result),
  ]
  return "\n".join(lines)


def main(argv=None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  args = parse_args(argv)
  if args.merge:
    return merge(args)
  sides = make_sides(args.before, args.after, args.after_variant, args.env)
  mach = wl.machine()
  run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
  rows = {}
  for scale in [float(s) for s in args.scales.split(",")]:
    workload = wl.Workload(num_clients=int(round(1000 * scale)))
    wl.ensure_input(workload, args.workdir, log)
    for name in args.rows.split(","):
      key = f"{name}@{scale:g}"
      runs = {side["label"]: [] for side in sides}
      first = None
      for repeat in range(args.repeat):
        for side in sides:
          run = run_side(side, name, workload, args, repeat)
          first = first or run
          if (run["clients"], run["examples"]) != (first["clients"], first["examples"]):
            raise SystemExit(
              f"{key}: {side['label']} wrote {run['clients']} clients, {run['examples']} "
              f"examples; the first run wrote {first['clients']}, {first['examples']}"
            )
          runs[side["label"]].append(run)
          log(
            f"{key} {side['label']} {repeat + 1}/{args.repeat}: pipeline "
            f"{run['pipeline_s']:.1f} s, wall {run['wall_s']:.1f} s, cpu {run['cpu_s']:.1f} s "
            f"(reaped {run['cpu_reaped_s']:.1f}, polled {run['cpu_polled_s']:.1f}), load "
            f"{run['loadavg_before'][0]:.1f}"
          )
      rows[key] = {
        "name": name,
        "scale": scale,
        "clients": workload.num_clients,
        "input_examples": workload.num_examples,
        "output_clients": first["clients"],
        "output_examples": first["examples"],
        "sides": {label: {"summary": summarize(r), "runs": r} for label, r in runs.items()},
      }
      after = rows[key]["sides"]["after"]["summary"]
      for side in sides:
        if side["kind"] != "after":
          got = rows[key]["sides"][side["label"]]["summary"]
          log(
            f"{key} after / {side['label']}: "
            + ", ".join(
              f"{m} {after[m]['median'] / got[m]['median']:.2f}"
              for m in ("pipeline_s", "wall_s", "cpu_s")
            )
          )
      if not args.no_write:
        write(args, argv, sides, rows, mach, run_id)
  return 0


def merge(args) -> int:
  """Writes the rows of several results files (same sides) as one file and section."""
  parts = [wl.read_json(name + ".json") for name in args.merge.split(",")]
  if any(p is None for p in parts):
    raise SystemExit(f"missing results among {args.merge}")
  if len({json.dumps([(s["label"], s["commit"]) for s in p["sides"]]) for p in parts}) != 1:
    raise SystemExit("the results to merge measured different sides")
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
    "env": args.env,
    "command": wl.command_line("bench.bench_before_after", argv),
    "sides": [{k: v for k, v in s.items() if k != "command"} for s in sides],
    "beam_args": list(wl.BEAM_LOCAL_ARGS),
    "rows": rows,
    "machine": mach,
    "versions": wl.versions(),
  }
  if args.notes:
    with open(args.notes, encoding="utf-8") as f:
      result["notes"] = f.read()
  wl.write_json(args.name + ".json", result)
  wl.write_readme_section(args.section, readme_section(result))


if __name__ == "__main__":
  sys.exit(main())
