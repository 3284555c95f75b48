"""The benchmarks' workload: EMNIST-like clients, generated deterministically.

Every benchmark reads the same data, built here from a seed and a client count
alone:

- clients `f00000_NN` (EMNIST-writer-like ids), lognormal sizes (sigma 1.25,
  mean ~90 examples: a few clients hold 1 example, a few over 1,000);
- elements `label` int32 in [0, 62) and `pixels` float32[28, 28] in [0, 1]
  (a handwriting-like glyph per label, shifted by up to 2 pixels, plus noise);
- client `i`'s examples come from a generator seeded with (seed, i), so any
  client can be regenerated alone, in any process, with the same bytes.

Artifacts derived from a workload are cached under a work directory
(`build/bench` by default) and rebuilt only when missing:

- `input/`: the workload as TFRecord files of `tf.train.Example` with a
  `client_id` bytes feature (records of several clients interleaved in each
  file), the input of every pipeline (`fedbeam prepare`, the plain Beam
  pipeline, dataset_grouper);
- `tff.sqlite`: the same clients written by TFF's `save_to_sql_client_data`;
  `tff-indexed.sqlite`: a copy with `CREATE INDEX ... ON examples(client_id)`;
- `per-user/`: one TFRecord file per client (`label`, `pixels` Examples), the
  layout TFF's FLAIR loader reads with `FilePerUserClientData`.

Stores written by fedbeam are never cached across source changes: a store
carries a stamp of the fedbeam sources it was prepared with
(`fedbeam_source_digest`).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from typing import Iterable, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
README = os.path.join(ROOT, "bench", "README.md")
DEFAULT_WORKDIR = os.path.join(ROOT, "build", "bench")
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
FEDBEAM = os.path.join(ROOT, ".venv", "bin", "fedbeam")
GROUPER_PYTHON = os.path.join(ROOT, "build", "grouper-venv", "bin", "python")

NUM_LABELS = 62
IMAGE = 28
SIGMA = 1.25
# The local Beam runner every pipeline benchmark uses: two worker processes.
BEAM_LOCAL_ARGS = ("--direct_num_workers=2", "--direct_running_mode=multi_processing")
ELEMENT_SPEC_JSON = {
  "label": {"dtype": "int32", "shape": []},
  "pixels": {"dtype": "float32", "shape": [IMAGE, IMAGE]},
}


@dataclasses.dataclass(frozen=True)
class Workload:
  """A deterministic EMNIST-like federated dataset."""

  num_clients: int = 1000
  mean_examples: float = 90.0
  seed: int = 0

  @property
  def name(self) -> str:
    return f"emnist-like-c{self.num_clients}-m{self.mean_examples:g}-s{self.seed}"

  @functools.cached_property
  def sizes(self) -> dict[str, int]:
    """Client id -> number of examples (lognormal, at least 1)."""
    rng = np.random.default_rng([self.seed, 0xC11E])
    mu = np.log(self.mean_examples) - SIGMA**2 / 2
    n = np.maximum(1, np.round(rng.lognormal(mu, SIGMA, size=self.num_clients))).astype(int)
    suffix = rng.integers(10, 99, size=self.num_clients)
    return {f"f{i:05d}_{int(s)}": int(k) for i, (k, s) in enumerate(zip(n, suffix))}

  @property
  def client_ids(self) -> list[str]:
    return sorted(self.sizes)

  @property
  def num_examples(self) -> int:
    return int(sum(self.sizes.values()))

  def size_summary(self) -> dict[str, float]:
    v = sorted(self.sizes.values())
    return {
      "clients": len(v),
      "examples": int(sum(v)),
      "min": v[0],
      "median": statistics.median(v),
      "mean": sum(v) / len(v),
      "p99": v[min(len(v) - 1, int(0.99 * len(v)))],
      "max": v[-1],
      "clients_with_1": sum(1 for x in v if x == 1),
      "clients_over_1000": sum(1 for x in v if x > 1000),
    }

  def client_arrays(self, client_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels int32[n], pixels float32[n, 28, 28]) of one client."""
    index = int(client_id[1:].split("_")[0])
    n = self.sizes[client_id]
    rng = np.random.default_rng([self.seed, 0xDA7A, index])
    labels = rng.integers(0, NUM_LABELS, size=n).astype(np.int32)
    shift = rng.integers(0, 25, size=n)
    noise = rng.standard_normal(size=(n, IMAGE, IMAGE), dtype=np.float32) * np.float32(0.03)
    pixels = np.clip(_shifted_glyphs()[labels, shift] + noise, 0.0, 1.0).astype(np.float32)
    return labels, pixels

  def client_checksum(self, client_id: str) -> tuple[int, float]:
    """(examples, sum of pixels in float64) of a client, to check readers against."""
    labels, pixels = self.client_arrays(client_id)
    return len(labels), float(pixels.astype(np.float64).sum())


