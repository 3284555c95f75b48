"""The figure of docs/cli.md's partitioner section: labels per client after `--partition dirichlet`.

Writes scikit-learn's 1,797 handwritten digits as TFRecord files without a
client id (`fedbeam.demo.write_input`), runs the documented command

    fedbeam prepare --input 'digits-*.tfrecord' --input-format tfrecord \\
      --partition dirichlet --label-key label --num-clients 20 --dirichlet-alpha A \\
      --partition-seed 0 --element-spec element_spec.json --output store-A

for A = 0.1, 0.5 and 100, reads each store's client files back and draws the
number of examples of each label per client, one panel per alpha.

    .venv/bin/python -m bench.partition_figure > build/bench/logs/partition_figure.log 2>&1

Writes docs/partition-dirichlet.png.
"""

from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR = os.path.join(ROOT, "build", "partition-figure")
FIGURE = os.path.join(ROOT, "docs", "partition-dirichlet.png")
ALPHAS = (0.1, 0.5, 100.0)
NUM_CLIENTS = 20


def label_counts(store: str) -> np.ndarray:
  """[clients, 10] examples per label, clients in the order 0..N-1, from the client files."""
  from fedbeam.label_distribution import read_label_distribution  # pylint: disable=g-import-not-at-top

  d = read_label_distribution(store, "label", max_clients=NUM_CLIENTS)
  out = np.zeros((NUM_CLIENTS, 10), np.int64)
  for i, client_id in enumerate(d.client_ids):
    for j, label in enumerate(d.labels):
      out[int(client_id), int(label)] = d.counts[i, j]
  return out


def main() -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from fedbeam import cli, demo  # pylint: disable=g-import-not-at-top

  images, labels = demo.load_digits_examples()
  input_dir = os.path.join(WORKDIR, "input")
  pattern = demo.write_input(images, labels, input_dir)
  counts = {}
  for alpha in ALPHAS:
    store = os.path.join(WORKDIR, f"store-{alpha:g}")
    rc = cli.main(
      [
        "prepare",
        "--input",
        pattern,
        "--input-format",
        "tfrecord",
        "--partition",
        "dirichlet",
        "--label-key",
        "label",
        "--num-clients",
        str(NUM_CLIENTS),
        "--dirichlet-alpha",
        f"{alpha:g}",
        "--partition-seed",
        "0",
        "--element-spec",
        os.path.join(input_dir, "element_spec.json"),
        "--output",
        store,
        "--overwrite",
      ]
    )
    if rc != 0:
      return rc
    counts[alpha] = label_counts(store)
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(len(ALPHAS), 1, figsize=(8, 2.4 * len(ALPHAS)), sharex=True)
  colors = plt.get_cmap("tab10").colors
  for ax, alpha in zip(axes, ALPHAS):
    c = counts[alpha]
    bottom = np.zeros(NUM_CLIENTS)
    for label in range(10):
      ax.bar(
        np.arange(NUM_CLIENTS),
        c[:, label],
        bottom=bottom,
        color=colors[label],
        label=str(label),
        width=0.85,
      )
      bottom += c[:, label]
    ax.set_ylabel("examples")
    ax.set_title(f"--dirichlet-alpha {alpha:g}", fontsize=10)
  axes[-1].set_xlabel("client id")
  axes[-1].set_xticks(np.arange(NUM_CLIENTS))
  axes[0].legend(
    title="label",
    ncol=10,
    fontsize=7,
    title_fontsize=8,
    loc="upper right",
    bbox_to_anchor=(1.0, 1.45),
  )
  fig.suptitle(
    "fedbeam prepare --partition dirichlet: labels per client (1,797 digits, "
    f"{NUM_CLIENTS} clients, seed 0)",
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(FIGURE, dpi=100)
  plt.close(fig)
  for alpha in ALPHAS:
    c = counts[alpha]
    top = np.mean(c.max(axis=1) / np.maximum(c.sum(axis=1), 1))
    print(
      f"alpha {alpha:g}: sizes {sorted(c.sum(axis=1).tolist())}; mean share of a client's "
      f"top label {top:.2f}"
    )
  print(f"figure: {FIGURE}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
