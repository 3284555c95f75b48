"""Per-round cost of pseudo-client expansion: precomputed store vs. TFF on the fly.

One process, same data, same sampled clients per round:

- fedbeam: `fedbeam prepare` expands ~300 EMNIST-like raw clients 3x with
  `fedbeam.transforms:random_affine` once (timed separately, it is paid once);
  each round then reads its K sampled pseudo-clients from the store through
  `load_client_data(...).create_tf_dataset_for_client`.
- TFF: `tff.simulation.datasets.TransformingClientData` over the raw clients
  (the same TFF SQLite database the store was prepared from, loaded with
  `load_and_parse_sql_client_data`) applies the same affine warps on the fly,
  with the same pseudo-client ids.
- with `--with-raw-store`, also TFF over the raw clients read from an
  unexpanded fedbeam store (the reader of the fedbeam row), which isolates
  the on-the-fly transform from TFF's SQLite reader (adds ~1.5 minutes).

A round materializes every batch (`batch(20)`) of every sampled client as
numpy arrays. Rounds sample K clients with `np.random.RandomState(round)`. One
warm-up round per contender is not counted.

    .venv/bin/python -m bench.bench_expansion > /tmp/bench_expansion.log 2>&1

Writes bench/results/expansion.json and the "Pseudo-client expansion" section
of bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from bench import workload as wl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "expansion.json")
README = os.path.join(ROOT, "bench", "README.md")
SECTION = "## Pseudo-client expansion"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--raw-clients", type=int, default=300)
  p.add_argument("--mean-examples", type=float, default=90.0)
  p.add_argument("--expansion", type=int, default=3, help="pseudo-clients per raw client")
  p.add_argument("--clients-per-round", type=int, default=50)
  p.add_argument("--batch-size", type=int, default=20)
  p.add_argument("--rounds", type=int, default=20)
  p.add_argument("--workdir", default=None, help="default: a temporary directory")
  p.add_argument(
    "--with-raw-store",
    action="store_true",
    help="add TFF's on-the-fly expansion over an unexpanded fedbeam store",
  )
  p.add_argument("--no-write", action="store_true", help="do not write results and README")
  return p.parse_args(argv)


# --- data ----------------------------------------------------------------------


def client_sizes(num_clients: int, mean: float, seed: int = 0) -> dict[str, int]:
  """Lognormal client sizes (sigma 0.6) with the given mean; ids like EMNIST writer ids."""
  rng = np.random.default_rng(seed)
  sigma = 0.6
  mu = np.log(mean) - sigma**2 / 2
  sizes = np.maximum(1, np.round(rng.lognormal(mu, sigma, size=num_clients))).astype(int)
  return {f"f{i:04d}_{int(rng.integers(10, 99))}": int(n) for i, n in enumerate(sizes)}


def glyph_templates(count: int, rng) -> np.ndarray:
  """Handwriting-like 28x28 glyphs: dark strokes (0) on a white background (1)."""
  yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
  out = np.ones((count, 28, 28), np.float32)
  for t in range(count):
    ink = np.zeros((28, 28), np.float32)
    for _ in range(rng.integers(2, 4)):
      (y0, x0), (y1, x1) = rng.uniform(5, 23, size=(2, 2))
      for s in np.linspace(0, 1, 24):
        cy, cx = y0 + s * (y1 - y0), x0 + s * (x1 - x0)
        ink = np.maximum(ink, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0))
    out[t] = 1.0 - ink
  return out


def write_raw_database(path: str, sizes: dict[str, int], seed: int = 0) -> int:
  """Writes the raw clients with TFF's save_to_sql_client_data; returns the example count."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  templates = glyph_templates(62, rng)
  data = {}
  for cid, n in sizes.items():
    labels = rng.integers(0, 62, size=n).astype(np.int32)
    shifts = rng.integers(-2, 3, size=(n, 2))
    pixels = np.stack(
      [np.roll(templates[l], tuple(s), axis=(0, 1)) for l, s in zip(labels, shifts)]
    )
    pixels = np.clip(pixels + rng.normal(0, 0.03, size=pixels.shape), 0, 1).astype(np.float32)
    data[cid] = collections.OrderedDict(label=labels, pixels=pixels)
  tff.simulation.datasets.save_to_sql_client_data(
    list(sizes), lambda cid: tf.data.Dataset.from_tensor_slices(data[cid]), path
  )
  return int(sum(sizes.values()))


