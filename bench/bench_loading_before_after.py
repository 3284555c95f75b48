"""bench_loading's fedbeam rows before and after a change: several checkouts, one environment.

Runs `python -m bench.bench_loading --parts loading --rows <--rows> --no-write`
of each side (`--before` checkouts, repeatable, then `--after`, this one) in
the after checkout's virtualenv with `PYTHONPATH` at the side's checkout, so
each side runs its own bench_loading and its own fedbeam on the same installed
packages (checked: each side must import fedbeam from its own root). Every
side has its own work directory under `--workdir` (its own store of the same
workload, written by its own `fedbeam prepare`: bench_loading runs
`<root>/.venv/bin/fedbeam`, so a before checkout without a `.venv` gets a
link to the after checkout's, and `PYTHONPATH` still picks the side's code). The sides take turns,
`--repeat` times; each run is a fresh process whose per-row figure is
bench_loading's median ms per client over its timed rounds. Reported: the
median over runs of those figures, and after / before.

Writes bench/results/<--name>.json and the README section `--section`.

    .venv/bin/python -m bench.bench_loading_before_after --before /work/wt-base \\
        > build/bench/logs/bench_loading_before_after.log 2>&1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import time

from bench import workload as wl
from bench.bench_before_after import make_sides, run_timed, spread

ROWS = "fedbeam_eager,fedbeam_graph,fedbeam_tensors,limit"
_RESULT = re.compile(r"^(?:\[[^\]]*\] )?loading: (\{.*\})\s*$", re.M)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--before", action="append", required=True, help="a 'before' checkout root")
  p.add_argument("--after", default=wl.ROOT)
  p.add_argument("--rows", default=ROWS)
  p.add_argument("--repeat", type=int, default=3)
  p.add_argument(
    "--rounds", type=int, default=8, help="bench_loading's timed rounds per run (more: less noise)"
  )
  p.add_argument("--workdir", default=os.path.join(wl.DEFAULT_WORKDIR, "loading_before_after"))
  p.add_argument("--name", default="loading_before_after")
  p.add_argument("--section", default="## Client loading before/after")
  p.add_argument("--notes", help="a Markdown file whose text follows the table")
  p.add_argument("--no-write", action="store_true")
  return p.parse_args(argv)


def log(msg: str) -> None:
  print(f"[loading_before_after {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
  args = parse_args(argv)
  sides = make_sides(args.before, args.after)
  for side in sides:
    venv = os.path.join(side["root"], ".venv")
    if not os.path.lexists(venv):
      os.symlink(os.path.join(os.path.abspath(args.after), ".venv"), venv)
  run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
  mach = wl.machine()
  runs = {s["label"]: [] for s in sides}
  for repeat in range(args.repeat):
    for side in sides:
      tag = side["label"].replace(" ", "_")
      workdir = os.path.join(args.workdir, tag)
      logf = os.path.join(args.workdir, "logs", f"{tag}-{repeat}.log")
      cmd = [
        side["command"]["argv"][0],
        "-m",
        "bench.bench_loading",
        "--parts",
        "loading",
        "--rows",
        args.rows,
        "--rounds",
        str(args.rounds),
        "--no-write",
        "--workdir",
        workdir,
      ]
      load = os.getloadavg()[0]
      run = run_timed(cmd, logf, side["root"], side["command"]["env"])
      if run["returncode"] != 0:
        raise SystemExit(f"{side['label']}: bench_loading failed; see {logf}")
      with open(logf, encoding="utf-8") as f:
        found = _RESULT.findall(f.read())
      if not found:
        raise SystemExit(f"{side['label']}: no 'loading:' result line in {logf}")
      figures = json.loads(found[-1])
      runs[side["label"]].append({"ms_per_client": figures, "loadavg_before": load, "log": logf})
      log(f"{side['label']} {repeat + 1}/{args.repeat} (load {load:.1f}): {figures}")
  rows = {
    row: {
      side["label"]: spread([r["ms_per_client"][row] for r in runs[side["label"]]])
      for side in sides
    }
    for row in args.rows.split(",")
  }
  result = {
    "benchmark": "bench_loading's fedbeam rows before/after",
    "run_id": run_id,
    "name": args.name,
    "section": args.section,
    "command": wl.command_line("bench.bench_loading_before_after", argv),
    "rounds": args.rounds,
    "sides": [{k: v for k, v in s.items() if k != "command"} for s in sides],
    "rows": rows,
    "runs": runs,
    "machine": dict(mach, loadavg_at_end=list(os.getloadavg())),
    "versions": wl.versions(),
  }
  if args.notes:
    with open(args.notes, encoding="utf-8") as f:
      result["notes"] = f.read()
  for row, got in rows.items():
    for side in sides[:-1]:
      log(
        f"{row}: after / {side['label']} = "
        f"{got['after']['median'] / got[side['label']]['median']:.2f}"
      )
  if not args.no_write:
    wl.write_json(args.name + ".json", result)
    wl.write_readme_section(args.section, readme_section(result))
  return 0


def readme_section(result: dict) -> str:
  sides = result["sides"]
  befores = [s for s in sides if s["kind"] == "before"]
  lines = [
    result["section"],
    "",
    "bench_loading's loading part (50 sampled clients per round out of 1,000, "
    f"{result.get('rounds', 8)} timed rounds), "
    "fedbeam's rows and the limit, run by each side's own bench_loading and fedbeam in one "
    "virtualenv (`PYTHONPATH` at the side's checkout); sides take turns, "
    f"{len(next(iter(result['runs'].values())))} runs each, every run a fresh process. Figures: "
    "ms per client (a run's median over its rounds), median over runs (min–max); ratios "
    "after / before (above 1.00 = after is slower).",
    "",
    "| row | "
    + " | ".join(f"{s['label'].split()[0]} (`{s['commit']}`) ms/client" for s in sides)
    + " | "
    + " | ".join(f"after / `{s['commit']}`" for s in befores)
    + " |",
    "| --- |" + " ---: |" * (len(sides) + len(befores)),
  ]
  for row, got in result["rows"].items():
    cells = [
      f"{got[s['label']]['median']:.2f} ({got[s['label']]['min']:.2f}–{got[s['label']]['max']:.2f})"
      for s in sides
    ]
    cells += [f"{got['after']['median'] / got[s['label']]['median']:.2f}" for s in befores]
    lines.append(f"| `{row}` | " + " | ".join(cells) + " |")
  loads = [r["loadavg_before"] for rs in result["runs"].values() for r in rs]
  lines += [
    "",
    f"1-minute load average before each run: {min(loads):.1f}–{max(loads):.1f} "
    f"(median {statistics.median(loads):.1f}) on {result['machine']['nproc']} CPUs.",
    "",
    *wl.section_footer(result),
  ]
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
