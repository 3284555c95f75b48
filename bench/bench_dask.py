"""Shakespeare-sized `fedbeam prepare` on Dask next to the local runner.

The input is 1,311 text clients (TFF's Shakespeare has 1,129 train and test
speakers; the text dataset this was first seen on had 1,311): lines of
words drawn from a fixed vocabulary, lognormal line counts per client, in
two TFRecord files (one string feature `snippets`, variable length). Each
run is a fresh process (`--worker`) calling `run_prepare`:

- `local`: Beam's FnApiRunner with two worker processes
  (`--direct_num_workers=2 --direct_running_mode=multi_processing`);
- `dask`: `fedbeam.pipelines.dask.DaskRunner` over a
  `dask.distributed.LocalCluster(n_workers=2, processes=True,
  threads_per_worker=1)` started in the process before the clock starts.

Rows take turns (local, dask, local, ...), `--repeat` times (default 3);
the time is `run_prepare`'s own (pipeline) time, medians reported. Every
Dask store must be byte-identical to the local one (SHA-256 over every
file), or the run fails. Writes bench/results/dask.json and the "Dask"
section of bench/README.md.

    .venv/bin/python -m bench.bench_dask > build/bench/logs/bench_dask.log 2>&1
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np

from bench import workload as wl

SECTION = "## Dask"
RESULT_FILE = "dask.json"
NUM_CLIENTS = 1311
RUNNERS = ("local", "dask")
_WORDS = (
  "thou",
  "thee",
  "lord",
  "king",
  "love",
  "night",
  "sweet",
  "death",
  "good",
  "heart",
  "speak",
  "hath",
  "come",
  "sir",
  "fair",
  "honour",
  "blood",
  "grace",
  "world",
  "eyes",
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeat", type=int, default=3)
  p.add_argument("--workdir", default=wl.DEFAULT_WORKDIR)
  p.add_argument("--no-write", action="store_true")
  p.add_argument("--worker", choices=RUNNERS, help=argparse.SUPPRESS)
  p.add_argument("--input", help=argparse.SUPPRESS)
  p.add_argument("--output", help=argparse.SUPPRESS)
  p.add_argument("--result", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def log(msg: str) -> None:
  print(f"[bench_dask {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def text_clients(num_clients: int = NUM_CLIENTS, seed: int = 0) -> dict:
  """{speaker id: [{"snippets": line}, ...]}, sizes lognormal (median 20 lines)."""
  rng = np.random.default_rng(seed)
  clients = {}
  for i in range(num_clients):
    count = int(min(1000, max(1, round(rng.lognormal(np.log(20), 1.0)))))
    lines = [" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 30)))) for _ in range(count)]
    clients[f"PLAY_{i // 40:02d}_SPEAKER_{i:04d}"] = [{"snippets": line} for line in lines]
  return clients


def ensure_input(workdir: str) -> tuple[str, int]:
  """Writes the text input once; returns (file pattern, number of lines)."""
  from fedbeam import testing  # pylint: disable=g-import-not-at-top

  directory = os.path.join(workdir, "text-c1311", "input")
  done = os.path.join(directory, ".done")
  pattern = os.path.join(directory, "part-*.tfrecord")
  clients = text_clients()
  lines = sum(len(v) for v in clients.values())
  if os.path.exists(done):
    return pattern, lines
  shutil.rmtree(directory, ignore_errors=True)
  ids = sorted(clients)
  for k in range(2):
    testing.write_tfrecord_input(
      os.path.join(directory, f"part-{k}.tfrecord"),
      {cid: clients[cid] for cid in ids[k::2]},
      "speaker",
    )
  with open(done, "w", encoding="utf-8") as f:
    f.write("ok\n")
  return pattern, lines


def worker(args) -> int:
  """One timed `run_prepare` on the named runner; writes its seconds and store digest."""
  from fedbeam.pipelines.prepare import PrepareConfig, run_prepare  # pylint: disable=g-import-not-at-top

  config = PrepareConfig(
    input=args.input,
    input_format="tfrecord",
    output=args.output,
    client_id_key="speaker",
    overwrite=True,
  )
  cluster = None
  if args.worker == "dask":
    from dask.distributed import LocalCluster  # pylint: disable=g-import-not-at-top

    cluster = LocalCluster(
      n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
    )
    beam_args = [
      "--runner=fedbeam.pipelines.dask.DaskRunner",
      f"--dask_client_address={cluster.scheduler_address}",
    ]
  else:
    beam_args = list(wl.BEAM_LOCAL_ARGS)
  try:
    result = run_prepare(config, beam_args)
  finally:
    if cluster is not None:
      cluster.close()
  with open(args.result, "w", encoding="utf-8") as f:
    json.dump(
      {
        "seconds": result.seconds,
        "digest": tree_digest(args.output),
        "clients": sum(s["num_clients"] for s in result.metadata["splits"]),
        "examples": sum(s["num_examples"] for s in result.metadata["splits"]),
      },
      f,
    )
  return 0


def tree_digest(root: str) -> str:
  """SHA-256 over every file's relative path and bytes, in path order."""
  h = hashlib.sha256()
  paths = sorted(
    os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names
  )
  for rel in paths:
    h.update(rel.encode() + b"\0")
    with open(os.path.join(root, rel), "rb") as f:
      h.update(f.read())
  return h.hexdigest()