@functools.lru_cache(maxsize=1)
def _shifted_glyphs() -> np.ndarray:
  """float32[62, 25, 28, 28]: a glyph per label, at every shift in [-2, 2]^2."""
  rng = np.random.default_rng(1234)
  yy, xx = np.mgrid[0:IMAGE, 0:IMAGE].astype(np.float32)
  out = np.ones((NUM_LABELS, 25, IMAGE, IMAGE), np.float32)
  for t in range(NUM_LABELS):
    ink = np.zeros((IMAGE, IMAGE), np.float32)
    for _ in range(rng.integers(2, 4)):
      (y0, x0), (y1, x1) = rng.uniform(5, 23, size=(2, 2))
      for s in np.linspace(0, 1, 24):
        cy, cx = y0 + s * (y1 - y0), x0 + s * (x1 - x0)
        ink = np.maximum(ink, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0))
    glyph = 1.0 - ink
    for k in range(25):
      dy, dx = divmod(k, 5)
      out[t, k] = np.roll(glyph, (dy - 2, dx - 2), axis=(0, 1))
  return out


# --- tf.train.Example encoding (fedbeam's deterministic encoder) ----------------------

_CLIENT_ID_JSON = {"client_id": {"dtype": "string", "shape": []}}


@functools.lru_cache(maxsize=None)
def _example_spec(features_json: str, with_id: bool):
  from fedbeam.format.spec import ElementSpec  # pylint: disable=g-import-not-at-top

  features = json.loads(features_json)
  return ElementSpec.from_json({**_CLIENT_ID_JSON, **features} if with_id else features)


def encode_client(columns: dict, features_json: dict, client_id: str, with_id: bool) -> list[bytes]:
  """A client's examples (`columns`: feature -> values stacked on axis 0) as serialized
  `tf.train.Example`s, with a `client_id` feature when `with_id`; protobuf's
  deterministic bytes (fedbeam.format.codec.encode_examples)."""
  from fedbeam.format.codec import encode_examples  # pylint: disable=g-import-not-at-top

  n = len(next(iter(columns.values())))
  if with_id:
    columns = dict(columns, client_id=np.array([client_id.encode("utf-8")] * n, dtype=object))
  return encode_examples(columns, _example_spec(json.dumps(features_json), with_id), n)


def client_records(workload: Workload, client_id: str, with_id: bool) -> list[bytes]:
  labels, pixels = workload.client_arrays(client_id)
  return encode_client({"label": labels, "pixels": pixels}, ELEMENT_SPEC_JSON, client_id, with_id)


# --- cached artifacts ----------------------------------------------------------------


def workload_dir(workload: Workload, workdir: str = DEFAULT_WORKDIR) -> str:
  return os.path.join(workdir, workload.name)


def _done(path: str) -> bool:
  return os.path.exists(path + ".done")


