"""Input formats: `fedbeam prepare` from Parquet next to the same examples as TFRecord.

The workload (bench/workload.py, EMNIST-like: `label` int32, `pixels`
float32[28, 28]) is read from its TFRecord input files (tf.train.Example
with a `client_id` bytes feature) and from Parquet files holding the same
records in the same files and order (columns `client_id` string, `label`
int32, `pixels` fixed_size_list<fixed_size_list<float32, 28>, 28>, row
groups of 2,048 rows), written here once and cached. Both runs get the
workload's `--element-spec` and Beam's FnApiRunner with 2 worker processes
(bench/workload.py's BEAM_LOCAL_ARGS), each in a fresh `fedbeam prepare`
process. Examples/s is input examples / the pipeline seconds `fedbeam
prepare` reports. Runs are interleaved (TFRecord, Parquet, TFRecord, ...)
so that load on a shared machine falls on both alike; the table gives the
median of `--repeat` runs and the ratio of the medians. Both stores'
client files are compared byte for byte after the runs.

    .venv/bin/python -m bench.bench_inputs > build/bench/logs/bench_inputs.log 2>&1
    .venv/bin/python -m bench.bench_inputs --clients 100 --repeat 1 --no-write   # smoke run

Writes bench/results/inputs.json and the "Input formats" section of bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys

import numpy as np

from bench import workload as wl

RESULT_FILE = "inputs.json"
SECTION = "## Parquet input"
_FEDBEAM_SECONDS = re.compile(r"store written: .* in ([0-9.]+) s \(")


def log(msg: str) -> None:
  print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def parquet_pattern(workload: wl.Workload, workdir: str) -> str:
  return os.path.join(wl.workload_dir(workload, workdir), "parquet", "part-*.parquet")


def ensure_parquet(workload: wl.Workload, workdir: str) -> str:
  """The workload's TFRecord input files as Parquet: same files, same records, same order."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  directory = os.path.dirname(parquet_pattern(workload, workdir))
  if os.path.exists(directory + ".done"):
    return parquet_pattern(workload, workdir)
  os.makedirs(directory, exist_ok=True)
  ids = workload.client_ids
  count = wl.num_input_files(workload)
  for k in range(count):
    cids, labels, pixels = [], [], []
    for cid in ids[k::count]:
      label, pixel = workload.client_arrays(cid)
      cids.extend([cid] * len(label))
      labels.append(label)
      pixels.append(pixel)
    # The order ensure_input writes the TFRecord file in.
    order = np.random.default_rng([workload.seed, 0xF11E, k]).permutation(len(cids))
    label = np.concatenate(labels)[order]
    pixel = np.concatenate(pixels)[order].reshape(-1)
    rows = pa.FixedSizeListArray.from_arrays(pa.array(pixel, pa.float32()), wl.IMAGE)
    table = pa.table(
      {
        "client_id": pa.array([cids[j] for j in order], pa.string()),
        "label": pa.array(label, pa.int32()),
        "pixels": pa.FixedSizeListArray.from_arrays(rows, wl.IMAGE),
      }
    )
    pq.write_table(
      table, os.path.join(directory, f"part-{k:05d}-of-{count:05d}.parquet"), row_group_size=2048
    )
  with open(directory + ".done", "w", encoding="utf-8") as f:
    f.write(f"{count} files, {workload.num_examples} examples\n")
  log(f"workload {workload.name}: wrote {count} Parquet files")
  return parquet_pattern(workload, workdir)


def run_prepare(fmt: str, pattern: str, store: str, workdir: str, logf: str) -> dict:
  cmd = wl.prepare_command(pattern, store, wl.element_spec_file(workdir))
  cmd[cmd.index("--input-format") + 1] = fmt
  run = wl.run_measured(cmd, logf)
  if run["returncode"] != 0:
    raise RuntimeError(f"fedbeam prepare --input-format {fmt} failed (log {run['log']})")
  with open(logf, encoding="utf-8") as f:
    run["pipeline_s"] = float(_FEDBEAM_SECONDS.findall(f.read())[-1])
  return run


