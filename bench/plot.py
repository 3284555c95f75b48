"""Charts of the benchmark results (matplotlib, Agg backend) into bench/results/*.png.

Reads bench/results/{loading,scale,pipeline}.json, whichever exist:

- per_round.png: median time per round by reader and consumption mode
  (1,000 clients), with min–max whiskers; the expansion rows; streaming time
  per client;
- round_scaling.png: milliseconds per client at 1,000 and 10,000 clients;
- load_scaling.png: time until `client_ids` is ready and RSS growth of the
  loaders at 1,000, 10,000 and 100,000 clients;
- pipeline_scaling.png: pipeline seconds and peak RSS at 1x and 10x data.

    .venv/bin/python -m bench.plot
"""

from __future__ import annotations

import os
import sys

from bench import workload as wl

COLORS = {"fedbeam": "#1f77b4", "limit": "#7f7f7f", "peer": "#d62728", "grouper": "#9467bd"}


def _color(name: str) -> str:
  if name.startswith("fedbeam"):
    return COLORS["fedbeam"]
  if name.startswith("limit"):
    return COLORS["limit"]
  if name.startswith("grouper"):
    return COLORS["grouper"]
  return COLORS["peer"]


def _label(name: str) -> str:
  return name.replace("_", " ")


def _bars(ax, rows: dict, key: str, title: str, xlabel: str, scale: float = 1.0) -> None:
  names = list(rows)
  med = [rows[n][key] * scale for n in names]
  lo = [rows[n].get("min_s", rows[n][key]) * scale for n in names] if key == "median_s" else med
  hi = [rows[n].get("max_s", rows[n][key]) * scale for n in names] if key == "median_s" else med
  y = range(len(names))
  ax.barh(
    list(y),
    med,
    color=[_color(n) for n in names],
    xerr=[[m - l for m, l in zip(med, lo)], [h - m for m, h in zip(med, hi)]],
    capsize=2,
    error_kw={"lw": 0.8},
  )
  ax.set_yticks(list(y))
  ax.set_yticklabels([_label(n) for n in names], fontsize=8)
  ax.invert_yaxis()
  ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_title(title, fontsize=10)
  for i, (m, h) in enumerate(zip(med, hi)):
    ax.text(max(m, h) * 1.03, i, f"{m:.3g}", va="center", fontsize=7)
  ax.grid(axis="x", which="both", alpha=0.3)


def _log_log(axes_and_labels, xlabel: str) -> None:
  """Log-log axes with a grid and a legend; `axes_and_labels`: (axes, y label) pairs."""
  for ax, ylabel in axes_and_labels:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=7)