def _mark_done(path: str, info: dict) -> None:
  with open(path + ".done", "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)


def num_input_files(workload: Workload) -> int:
  return max(2, workload.num_clients // 125)


def input_pattern(workload: Workload, workdir: str = DEFAULT_WORKDIR) -> str:
  return os.path.join(workload_dir(workload, workdir), "input", "part-*.tfrecord")


def ensure_input(workload: Workload, workdir: str = DEFAULT_WORKDIR, log=print) -> str:
  """Writes the workload as TFRecord files of Examples with `client_id`; returns the pattern.

  File `k` of `F` holds the clients with index = k mod F, their records
  interleaved in a seeded random order (raw data is not grouped by client).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  directory = os.path.join(workload_dir(workload, workdir), "input")
  if _done(directory):
    return input_pattern(workload, workdir)
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  start = time.perf_counter()
  ids = workload.client_ids
  count = num_input_files(workload)
  for k in range(count):
    records = []
    for cid in ids[k::count]:
      records.extend(client_records(workload, cid, with_id=True))
    order = np.random.default_rng([workload.seed, 0xF11E, k]).permutation(len(records))
    with tf.io.TFRecordWriter(
      os.path.join(directory, f"part-{k:05d}-of-{count:05d}.tfrecord")
    ) as w:
      for j in order:
        w.write(records[j])
  _mark_done(
    directory,
    {"files": count, "examples": workload.num_examples, "seconds": time.perf_counter() - start},
  )
  log(
    f"workload {workload.name}: wrote {count} input files, {workload.num_examples} examples "
    f"in {time.perf_counter() - start:.1f} s"
  )
  return input_pattern(workload, workdir)


def element_spec_file(workdir: str = DEFAULT_WORKDIR) -> str:
  path = os.path.join(workdir, "element_spec.json")
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(ELEMENT_SPEC_JSON, f)
  return path


def tff_element_spec():
  import collections  # pylint: disable=g-import-not-at-top

  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return collections.OrderedDict(
    label=tf.TensorSpec([], tf.int32), pixels=tf.TensorSpec([IMAGE, IMAGE], tf.float32)
  )


def tff_sqlite_path(workload: Workload, workdir: str = DEFAULT_WORKDIR) -> str:
  return os.path.join(workload_dir(workload, workdir), "tff.sqlite")


def write_tff_sqlite(workload: Workload, path: str) -> dict:
  """TFF's `save_to_sql_client_data` of the workload; the data is in memory beforehand.

  Returns {"seconds": time inside save_to_sql_client_data, "examples": n}.
  """
  import collections  # pylint: disable=g-import-not-at-top

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  arrays = {cid: workload.client_arrays(cid) for cid in workload.client_ids}

  def dataset_fn(cid):
    labels, pixels = arrays[cid]
    return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(label=labels, pixels=pixels))

  if os.path.exists(path):
    os.remove(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  start = time.perf_counter()
  tff.simulation.datasets.save_to_sql_client_data(workload.client_ids, dataset_fn, path)
  return {"seconds": time.perf_counter() - start, "examples": workload.num_examples}


def write_tff_format_sqlite(path: str, clients: Iterable[tuple[str, list[bytes]]]) -> dict:
  """A database as `save_to_sql_client_data` writes it, from (client id, serialized Examples).

  Same schema statements, same rows in the same order, one transaction.
  """
  if os.path.exists(path):
    os.remove(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  start = time.perf_counter()
  examples = 0
  con = sqlite3.connect(path)
  with con:
    con.execute("""CREATE TABLE examples (
           split_name TEXT NOT NULL,
           client_id TEXT NOT NULL,
           serialized_example_proto BLOB NOT NULL);""")
    con.execute("""CREATE TABLE client_metadata (
           client_id TEXT NOT NULL,
           split_name TEXT NOT NULL,
           num_examples INTEGER NOT NULL);""")
    for cid, records in clients:
      con.executemany(
        "INSERT INTO examples (split_name, client_id, serialized_example_proto) VALUES (?, ?, ?);",
        [("default_split", cid, r) for r in records],
      )
      con.execute(
        "INSERT INTO client_metadata (client_id, split_name, num_examples) VALUES (?, ?, ?);",
        (cid, "default_split", len(records)),
      )
      examples += len(records)
  con.close()
  return {
    "seconds": time.perf_counter() - start,
    "examples": examples,
    "writer": "bench.workload.write_tff_format_sqlite",
  }


def write_tff_sqlite_direct(workload: Workload, path: str) -> dict:
  """The database `save_to_sql_client_data` writes for the workload, written with sqlite3.

  Byte-identical to TFF's (bench_pipeline checks it with SHA-256 whenever it
  times TFF's writer), without TFF's per-element Python serialization.
  """
  return write_tff_format_sqlite(
    path, ((cid, client_records(workload, cid, with_id=False)) for cid in workload.client_ids)
  )


def ensure_tff_sqlite(workload: Workload, workdir: str = DEFAULT_WORKDIR, log=print) -> str:
  """The workload's TFF SQLite database (TFF's bytes; see `write_tff_sqlite_direct`)."""
  path = tff_sqlite_path(workload, workdir)
  if not _done(path):
    info = write_tff_sqlite_direct(workload, path)
    _mark_done(path, info)
    log(f"workload {workload.name}: TFF SQLite database written in {info['seconds']:.1f} s")
  return path


def ensure_indexed_sqlite(workload: Workload, workdir: str = DEFAULT_WORKDIR, log=print) -> str:
  """A copy of TFF's database with an index on examples(client_id)."""
  src = ensure_tff_sqlite(workload, workdir, log)
  path = os.path.join(workload_dir(workload, workdir), "tff-indexed.sqlite")
  if not _done(path):
    start = time.perf_counter()
    shutil.copyfile(src, path)
    with sqlite3.connect(path) as con:
      con.execute("CREATE INDEX examples_client_id ON examples(client_id)")
    _mark_done(path, {"seconds": time.perf_counter() - start})
    log(f"workload {workload.name}: indexed SQLite copy in {time.perf_counter() - start:.1f} s")
  return path


def ensure_per_user_files(workload: Workload, workdir: str = DEFAULT_WORKDIR, log=print) -> dict:
  """One TFRecord file per client (FLAIR's layout); returns {client id: path}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  directory = os.path.join(workload_dir(workload, workdir), "per-user")
  paths = {cid: os.path.join(directory, f"{cid}.tfrecord") for cid in workload.client_ids}
  if _done(directory):
    return paths
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  start = time.perf_counter()
  for cid, path in paths.items():
    with tf.io.TFRecordWriter(path) as w:
      for record in client_records(workload, cid, with_id=False):
        w.write(record)
  _mark_done(directory, {"seconds": time.perf_counter() - start})
  log(f"workload {workload.name}: per-user files in {time.perf_counter() - start:.1f} s")
  return paths


# --- fedbeam stores ---------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def fedbeam_source_digest() -> str:
  """SHA-256 over fedbeam's Python sources and schemas: a cached store is reused only if equal."""
  h = hashlib.sha256()
  files = sorted(
    glob.glob(os.path.join(ROOT, "fedbeam", "**", "*.py"), recursive=True)
    + glob.glob(os.path.join(ROOT, "schemas", "*"))
  )
  for path in files:
    h.update(os.path.relpath(path, ROOT).encode())
    with open(path, "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def store_is_current(store: str) -> bool:
  stamp = os.path.join(store + ".stamp.json")
  if not (os.path.exists(os.path.join(store, "metadata.json")) and os.path.exists(stamp)):
    return False
  with open(stamp, encoding="utf-8") as f:
    return json.load(f).get("fedbeam_source_digest") == fedbeam_source_digest()


def stamp_store(store: str, info: dict) -> None:
  with open(store + ".stamp.json", "w", encoding="utf-8") as f:
    json.dump({**info, "fedbeam_source_digest": fedbeam_source_digest()}, f, indent=2)


def prepare_command(
  input_glob: str, output: str, spec_file: str, extra: Iterable[str] = ()
) -> list[str]:
  """`fedbeam prepare` of the workload's TFRecord input on the local runner, 2 workers."""
  return [
    FEDBEAM,
    "prepare",
    "--input",
    input_glob,
    "--input-format",
    "tfrecord",
    "--client-id-key",
    "client_id",
    "--element-spec",
    spec_file,
    "--output",
    output,
    "--overwrite",
    *extra,
    *BEAM_LOCAL_ARGS,
  ]


def ensure_fedbeam_store(
  workload: Workload,
  name: str,
  extra: Iterable[str] = (),
  workdir: str = DEFAULT_WORKDIR,
  log=print,
  in_process_fallback: bool = False,
) -> str:
  """A store of the workload prepared by `fedbeam prepare` (reused while fedbeam is unchanged).

  Prepared on 2 worker processes; with `in_process_fallback`, a failed run is
  retried on the in-process runner (the stamp records it).
  """
  store = os.path.join(workload_dir(workload, workdir), "stores", name)
  if store_is_current(store):
    return store
  pattern = ensure_input(workload, workdir, log)
  os.makedirs(os.path.dirname(store), exist_ok=True)
  cmd = prepare_command(pattern, store, element_spec_file(workdir), extra)
  logf = os.path.join(os.path.dirname(store), f"{name}.log")
  run = run_measured(cmd, logf)
  note = None
  if run["returncode"] != 0:
    failed = logf + f".failed-{time.strftime('%H%M%S')}"
    os.replace(logf, failed)
    with open(failed, encoding="utf-8", errors="replace") as f:
      errors = [l.strip() for l in f if l.startswith("fedbeam prepare: error")]
    note = (
      f"2 workers: exit {run['returncode']}"
      + (f" ({errors[-1]})" if errors else "")
      + f", log {os.path.relpath(failed, ROOT)}"
    )
    if not in_process_fallback:
      raise RuntimeError(f"fedbeam prepare failed: {note}")
    log(f"workload {workload.name}: store {name}: {note}; retrying in-process")
    cmd = [c for c in cmd if c not in BEAM_LOCAL_ARGS]
    run = run_measured(cmd, logf)
    if run["returncode"] != 0:
      raise RuntimeError(
        f"fedbeam prepare failed on 2 workers ({note}) and in-process "
        f"(exit {run['returncode']}, log {run['log']})"
      )
  stamp_store(
    store,
    {
      "command": cmd,
      "wall_s": run["wall_s"],
      "peak_pss_mb": run["peak_pss_mb"],
      "two_worker_failure": note,
    },
  )
  log(
    f"workload {workload.name}: store {name} prepared in {run['wall_s']:.1f} s"
    + (" (in-process)" if note else "")
  )
  return store


# --- measuring processes ----------------------------------------------------------

# A measured process is stopped when the machine's available memory falls below
# this, so that a runaway benchmark cannot take the machine down with it.
MIN_AVAILABLE_MB = 1500


def run_measured(
  cmd: list[str],
  log_path: str,
  env: Optional[dict] = None,
  poll_s: float = 0.2,
  timeout_s: Optional[float] = None,
  min_available_mb: float = MIN_AVAILABLE_MB,
) -> dict:
  """Runs `cmd` with output to `log_path`; wall time and peak memory of its process tree.

  Memory is polled every `poll_s` seconds with psutil over the process and
  all its descendants (Beam's worker processes): `peak_pss_mb` is the peak of
  the summed proportional set sizes (shared pages such as TensorFlow's
  libraries, loaded by every worker, counted once), `peak_rss_mb` the peak
  of the summed RSS (shared pages counted in every process). The tree is
  killed when the machine's available memory drops under `min_available_mb`
  (`killed_low_memory` in the result).
  """
  import psutil  # pylint: disable=g-import-not-at-top

  os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
  peak = {"rss": 0, "pss": 0}
  killed = [None]
  stop = threading.Event()
  with open(log_path, "w", encoding="utf-8") as out:
    start = time.perf_counter()
    proc = subprocess.Popen(
      cmd,
      stdout=out,
      stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL,
      env=env,
      cwd=ROOT,
      start_new_session=True,
    )

    def poll():
      try:
        parent = psutil.Process(proc.pid)
      except psutil.NoSuchProcess:
        return
      while not stop.is_set():
        rss = pss = 0
        try:
          procs = [parent] + parent.children(recursive=True)
        except psutil.NoSuchProcess:
          break
        for p in procs:
          try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
          except psutil.Error:
            pass  # The process ended between listing and reading it.
        peak["rss"] = max(peak["rss"], rss)
        peak["pss"] = max(peak["pss"], pss)
        available = psutil.virtual_memory().available
        if available < min_available_mb * 2**20:
          killed[0] = available / 2**20
          try:
            os.killpg(proc.pid, 9)
          except OSError:
            pass  # Already gone.
          break
        stop.wait(poll_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
      returncode = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, 9)
      returncode = proc.wait()
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
  out = {
    "returncode": returncode,
    "wall_s": wall,
    "peak_rss_mb": peak["rss"] / 2**20,
    "peak_pss_mb": peak["pss"] / 2**20,
    "log": os.path.relpath(log_path, ROOT),
  }
  if killed[0] is not None:
    out["killed_low_memory"] = killed[0]
  return out


def failure_reason(row: dict) -> str:
  """A failed run's message, with the error line its log holds (if any)."""
  msg = row.get("failed", "")
  path = os.path.join(ROOT, row.get("log", ""))
  if row.get("log") and os.path.exists(path):
    with open(path, encoding="utf-8", errors="replace") as f:
      errors = [l.strip() for l in f if ": error: " in l and not l.startswith("ERROR")]
    if errors and errors[-1] not in msg:
      msg = f"{msg} — {errors[-1]}"
  return msg


# --- reporting helpers ------------------------------------------------------------


def command_line(module: str, argv=None, log_name: Optional[str] = None) -> str:
  """How a benchmark was run, for its report: `.venv/bin/python -m MODULE ARGS > LOG 2>&1`."""
  args = list(argv if argv is not None else sys.argv[1:])
  log_name = log_name or module.rsplit(".", 1)[-1]
  return (
    f".venv/bin/python -m {module}"
    + "".join(f" {a}" for a in args)
    + f" > build/bench/logs/{log_name}.log 2>&1"
  )


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass  # No /proc (not Linux): keep platform's answer.
  import psutil  # pylint: disable=g-import-not-at-top

  mem = round(psutil.virtual_memory().total / 2**30, 1)
  return {
    "nproc": os.cpu_count(),
    "cpu": cpu,
    "memory_gib": mem,
    "platform": platform.platform(),
    "loadavg_at_start": list(os.getloadavg()),
  }


def versions() -> dict:
  import apache_beam  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  import fedbeam  # pylint: disable=g-import-not-at-top

  out = {
    "python": platform.python_version(),
    "tensorflow": tf.__version__,
    "apache_beam": apache_beam.__version__,
    "numpy": np.__version__,
    "fedbeam": fedbeam.__version__,
  }
  if "tensorflow_federated" in sys.modules:
    out["tensorflow_federated"] = sys.modules["tensorflow_federated"].__version__
  out["fedbeam_source_digest"] = fedbeam_source_digest()
  return out


def stats(values: list[float]) -> dict:
  return {
    "median_s": statistics.median(values),
    "min_s": min(values),
    "max_s": max(values),
    "n": len(values),
  }


def write_json(name: str, result: dict) -> str:
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, name)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  os.replace(path + ".tmp", path)
  return path


def read_json(name: str) -> Optional[dict]:
  path = os.path.join(RESULTS_DIR, name)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def sample_rounds(
  client_ids: list[str], rounds: int, per_round: int, seed: int = 1000
) -> list[list[str]]:
  """Round r's clients: `np.random.RandomState(seed + r).choice(ids, K, replace=False)`.

  Round 0 is the warm-up round.
  """
  ids = sorted(client_ids)
  return [
    [str(c) for c in np.random.RandomState(seed + r).choice(ids, per_round, replace=False)]
    for r in range(rounds + 1)
  ]


# --- many tiny clients (the 100k-client store) ------------------------------------

TINY_SPEC_JSON = {"label": {"dtype": "int32", "shape": []}, "x": {"dtype": "float32", "shape": [4]}}


@dataclasses.dataclass(frozen=True)
class TinyWorkload:
  """Many clients of 1-3 tiny examples (`label` int32, `x` float32[4]) each."""

  num_clients: int = 100_000
  seed: int = 0

  @property
  def name(self) -> str:
    return f"tiny-c{self.num_clients}-s{self.seed}"

  @functools.cached_property
  def sizes(self) -> dict[str, int]:
    rng = np.random.default_rng([self.seed, 0x7117])
    n = rng.integers(1, 4, size=self.num_clients)
    return {f"u{i:06d}": int(k) for i, k in enumerate(n)}

  @property
  def num_examples(self) -> int:
    return int(sum(self.sizes.values()))


def tiny_client_records(workload: TinyWorkload, client_id: str, with_id: bool) -> list[bytes]:
  rng = np.random.default_rng([workload.seed, 0x7118, int(client_id[1:])])
  n = workload.sizes[client_id]
  labels = rng.integers(0, 10, size=n).astype(np.int32)
  xs = rng.random((n, 4), dtype=np.float32)
  return encode_client({"label": labels, "x": xs}, TINY_SPEC_JSON, client_id, with_id)


def ensure_tiny_input(workload: TinyWorkload, workdir: str = DEFAULT_WORKDIR, log=print) -> str:
  """The tiny workload as 8 TFRecord files of Examples with `client_id`; returns the pattern."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  directory = os.path.join(workdir, workload.name, "input")
  pattern = os.path.join(directory, "part-*.tfrecord")
  if _done(directory):
    return pattern
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  ids = sorted(workload.sizes)
  count = 8
  start = time.perf_counter()
  for k in range(count):
    with tf.io.TFRecordWriter(
      os.path.join(directory, f"part-{k:05d}-of-{count:05d}.tfrecord")
    ) as w:
      for cid in ids[k::count]:
        for record in tiny_client_records(workload, cid, with_id=True):
          w.write(record)
  _mark_done(
    directory,
    {"files": count, "examples": workload.num_examples, "seconds": time.perf_counter() - start},
  )
  log(
    f"workload {workload.name}: wrote {count} input files, {workload.num_examples} examples "
    f"in {time.perf_counter() - start:.1f} s"
  )
  return pattern


def ensure_tiny_sqlite(workload: TinyWorkload, workdir: str = DEFAULT_WORKDIR, log=print) -> str:
  """The tiny workload in TFF's SQLite format (schema and rows of save_to_sql_client_data)."""
  path = os.path.join(workdir, workload.name, "tff.sqlite")
  if not _done(path):
    ids = sorted(workload.sizes)
    info = write_tff_format_sqlite(
      path, ((cid, tiny_client_records(workload, cid, with_id=False)) for cid in ids)
    )
    _mark_done(path, info)
    log(f"workload {workload.name}: TFF SQLite database written in {info['seconds']:.1f} s")
  return path


def tiny_spec_file(workdir: str = DEFAULT_WORKDIR) -> str:
  path = os.path.join(workdir, "tiny_element_spec.json")
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(TINY_SPEC_JSON, f)
  return path


# --- README sections ----------------------------------------------------------------

# Order of the sections in bench/README.md; a new section goes before the first
# later one present. Sections are replaced in place.
SECTION_ORDER = (
  "## Summary",
  "## Client loading",
  "## Expansion: precomputed vs on the fly",
  "## Pseudo-client expansion",
  "## Streaming every client",
  "## Pipeline",
  "## Input formats",
  "## Scale",
  "## Training input share",
  "## Simulation loop",
)
README_INTRO = (
  "# Benchmarks\n\nBenchmarks against peers (not tests). Each section is written by "
  "its script; `python -m bench.run_all` (`make bench`) runs them all and writes "
  "the summary.\n\n"
)


def write_readme_section(title: str, section: str) -> None:
  """Replaces the section `title` of bench/README.md, or inserts it in SECTION_ORDER."""
  import re  # pylint: disable=g-import-not-at-top

  text = ""
  if os.path.exists(README):
    with open(README, encoding="utf-8") as f:
      text = f.read()
  if not text.strip():
    text = README_INTRO
  section = section.rstrip("\n") + "\n\n"
  pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: section, text, count=1)
  else:
    later = SECTION_ORDER[SECTION_ORDER.index(title) + 1 :] if title in SECTION_ORDER else ()
    positions = [
      m.start() for t in later for m in [re.search(rf"^{re.escape(t)}\n", text, re.M)] if m
    ]
    if positions:
      at = min(positions)
      text = text[:at] + section + text[at:]
    else:
      text = text.rstrip("\n") + "\n\n" + section
  with open(README, "w", encoding="utf-8") as f:
    f.write(text.rstrip("\n") + "\n")


def section_footer(result: dict) -> list[str]:
  """A README section's closing lines: `notes`, the `command`, the machine, the raw numbers.

  `result` holds `command`, `machine`, `versions`, `name` (bench/results/<name>.json),
  `run_id` and optionally `notes` (Markdown).
  """
  return [
    *([result["notes"].strip(), ""] if result.get("notes") else []),
    "Command (from the repository root):",
    "",
    "```sh",
    result["command"],
    "```",
    "",
    machine_line(result["machine"], result["versions"]),
    f"Raw numbers: `bench/results/{result['name']}.json`. Measured {result['run_id']}.",
  ]


def machine_line(mach: dict, vers: dict) -> str:
  load = ", ".join(f"{x:.2f}" for x in mach["loadavg_at_start"])
  end = mach.get("loadavg_at_end")
  tail = f"; at the end {', '.join(f'{x:.2f}' for x in end)}" if end else ""
  v = ", ".join(f"{k} {val}" for k, val in vers.items())
  return (
    f"Machine: {mach['nproc']} CPUs ({mach['cpu']}), {mach.get('memory_gib')} GiB, "
    f"{mach['platform']}; load average (1, 5, 15 min) at the start {load}{tail}. "
    f"Versions: {v}."
  )