def element_spec():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return collections.OrderedDict(
    label=tf.TensorSpec([], tf.int32), pixels=tf.TensorSpec([28, 28], tf.float32)
  )


# --- TFF's on-the-fly expansion with the seed's ids ---------------------------------------


def tff_transforming(base, make_transform_fn, num_transformed_clients: int):
  """TransformingClientData over `base` with ids '{raw}_{index:0{digits}d}'."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  raw_ids = sorted(base.client_ids)
  k, g = divmod(num_transformed_clients, len(raw_ids))
  digits = len(str(num_transformed_clients - 1))
  remainder = set(raw_ids[:g])

  def expand(raw):
    return [f"{raw}_{i:0{digits}d}" for i in range(k + (1 if raw in remainder else 0))]

  def reduce(client_id):
    return tf.strings.regex_replace(client_id, "_[0-9]+$", "")

  def make(client_id):
    if isinstance(client_id, tf.Tensor):
      client_id = client_id.numpy().decode("utf-8")
    raw, index = client_id.rsplit("_", 1)
    fn = make_transform_fn(raw, int(index))
    return (lambda x: x) if fn is None else fn

  return tff.simulation.datasets.TransformingClientData(base, make, expand, reduce)


# --- measurement -----------------------------------------------------------------


def materialize(client_data, client_ids, batch_size: int) -> int:
  """Iterates every batch of every client; returns the number of examples seen."""
  seen = 0
  for cid in client_ids:
    for batch in client_data.create_tf_dataset_for_client(cid).batch(batch_size):
      seen += int(batch["label"].numpy().shape[0])
      batch["pixels"].numpy()
  return seen


def run_rounds(contenders: dict, ids: list[str], args) -> dict[str, list[float]]:
  """Per-round seconds of each contender; contenders take turns inside each round."""
  times = {name: [] for name in contenders}
  examples = {}
  for r in range(-1, args.rounds):  # round -1 warms up
    sample = list(
      np.random.RandomState(max(r, 0) + 1000).choice(ids, args.clients_per_round, replace=False)
    )
    for name, cd in contenders.items():
      start = time.perf_counter()
      n = materialize(cd, sample, args.batch_size)
      seconds = time.perf_counter() - start
      if r >= 0:
        times[name].append(seconds)
      examples.setdefault(r, set()).add(n)
    if len(examples[r]) != 1:
      raise AssertionError(f"round {r}: contenders read different example counts {examples[r]}")
  return times


def check_same_data(a, b, client_ids) -> None:
  for cid in client_ids:
    xs = list(a.create_tf_dataset_for_client(cid).as_numpy_iterator())
    ys = list(b.create_tf_dataset_for_client(cid).as_numpy_iterator())
    assert len(xs) == len(ys), cid
    for x, y in zip(xs, ys):
      assert x["label"] == y["label"], cid
      np.testing.assert_allclose(x["pixels"], y["pixels"], atol=1e-5, err_msg=cid)


def stats(values: list[float]) -> dict[str, float]:
  return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}


def machine() -> dict[str, str]:
  cpu = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  return {
    "nproc": str(os.cpu_count()),
    "cpu": cpu,
    "platform": platform.platform(),
    "loadavg_at_start": load,
  }


def versions() -> dict[str, str]:
  import apache_beam  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  import fedbeam  # pylint: disable=g-import-not-at-top

  return {
    "python": platform.python_version(),
    "tensorflow": tf.__version__,
    "tensorflow_federated": tff.__version__,
    "apache_beam": apache_beam.__version__,
    "numpy": np.__version__,
    "fedbeam": fedbeam.__version__,
  }


# --- README section -----------------------------------------------------------------


def readme_section(result: dict) -> str:
  c, m, v = result["config"], result["machine"], result["versions"]
  rows = result["per_round"]
  lines = [
    SECTION,
    "",
    f"Time per round to materialize {c['clients_per_round']} sampled pseudo-clients (every "
    f"batch of {c['batch_size']}, as numpy) out of {c['num_transformed_clients']} = "
    f"{c['expansion']} x {c['raw_clients']} raw EMNIST-like clients (`label` int32, `pixels` "
    f"float32[28, 28], lognormal sizes, {c['raw_examples']} raw examples) expanded with "
    "`fedbeam.transforms:random_affine`. Same data, same pseudo-client ids and the same "
    f"sampled clients per round for every row; {c['rounds']} rounds after one warm-up round, "
    "contenders taking turns within each round.",
    "",
    "| contender | median s/round | min–max s/round | median / fedbeam median |",
    "| --- | ---: | ---: | ---: |",
  ]
  base = rows["fedbeam_store"]["median_s"]
  labels = {
    "fedbeam_store": "fedbeam: precomputed expanded store (`load_client_data`)",
    "tff_transforming_sql": "TFF `TransformingClientData` on the fly over the TFF SQLite raw data",
    "tff_transforming_raw_store": "TFF `TransformingClientData` on the fly over the raw clients "
    "in an unexpanded fedbeam store",
  }
  for name, s in rows.items():
    lines.append(
      f"| {labels[name]} | {s['median_s']:.3f} | {s['min_s']:.3f}–{s['max_s']:.3f} | "
      f"{s['median_s'] / base:.2f}x |"
    )
  p = result["prepare"]
  overheads = [
    (labels[name].split(" over ")[-1], s["median_s"] - base)
    for name, s in rows.items()
    if name != "fedbeam_store"
  ]
  paid_back = "; ".join(
    f"{p['expanded_store_s'] / extra:.0f} rounds against TFF over {what}"
    if extra > 0
    else f"never against TFF over {what}"
    for what, extra in overheads
  )
  lines += [
    "",
    f"fedbeam pays the transform once: `fedbeam prepare` of the expanded store took "
    f"{p['expanded_store_s']:.1f} s (local in-process runner, one worker), which the per-round "
    f"savings pay back after {paid_back}.",
    "",
    "Each round includes creating every sampled client's dataset, as a simulation does. "
    "TFF's SQLite reader scans the whole `examples` table for each client "
    "(`save_to_sql_client_data` creates no index on `client_id`), which is part of the TFF "
    "row's time. "
    + (
      "The last row reads the raw clients with fedbeam's reader instead, so its difference "
      "to the fedbeam row is the on-the-fly transform alone."
      if "tff_transforming_raw_store" in rows
      else "`--with-raw-store` adds a row with TFF's on-the-fly expansion over the raw clients in "
      "an unexpanded fedbeam store, which separates the transform's cost from the reader's."
    ),
    "",
    "Command (from the repository root):",
    "",
    "```sh",
    result["command"],
    "```",
    "",
    f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['platform']}; 1-minute load average "
    f"{m['loadavg_at_start'][0]:.2f} at the start and {m['loadavg_at_end'][0]:.2f} at the end "
    "(other jobs shared the machine when the load exceeds the CPU count)."
    f" Versions: Python {v['python']}, TensorFlow {v['tensorflow']}, TensorFlow Federated "
    f"{v['tensorflow_federated']}, Apache Beam {v['apache_beam']}, numpy {v['numpy']}, "
    f"fedbeam {v['fedbeam']}. Raw numbers: `bench/results/expansion.json`.",
    "",
  ]
  return "\n".join(lines)


def write_readme_section(section: str) -> None:
  """Replaces (or appends) this benchmark's section; other sections are left as they are."""
  text = ""
  if os.path.exists(README):
    with open(README, encoding="utf-8") as f:
      text = f.read()
  if not text.strip():
    text = "# Benchmarks\n\nBenchmarks against peers (not tests). Each section is written by its script.\n\n"
  pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + "\n", text, count=1)
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  with open(README, "w", encoding="utf-8") as f:
    f.write(text.rstrip("\n") + "\n")