def _client_files(store: str) -> dict:
  from fedbeam.format.metadata import data_root, read_metadata  # pylint: disable=g-import-not-at-top

  root = data_root(store, read_metadata(store))
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      if name.endswith(".tfrecord"):
        path = os.path.join(dirpath, name)
        with open(path, "rb") as f:
          out[os.path.relpath(path, root)] = f.read()
  return out


def readme_section(result: dict) -> str:
  rows = result["rows"]
  t, p = rows["tfrecord"], rows["parquet"]
  lines = [
    SECTION,
    "",
    f"`fedbeam prepare` (group + write, `--element-spec` given, 2 worker processes) of "
    f"{result['clients']:,} EMNIST-like clients ({result['examples']:,} examples) from "
    "the same records as TFRecord and as Parquet (bench/bench_inputs.py); "
    f"medians of {result['repeat']} runs each, interleaved, on a shared machine "
    "(other jobs ran alongside: the load average below; compare the ratio, not the "
    "absolute rates). Both stores' client files are byte-identical: "
    f"{result['identical_client_files']}.",
    "",
    "| input | median pipeline s | min–max s | median examples/s | vs TFRecord |",
    "| --- | ---: | ---: | ---: | ---: |",
  ]
  for name, row in (("TFRecord (tf.train.Example)", t), ("Parquet (pyarrow)", p)):
    lines.append(
      f"| {name} | {row['median_s']:.1f} | {row['min_s']:.1f}–{row['max_s']:.1f} | "
      f"{row['examples_per_s']:,.0f} | "
      f"{row['examples_per_s'] / t['examples_per_s']:.2f}x |"
    )
  lines += [
    "",
    wl.machine_line(result["machine"], result["versions"]),
    "",
    f"Command: `{result['command']}`",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--clients", type=int, default=300)
  parser.add_argument("--repeat", type=int, default=3)
  parser.add_argument("--workdir", default=wl.DEFAULT_WORKDIR)
  parser.add_argument("--no-write", action="store_true", help="do not write results or README")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  mach = wl.machine()
  workload = wl.Workload(num_clients=args.clients)
  patterns = {
    "tfrecord": wl.ensure_input(workload, args.workdir, log),
    "parquet": ensure_parquet(workload, args.workdir),
  }
  stores = {
    fmt: os.path.join(wl.workload_dir(workload, args.workdir), "stores", f"input-{fmt}")
    for fmt in patterns
  }
  runs: dict[str, list] = {fmt: [] for fmt in patterns}
  for repeat in range(args.repeat):
    for fmt, pattern in patterns.items():
      logf = os.path.join(args.workdir, "logs", f"inputs-{fmt}-{workload.name}.log")
      run = run_prepare(fmt, pattern, stores[fmt], args.workdir, logf)
      runs[fmt].append(run)
      log(
        f"{fmt} (run {repeat + 1}/{args.repeat}): {run['pipeline_s']:.1f} s pipeline, "
        f"{workload.num_examples / run['pipeline_s']:,.0f} ex/s, wall {run['wall_s']:.1f} s"
      )
  identical = _client_files(stores["tfrecord"]) == _client_files(stores["parquet"])
  rows = {}
  for fmt, done in runs.items():
    seconds = [r["pipeline_s"] for r in done]
    rows[fmt] = {
      "median_s": statistics.median(seconds),
      "min_s": min(seconds),
      "max_s": max(seconds),
      "runs_s": seconds,
      "examples_per_s": workload.num_examples / statistics.median(seconds),
      "peak_pss_mb": statistics.median(r["peak_pss_mb"] for r in done),
    }
  mach["loadavg_at_end"] = list(os.getloadavg())
  result = {
    "clients": workload.num_clients,
    "examples": workload.num_examples,
    "repeat": args.repeat,
    "rows": rows,
    "identical_client_files": identical,
    "machine": mach,
    "versions": wl.versions(),
    "command": wl.command_line("bench.bench_inputs", argv),
    "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
  }
  log(
    f"parquet/tfrecord examples/s: "
    f"{rows['parquet']['examples_per_s'] / rows['tfrecord']['examples_per_s']:.2f}x; "
    f"client files identical: {identical}"
  )
  if not args.no_write:
    wl.write_json(RESULT_FILE, result)
    wl.write_readme_section(SECTION, readme_section(result))
  return 0 if identical else 1


if __name__ == "__main__":
  sys.exit(main())
