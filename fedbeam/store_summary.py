"""What `fedbeam inspect` reports about a store: counts, sizes, parameters."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedbeam.format.layout import StoreFormatError
from fedbeam.format.manifest import read_manifest
from fedbeam.format.metadata import read_metadata

__all__ = [
  "PERCENTILES",
  "summarize_store",
  "format_summary",
]

PERCENTILES = (("min", 0), ("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))


def summarize_store(path: str) -> dict[str, Any]:
  """Returns a JSON-ready summary of the committed store at `path`.

  Keys: format_version, path, splits ({name: {num_clients, num_examples,
  num_bytes, num_empty_clients, client_size: {min, p50, p90, p99, max}}}),
  empty_clients (count), empty_client_report, element_spec, num_shards,
  parameters.

  Raises:
    StoreFormatError: no committed store at `path`, or a damaged one.
  """
  metadata = read_metadata(path)
  sizes: dict[str, list[int]] = {s["name"]: [] for s in metadata["splits"]}
  for row in read_manifest(path, metadata):
    if row["split"] not in sizes:
      raise StoreFormatError(
        f"{path}: manifest row for client {row['client_id']!r} names split "
        f"{row['split']!r}, which the metadata does not list"
      )
    sizes[row["split"]].append(int(row["num_examples"]))
  splits = {}
  for s in metadata["splits"]:
    counts = np.array(sizes[s["name"]], dtype=np.int64)
    if len(counts) != s["num_clients"]:
      raise StoreFormatError(
        f"{path}: split {s['name']!r} lists {s['num_clients']} clients in the metadata "
        f"but {len(counts)} in the manifest"
      )
    pct = (
      {name: int(np.percentile(counts, q, method="nearest")) for name, q in PERCENTILES}
      if len(counts)
      else {name: 0 for name, _ in PERCENTILES}
    )
    splits[s["name"]] = {
      "num_clients": s["num_clients"],
      "num_examples": s["num_examples"],
      "num_bytes": s["num_bytes"],
      "num_empty_clients": s["num_empty_clients"],
      "client_size": pct,
    }
  return {
    "path": path,
    "format_version": metadata["format_version"],
    "fedbeam_version": metadata["fedbeam_version"],
    "splits": splits,
    "empty_clients": metadata["empty_clients"]["found"],
    "empty_client_report": metadata["empty_clients"],
    "element_spec": {
      f["name"]: {"dtype": f["dtype"], "shape": f["shape"]} for f in metadata["element_spec"]
    },
    "num_shards": metadata["num_shards"],
    "parameters": metadata["parameters"],
  }


def format_summary(summary: dict[str, Any]) -> str:
  """Human-readable form of `summarize_store`'s result."""
  lines = [
    f"fedbeam store {summary['path']} (format v{summary['format_version']}, "
    f"written by fedbeam {summary['fedbeam_version']})"
  ]
  for name, s in summary["splits"].items():
    c = s["client_size"]
    lines.append(
      f"  split {name}: {s['num_clients']} clients, {s['num_examples']} examples, "
      f"{s['num_bytes']} bytes, {s['num_empty_clients']} empty"
    )
    lines.append(
      f"    examples per client: min {c['min']}, p50 {c['p50']}, p90 {c['p90']}, "
      f"p99 {c['p99']}, max {c['max']}"
    )
  r = summary["empty_client_report"]
  lines.append(
    f"  empty clients: {r['found']} found, policy {r['policy']}, {r['dropped']} dropped"
    + (f" (e.g. {', '.join(map(repr, r['sample'][:5]))})" if r["sample"] else "")
  )
  spec = ", ".join(f"{k}: {v['dtype']}{v['shape']}" for k, v in summary["element_spec"].items())
  lines.append(f"  element spec: {spec}")
  params = ", ".join(f"{k}={v}" for k, v in summary["parameters"].items() if v is not None)
  lines.append(f"  parameters: {params}")
  return "\n".join(lines)