def per_round_chart(plt, loading: dict, out: str) -> None:
  panels = []
  if "loading" in loading:
    panels.append(
      (
        "loading",
        "median_s",
        "Consuming 50 sampled clients (1,000 clients)",
        "seconds per round (log)",
        1.0,
      )
    )
  if "expansion" in loading:
    panels.append(
      (
        "expansion",
        "median_s",
        "3x expansion: precomputed vs on the fly",
        "seconds per round (log)",
        1.0,
      )
    )
  if "streaming" in loading:
    panels.append(
      ("streaming", "ms_per_client", "Streaming every client once", "ms per client (log)", 1.0)
    )
  if not panels:
    return
  heights = [len(loading[p[0]].get("per_round", loading[p[0]].get("per_pass"))) for p in panels]
  fig, axes = plt.subplots(
    len(panels),
    1,
    figsize=(9, 1.2 + 0.32 * sum(heights) + 0.6 * len(panels)),
    gridspec_kw={"height_ratios": heights},
  )
  if len(panels) == 1:
    axes = [axes]
  for ax, (part, key, title, xlabel, scale) in zip(axes, panels):
    rows = loading[part].get("per_round") or loading[part].get("per_pass")
    _bars(ax, rows, key, title, xlabel, scale)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def round_scaling_chart(plt, loading: dict, scale: dict, out: str) -> None:
  small = (loading.get("loading") or {}).get("per_round", {})
  big = (scale.get("rounds") or {}).get("per_round", {})
  if not small or not big:
    return
  n_small = loading["config"]["workload"]["clients"]
  n_big = scale["rounds"]["clients"]
  fig, ax = plt.subplots(figsize=(9, 5))
  markers = "osD^v<>ph*"
  for i, name in enumerate(n for n in big if n in small):
    style = "--" if "extrapolated_from_clients" in big[name] else "-"
    ax.plot(
      [n_small, n_big],
      [small[name]["ms_per_client"], big[name]["ms_per_client"]],
      style,
      marker=markers[i % len(markers)],
      color=_color(name),
      alpha=0.85,
      label=_label(name) + (" (extrapolated)" if style == "--" else ""),
    )
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  ax.set_xlabel("clients in the dataset (log)")
  ax.set_ylabel("ms per sampled client (median round / 50, log)")
  ax.set_title(
    "Per-round reading vs dataset size (blue: fedbeam, red: TFF, grey: limit)", fontsize=10
  )
  ax.grid(which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def load_scaling_chart(plt, scale: dict, out: str) -> None:
  rows = (scale.get("load") or {}).get("rows", [])
  if not rows:
    return
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  for loader, color in (("fedbeam", COLORS["fedbeam"]), ("tff_sql", COLORS["peer"])):
    pts = sorted((r["clients"], r) for r in rows if r["loader"] == loader)
    if not pts:
      continue
    xs = [p[0] for p in pts]
    label = (
      "fedbeam load_client_data" if loader == "fedbeam" else "TFF load_and_parse_sql_client_data"
    )
    a.plot(xs, [p[1]["load_s"] for p in pts], marker="o", color=color, label=label)
    b.plot(
      xs, [max(p[1]["peak_rss_growth_mb"], 0.1) for p in pts], marker="o", color=color, label=label
    )
  a.axhline(1.0, color="k", lw=0.8, ls=":", label="target: 1 s")
  b.axhline(200, color="k", lw=0.8, ls=":", label="target: 200 MB")
  _log_log(((a, "seconds until client_ids is ready"), (b, "peak RSS growth, MB")), "clients (log)")
  fig.suptitle("Loading a dataset vs number of clients", fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def pipeline_chart(plt, pipeline: dict, out: str) -> None:
  rows = pipeline.get("rows", {})
  names = []
  for key in rows:
    name = key.split("@")[0]
    if name not in names:
      names.append(name)
  if not names:
    return
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  palette = {
    "fedbeam_full": "#1f77b4",
    "fedbeam_group": "#17becf",
    "plain_beam": "#ff7f0e",
    "plain_beam_tuned": "#e7ba52",
    "grouper": "#9467bd",
    "tff_sqlite": "#d62728",
  }
  for name in names:
    pts = sorted(
      (r["input_examples"], r)
      for k, r in rows.items()
      if k.split("@")[0] == name and "pipeline_s" in r
    )
    if not pts:
      continue
    xs = [p[0] for p in pts]
    a.plot(xs, [p[1]["pipeline_s"] for p in pts], marker="o", label=name, color=palette.get(name))
    b.plot(
      xs,
      [p[1].get("peak_pss_mb", p[1]["peak_rss_mb"]) / 1024 for p in pts],
      marker="o",
      label=name,
      color=palette.get(name),
    )
  _log_log(
    ((a, "pipeline seconds"), (b, "peak PSS of the process tree, GiB")), "input examples (log)"
  )
  fig.suptitle(
    "Building client datasets: 1x, 3x and 10x data (Beam: 2 worker processes; "
    "missing points: the run did not complete)",
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  del argv
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  loading = wl.read_json("loading.json") or {}
  scale = wl.read_json("scale.json") or {}
  pipeline = wl.read_json("pipeline.json") or {}
  os.makedirs(wl.RESULTS_DIR, exist_ok=True)
  per_round_chart(plt, loading, os.path.join(wl.RESULTS_DIR, "per_round.png"))
  round_scaling_chart(plt, loading, scale, os.path.join(wl.RESULTS_DIR, "round_scaling.png"))
  load_scaling_chart(plt, scale, os.path.join(wl.RESULTS_DIR, "load_scaling.png"))
  pipeline_chart(plt, pipeline, os.path.join(wl.RESULTS_DIR, "pipeline_scaling.png"))
  print("charts written to", os.path.relpath(wl.RESULTS_DIR, wl.ROOT))
  return 0


if __name__ == "__main__":
  sys.exit(main())