def readme_section(result: dict) -> str:
  rows = result["rows"]
  local = rows["local"]
  lines = [
    SECTION,
    "",
    f"`fedbeam prepare` (group + write + manifest, no expansion) of a Shakespeare-sized text "
    f"input: {result['clients']:,} clients, {result['examples']:,} lines (one variable-length "
    "string feature), two TFRecord files. Local: Beam's FnApiRunner with two worker "
    "processes. Dask: `fedbeam.pipelines.dask.DaskRunner` over a `dask.distributed` "
    "LocalCluster of two worker processes (one thread each), started before the clock. Rows "
    f"took turns, {result['repeat']} runs each; the time is `run_prepare`'s own. Every Dask "
    "store was byte-identical to the local one (SHA-256 over every file).",
    "",
    "| runner | median s | min–max s | vs local |",
    "| --- | ---: | ---: | ---: |",
  ]
  for name, label in (
    ("local", "local FnApiRunner, 2 worker processes"),
    ("dask", "DaskRunner (fedbeam's), LocalCluster of 2 worker processes"),
  ):
    r = rows[name]
    lines.append(
      f"| {label} | {r['median_s']:.1f} | {r['min_s']:.1f}–{r['max_s']:.1f} | "
      f"{r['median_s'] / local['median_s']:.2f}x |"
    )
  lines += [
    "",
    "Why Dask is slower: Beam 2.72's DaskRunner computes a side input's whole upstream graph "
    "again inside every task that reads it (`DaskBagWindowedIterator` in "
    "`apache_beam/runners/dask/transform_evaluator.py`), and fedbeam's steps after the "
    "shuffle read side inputs (counts, plan, split, shard count) computed from other side "
    "inputs, so upstream work repeats many times. Upstream fix: hand each side input to "
    "`map_partitions` as a dependency computed once (e.g. `dask.delayed(list)(bag)`) instead "
    "of computing it in every task ([docs/upstream/dask-runner.md]"
    "(../docs/upstream/dask-runner.md)).",
    "",
    *reads_lines(wl.read_json("dask_reads.json")),
    "Command (from the repository root):",
    "",
    "```sh",
    result["command"],
    "```",
    "",
    f"Machine: {result['machine']['nproc']} CPUs, {result['machine']['memory_gib']} GiB; load "
    f"average (1, 5, 15 min) at the start {', '.join(f'{v:.2f}' for v in result['machine']['loadavg_at_start'])}; "
    f"at the end {', '.join(f'{v:.2f}' for v in result['machine']['loadavg_at_end'])} (the machine "
    "was shared with other work: a load above 2 slows every row). Raw numbers: "
    "`bench/results/dask.json`.",
    f"Measured {result['run_id']}.",
  ]
  return "\n".join(lines)