# --- main -------------------------------------------------------------------------


def main(argv=None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  args = parse_args(argv)
  mach = machine()
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from fedbeam.runtime.client_data import load_client_data  # pylint: disable=g-import-not-at-top
  from fedbeam.runtime.tff_worker import stop_tff_workers  # pylint: disable=g-import-not-at-top
  from fedbeam.testing import prepare_store  # pylint: disable=g-import-not-at-top
  from fedbeam.transforms import random_affine  # pylint: disable=g-import-not-at-top

  workdir = args.workdir or tempfile.mkdtemp(prefix="fedbeam-bench-expansion-")
  os.makedirs(workdir, exist_ok=True)
  try:
    sizes = client_sizes(args.raw_clients, args.mean_examples)
    n = args.expansion * args.raw_clients
    db = os.path.join(workdir, "raw.sqlite")
    if os.path.exists(db):
      os.remove(db)
    start = time.perf_counter()
    raw_examples = write_raw_database(db, sizes)
    print(
      f"raw database: {len(sizes)} clients, {raw_examples} examples, "
      f"{time.perf_counter() - start:.1f} s",
      flush=True,
    )

    spec = element_spec()
    start = time.perf_counter()
    expanded = prepare_store(
      db,
      workdir,
      output=os.path.join(workdir, "expanded"),
      element_spec=spec,
      order_by="@input",
      overwrite=True,
      num_transformed_clients=n,
      transform="fedbeam.transforms:random_affine",
    )
    prepare_expanded = time.perf_counter() - start
    print(f"prepare expanded store: {prepare_expanded:.1f} s", flush=True)
    fedbeam_cd = load_client_data(expanded)
    sql_base = tff.simulation.datasets.load_and_parse_sql_client_data(db, spec)
    contenders = collections.OrderedDict(
      fedbeam_store=fedbeam_cd,
      tff_transforming_sql=tff_transforming(sql_base, random_affine, n),
    )
    prepare_raw = None
    if args.with_raw_store:
      start = time.perf_counter()
      raw_store = prepare_store(
        db,
        workdir,
        output=os.path.join(workdir, "raw"),
        element_spec=spec,
        order_by="@input",
        overwrite=True,
      )
      prepare_raw = time.perf_counter() - start
      print(f"prepare raw store: {prepare_raw:.1f} s", flush=True)
      contenders["tff_transforming_raw_store"] = tff_transforming(
        load_client_data(raw_store), random_affine, n
      )
    ids = fedbeam_cd.client_ids
    for name, cd in contenders.items():
      assert cd.client_ids == ids, name
    check = list(np.random.RandomState(0).choice(ids, 6, replace=False))
    for name, cd in contenders.items():
      if name != "fedbeam_store":
        check_same_data(contenders["fedbeam_store"], cd, check)

    times = run_rounds(contenders, ids, args)
    mach["loadavg_at_end"] = os.getloadavg()
    per_round = {name: stats(t) for name, t in times.items()}
    base = per_round["fedbeam_store"]["median_s"]
    result = {
      "benchmark": "pseudo-client expansion: per-round materialization of sampled clients",
      "command": wl.command_line("bench.bench_expansion", argv),
      "config": {
        "raw_clients": args.raw_clients,
        "raw_examples": raw_examples,
        "mean_examples_target": args.mean_examples,
        "client_size": {
          "min": min(sizes.values()),
          "median": statistics.median(sizes.values()),
          "max": max(sizes.values()),
        },
        "expansion": args.expansion,
        "num_transformed_clients": n,
        "transform": "fedbeam.transforms:random_affine",
        "clients_per_round": args.clients_per_round,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "warmup_rounds": 1,
      },
      "prepare": {
        "expanded_store_s": prepare_expanded,
        "raw_store_s": prepare_raw,
        "runner": "local in-process FnApiRunner",
      },
      "per_round": per_round,
      "ratio_vs_fedbeam_median": {name: s["median_s"] / base for name, s in per_round.items()},
      "rounds_s": times,
      "machine": mach,
      "versions": versions(),
    }
    print(
      json.dumps(
        {k: result[k] for k in ("per_round", "ratio_vs_fedbeam_median", "prepare")}, indent=2
      ),
      flush=True,
    )
    if not args.no_write:
      os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
      with open(RESULTS, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
      write_readme_section(readme_section(result))
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
    stop_tff_workers()
  return 0


if __name__ == "__main__":
  sys.exit(main())
