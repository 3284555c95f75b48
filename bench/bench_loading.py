"""Time per round of consuming sampled clients: fedbeam's consumption paths vs TFF's readers.

One process, the same workload (bench/workload.py: 1,000 EMNIST-like clients,
lognormal sizes), the same sampled clients in every row of a round (50 per
round, `np.random.RandomState(1000 + round)`), every batch of 20 consumed the
same way: the batch's pixels summed and its examples counted (the per-client
count and sum are checked against the workload after timing). Round 0 warms
up (traces the functions) and is not counted; rows take turns inside each
round, starting one row later every round. A round's time includes creating
every sampled client's dataset, as a simulation does.

Consumption modes:

- eager: `for batch in client_data.create_tf_dataset_for_client(id).batch(20)`
  in Python (how TFF users consume a ClientData);
- graph: one `tf.function(id)` per client:
  `serializable_dataset_fn(id).batch(20).reduce(...)`;
- tensors (fedbeam only): `client_tensors_fn(id)` (the whole client, one
  vectorized parse) then a `tf.range` loop in the same `tf.function` slicing
  batches of 20 from it;
- limit: `tf.function(path)`: `TFRecordDataset(path).batch(2**31 - 1)` ->
  one element -> `parse_example`, the pixels summed once (no per-batch
  iteration), over the fedbeam store's own client files with the path given
  (1 MiB read buffer, tf.data's static rewrites off: the fastest form found);
  `limit + slicing` adds the tensors row's `tf.range` batch loop.

Rows: fedbeam (`load_client_data`) eager / graph / tensors; TFF SQLite as
`save_to_sql_client_data` writes it (`load_and_parse_sql_client_data`), eager
and graph; the same database with `CREATE INDEX ... ON examples(client_id)`;
TFF `FilePerUserClientData` over one TFRecord file per client (FLAIR's layout,
`TFRecordDataset(path).map(parse_single_example, AUTOTUNE)`); the limit.
After the rounds, `create_tf_dataset_for_client(id)` alone (no iteration) is
timed for each reader over the clients of the timed rounds.

Second part (`expansion`): 3x pseudo-client expansion of the same 1,000 raw
clients with `fedbeam.transforms:random_affine`: fedbeam's precomputed
expanded store (the `fedbeam prepare` output of bench_pipeline's full row,
train split) vs TFF's `TransformingClientData` applying the same warps on the
fly over the indexed SQLite and over FilePerUserClientData (eager only: the
warp's parameters come from a Python hash of the id, which a traced
`serializable_dataset_fn` cannot compute). bench_expansion.py has the same
comparison over TFF's unindexed SQLite.

Third part (`streaming`): every client once: fedbeam's
`create_tf_dataset_from_all_clients(seed=0)` (eager and graph) and
`datasets(seed=0)` (eager), `create_tf_dataset_from_all_clients` of TFF's
FilePerUserClientData, and
dataset_grouper 0.3.0's `build_group_stream()` over its own pipeline's output
of the same data (eager and graph), run in its virtualenv by
bench/grouper_worker.py. A short warm-up, then `--stream-passes` full passes.

    .venv/bin/python -m bench.bench_loading > build/bench/logs/bench_loading.log 2>&1
    .venv/bin/python -m bench.bench_loading --quick --no-write > /tmp/loading.log 2>&1  # smoke

Part `figures` (not in the default `--parts`): build time, memory and lookup
cost of the traced reads' id -> manifest figures lookup at 10^5 and 10^6
clients, against a `tf.lookup.StaticHashTable` of every id. `--rows` limits
the loading part to some rows (before/after comparisons of fedbeam's paths).

`--parts` runs some of the parts; the others keep their last numbers in
bench/results/loading.json (each part records when it was measured). Writes
bench/results/loading.json and the "Client loading", "Expansion: precomputed
vs on the fly", "Streaming every client" and "Training input share" sections
of bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import numpy as np

from bench import workload as wl

SECTIONS = (
  "## Client loading",
  "## Expansion: precomputed vs on the fly",
  "## Streaming every client",
  "## Training input share",
)
RESULT_FILE = "loading.json"
WHOLE = (1 << 31) - 1


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--clients", type=int, default=1000)
  p.add_argument("--mean-examples", type=float, default=90.0)
  p.add_argument("--rounds", type=int, default=8, help="timed rounds (after one warm-up round)")
  p.add_argument("--clients-per-round", type=int, default=50)
  p.add_argument("--batch-size", type=int, default=20)
  p.add_argument("--expansion", type=int, default=3)
  p.add_argument("--expansion-rounds", type=int, default=8)
  p.add_argument("--stream-passes", type=int, default=2)
  p.add_argument(
    "--train-rounds",
    type=int,
    default=2,
    help="timed training rounds of the input-share part (after one warm-up)",
  )
  p.add_argument("--parts", default="loading,expansion,streaming,training")
  p.add_argument(
    "--rows",
    default="",
    help="loading part: only these rows (comma-separated names, e.g. "
    "fedbeam_eager,fedbeam_graph,fedbeam_tensors,limit); peers whose rows "
    "are all left out are not built",
  )
  p.add_argument("--workdir", default=wl.DEFAULT_WORKDIR)
  p.add_argument(
    "--quick",
    action="store_true",
    help="smoke run: 120 clients, 2 rounds of 10 clients, 1 streaming pass",
  )
  p.add_argument("--no-write", action="store_true", help="do not write results and README")
  args = p.parse_args(argv)
  if args.quick:
    args.clients, args.rounds, args.clients_per_round = 120, 2, 10
    args.expansion_rounds, args.stream_passes, args.train_rounds = 2, 1, 1
  return args


def log(msg: str) -> None:
  print(msg, flush=True)


# --- consumers: fn(client_id) -> (examples, pixel sum) ---------------------------------


def eager_consumer(client_data, batch_size: int):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def consume(cid):
    total, n = tf.constant(0.0), 0
    for batch in client_data.create_tf_dataset_for_client(cid).batch(batch_size):
      total += tf.reduce_sum(batch["pixels"])
      n += int(batch["label"].shape[0])
    return n, float(total)

  return consume


def _reduce_batches(dataset):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return dataset.reduce(
    (tf.constant(0, tf.int64), tf.constant(0.0)),
    lambda acc, b: (
      acc[0] + tf.cast(tf.shape(b["label"])[0], tf.int64),
      acc[1] + tf.reduce_sum(b["pixels"]),
    ),
  )


def graph_consumer(dataset_fn, batch_size: int):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
  def consume_fn(cid):
    return _reduce_batches(dataset_fn(cid).batch(batch_size))

  def consume(cid):
    n, total = consume_fn(tf.constant(cid))
    return int(n), float(total)

  return consume


def _slice_batches(tensors, batch_size: int):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  n = tf.shape(tensors["label"])[0]
  total = tf.constant(0.0)
  for i in tf.range(0, n, batch_size):
    total += tf.reduce_sum(tensors["pixels"][i : i + batch_size])
  return n, total


def tensors_consumer(client_tensors_fn, batch_size: int):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
  def consume_fn(cid):
    return _slice_batches(client_tensors_fn(cid), batch_size)

  def consume(cid):
    n, total = consume_fn(tf.constant(cid))
    return int(n), float(total)

  return consume


def _parse_batch(serialized):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  parsed = tf.io.parse_example(
    serialized,
    {
      "label": tf.io.FixedLenFeature([], tf.int64),
      "pixels": tf.io.FixedLenFeature([wl.IMAGE, wl.IMAGE], tf.float32),
    },
  )
  return collections.OrderedDict(label=tf.cast(parsed["label"], tf.int32), pixels=parsed["pixels"])


def _parse_one(serialized):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  parsed = tf.io.parse_single_example(
    serialized,
    {
      "label": tf.io.FixedLenFeature([], tf.int64),
      "pixels": tf.io.FixedLenFeature([wl.IMAGE, wl.IMAGE], tf.float32),
    },
  )
  return collections.OrderedDict(label=tf.cast(parsed["label"], tf.int32), pixels=parsed["pixels"])


def limit_consumer(paths: dict, batch_size: int, sliced: bool):
  """The whole client file in one read and one parse_example, path given (no id lookup).

  The fastest form found: a 1 MiB read buffer, tf.data's static graph
  rewrites off (they cost more than a one-element read), and the parse on
  the single element outside the dataset.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = False
  options.autotune.enabled = False

  @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
  def consume_fn(path):
    records = (
      tf.data.TFRecordDataset(path, buffer_size=1 << 20)
      .batch(WHOLE)
      .with_options(options)
      .get_single_element()
    )
    whole = _parse_batch(records)
    if sliced:
      return _slice_batches(whole, batch_size)
    return tf.shape(whole["label"])[0], tf.reduce_sum(whole["pixels"])

  def consume(cid):
    n, total = consume_fn(tf.constant(paths[cid]))
    return int(n), float(total)

  return consume