def reads_lines(reads) -> list[str]:
  """The traced counts of bench/dask_side_input_reads.py (dask_reads.json), if measured."""
  if not reads or not {"local", "dask"} <= set(reads["runs"]):
    return []
  local, dask = reads["runs"]["local"], reads["runs"]["dask"]

  def opens(r):
    return ", ".join(f"{n}" for n in r["input_opens"].values())

  def writes(r):
    return ", ".join(f"{k} times: {v:,} files" for k, v in r["writes_per_client_file"].items())

  return [
    "How much is recomputed (`bench/dask_side_input_reads.py`: one run per runner under "
    "`strace -f`, counting opens and renames in the whole process tree): the Dask run opened "
    f"each input file {opens(dask)} times (local: {opens(local)}), wrote each client file "
    f"again at every recomputation of the write step ({writes(dask)}; local: {writes(local)}; "
    "each write goes to a temporary name renamed over the same file, so the store is still "
    f"identical) and used {dask['cpu_s']:.0f} s of CPU over the process tree against the "
    f"local run's {local['cpu_s']:.0f} s (wall {dask['wall_s']:.0f} s vs "
    f"{local['wall_s']:.0f} s; `bench/results/dask_reads.json`).",
    "",
  ]


def main(argv=None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  args = parse_args(argv)
  if args.worker:
    return worker(args)
  mach = wl.machine()
  run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
  pattern, num_lines = ensure_input(args.workdir)
  runs: dict[str, list] = {name: [] for name in RUNNERS}
  digests = set()
  info = {}
  for repeat in range(args.repeat):
    for name in RUNNERS:
      out = os.path.join(args.workdir, "text-c1311", "stores", name)
      shutil.rmtree(out, ignore_errors=True)
      result_path = out + ".json"
      cmd = [
        wl.PYTHON,
        "-m",
        "bench.bench_dask",
        "--worker",
        name,
        "--input",
        pattern,
        "--output",
        out,
        "--result",
        result_path,
      ]
      run = wl.run_measured(cmd, os.path.join(args.workdir, "logs", f"dask-{name}-{repeat}.log"))
      if run["returncode"] != 0:
        log(f"{name} run {repeat + 1} failed; see {run['log']}")
        return 1
      with open(result_path, encoding="utf-8") as f:
        info = json.load(f)
      digests.add(info["digest"])
      runs[name].append(info["seconds"])
      log(
        f"{name} run {repeat + 1}/{args.repeat}: {info['seconds']:.1f} s, "
        f"wall {run['wall_s']:.1f} s, load {os.getloadavg()[0]:.1f}"
      )
  if len(digests) != 1:
    log(f"stores differ between runs: {sorted(digests)}")
    return 1
  mach["loadavg_at_end"] = list(os.getloadavg())
  result = {
    "benchmark": "prepare on Dask vs the local runner (text input)",
    "run_id": run_id,
    "repeat": args.repeat,
    "clients": info["clients"],
    "examples": info["examples"],
    "input_lines": num_lines,
    "command": wl.command_line("bench.bench_dask", argv),
    "rows": {name: dict(wl.stats(times), runs=times) for name, times in runs.items()},
    "machine": mach,
    "versions": wl.versions(),
  }
  for name in RUNNERS:
    r = result["rows"][name]
    log(f"{name}: median {r['median_s']:.1f} s ({r['min_s']:.1f}-{r['max_s']:.1f})")
  if not args.no_write:
    wl.write_json(RESULT_FILE, result)
    wl.write_readme_section(SECTION, readme_section(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
