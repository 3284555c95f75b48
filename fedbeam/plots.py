"""PNG plots of a store and of a training run: `fedbeam inspect --plot`, `fedbeam train --plot`.

matplotlib is imported inside each function (with the non-interactive Agg
backend chosen on the figure's canvas, not process-wide), so importing this
module, the CLI or the pipelines costs nothing.
"""

from __future__ import annotations

import csv
import math
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

if TYPE_CHECKING:
  from fedbeam.label_distribution import LabelDistribution

__all__ = ["plot_accuracy", "plot_client_sizes", "plot_label_distribution", "read_accuracy"]


def _figure(width: float = 6.0, height: float = 3.5):
  """A matplotlib Figure with an Agg canvas (no pyplot, no global backend switch)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def plot_client_sizes(sizes: Mapping[str, Sequence[int]], path: str, title: str = "") -> None:
  """Writes a PNG histogram of examples per client, one series per split, log count axis.

  Args:
    sizes: split name -> the examples of each of its clients (from the
      manifest: `fedbeam.format.manifest.read_manifest`).
    path: the PNG file to write.
    title: the plot's title (default: "Client sizes").

  Raises:
    ValueError: no split holds a client.
    OSError: the file cannot be written.
  """
  names = [name for name in sorted(sizes) if len(sizes[name])]
  if not names:
    raise ValueError("no client to plot")
  largest = max(max(sizes[name]) for name in names)
  bins = min(50, largest + 1)
  fig = _figure()
  ax = fig.add_subplot()
  ax.hist(
    [list(sizes[name]) for name in names],
    bins=bins,
    range=(0, largest + 1),
    label=[f"{name} ({len(sizes[name])} clients)" for name in names],
    histtype="step",
    linewidth=1.5,
  )
  ax.set_yscale("log")
  ax.set_xlabel("examples per client")
  ax.set_ylabel("clients (log scale)")
  ax.set_title(title or "Client sizes")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def plot_label_distribution(distribution: LabelDistribution, path: str, title: str = "") -> None:
  """Writes a PNG stacked bar chart: each client's examples by label, one bar per client.

  Args:
    distribution: a `fedbeam.label_distribution.LabelDistribution`.
    path: the PNG file to write.
    title: the plot's title (default: names the feature and both entropies).

  Raises:
    ValueError: no client holds an example.
    OSError: the file cannot be written.
  """
  counts = distribution.counts
  if not counts.size or not counts.sum():
    raise ValueError("no example to plot")
  fig = _figure(width=max(6.0, 0.25 * len(distribution.client_ids) + 2.0), height=4.0)
  ax = fig.add_subplot()
  positions = list(range(len(distribution.client_ids)))
  bottom = [0] * len(positions)
  colors = _label_colors(len(distribution.labels))
  for j, label in enumerate(distribution.labels):
    column = [int(c) for c in counts[:, j]]
    ax.bar(positions, column, bottom=bottom, color=colors[j], label=label, width=0.85)
    bottom = [b + c for b, c in zip(bottom, column)]
  ax.set_xticks(positions)
  ax.set_xticklabels(distribution.client_ids, rotation=90, fontsize=6)
  ax.set_xlabel("client")
  ax.set_ylabel("examples")
  ax.set_title(
    title
    or (
      f"{distribution.feature} per client: mean client entropy "
      f"{distribution.mean_client_entropy:.2f} bits, pooled {distribution.pooled_entropy:.2f}"
    ),
    fontsize=9,
  )
  if len(distribution.labels) <= 20:
    ax.legend(fontsize=6, ncol=2, loc="upper right", title=distribution.feature)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _label_colors(n: int) -> list:
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top

  cmap = colormaps["tab20" if n > 10 else "tab10"]
  return [cmap(i % cmap.N) for i in range(n)]


def read_accuracy(metrics_csv: str) -> tuple[list[int], list[float], list[float]]:
  """(rounds, train accuracy, test accuracy) from `fedbeam train`'s metrics.csv (NaN: none).

  Raises:
    OSError: the file cannot be read. ValueError: it is not a metrics.csv.
  """
  with open(metrics_csv, encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f))
  try:
    rounds = [int(r["round"]) for r in rows]
    train = [float(r["train_accuracy"]) if r["train_accuracy"] else math.nan for r in rows]
    test = [float(r["test_accuracy"]) if r["test_accuracy"] else math.nan for r in rows]
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{metrics_csv}: not a fedbeam train metrics.csv ({e})") from None
  return rounds, train, test


def plot_accuracy(
  metrics_csv: str, path: str, title: str = "", chance: Optional[float] = None
) -> None:
  """Writes a PNG of train and test accuracy per round from `fedbeam train`'s metrics.csv.

  Rounds without evaluation have no test point; `chance`, if given, is drawn
  as a dashed line.

  Raises:
    ValueError: the file holds no round, or is not a metrics.csv.
    OSError: a file cannot be read or written.
  """
  rounds, train, test = read_accuracy(metrics_csv)
  if not rounds:
    raise ValueError(f"{metrics_csv}: no round to plot")
  fig = _figure()
  ax = fig.add_subplot()
  evaluated = [(r, a) for r, a in zip(rounds, test) if not math.isnan(a)]
  if evaluated:
    ax.plot(*zip(*evaluated), marker="o", label="test (held-out clients)")
  ax.plot(rounds, train, marker=".", alpha=0.6, label="train (sampled clients)")
  if chance is not None:
    ax.axhline(chance, color="grey", linestyle="--", label="chance")
  ax.set_xlabel("round")
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1)
  ax.set_title(title or "Accuracy per round")
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