def creation_ms(client_data, client_ids, passes: int = 3) -> dict:
  """ms per `create_tf_dataset_for_client(id)` call alone (no iteration): median of passes."""
  for cid in client_ids[:5]:
    client_data.create_tf_dataset_for_client(cid)
  per_pass = []
  for _ in range(passes):
    start = time.perf_counter()
    for cid in client_ids:
      client_data.create_tf_dataset_for_client(cid)
    per_pass.append(1000 * (time.perf_counter() - start) / len(client_ids))
  return {
    "median_ms": statistics.median(per_pass),
    "min_ms": min(per_pass),
    "max_ms": max(per_pass),
    "calls_per_pass": len(client_ids),
  }


# --- rounds ----------------------------------------------------------------------------


def run_rounds(contenders: dict, samples: list, expected, label: str) -> dict:
  """Seconds per round of each contender (round 0 = warm-up, not kept) and checks.

  `expected(cid) -> (n, pixel_sum)`; a row whose counts differ fails the run,
  sums must agree to 1e-3 relative.
  """
  names = list(contenders)
  times = {n: [] for n in names}
  mismatches = collections.Counter()
  for r, sample in enumerate(samples):
    order = names[r % len(names) :] + names[: r % len(names)]
    line = []
    for name in order:
      fn = contenders[name]
      start = time.perf_counter()
      results = [fn(cid) for cid in sample]
      seconds = time.perf_counter() - start
      if r > 0:
        times[name].append(seconds)
      line.append(f"{name} {seconds:.3f}")
      for cid, (n, total) in zip(sample, results):
        want_n, want_sum = expected(cid)
        if n != want_n:
          raise AssertionError(f"{label} {name}: client {cid} has {n} examples, want {want_n}")
        if abs(total - want_sum) > 1e-3 * max(1.0, abs(want_sum)):
          mismatches[name] += 1
    log(f"{label} round {r}{' (warm-up)' if r == 0 else ''}: " + ", ".join(line))
  for name, count in mismatches.items():
    raise AssertionError(f"{label} {name}: {count} clients with a different pixel sum")
  return times


def summarize(times: dict, per_round: int) -> dict:
  out = {}
  for name, values in times.items():
    s = wl.stats(values)
    s["ms_per_client"] = 1000 * s["median_s"] / per_round
    out[name] = s
  return out


