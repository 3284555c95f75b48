"""Checkpoints of the loop's state: written atomically, read back checked whole.

A checkpoint is an uncompressed `.npz` (a zip of `.npy` arrays): the round
number, the trainable and non-trainable weights, the server optimizer's
values, and a JSON metadata document (settings, store identity). `load_state`
checks every entry's CRC-32, count, dtype and shape against the model before
it allocates an array, so a damaged or foreign file raises `CheckpointError`
naming the file and the fault instead of yielding a half-read state.

Checkpoints are written with `fedbeam.format.fs.atomic_write`, the one
atomic file write of the project (store files, config.json, metrics.csv).
"""

from __future__ import annotations

import io
import json
from typing import Any, Optional
import zipfile

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedbeam.format.fs import atomic_write, file_info, open_read
from fedbeam.runtime.simulation.read_errors import error_cause
from fedbeam.runtime.simulation.types import SimulationState

__all__ = ["CheckpointError", "load_state", "save_state"]


class CheckpointError(ValueError):
  """A checkpoint that cannot be resumed from; the message names the file and the fault.

  Raised for a missing, truncated or damaged file, something else in its
  place (a directory, a FIFO), and a file whose arrays do not fit the model
  and server optimizer (counts, shapes, dtypes).
  """


# Bytes a checkpoint holds beyond its arrays' data: the metadata document
# (settings, store identity), npy headers and zip records.
_CHECKPOINT_OVERHEAD_BYTES = 16 << 20
# Groups of numbered arrays in a checkpoint, with what a message calls them.
_ARRAY_GROUPS = (
  ("trainable", "trainable weights"),
  ("non_trainable", "non-trainable weights"),
  ("server_optimizer", "server optimizer values"),
)


def _state_arrays(state: SimulationState) -> dict[str, np.ndarray]:
  """The numbered arrays of a state, keyed as in the checkpoint (without the metadata)."""
  arrays: dict[str, np.ndarray] = {"round_num": np.asarray(state.round_num, np.int64)}
  values = (
    state.model_weights.trainable,
    state.model_weights.non_trainable,
    tf.nest.flatten(state.server_optimizer_state),
  )
  for (prefix, _), group in zip(_ARRAY_GROUPS, values):
    for i, w in enumerate(group):
      arrays[f"{prefix}/{i}"] = np.asarray(w)
  return arrays


def save_state(
  path: str, state: SimulationState, metadata: Optional[dict[str, Any]] = None
) -> None:
  """Writes `state` to `path` atomically (a temporary file, then a rename).

  A reader never sees a partial file: a crash leaves the previous checkpoint
  or the new one. (On object stores such as `gs://` a rename is a copy; the
  file is still complete or absent.) The file is an uncompressed `.npz`
  (a zip of `.npy` arrays), whose per-entry CRC-32 `load_state` checks.

  Args:
    path: Destination file (a local path or a URL such as gs://...).
    state: The state to save.
    metadata: JSON-serializable facts stored beside it (seed, flags...).
  """
  arrays = _state_arrays(state)
  arrays["metadata"] = np.asarray(json.dumps(metadata or {}, sort_keys=True))
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  atomic_write(path, buffer.getvalue())


def _checkpoint_bytes(path: str, limit: int) -> bytes:
  """The content of a checkpoint file that is a regular file of at most `limit` bytes."""
  try:
    # Checked before opening: opening a FIFO would wait for a writer.
    info = file_info(path, follow_links=True)
    if info.kind == "directory":
      raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not info.is_file:
      raise CheckpointError(f"checkpoint {path} is not a regular file")
    size = info.size
    if size > limit:
      raise CheckpointError(
        f"checkpoint {path} is {size} bytes, more than a checkpoint of this model "
        f"and server optimizer can be ({limit} bytes)"
      )
    with open_read(path) as f:
      return f.read()
  except (FileNotFoundError, tf.errors.NotFoundError):
    raise CheckpointError(f"checkpoint {path} does not exist") from None
  except (OSError, tf.errors.OpError) as error:
    raise CheckpointError(f"checkpoint {path} cannot be read: {error_cause(error)}") from None


def _npy_header(entry) -> tuple[tuple[int, ...], np.dtype]:
  """`(shape, dtype)` from an `.npy` header, read before any array data is allocated."""
  version = np.lib.format.read_magic(entry)
  if version == (1, 0):
    shape, _, dtype = np.lib.format.read_array_header_1_0(entry)
  elif version == (2, 0):
    shape, _, dtype = np.lib.format.read_array_header_2_0(entry)
  else:
    raise ValueError(f"npy format version {version} is not one save_state writes")
  return shape, dtype


