"""Cost of the manifest's bounds: `read_metadata` + `read_manifest` over a large manifest.

Writes a store's metadata and one manifest file of N rows (the rows only; no
client files, which these two functions never open) and times reading every
row back. With `--peer PATH`, a module of another checkout that defines both
(`fedbeam/store_format.py` of a checkout from before `fedbeam.format`, e.g.
one whose reader checks no Avro block framing, row bounds or file types) is
loaded beside this one and the two are timed in turn in one
process, after TensorFlow is imported for both:

    .venv/bin/python -m bench.bench_manifest_read --rows 100000 \\
        --peer /work/main/fedbeam/store_format.py

Prints one JSON object: rows, seconds per run and median for each, ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types

import fastavro

from fedbeam.format.layout import (
  FORMAT_VERSION,
  ID_ENCODING,
  MANIFEST_DIR,
  UNSPLIT,
  client_relative_path,
)
from fedbeam.format.manifest import manifest_file_name, read_manifest
from fedbeam.format.metadata import metadata_path, metadata_to_json, parsed_schema, read_metadata

__all__ = ["write_manifest_store", "time_manifest_read"]


def write_manifest_store(root: str, rows: int) -> str:
  """A store directory at `root` with metadata and one manifest file of `rows` clients."""
  data_dir = "data-0123456789abcdef"
  os.makedirs(os.path.join(root, data_dir, MANIFEST_DIR), exist_ok=True)
  records = []
  for i in range(rows):
    cid = f"client-{i:08d}"
    records.append(
      {
        "client_id": cid,
        "split": UNSPLIT,
        "raw_client_id": cid,
        "pseudo_index": 0,
        "num_examples": 10,
        "num_bytes": 1000,
        "path": f"{data_dir}/{client_relative_path(cid, UNSPLIT, 25)}",
        "crc32c": i,
      }
    )
  records.sort(key=lambda r: r["client_id"])
  with open(os.path.join(root, data_dir, MANIFEST_DIR, manifest_file_name(0, 1)), "wb") as f:
    fastavro.writer(f, parsed_schema("manifest"), records, codec="null")
  metadata = {
    "format_version": FORMAT_VERSION,
    "fedbeam_version": "bench",
    "element_spec": [
      {"name": "label", "dtype": "int64", "shape": []},
      {"name": "pixels", "dtype": "float32", "shape": [4]},
    ],
    "data_dir": data_dir,
    "id_encoding": ID_ENCODING,
    "num_shards": 25,
    "manifest": {"num_files": 1},
    "splits": [
      {
        "name": UNSPLIT,
        "num_clients": rows,
        "num_examples": 10 * rows,
        "num_bytes": 1000 * rows,
        "num_empty_clients": 0,
      }
    ],
    "empty_clients": {"found": 0, "policy": "keep", "dropped": 0, "sample": []},
    "parameters": {},
  }
  with open(metadata_path(root), "wb") as f:
    f.write(metadata_to_json(metadata))
  return root


def time_manifest_read(store_format, root: str) -> float:
  """Seconds of `read_metadata` + reading every `read_manifest` row with module `store_format`."""
  start = time.perf_counter()
  metadata = store_format.read_metadata(root)
  count = sum(1 for _ in store_format.read_manifest(root, metadata))
  seconds = time.perf_counter() - start
  assert count == metadata["splits"][0]["num_clients"], count
  return seconds


def _load_peer(path: str):
  spec = importlib.util.spec_from_file_location("peer_store_format", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=100_000)
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--peer", help="a module file defining read_metadata and read_manifest")
  args = p.parse_args(argv)
  # (main's reader imports TensorFlow; the loader always has it.)
  modules = {
    "fedbeam": types.SimpleNamespace(read_metadata=read_metadata, read_manifest=read_manifest)
  }
  if args.peer:
    modules["peer"] = _load_peer(args.peer)
  times = {name: [] for name in modules}
  with tempfile.TemporaryDirectory() as tmp:
    root = write_manifest_store(tmp, args.rows)
    for module in modules.values():
      time_manifest_read(module, root)  # warm-up
    for _ in range(args.runs):
      for name, module in modules.items():
        times[name].append(time_manifest_read(module, root))
  out = {"rows": args.rows}
  for name, ts in times.items():
    out[name] = {"seconds": [round(t, 3) for t in ts], "median": round(statistics.median(ts), 3)}
  if args.peer:
    out["ratio"] = round(out["fedbeam"]["median"] / out["peer"]["median"], 2)
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