# --- part 1: loading ------------------------------------------------------------------


def loading_part(args, workload) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from fedbeam.format.layout import join  # pylint: disable=g-import-not-at-top
  from fedbeam.format.manifest import read_manifest  # pylint: disable=g-import-not-at-top
  from fedbeam.format.metadata import read_metadata  # pylint: disable=g-import-not-at-top
  from fedbeam.runtime.client_data import load_client_data  # pylint: disable=g-import-not-at-top

  spec = wl.tff_element_spec()
  wanted = set(filter(None, args.rows.split(",")))
  needed = lambda peer: not wanted or any(r.startswith(peer + "_") for r in wanted)  # noqa: E731
  store = wl.ensure_fedbeam_store(workload, "plain", workdir=args.workdir, log=log)
  fedbeam_cd = load_client_data(store)
  metadata = read_metadata(store)
  store_paths = {
    row["client_id"]: join(store, row["path"]) for row in read_manifest(store, metadata)
  }
  peers = {}
  if needed("sql"):
    peers["sql"] = tff.simulation.datasets.load_and_parse_sql_client_data(
      wl.ensure_tff_sqlite(workload, args.workdir, log), spec
    )
  if needed("sql_indexed"):
    peers["sql_indexed"] = tff.simulation.datasets.load_and_parse_sql_client_data(
      wl.ensure_indexed_sqlite(workload, args.workdir, log), spec
    )
  if needed("per_user"):
    peers["per_user"] = tff.simulation.datasets.FilePerUserClientData(
      wl.ensure_per_user_files(workload, args.workdir, log),
      lambda p: tf.data.TFRecordDataset(p).map(_parse_one, num_parallel_calls=tf.data.AUTOTUNE),
    )
  for name, cd in peers.items():
    if sorted(cd.client_ids) != fedbeam_cd.client_ids:
      raise AssertionError(f"{name}: different client ids")
    if cd.element_type_structure != fedbeam_cd.element_type_structure:
      raise AssertionError(f"{name}: element spec {cd.element_type_structure}")

  b = args.batch_size
  contenders = collections.OrderedDict(
    [
      ("fedbeam_eager", eager_consumer(fedbeam_cd, b)),
      ("fedbeam_graph", graph_consumer(fedbeam_cd.serializable_dataset_fn, b)),
      ("fedbeam_tensors", tensors_consumer(fedbeam_cd.client_tensors_fn, b)),
    ]
  )
  for name, cd in peers.items():
    contenders[f"{name}_eager"] = eager_consumer(cd, b)
    contenders[f"{name}_graph"] = graph_consumer(cd.serializable_dataset_fn, b)
  contenders["limit"] = limit_consumer(store_paths, b, sliced=False)
  contenders["limit_sliced"] = limit_consumer(store_paths, b, sliced=True)
  if wanted:
    contenders = collections.OrderedDict((k, v) for k, v in contenders.items() if k in wanted)
  samples = wl.sample_rounds(fedbeam_cd.client_ids, args.rounds, args.clients_per_round)
  checks = {}

  def expected(cid):
    if cid not in checks:
      checks[cid] = workload.client_checksum(cid)
    return checks[cid]

  load_start = os.getloadavg()
  times = run_rounds(contenders, samples, expected, "loading")
  examples = [sum(workload.sizes[c] for c in s) for s in samples[1:]]
  timed_ids = [c for s in samples[1:] for c in s]
  create = collections.OrderedDict(
    (name, creation_ms(cd, timed_ids))
    for name, cd in [("fedbeam", fedbeam_cd)] + list(peers.items())
  )
  log(
    "create_tf_dataset_for_client alone, ms per call: "
    + ", ".join(f"{k} {v['median_ms']:.2f}" for k, v in create.items())
  )
  return {
    "per_round": summarize(times, args.clients_per_round),
    "rounds_s": times,
    "create_ms": create,
    "examples_per_round": {
      "median": statistics.median(examples),
      "min": min(examples),
      "max": max(examples),
    },
    "store": os.path.relpath(store, wl.ROOT),
    "loadavg": {"start": list(load_start), "end": list(os.getloadavg())},
  }