def _checkpoint_arrays(
  path: str, content: bytes, expected: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
  """Reads the arrays of a checkpoint, each checked against `expected` before it is read.

  `expected` maps entry names (without `.npy`) to arrays of the wanted shape
  and dtype; `metadata` must be a 0-d unicode string.
  """
  try:
    archive = zipfile.ZipFile(io.BytesIO(content))
    damaged = archive.testzip()
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
    raise CheckpointError(
      f"checkpoint {path} is truncated or damaged (not a complete .npz file: {error_cause(error)})"
    ) from None
  if damaged is not None:
    raise CheckpointError(
      f"checkpoint {path} is damaged: its entry {damaged} fails its CRC-32 check"
    )
  names = {n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")}
  if len(names) != len(archive.namelist()):
    raise CheckpointError(f"checkpoint {path} holds entries that are not .npy arrays")
  for prefix, label in _ARRAY_GROUPS:
    have = sum(1 for n in names if n.startswith(prefix + "/"))
    want = sum(1 for n in expected if n.startswith(prefix + "/"))
    if have != want:
      raise CheckpointError(
        f"checkpoint {path} holds {have} {label}, this model and server optimizer have {want}"
      )
  wanted = set(expected) | {"metadata"}
  if names != wanted:
    raise CheckpointError(
      f"checkpoint {path} lacks entries {sorted(wanted - names)} and has unexpected "
      f"entries {sorted(names - wanted)}"
    )
  arrays = {}
  for name in sorted(wanted):
    try:
      with archive.open(name + ".npy") as entry:
        shape, dtype = _npy_header(entry)
      if name == "metadata":
        fits = dtype.kind == "U" and shape == ()
        want = "a unicode string of shape ()"
      else:
        like = expected[name]
        fits = dtype == like.dtype and shape == like.shape
        want = f"{like.dtype.name} of shape {like.shape}"
      if not fits:
        raise CheckpointError(
          f"checkpoint {path}: {name} is {dtype.name} of shape {shape}, this model and "
          f"server optimizer need {want}"
        )
      with archive.open(name + ".npy") as entry:
        arrays[name] = np.lib.format.read_array(entry, allow_pickle=False)
        trailing = len(entry.read())
    except CheckpointError:
      raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
      raise CheckpointError(
        f"checkpoint {path}: {name} is damaged ({error_cause(error)})"
      ) from None
    if trailing:
      raise CheckpointError(f"checkpoint {path}: {name} has {trailing} bytes after its array data")
  return arrays


def load_state(path: str, like: SimulationState) -> tuple[SimulationState, dict[str, Any]]:
  """Reads a state written by `save_state`, checked whole before it is returned.

  Every entry's CRC-32, count, shape and dtype are checked against `like`
  (the shapes before any array is read), so a damaged file never yields a
  half-read or misshapen state.

  Args:
    path: The checkpoint file.
    like: A state of the same model and server optimizer (e.g.
      `SimulationLoop.state`), which gives the arrays' shapes and dtypes and
      the optimizer state's structure.

  Returns:
    `(state, metadata)`.

  Raises:
    CheckpointError: (a ValueError) If the file is missing, not a regular
      file, truncated or damaged, or does not hold a state shaped like
      `like`; the message names the file and what is wrong.
  """
  expected = _state_arrays(like)
  limit = _CHECKPOINT_OVERHEAD_BYTES + sum(a.nbytes for a in expected.values())
  arrays = _checkpoint_arrays(path, _checkpoint_bytes(path, limit), expected)
  try:
    metadata = json.loads(str(arrays["metadata"]))
  except json.JSONDecodeError as error:
    raise CheckpointError(f"checkpoint {path}: its metadata is not JSON ({error})") from None
  if not isinstance(metadata, dict):
    raise CheckpointError(f"checkpoint {path}: its metadata is not a JSON object")
  round_num = int(arrays["round_num"])
  if round_num < 0:
    raise CheckpointError(f"checkpoint {path}: round number {round_num} is negative")
  if "round_num" in metadata and metadata["round_num"] != round_num:
    raise CheckpointError(
      f"checkpoint {path}: round number {round_num}, but its metadata says "
      f"{metadata['round_num']!r}"
    )

  def group(prefix: str) -> list[np.ndarray]:
    count = sum(1 for n in expected if n.startswith(prefix + "/"))
    return [arrays[f"{prefix}/{i}"] for i in range(count)]

  state = SimulationState(
    round_num=round_num,
    model_weights=tff.learning.models.ModelWeights(
      trainable=group("trainable"),
      non_trainable=group("non_trainable"),
    ),
    server_optimizer_state=tf.nest.pack_sequence_as(
      like.server_optimizer_state, group("server_optimizer")
    ),
  )
  return state, metadata
