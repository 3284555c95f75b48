"""How loading and per-round reading scale with the number of clients.

Three measurements:

- `load`: in a fresh process per loader and store (so RSS growth is the
  loader's alone), after importing TensorFlow, TFF and fedbeam: the time until
  `client_ids` is ready and the RSS growth (current and peak, sampled every
  5 ms) of fedbeam's `load_client_data(store)` and of TFF's
  `load_and_parse_sql_client_data(db)`; then the time of
  `create_tf_dataset_for_client` for the first and for the last client id
  (median of 200 calls each, interleaved) and, for reference, the cost of the
  `client_id in client_ids` list scan TFF's ClientData classes do. Stores:
  the 1,000- and 10,000-client EMNIST-like workloads and a 100,000-client
  store of 1-3 tiny examples per client (`label`, `x` float32[4]) that
  `fedbeam prepare` builds here on 2 workers (timed, peak RSS).
- `rounds`: the per-round rows of bench_loading at 10,000 clients (~884k
  examples): same consumers, 50 sampled clients per round, every batch of 20,
  `--rounds` rounds after a warm-up. TFF's unindexed SQLite scans its whole
  table for each client (~2.9 GB here), so its row reads only the first
  `--sql-clients` clients of each round and reports that time scaled to 50
  clients (marked as extrapolated), eager only.
- the curves put these next to bench_loading's 1,000-client numbers
  (bench/results/loading.json) and bench_pipeline's 1x/10x rows.

    .venv/bin/python -m bench.bench_scale > build/bench/logs/bench_scale.log 2>&1
    .venv/bin/python -m bench.bench_scale --quick --no-write > /tmp/scale.log 2>&1  # smoke

Writes bench/results/scale.json and the "Scale" section of bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import sys
import threading
import time

from bench import workload as wl

SECTION = "## Scale"
RESULT_FILE = "scale.json"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--parts", default="load,rounds")
  p.add_argument("--tiny-clients", type=int, default=100_000)
  p.add_argument("--round-clients", type=int, default=10_000)
  p.add_argument(
    "--load-clients",
    default="1000,10000",
    help="EMNIST-like workloads whose load time is measured (plus the tiny store)",
  )
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--clients-per-round", type=int, default=50)
  p.add_argument(
    "--sql-clients", type=int, default=5, help="clients per round read from the unindexed SQLite"
  )
  p.add_argument("--batch-size", type=int, default=20)
  p.add_argument("--calls", type=int, default=200, help="create_tf_dataset_for_client calls")
  p.add_argument("--workdir", default=wl.DEFAULT_WORKDIR)
  p.add_argument(
    "--quick",
    action="store_true",
    help="smoke run: 5,000 tiny clients, 1,000-client rounds, 2 rounds",
  )
  p.add_argument("--no-write", action="store_true")
  p.add_argument("--worker", choices=("fedbeam", "tff_sql"), help=argparse.SUPPRESS)
  p.add_argument("--path", help=argparse.SUPPRESS)
  p.add_argument("--result", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.tiny_clients, args.round_clients, args.rounds = 5000, 1000, 2
    args.load_clients, args.calls, args.clients_per_round = "1000", 50, 10
  return args


def log(msg: str) -> None:
  print(msg, flush=True)


# --- load worker (fresh process) --------------------------------------------------------


def load_worker(args) -> int:
  """Loads one store or database; writes load time, RSS growth and id-lookup costs."""
  import psutil  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from fedbeam.runtime.client_data import load_client_data  # pylint: disable=g-import-not-at-top
  from fedbeam.runtime.tff_worker import stop_tff_workers  # pylint: disable=g-import-not-at-top

  me = psutil.Process()
  # Warm up what any loader pays once per process (TF eager context, op registry).
  tf.data.Dataset.from_tensors(tf.constant("x")).map(tf.strings.length)
  gc.collect()
  rss0 = me.memory_info().rss
  peak = [rss0]
  stop = threading.Event()

  def poll():
    while not stop.is_set():
      peak[0] = max(peak[0], me.memory_info().rss)
      stop.wait(0.005)

  thread = threading.Thread(target=poll, daemon=True)
  thread.start()
  start = time.perf_counter()
  if args.worker == "fedbeam":
    cd = load_client_data(args.path)
  else:
    cd = tff.simulation.datasets.load_and_parse_sql_client_data(
      args.path, _tiny_or_emnist_spec(args.path)
    )
  ids = cd.client_ids
  load_s = time.perf_counter() - start
  stop.set()
  thread.join()
  gc.collect()
  rss1 = me.memory_info().rss
  first, last = ids[0], ids[-1]
  times = {"first": [], "last": []}
  for _ in range(args.calls):
    for which, cid in (("first", first), ("last", last)):
      t = time.perf_counter()
      cd.create_tf_dataset_for_client(cid)
      times[which].append(time.perf_counter() - t)
  scan = {"first": [], "last": []}
  id_list = list(ids)
  for _ in range(args.calls):
    for which, cid in (("first", first), ("last", last)):
      t = time.perf_counter()
      _ = cid in id_list
      scan[which].append(time.perf_counter() - t)
  # One element of each, to check the datasets are real.
  for cid in (first, last):
    next(iter(cd.create_tf_dataset_for_client(cid)))
  stop_tff_workers()
  out = {
    "clients": len(ids),
    "load_s": load_s,
    "rss_growth_mb": (rss1 - rss0) / 2**20,
    "peak_rss_growth_mb": (peak[0] - rss0) / 2**20,
    "rss_before_mb": rss0 / 2**20,
    "create_first_ms": 1000 * statistics.median(times["first"]),
    "create_last_ms": 1000 * statistics.median(times["last"]),
    "list_scan_first_ms": 1000 * statistics.median(scan["first"]),
    "list_scan_last_ms": 1000 * statistics.median(scan["last"]),
  }
  with open(args.result, "w", encoding="utf-8") as f:
    json.dump(out, f)
  return 0


def _tiny_or_emnist_spec(path: str):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if "/tiny-" in path:
    return collections.OrderedDict(
      label=tf.TensorSpec([], tf.int32), x=tf.TensorSpec([4], tf.float32)
    )
  return wl.tff_element_spec()


def measure_load(kind: str, path: str, name: str, args) -> dict:
  result = os.path.join(args.workdir, "tmp", f"load-{kind}-{name}.json")
  os.makedirs(os.path.dirname(result), exist_ok=True)
  cmd = [
    wl.PYTHON,
    "-m",
    "bench.bench_scale",
    "--worker",
    kind,
    "--path",
    path,
    "--result",
    result,
    "--calls",
    str(args.calls),
  ]
  run = wl.run_measured(cmd, os.path.join(args.workdir, "logs", f"scale-load-{kind}-{name}.log"))
  if run["returncode"] != 0:
    raise RuntimeError(f"load worker failed; see {run['log']}")
  with open(result, encoding="utf-8") as f:
    out = json.load(f)
  out["store"] = name
  log(
    f"load {kind} {name}: {out['clients']} clients, ids in {out['load_s']:.3f} s, RSS +"
    f"{out['rss_growth_mb']:.0f} MB (peak +{out['peak_rss_growth_mb']:.0f}), create first "
    f"{out['create_first_ms']:.3f} ms / last {out['create_last_ms']:.3f} ms"
  )
  return out


def load_part(args) -> dict:
  tiny = wl.TinyWorkload(num_clients=args.tiny_clients)
  pattern = wl.ensure_tiny_input(tiny, args.workdir, log)
  store = os.path.join(args.workdir, tiny.name, "store")
  cmd = wl.prepare_command(pattern, store, wl.tiny_spec_file(args.workdir))
  logf = os.path.join(args.workdir, "logs", f"scale-prepare-{tiny.name}.log")
  load = os.getloadavg()
  run = wl.run_measured(cmd, logf)
  if run["returncode"] != 0:
    raise RuntimeError(f"fedbeam prepare of the tiny store failed; see {run['log']}")
  with open(logf, encoding="utf-8") as f:
    import re  # pylint: disable=g-import-not-at-top

    found = re.findall(r"store written: .* in ([0-9.]+) s \(", f.read())
  prepare = {
    "clients": tiny.num_clients,
    "examples": tiny.num_examples,
    "wall_s": run["wall_s"],
    "pipeline_s": float(found[-1]),
    "peak_rss_mb": run["peak_rss_mb"],
    "peak_pss_mb": run["peak_pss_mb"],
    "loadavg_before": list(load),
    "command": " ".join(
      os.path.relpath(c, wl.ROOT) if c.startswith(wl.ROOT + "/") else c for c in cmd
    ),
  }
  log(
    f"prepare {tiny.name}: {prepare['pipeline_s']:.1f} s pipeline, wall {run['wall_s']:.1f} s, "
    f"peak PSS {run['peak_pss_mb']:,.0f} MB"
  )
  rows = []
  errors = []
  for n in [int(x) for x in args.load_clients.split(",") if x]:
    w = wl.Workload(num_clients=n)
    try:
      fedbeam_store = wl.ensure_fedbeam_store(
        w, "plain", workdir=args.workdir, log=log, in_process_fallback=True
      )
    except RuntimeError as e:
      errors.append(f"{w.name}: {e}")
      log(f"load {w.name}: no store ({e})")
    else:
      rows.append(dict(measure_load("fedbeam", fedbeam_store, w.name, args), loader="fedbeam"))
    rows.append(
      dict(
        measure_load("tff_sql", wl.ensure_tff_sqlite(w, args.workdir, log), w.name, args),
        loader="tff_sql",
      )
    )
  rows.append(dict(measure_load("fedbeam", store, tiny.name, args), loader="fedbeam"))
  rows.append(
    dict(
      measure_load("tff_sql", wl.ensure_tiny_sqlite(tiny, args.workdir, log), tiny.name, args),
      loader="tff_sql",
    )
  )
  return {"prepare_tiny": prepare, "rows": rows, "errors": errors}


# --- rounds at 10,000 clients -------------------------------------------------------------


def store_build(store: str) -> dict:
  """How the store was prepared (its stamp: command, wall time, peak PSS, 2-worker failure)."""
  with open(store + ".stamp.json", encoding="utf-8") as f:
    stamp = json.load(f)
  stamp["command"] = " ".join(
    os.path.relpath(c, wl.ROOT) if c.startswith(wl.ROOT + "/") else c for c in stamp["command"]
  )
  return stamp


def rounds_part(args) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from bench import bench_loading as bl  # pylint: disable=g-import-not-at-top
  from fedbeam.format.layout import join  # pylint: disable=g-import-not-at-top
  from fedbeam.format.manifest import read_manifest  # pylint: disable=g-import-not-at-top
  from fedbeam.format.metadata import read_metadata  # pylint: disable=g-import-not-at-top
  from fedbeam.runtime.client_data import load_client_data  # pylint: disable=g-import-not-at-top

  workload = wl.Workload(num_clients=args.round_clients)
  spec = wl.tff_element_spec()
  store = wl.ensure_fedbeam_store(
    workload, "plain", workdir=args.workdir, log=log, in_process_fallback=True
  )
  fedbeam_cd = load_client_data(store)
  metadata = read_metadata(store)
  store_paths = {
    row["client_id"]: join(store, row["path"]) for row in read_manifest(store, metadata)
  }
  sql = tff.simulation.datasets.load_and_parse_sql_client_data(
    wl.ensure_tff_sqlite(workload, args.workdir, log), spec
  )
  indexed = tff.simulation.datasets.load_and_parse_sql_client_data(
    wl.ensure_indexed_sqlite(workload, args.workdir, log), spec
  )
  per_user = tff.simulation.datasets.FilePerUserClientData(
    wl.ensure_per_user_files(workload, args.workdir, log),
    lambda p: tf.data.TFRecordDataset(p).map(bl._parse_one, num_parallel_calls=tf.data.AUTOTUNE),
  )  # pylint: disable=protected-access
  b = args.batch_size
  sql_eager = bl.eager_consumer(sql, b)
  k = args.sql_clients

  class Partial:
    """Consumes only the first k clients of each round (the rest return the expected value)."""

    def __init__(self):
      self.seen = 0

    def __call__(self, cid):
      self.seen += 1
      if (self.seen - 1) % args.clients_per_round < k:
        return sql_eager(cid)
      return expected(cid)

  contenders = collections.OrderedDict(
    [
      ("fedbeam_eager", bl.eager_consumer(fedbeam_cd, b)),
      ("fedbeam_graph", bl.graph_consumer(fedbeam_cd.serializable_dataset_fn, b)),
      ("fedbeam_tensors", bl.tensors_consumer(fedbeam_cd.client_tensors_fn, b)),
      ("sql_eager", Partial()),
      ("sql_indexed_eager", bl.eager_consumer(indexed, b)),
      ("sql_indexed_graph", bl.graph_consumer(indexed.serializable_dataset_fn, b)),
      ("per_user_eager", bl.eager_consumer(per_user, b)),
      ("per_user_graph", bl.graph_consumer(per_user.serializable_dataset_fn, b)),
      ("limit", bl.limit_consumer(store_paths, b, sliced=False)),
    ]
  )
  checks = {}

  def expected(cid):
    if cid not in checks:
      checks[cid] = workload.client_checksum(cid)
    return checks[cid]

  samples = wl.sample_rounds(fedbeam_cd.client_ids, args.rounds, args.clients_per_round)
  load = os.getloadavg()
  times = bl.run_rounds(contenders, samples, expected, f"rounds@{workload.num_clients}")
  # The SQLite row read k of the clients: scale its time to the whole round.
  times["sql_eager"] = [t * args.clients_per_round / k for t in times["sql_eager"]]
  per_round = bl.summarize(times, args.clients_per_round)
  per_round["sql_eager"]["extrapolated_from_clients"] = k
  return {
    "clients": workload.num_clients,
    "examples": workload.num_examples,
    "workload": workload.size_summary(),
    "per_round": per_round,
    "rounds_s": times,
    "store_build": store_build(store),
    "loadavg": {"start": list(load), "end": list(os.getloadavg())},
    "sql_table_bytes": os.path.getsize(wl.tff_sqlite_path(workload, args.workdir)),
  }


# --- README -------------------------------------------------------------------------


def readme_section(result: dict) -> str:
  lines = [SECTION, ""]
  if "load" in result:
    p = result["load"]["prepare_tiny"]
    lines += [
      f"**Loading.** Each row loads one store or database in a fresh process (after importing "
      "TensorFlow, TFF and fedbeam) and measures the time until `client_ids` is ready and the "
      "RSS growth (after the load; peak sampled every 5 ms), then `create_tf_dataset_for_client` "
      "for the first and the last client id (median of "
      f"{result['config']['calls']} calls each) and the `id in client_ids` list scan TFF's "
      "ClientData classes do before creating a dataset. The "
      f"{p['clients']:,}-client store holds 1–3 tiny examples per client "
      f"({p['examples']:,} examples); `fedbeam prepare` built it on 2 workers in "
      f"{p['pipeline_s']:.1f} s (wall {p['wall_s']:.1f} s, peak PSS {p['peak_pss_mb']:,.0f} MB). "
      "![load scaling](results/load_scaling.png)",
      "",
      "| store | clients | loader | `client_ids` ready s | RSS growth MB | peak growth MB | "
      "create first id ms | create last id ms | list scan first / last ms |",
      "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = {
      "fedbeam": "fedbeam `load_client_data`",
      "tff_sql": "TFF `load_and_parse_sql_client_data`",
    }
    for r in result["load"]["rows"]:
      lines.append(
        f"| {r['store']} | {r['clients']:,} | {names[r['loader']]} | {r['load_s']:.3f} | "
        f"{r['rss_growth_mb']:.1f} | {r['peak_rss_growth_mb']:.1f} | "
        f"{r['create_first_ms']:.3f} | {r['create_last_ms']:.3f} | "
        f"{r['list_scan_first_ms']:.4f} / {r['list_scan_last_ms']:.3f} |"
      )
    lines.append("")
  if "rounds_error" in result:
    lines += [
      f"**Per-round reading at {result['config']['round_clients']:,} clients**: not "
      f"measured ({result['rounds_error']}).",
      "",
    ]
  if "rounds" in result:
    r = result["rounds"]
    lines += [
      f"**Per-round reading at {r['clients']:,} clients** ({r['examples']:,} examples; TFF's "
      f"database {r['sql_table_bytes'] / 2**30:.1f} GiB): the Client loading rows, "
      f"{result['config']['clients_per_round']} sampled clients per round, "
      f"{result['config']['rounds']} rounds after a warm-up. The unindexed-SQLite row read "
      f"the first {r['per_round']['sql_eager']['extrapolated_from_clients']} clients of each "
      "round; its time is scaled to the whole round (extrapolated). "
      + _store_note(r.get("store_build"))
      + "![round scaling](results/round_scaling.png)",
      "",
      "| reader | median s/round | min–max s/round | ms/client | at 1,000 clients ms/client | "
      "growth |",
      "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    from bench.bench_loading import LABELS  # pylint: disable=g-import-not-at-top

    small = ((wl.read_json("loading.json") or {}).get("loading") or {}).get("per_round", {})
    for name, s in r["per_round"].items():
      who, how = LABELS[name]
      at1k = small.get(name, {}).get("ms_per_client")
      extra = " (extrapolated)" if "extrapolated_from_clients" in s else ""
      at1k_text = "" if at1k is None else f"{at1k:.2f}"
      growth = "" if at1k is None else f"{s['ms_per_client'] / at1k:.2f}x"
      lines.append(
        f"| {who}, {how.split(':')[0]}{extra} | {s['median_s']:.3f} | "
        f"{s['min_s']:.3f}–{s['max_s']:.3f} | {s['ms_per_client']:.2f} | {at1k_text} | "
        f"{growth} |"
      )
    lines.append("")
  lines += [
    "Command (from the repository root):",
    "",
    "```sh",
    result["command"],
    "```",
    "",
    wl.machine_line(result["machine"], result["versions"]),
    f"Raw numbers: `bench/results/{RESULT_FILE}`.",
    "",
  ]
  return "\n".join(lines)


def _store_note(build) -> str:
  if not build:
    return ""
  how = (
    "on the in-process runner" if "direct_num_workers" not in build["command"] else "on 2 workers"
  )
  note = (
    f"The fedbeam store was prepared {how} in {build['wall_s']:.0f} s (peak PSS "
    f"{build['peak_pss_mb']:,.0f} MB)"
  )
  if build.get("two_worker_failure"):
    note += " after the 2-worker run failed: " + build["two_worker_failure"].split(", log ")[
      0
    ].replace("2 workers: ", "")
  return note + ". "


def main(argv=None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  args = parse_args(argv)
  if args.worker:
    return load_worker(args)
  from fedbeam.runtime.tff_worker import stop_tff_workers  # pylint: disable=g-import-not-at-top

  mach = wl.machine()
  parts = set(args.parts.split(","))
  result = {
    "benchmark": "scaling of loading and per-round reading",
    "command": wl.command_line("bench.bench_scale", argv),
    "config": {
      "tiny_clients": args.tiny_clients,
      "round_clients": args.round_clients,
      "rounds": args.rounds,
      "clients_per_round": args.clients_per_round,
      "sql_clients": args.sql_clients,
      "batch_size": args.batch_size,
      "calls": args.calls,
      "quick": args.quick,
    },
    "machine": mach,
  }
  try:
    if "load" in parts:
      result["load"] = load_part(args)
    if "rounds" in parts:
      try:
        result["rounds"] = rounds_part(args)
      except RuntimeError as e:
        log(f"rounds part failed: {e}")
        result["rounds_error"] = str(e)
  finally:
    stop_tff_workers()
  mach["loadavg_at_end"] = list(os.getloadavg())
  result["versions"] = wl.versions()
  if not args.no_write:
    wl.write_json(RESULT_FILE, result)
    wl.write_readme_section(SECTION, readme_section(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