# --- part: the reader's in-graph manifest lookup ------------------------------------------


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def figures_part(args) -> dict:
  """Build time, memory and per-call cost of the traced reads' id -> manifest figures lookup.

  `ManifestFigures` (sorted fingerprints + searchsorted) against a
  `tf.lookup.StaticHashTable` of every id, at 10^5 and 10^6 synthetic ids of
  the workload's form; memory is RSS growth in this process (one sample, so
  read it as an estimate), lookup cost the median of 2,000 calls of a traced
  lookup.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from fedbeam.runtime.client_file_checks import ManifestFigures  # pylint: disable=g-import-not-at-top

  out = {}
  for n in (100_000, 1_000_000):
    ids = [f"f{i:07d}_{i * 7919 % 1000}" for i in range(n)]
    counts = np.arange(n, dtype=np.int64) % 2000
    for kind in ("fingerprints", "hash_table"):
      rss, start = _rss_mb(), time.perf_counter()
      if kind == "fingerprints":
        figures = ManifestFigures(ids, counts, 16 * counts + 100)
        lookup = figures.lookup
      else:
        table = tf.lookup.StaticHashTable(
          tf.lookup.KeyValueTensorInitializer(tf.constant(ids), tf.constant(counts)),
          default_value=-1,
        )
        lookup = table.lookup
      build_s = time.perf_counter() - start
      fn = tf.function(lookup, input_signature=[tf.TensorSpec([], tf.string)])
      start = time.perf_counter()
      fn.get_concrete_function()
      trace_s = time.perf_counter() - start
      grown = _rss_mb() - rss
      probe = [tf.constant(ids[(i * 104729) % n]) for i in range(2000)]
      times = []
      for cid in probe:
        t = time.perf_counter()
        fn(cid)
        times.append(time.perf_counter() - t)
      out[f"{kind}_{n}"] = {
        "clients": n,
        "build_s": build_s,
        "trace_s": trace_s,
        "rss_growth_mb": grown,
        "lookup_us": 1e6 * statistics.median(times),
      }
      log(
        f"figures {kind} {n}: build {build_s:.2f} s, trace {trace_s:.2f} s, RSS +{grown:.0f} MB, "
        f"lookup {out[f'{kind}_{n}']['lookup_us']:.1f} us"
      )
      del fn, lookup
  return out


# --- part 2: expansion ------------------------------------------------------------------


def expansion_extra_args(workload, expansion: int) -> list[str]:
  """The `fedbeam prepare` flags of the full pipeline row: 3x expansion + 10% test clients."""
  return [
    "--num-transformed-clients",
    str(expansion * workload.num_clients),
    "--transform",
    "fedbeam.transforms:random_affine",
    "--test-fraction",
    "0.1",
  ]


def expansion_part(args, workload) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from bench.bench_expansion import tff_transforming  # pylint: disable=g-import-not-at-top
  from fedbeam.runtime.client_data import load_client_data  # pylint: disable=g-import-not-at-top
  from fedbeam.transforms import random_affine  # pylint: disable=g-import-not-at-top

  spec = wl.tff_element_spec()
  store = wl.ensure_fedbeam_store(
    workload,
    "expanded-split",
    expansion_extra_args(workload, args.expansion),
    workdir=args.workdir,
    log=log,
  )
  train = load_client_data(store, split="train")
  n = args.expansion * workload.num_clients
  indexed = tff.simulation.datasets.load_and_parse_sql_client_data(
    wl.ensure_indexed_sqlite(workload, args.workdir, log), spec
  )
  per_user = tff.simulation.datasets.FilePerUserClientData(
    wl.ensure_per_user_files(workload, args.workdir, log),
    lambda p: tf.data.TFRecordDataset(p).map(_parse_one, num_parallel_calls=tf.data.AUTOTUNE),
  )
  tff_indexed = tff_transforming(indexed, random_affine, n)
  tff_per_user = tff_transforming(per_user, random_affine, n)
  missing = set(train.client_ids) - set(tff_indexed.client_ids)
  if missing:
    raise AssertionError(f"pseudo-client ids differ, e.g. {sorted(missing)[:3]}")

  b = args.batch_size
  fedbeam_tensors = tensors_consumer(train.client_tensors_fn, b)
  contenders = collections.OrderedDict(
    [
      ("fedbeam_expanded_eager", eager_consumer(train, b)),
      ("fedbeam_expanded_graph", graph_consumer(train.serializable_dataset_fn, b)),
      ("fedbeam_expanded_tensors", fedbeam_tensors),
      ("tff_transforming_sql_indexed_eager", eager_consumer(tff_indexed, b)),
      ("tff_transforming_per_user_eager", eager_consumer(tff_per_user, b)),
    ]
  )
  samples = wl.sample_rounds(
    train.client_ids, args.expansion_rounds, args.clients_per_round, seed=2000
  )
  reference = {}

  def expected(cid):
    if cid not in reference:
      reference[cid] = fedbeam_tensors(cid)
    return reference[cid]

  load_start = os.getloadavg()
  times = run_rounds(contenders, samples, expected, "expansion")
  examples = [sum(train.num_examples(c) for c in s) for s in samples[1:]]
  stamp_path = store + ".stamp.json"
  with open(stamp_path, encoding="utf-8") as f:
    stamp = json.load(f)
  return {
    "per_round": summarize(times, args.clients_per_round),
    "rounds_s": times,
    "raw_clients": workload.num_clients,
    "pseudo_clients": n,
    "train_clients": len(train.client_ids),
    "examples_per_round": {
      "median": statistics.median(examples),
      "min": min(examples),
      "max": max(examples),
    },
    "store": os.path.relpath(store, wl.ROOT),
    "prepare_command": " ".join(
      os.path.relpath(c, wl.ROOT) if c.startswith(wl.ROOT) else c for c in stamp["command"]
    ),
    "prepare_wall_s": stamp["wall_s"],
    "loadavg": {"start": list(load_start), "end": list(os.getloadavg())},
  }


# --- part 3: streaming ------------------------------------------------------------------


def grouper_dataset(workload, workdir: str) -> str:
  """dataset_grouper's output for the workload (bench_pipeline writes it; built here if not)."""
  prefix = os.path.join(wl.workload_dir(workload, workdir), "grouper", "groups")
  if not os.path.exists(prefix + ".done"):
    run = wl.run_measured(
      [
        wl.GROUPER_PYTHON,
        os.path.join(wl.ROOT, "bench", "grouper_worker.py"),
        "write",
        "--input",
        wl.ensure_input(workload, workdir, log),
        "--output",
        prefix,
        "--result",
        prefix + ".write.json",
        *wl.BEAM_LOCAL_ARGS,
      ],
      os.path.join(workdir, "logs", f"grouper-write-{workload.name}.log"),
    )
    if run["returncode"] != 0:
      raise RuntimeError(f"dataset_grouper's pipeline failed; see {run['log']}")
    with open(prefix + ".done", "w", encoding="utf-8") as f:
      json.dump(run, f)
  return prefix + "-*-of-*"


