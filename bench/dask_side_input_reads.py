"""How often one `fedbeam prepare` run opens its input and writes each client file, per runner.

Runs bench_dask's worker (`python -m bench.bench_dask --worker RUNNER`, the
same 1,311-client text input, already written by bench_dask) once under
`strace -f --seccomp-bpf -e trace=openat,rename,renameat,renameat2` and counts,
in the trace of the whole process tree (Dask's worker processes included):

- `input_opens`: read-only opens of each input file;
- `tmp_file_creates_under_store`: creations of a temporary file under the
  store (every client file, the manifest and the metadata are written to a
  temporary name first, store_writer.py);
- `writes_per_client_file`: how many times each final client file was written
  (distinct temporary names renamed to it), as {count: number of files}.

Also the run's wall time, the CPU time of the process tree (user + system,
strace included; bench_before_after.run_timed) and `run_prepare`'s own
seconds. Beam 2.72's DaskRunner recomputes a side input's upstream graph in
every task that reads it (docs/upstream/dask-runner.md); these counts show
how much. Writes bench/results/dask_reads.json (no README section; bench/README.md's
"Dask" section quotes it).

    .venv/bin/python -m bench.dask_side_input_reads > build/bench/logs/dask_side_input_reads.log 2>&1
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import sys

from bench import bench_before_after, bench_dask
from bench import workload as wl


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--runners", default="local,dask")
  p.add_argument("--workdir", default=wl.DEFAULT_WORKDIR)
  p.add_argument("--no-write", action="store_true")
  return p.parse_args(argv)


def traced_run(runner: str, workdir: str) -> dict:
  pattern, _ = bench_dask.ensure_input(workdir)
  base = os.path.join(workdir, "text-c1311", "traced")
  os.makedirs(base, exist_ok=True)
  out = os.path.join(base, f"store-{runner}")
  shutil.rmtree(out, ignore_errors=True)
  trace = os.path.join(base, f"{runner}.trace")
  cmd = [
    "strace",
    "-f",
    "--seccomp-bpf",
    "-e",
    "trace=openat,rename,renameat,renameat2",
    "-o",
    trace,
    wl.PYTHON,
    "-m",
    "bench.bench_dask",
    "--worker",
    runner,
    "--input",
    pattern,
    "--output",
    out,
    "--result",
    out + ".json",
  ]
  run = bench_before_after.run_timed(cmd, os.path.join(base, f"{runner}.log"), wl.ROOT)
  if run["returncode"] != 0:
    raise SystemExit(f"{runner} run failed (exit {run['returncode']}); see {run['log']}")
  with open(trace, encoding="utf-8", errors="replace") as f:
    text = f.read()
  opens = {
    os.path.basename(p): len(re.findall(rf'openat\([^"]*"{re.escape(p)}", O_RDONLY', text))
    for p in sorted(glob.glob(pattern))
  }
  creates = len(
    re.findall(rf'openat\([^"]*"{re.escape(out)}/[^"]*\.tmp-[0-9a-f]+", O_WRONLY\|O_CREAT', text)
  )
  renamed = collections.Counter(
    re.findall(
      rf'rename\w*\([^"]*"{re.escape(out)}/[^"]*\.tmp-[0-9a-f]+"[^"]*"([^"]+\.tfrecord)"', text
    )
  )
  with open(out + ".json", encoding="utf-8") as f:
    res = json.load(f)
  os.remove(trace)  # Hundreds of MB; the counts are what is kept.
  shutil.rmtree(out, ignore_errors=True)
  return {
    "runner": runner,
    "wall_s": run["wall_s"],
    "cpu_s": run["cpu_s"],
    "pipeline_s": res["seconds"],
    "clients": res["clients"],
    "input_opens": opens,
    "tmp_file_creates_under_store": creates,
    "writes_per_client_file": {
      str(k): v for k, v in sorted(collections.Counter(renamed.values()).items())
    },
    "loadavg_after": list(os.getloadavg()),
  }


def main(argv=None) -> int:
  args = parse_args(argv)
  if shutil.which("strace") is None:
    raise SystemExit("strace is not installed")
  runs = {}
  for runner in args.runners.split(","):
    runs[runner] = traced_run(runner, args.workdir)
    print(json.dumps(runs[runner]), flush=True)
  if not args.no_write:
    wl.write_json(
      "dask_reads.json",
      {
        "benchmark": "input opens and client-file writes of one prepare run, per runner",
        "command": wl.command_line("bench.dask_side_input_reads", argv),
        "runs": runs,
        "machine": wl.machine(),
        "versions": wl.versions(),
      },
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
