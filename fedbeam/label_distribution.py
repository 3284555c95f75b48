"""Labels per client of a store: `fedbeam inspect --plot FILE.png --label-feature NAME`.

Reads the first clients' files (in manifest order: sorted by client id) with
the store's own codec, without TensorFlow, and counts each client's values of
one label feature. The mean per-client label entropy against the entropy of
the same clients' pooled labels says how non-IID the clients are: equal for
clients that all follow one distribution, far lower when each holds few labels.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Sequence

import numpy as np

from fedbeam.format.codec import decode_examples
from fedbeam.format.fs import read_store_file
from fedbeam.format.layout import StoreFormatError, client_relative_path, join
from fedbeam.format.manifest import read_manifest
from fedbeam.format.metadata import data_root, read_metadata
from fedbeam.format.spec import ElementSpec
from fedbeam.format.tfrecord import read_tfrecords

__all__ = ["LabelDistribution", "entropy_bits", "read_label_distribution"]


@dataclasses.dataclass(frozen=True)
class LabelDistribution:
  """Label counts of some clients of a store.

  `labels` are the distinct values, sorted (strings decoded as UTF-8 where
  they are); `counts[i, j]` is how many examples of client `client_ids[i]`
  hold `labels[j]`.
  """

  feature: str
  client_ids: tuple[str, ...]
  labels: tuple[str, ...]
  counts: np.ndarray

  @property
  def mean_client_entropy(self) -> float:
    """Mean over the clients (with examples) of their label entropy, in bits."""
    rows = [r for r in self.counts if r.sum()]
    return float(np.mean([entropy_bits(r) for r in rows])) if rows else 0.0

  @property
  def pooled_entropy(self) -> float:
    """The label entropy of the clients' examples taken together, in bits."""
    return entropy_bits(self.counts.sum(axis=0))


def entropy_bits(counts: Sequence[int]) -> float:
  """Shannon entropy (bits) of the distribution that `counts` are draws of; 0 for no draws."""
  c = np.asarray(counts, dtype=np.float64)
  total = c.sum()
  if total <= 0:
    return 0.0
  p = c[c > 0] / total
  return float(-(p * np.log2(p)).sum()) + 0.0


def _label_text(value) -> str:
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      return repr(value)
  return str(value.item() if hasattr(value, "item") else value)


def read_label_distribution(store: str, feature: str, max_clients: int = 30) -> LabelDistribution:
  """Counts the values of `feature` in each of the store's first `max_clients` clients.

  Args:
    store: a committed store (local or gs://).
    feature: a feature of the store's element spec holding one value per
      example (shape `[]` or `[1]`), e.g. a class label.
    max_clients: how many clients to read, in manifest order (sorted ids).

  Raises:
    ValueError: `feature` is not in the element spec, or holds more than one
      value per example; `max_clients` < 1.
    StoreFormatError: the store, its manifest or a client file is damaged.
  """
  if max_clients < 1:
    raise ValueError(f"max_clients must be >= 1, got {max_clients}")
  metadata = read_metadata(store)
  spec = ElementSpec.from_metadata(metadata["element_spec"])
  if feature not in spec.names:
    raise ValueError(
      f"--label-feature {feature!r} is not a feature of store {store} (features: {spec.names})"
    )
  f = spec[feature]
  if f.is_variable_length or math.prod(f.shape) != 1:
    raise ValueError(
      f"--label-feature {feature!r} has shape {list(f.shape)}; a label holds one value per example"
    )
  label_spec = ElementSpec((f,))
  data_dir = data_root(store, metadata)
  client_ids, values = [], []
  for row in read_manifest(store, metadata):
    if len(client_ids) == max_clients:
      break
    cid = row["client_id"]
    client_ids.append(cid)
    if not row["num_examples"]:
      values.append([])
      continue
    path = join(data_dir, client_relative_path(cid, row["split"], metadata["num_shards"]))
    data = read_store_file(store, path, int(row["num_bytes"]), f"client file of {cid!r}")
    records = list(read_tfrecords(io.BytesIO(data)))
    if len(records) != row["num_examples"]:
      raise StoreFormatError(
        f"store {store} is damaged: client {cid!r} holds {len(records)} records, the manifest "
        f"says {row['num_examples']}"
      )
    column = decode_examples(records, label_spec)[feature].reshape(-1)
    values.append([_label_text(v) for v in column])
  labels = sorted({v for vs in values for v in vs}, key=lambda s: (len(s), s))
  index = {label: j for j, label in enumerate(labels)}
  counts = np.zeros((len(client_ids), len(labels)), dtype=np.int64)
  for i, vs in enumerate(values):
    for v in vs:
      counts[i, index[v]] += 1
  return LabelDistribution(feature, tuple(client_ids), tuple(labels), counts)