def streaming_part(args, workload) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from fedbeam.runtime.client_data import load_client_data  # pylint: disable=g-import-not-at-top

  store = wl.ensure_fedbeam_store(workload, "plain", workdir=args.workdir, log=log)
  fedbeam_cd = load_client_data(store)
  per_user = tff.simulation.datasets.FilePerUserClientData(
    wl.ensure_per_user_files(workload, args.workdir, log),
    lambda p: tf.data.TFRecordDataset(p).map(_parse_one, num_parallel_calls=tf.data.AUTOTUNE),
  )
  b = args.batch_size
  clients = len(fedbeam_cd.client_ids)
  want_examples = workload.num_examples

  def all_clients_eager(cd):
    def run(limit=None):
      ds = cd.create_tf_dataset_from_all_clients(seed=0).batch(b)
      if limit:
        ds = ds.take(limit)
      total, n = tf.constant(0.0), 0
      for batch in ds:
        total += tf.reduce_sum(batch["pixels"])
        n += int(batch["label"].shape[0])
      return n, float(total)

    return run

  @tf.function
  def reduce_dataset(ds):
    return _reduce_batches(ds)

  def all_clients_graph(cd):
    def run(limit=None):
      ds = cd.create_tf_dataset_from_all_clients(seed=0).batch(b)
      if limit:
        ds = ds.take(limit)
      n, total = reduce_dataset(ds)
      return int(n), float(total)

    return run

  def datasets_eager(cd):
    def run(limit=None):
      total, n = tf.constant(0.0), 0
      for ds in cd.datasets(limit_count=limit, seed=0):
        for batch in ds.batch(b):
          total += tf.reduce_sum(batch["pixels"])
          n += int(batch["label"].shape[0])
      return n, float(total)

    return run

  contenders = collections.OrderedDict(
    [
      ("fedbeam_all_clients_eager", all_clients_eager(fedbeam_cd)),
      ("fedbeam_all_clients_graph", all_clients_graph(fedbeam_cd)),
      ("fedbeam_datasets_eager", datasets_eager(fedbeam_cd)),
      ("per_user_all_clients_eager", all_clients_eager(per_user)),
      ("per_user_all_clients_graph", all_clients_graph(per_user)),
    ]
  )
  want_sum = sum(workload.client_checksum(c)[1] for c in workload.client_ids)
  load_start = os.getloadavg()
  rows = {}
  for name, fn in contenders.items():
    fn(50)  # warm-up: traces, opens the first files
    seconds = []
    for _ in range(args.stream_passes):
      start = time.perf_counter()
      n, total = fn()
      seconds.append(time.perf_counter() - start)
      if n != want_examples or abs(total - want_sum) > 1e-3 * abs(want_sum):
        raise AssertionError(
          f"streaming {name}: {n} examples, sum {total}; want {want_examples}, {want_sum}"
        )
    s = wl.stats(seconds)
    s["ms_per_client"] = 1000 * s["median_s"] / clients
    rows[name] = s
    log(
      f"streaming {name}: {s['ms_per_client']:.2f} ms/client "
      f"({', '.join(f'{x:.2f}' for x in seconds)} s per pass)"
    )

  grouper = {"available": os.path.exists(wl.GROUPER_PYTHON)}
  if grouper["available"]:
    pattern = grouper_dataset(workload, args.workdir)
    result_path = os.path.join(args.workdir, "logs", f"grouper-stream-{workload.name}.json")
    run = wl.run_measured(
      [
        wl.GROUPER_PYTHON,
        os.path.join(wl.ROOT, "bench", "grouper_worker.py"),
        "stream",
        "--pattern",
        pattern,
        "--passes",
        str(args.stream_passes),
        "--batch-size",
        str(b),
        "--result",
        result_path,
      ],
      os.path.join(args.workdir, "logs", f"grouper-stream-{workload.name}.log"),
    )
    if run["returncode"] != 0:
      raise RuntimeError(f"dataset_grouper's stream failed; see {run['log']}")
    with open(result_path, encoding="utf-8") as f:
      out = json.load(f)
    grouper["versions"] = out.pop("versions")
    for mode, r in out.items():
      if (
        r["groups"] != clients
        or r["examples"] != want_examples
        or abs(r["pixel_sum"] - want_sum) > 1e-3 * abs(want_sum)
      ):
        raise AssertionError(
          f"dataset_grouper stream {mode}: {r['groups']} groups, "
          f"{r['examples']} examples, sum {r['pixel_sum']}"
        )
      rows[f"grouper_stream_{mode}"] = {
        "median_s": r["median_s"],
        "min_s": r["min_s"],
        "max_s": r["max_s"],
        "n": len(r["seconds"]),
        "ms_per_client": r["ms_per_group"],
      }
      log(f"streaming grouper_stream_{mode}: {r['ms_per_group']:.2f} ms/client")
  else:
    log("dataset_grouper's virtualenv is missing (bash bench/grouper_env.sh); no grouper rows")
  return {
    "per_pass": rows,
    "clients": clients,
    "examples": want_examples,
    "grouper": grouper,
    "loadavg": {"start": list(load_start), "end": list(os.getloadavg())},
  }


# --- part 4: input share of training rounds ------------------------------------------------


def training_part(args, workload) -> dict:
  """`SimulationLoop` with the `emnist-cnn` model over the store: round time and input share."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from bench import loop_profile  # pylint: disable=g-import-not-at-top
  from fedbeam.runtime import models, simulation  # pylint: disable=g-import-not-at-top
  from fedbeam.runtime.client_data import load_client_data  # pylint: disable=g-import-not-at-top

  store = wl.ensure_fedbeam_store(workload, "plain", workdir=args.workdir, log=log)
  data = load_client_data(store)
  spec = models.get_model("emnist-cnn")
  config = simulation.SimulationConfig(
    clients_per_round=args.clients_per_round,
    client_epochs=1,
    batch_size=args.batch_size,
    seed=0,
    eval_every=0,
  )
  loop = simulation.SimulationLoop(
    spec.model_fn,
    tff.learning.optimizers.build_sgdm(0.02),
    tff.learning.optimizers.build_sgdm(1.0),
    data,
    config,
    preprocess=spec.preprocess,
    devices=["/device:CPU:0"],
  )
  load_start = os.getloadavg()
  rounds, splits = [], []
  for r in range(args.train_rounds + 1):
    split = loop_profile.measure_input_and_compute(loop)
    start = time.perf_counter()
    loop.run_round()
    seconds = time.perf_counter() - start
    log(
      f"training round {r}{' (warm-up)' if r == 0 else ''}: {seconds:.2f} s; measured apart: "
      f"input {split['input_seconds']:.3f} s, compute {split['compute_seconds']:.3f} s, "
      f"producing the batches alone {split['produce_seconds']:.3f} s"
    )
    if r > 0:
      rounds.append(seconds)
      splits.append(split)
  input_s = statistics.median(s["input_seconds"] for s in splits)
  compute_s = statistics.median(s["compute_seconds"] for s in splits)
  produce_s = statistics.median(s["produce_seconds"] for s in splits)
  return {
    "model": "emnist-cnn",
    "device": "/device:CPU:0",
    "median_produce_s": produce_s,
    "config": {
      "clients_per_round": args.clients_per_round,
      "client_epochs": 1,
      "batch_size": args.batch_size,
      "shuffle_buffer": config.shuffle_buffer,
    },
    "round_s": wl.stats(rounds),
    "median_input_s": input_s,
    "median_compute_s": compute_s,
    "input_fraction": input_s / (input_s + compute_s),
    "input_fraction_of_round": input_s / statistics.median(rounds),
    "splits": splits,
    "loadavg": {"start": list(load_start), "end": list(os.getloadavg())},
  }


# --- README ---------------------------------------------------------------------------

LABELS = {
  "fedbeam_eager": (
    "fedbeam `load_client_data`",
    "eager: `create_tf_dataset_for_client(id).batch(20)`",
  ),
  "fedbeam_graph": (
    "fedbeam `load_client_data`",
    "graph: `serializable_dataset_fn(id).batch(20).reduce` in a `tf.function`",
  ),
  "fedbeam_tensors": (
    "fedbeam `load_client_data`",
    "tensors: `client_tensors_fn(id)` + `tf.range` slicing, one `tf.function`",
  ),
  "sql_eager": ("TFF SQLite as `save_to_sql_client_data` writes it", "eager"),
  "sql_graph": ("TFF SQLite as `save_to_sql_client_data` writes it", "graph"),
  "sql_indexed_eager": ("TFF SQLite + index on `client_id`", "eager"),
  "sql_indexed_graph": ("TFF SQLite + index on `client_id`", "graph"),
  "per_user_eager": ("TFF `FilePerUserClientData` (file per client)", "eager"),
  "per_user_graph": ("TFF `FilePerUserClientData` (file per client)", "graph"),
  "limit": ("limit: one read + one `parse_example` per client file", "whole client, no batch loop"),
  "limit_sliced": ("limit + the tensors row's batch loop", "whole client + `tf.range` slicing"),
  "fedbeam_expanded_eager": ("fedbeam precomputed expanded store", "eager"),
  "fedbeam_expanded_graph": ("fedbeam precomputed expanded store", "graph"),
  "fedbeam_expanded_tensors": ("fedbeam precomputed expanded store", "tensors"),
  "tff_transforming_sql_indexed_eager": (
    "TFF `TransformingClientData` on the fly over indexed SQLite",
    "eager",
  ),
  "tff_transforming_per_user_eager": (
    "TFF `TransformingClientData` on the fly over `FilePerUserClientData`",
    "eager",
  ),
  "fedbeam_all_clients_eager": (
    "fedbeam `create_tf_dataset_from_all_clients(seed=0)`",
    "eager, `.batch(20)`",
  ),
  "fedbeam_all_clients_graph": (
    "fedbeam `create_tf_dataset_from_all_clients(seed=0)`",
    "graph, `.batch(20).reduce`",
  ),
  "fedbeam_datasets_eager": ("fedbeam `datasets(seed=0)`", "eager, each client `.batch(20)`"),
  "per_user_all_clients_eager": (
    "TFF `FilePerUserClientData.create_tf_dataset_from_all_clients`",
    "eager",
  ),
  "per_user_all_clients_graph": (
    "TFF `FilePerUserClientData.create_tf_dataset_from_all_clients`",
    "graph",
  ),
  "per_user_datasets_eager": ("TFF `FilePerUserClientData.datasets`", "eager"),
  "grouper_stream_eager": (
    "dataset_grouper 0.3.0 `build_group_stream()`",
    "eager, each group `.batch(20)`",
  ),
  "grouper_stream_graph": (
    "dataset_grouper 0.3.0 `build_group_stream()`",
    "graph, nested `reduce`",
  ),
}


def _fmt_ratio(x: float) -> str:
  return f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def loading_section(result: dict) -> str:
  part, cfg = result["loading"], result["config"]
  rows = part["per_round"]
  ref = rows["fedbeam_tensors"]["median_s"]
  limit = rows["limit"]["median_s"]
  lines = [
    SECTIONS[0],
    "",
    f"Time per round to consume {cfg['clients_per_round']} sampled clients (every batch of "
    f"{cfg['batch_size']}: pixels summed, examples counted) out of {cfg['workload']['clients']} "
    f"EMNIST-like clients ({cfg['workload']['examples']:,} examples, lognormal sizes: median "
    f"{cfg['workload']['median']:g}, mean {cfg['workload']['mean']:.1f}, "
    f"{cfg['workload']['clients_with_1']} clients with 1 example, "
    f"{cfg['workload']['clients_over_1000']} over 1,000, max {cfg['workload']['max']}); "
    f"{part['examples_per_round']['median']:,.0f} examples per round (median). Same sampled "
    f"clients in every row of a round; {cfg['rounds']} rounds after one warm-up round; rows "
    "take turns inside each round. Medians over rounds; ratios are row median / "
    "fedbeam tensors median. ![per-round time](results/per_round.png)",
    "",
    "| reader | consumption | median s/round | min–max s/round | ms/client | vs fedbeam tensors | vs limit |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
  ]
  for name, s in rows.items():
    who, how = LABELS[name]
    lines.append(
      f"| {who} | {how} | {s['median_s']:.3f} | {s['min_s']:.3f}–{s['max_s']:.3f} | "
      f"{s['ms_per_client']:.2f} | {_fmt_ratio(s['median_s'] / ref)} | "
      f"{_fmt_ratio(s['median_s'] / limit)} |"
    )
  lines += [
    "",
    "Modes: *eager* iterates `create_tf_dataset_for_client(id).batch(20)` in Python; *graph* "
    "runs one `tf.function(id)` per client reducing `serializable_dataset_fn(id).batch(20)`; "
    "*tensors* is `client_tensors_fn(id)` followed by a `tf.range` loop slicing batches of 20 "
    "in the same `tf.function`. The limit reads each client's file of the same store with one "
    "`TFRecordDataset(path, buffer_size=1 MiB).batch(2**31-1)` → single element → "
    "`parse_example`, tf.data's static rewrites off, the path given (no id lookup, no batch "
    "loop). SQLite rows: TFF's `SqlClientData` runs `SELECT ... WHERE "
    "client_id = '...'`, which without an index scans the whole `examples` table for each "
    "client. FilePerUserClientData's `serializable_dataset_fn` builds a lookup table of every "
    "id on each call.",
    "",
  ]
  create = part.get("create_ms")
  if create:
    names = {
      "fedbeam": "fedbeam",
      "sql": "TFF SQLite",
      "sql_indexed": "TFF SQLite + index",
      "per_user": "FilePerUserClientData",
    }
    lines += [
      "`create_tf_dataset_for_client(id)` alone (building the dataset, no iteration), ms per "
      f"call, median of 3 passes over the {create['fedbeam']['calls_per_pass']} clients of the "
      "timed rounds: "
      + ", ".join(
        f"{names.get(k, k)} {v['median_ms']:.2f} ({v['min_ms']:.2f}–{v['max_ms']:.2f})"
        for k, v in create.items()
      )
      + ".",
      "",
    ]
  return "\n".join(lines)


def expansion_section(result: dict) -> str:
  part, cfg = result["expansion"], result["config"]
  rows = part["per_round"]
  ref = rows["fedbeam_expanded_tensors"]["median_s"]
  lines = [
    SECTIONS[1],
    "",
    f"{cfg['expansion']}x pseudo-client expansion of the {part['raw_clients']} raw clients above "
    f"with `fedbeam.transforms:random_affine` ({part['pseudo_clients']} pseudo-clients; "
    f"{part['train_clients']} in the train split sampled from): time per round to consume "
    f"{cfg['clients_per_round']} sampled pseudo-clients (every batch of {cfg['batch_size']}), "
    f"{part['examples_per_round']['median']:,.0f} examples per round (median), "
    f"{cfg['expansion_rounds']} rounds after one warm-up round. fedbeam reads the store that "
    "`fedbeam prepare` expanded once (as in the full pipeline row of the Pipeline section; "
    f"{part['prepare_wall_s']:.0f} s wall for this store); TFF's `TransformingClientData` "
    "applies the same warps to "
    "each example on the fly with the same pseudo-client ids (per-client sums checked equal).",
    "",
    "| reader | consumption | median s/round | min–max s/round | ms/client | vs fedbeam tensors |",
    "| --- | --- | ---: | ---: | ---: | ---: |",
  ]
  for name, s in rows.items():
    who, how = LABELS[name]
    lines.append(
      f"| {who} | {how} | {s['median_s']:.3f} | {s['min_s']:.3f}–{s['max_s']:.3f} | "
      f"{s['ms_per_client']:.2f} | {_fmt_ratio(s['median_s'] / ref)} |"
    )
  lines += [
    "",
    "TFF rows are eager only: the warp of a pseudo-client is drawn from a Python hash of its "
    "id, which `TransformingClientData`'s `serializable_dataset_fn` cannot compute when traced. "
    "TFF is given its fastest bases (the indexed database and per-client files); the "
    '"Pseudo-client expansion" section measures it over the unindexed database.',
    "",
  ]
  return "\n".join(lines)


def streaming_section(result: dict) -> str:
  part = result["streaming"]
  rows = part["per_pass"]
  g = rows.get("grouper_stream_eager")
  lines = [
    SECTIONS[2],
    "",
    f"Every client of the {part['clients']}-client workload once ({part['examples']:,} "
    "examples), every batch of 20 consumed (pixels summed); time per client = pass time / "
    f"clients, median of {result['config']['stream_passes']} passes after a short warm-up. "
    "dataset_grouper's rows read the output of its own pipeline of the same data (one "
    "`SequenceExample` per group) in its virtualenv (TensorFlow "
    f"{part['grouper'].get('versions', {}).get('tensorflow', '?')}).",
    "",
    "| stream | consumption | ms/client | median s/pass | min–max s/pass | grouper eager / row |",
    "| --- | --- | ---: | ---: | ---: | ---: |",
  ]
  for name, s in rows.items():
    who, how = LABELS[name]
    vs = _fmt_ratio(g["ms_per_client"] / s["ms_per_client"]) if g else "n/a"
    lines.append(
      f"| {who} | {how} | {s['ms_per_client']:.2f} | {s['median_s']:.2f} | "
      f"{s['min_s']:.2f}–{s['max_s']:.2f} | {vs} |"
    )
  lines.append("")
  return "\n".join(lines)


def training_section(result: dict) -> str:
  t = result["training"]
  if "error" in t:
    return "\n".join([SECTIONS[3], "", f"Not measured: {t['error']}.", ""])
  c = t["config"]
  return "\n".join(
    [
      SECTIONS[3],
      "",
      f"`fedbeam.runtime.simulation.SimulationLoop` with the `emnist-cnn` model over the "
      f"1,000-client store on the CPU: {c['clients_per_round']} clients per round, "
      f"{c['client_epochs']} epoch, batch {c['batch_size']}, shuffle buffer "
      f"{c['shuffle_buffer']}, FedAvg (client SGD 0.02, server SGD 1.0). Round time: median "
      f"{t['round_s']['median_s']:.2f} s (min–max {t['round_s']['min_s']:.2f}–"
      f"{t['round_s']['max_s']:.2f}) over {t['round_s']['n']} rounds after a warm-up round. "
      "`bench.loop_profile.measure_input_and_compute()` on the same clients: compute (each update "
      f"on its batches already in memory) {t['median_compute_s']:.3f} s; input (how much longer "
      "the same updates take on their datasets as the round builds them: reading, "
      f"preprocessing, shuffling, batching) {t['median_input_s']:.3f} s, that is "
      f"**{100 * t['input_fraction']:.1f}%** of the two "
      f"({100 * t['input_fraction_of_round']:.1f}% of the measured round time)."
      + (
        f" Producing every batch alone in a `tf.function` takes "
        f"{t['median_produce_s']:.3f} s; that includes setting up an in-graph iterator per "
        "client, which the update pays in both timings above."
        if "median_produce_s" in t
        else ""
      ),
      "",
    ]
  )


def write_readme(result: dict) -> None:
  for key, title, render in (
    ("loading", SECTIONS[0], loading_section),
    ("expansion", SECTIONS[1], expansion_section),
    ("streaming", SECTIONS[2], streaming_section),
    ("training", SECTIONS[3], training_section),
  ):
    if key in result:
      part = result[key]
      cmd = [
        "",
        "Command (from the repository root):",
        "",
        "```sh",
        part.get("command", result["command"]),
        "```",
        "",
        wl.machine_line(
          part.get("machine", result["machine"]), part.get("versions", result["versions"])
        ),
        f"Raw numbers: `bench/results/{RESULT_FILE}`.",
      ]
      when = part.get("measured_at")
      wl.write_readme_section(
        title, render(result) + "\n".join(cmd + ([f"Measured {when}."] if when else [])) + "\n"
      )


def main(argv=None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  args = parse_args(argv)
  mach = wl.machine()
  workload = wl.Workload(args.clients, args.mean_examples)
  from fedbeam.runtime.tff_worker import stop_tff_workers  # pylint: disable=g-import-not-at-top

  parts = set(args.parts.split(","))
  result = {
    "benchmark": "per-round consumption of sampled clients; expansion; streaming",
    "command": wl.command_line("bench.bench_loading", argv),
    "config": {
      "workload": workload.size_summary(),
      "workload_name": workload.name,
      "rounds": args.rounds,
      "warmup_rounds": 1,
      "clients_per_round": args.clients_per_round,
      "batch_size": args.batch_size,
      "expansion": args.expansion,
      "expansion_rounds": args.expansion_rounds,
      "stream_passes": args.stream_passes,
      "quick": args.quick,
    },
    "machine": mach,
  }
  try:
    wl.ensure_input(workload, args.workdir, log)
    if "loading" in parts:
      result["loading"] = loading_part(args, workload)
    if "figures" in parts:
      result["figures"] = figures_part(args)
    if "expansion" in parts:
      result["expansion"] = expansion_part(args, workload)
    if "streaming" in parts:
      result["streaming"] = streaming_part(args, workload)
    if "training" in parts:
      try:
        result["training"] = training_part(args, workload)
      except Exception as e:  # pylint: disable=broad-except
        log(f"training part failed: {type(e).__name__}: {e}")
        result["training"] = {"error": f"{type(e).__name__}: {e}"}
  finally:
    stop_tff_workers()
  mach["loadavg_at_end"] = list(os.getloadavg())
  result["versions"] = wl.versions()
  for key in ("loading", "expansion", "streaming"):
    if key in result:
      log(
        f"{key}: "
        + json.dumps(
          {
            k: round(v.get("ms_per_client", 0), 3)
            for k, v in result[key].get("per_round", result[key].get("per_pass", {})).items()
          }
        )
      )
  stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  for key in ("loading", "expansion", "streaming", "training"):
    if key in result:
      result[key].update(
        measured_at=stamp, command=result["command"], machine=mach, versions=result["versions"]
      )
  previous = wl.read_json(RESULT_FILE) or {}
  for key in ("loading", "expansion", "streaming", "training"):
    if key not in result and key in previous:
      result[key] = previous[key]  # a part not run this time keeps its last numbers
  if not args.no_write:
    wl.write_json(RESULT_FILE, result)
    write_readme(result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
