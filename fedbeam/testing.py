"""Helpers for testing pipelines that produce or consume fedbeam stores.

Build small client inputs in memory, prepare a store from them with the local
in-process Beam runner, and compare a store with the clients you expect::

    # test_my_data.py
    import numpy as np
    from fedbeam import testing

    def test_my_store(tmp_path):
      clients = {
          "alice": [{"x": np.float32(1.5), "label": 0}, {"x": np.float32(2.0), "label": 1}],
          "bob": [{"x": np.float32(0.5), "label": 1}],
      }
      store = testing.prepare_store(clients, tmp_path, order_by="@input")
      testing.assert_store_equals(store, clients)

`write_tfrecord_input`, `write_avro_input` and `write_tff_sqlite_input` write
three of the input formats of `fedbeam prepare`; `prepare_store` runs the prepare
job on them; `read_store` and `assert_store_equals` read a store back through
`fedbeam.runtime.load_client_data`, the loader users train from.

Elements are flat dicts `feature name -> value`; a value is anything
`np.asarray` accepts (Python or numpy scalars, lists, arrays, `str` or
`bytes`).

Importing this module does not import TensorFlow Federated: only
`write_tff_sqlite_input`, `read_store` and `assert_store_equals` do, when
called.
"""

from __future__ import annotations

import collections
import os
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np

from fedbeam.format.layout import UNSPLIT, client_relative_path, join
from fedbeam.format.metadata import read_metadata
from fedbeam.format.spec import ElementSpec
from fedbeam.format.tfrecord import tfrecord_frame

if TYPE_CHECKING:
  import tensorflow as tf

Element = Mapping[str, Any]
Clients = Mapping[str, Sequence[Element]]

__all__ = [
  "write_tfrecord_input",
  "write_unkeyed_tfrecord_input",
  "write_avro_input",
  "write_tff_sqlite_input",
  "prepare_store",
  "read_store",
  "client_file",
  "dataset_elements",
  "assert_store_equals",
  "assert_elements_equal",
]


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------


def _as_array(value: Any) -> np.ndarray:
  """A value as numpy; strings as an object array of `bytes`.

  Python `bytes` and `str` go through an object array: numpy's fixed-width
  bytes dtype would drop trailing NUL bytes.
  """
  if isinstance(value, np.ndarray):
    arr = value
  else:
    arr = np.asarray(value)
    if arr.dtype.kind in ("S", "U"):
      arr = np.array(value, dtype=object)
  if arr.dtype.kind in ("S", "U", "O"):
    flat = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in arr.reshape(-1).tolist()]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(arr.shape)
  return arr


def _as_values(value: Any) -> np.ndarray:
  """A value as a flat numpy array; `str` items become UTF-8 `bytes`."""
  return _as_array(value).reshape(-1)


def _example_bytes(
  element: Element, client_id: Optional[str], client_id_key: Optional[str]
) -> bytes:
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top

  example = example_pb2.Example()
  fmap = example.features.feature
  if client_id_key is not None:
    fmap[client_id_key].bytes_list.value.append(client_id.encode("utf-8"))
  for name, value in element.items():
    if name == client_id_key:
      raise ValueError(
        f"element of client {client_id!r} has a feature named like the "
        f"client-id key {client_id_key!r}"
      )
    arr = _as_values(value)
    if arr.dtype == object:
      fmap[name].bytes_list.value.extend(arr.tolist())
    elif arr.dtype.kind == "f":
      fmap[name].float_list.value.extend(arr.astype(np.float32).tolist())
    elif arr.dtype.kind in ("i", "u", "b"):
      fmap[name].int64_list.value.extend(arr.astype(np.int64).tolist())
    else:
      raise ValueError(
        f"feature {name!r}: cannot store numpy dtype {arr.dtype} in a tf.train.Example"
      )
  return example.SerializeToString(deterministic=True)


def _ensure_parent(path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)


def write_tfrecord_input(
  path: Union[str, os.PathLike], clients: Clients, client_id_key: str = "client_id"
) -> str:
  """Writes clients as one TFRecord file of serialized `tf.train.Example`.

  Input of `fedbeam prepare --input-format tfrecord --client-id-key KEY`.
  Each element becomes one record with the client id in the bytes feature
  `client_id_key`; strings go to `bytes_list`, floating values to
  `float_list` (float32), integers and bools to `int64_list`. Records are
  written client by client in the mapping's order, elements in list order.

  Args:
    path: the file to write (parent directories are created).
    clients: `{client_id: [element dict, ...]}`. A client with no element
      writes nothing (TFRecord input cannot declare an empty client).
    client_id_key: the feature that holds the client id.

  Returns:
    `path` as a string.

  Raises:
    ValueError: an element has a feature named `client_id_key`, or a value
      with a dtype `tf.train.Example` cannot hold.
  """
  path = os.fspath(path)
  _ensure_parent(path)
  with open(path, "wb") as f:
    for client_id, elements in clients.items():
      for element in elements:
        f.write(tfrecord_frame(_example_bytes(element, client_id, client_id_key)))
  return path


def write_unkeyed_tfrecord_input(path: Union[str, os.PathLike], elements: Sequence[Element]) -> str:
  """Writes elements as one TFRecord file of serialized `tf.train.Example` without client ids.

  Input of `fedbeam prepare --input-format tfrecord --partition ...`: one
  record per element, in list order, values stored as `write_tfrecord_input`
  stores them. Returns `path` as a string; raises ValueError for a value a
  `tf.train.Example` cannot hold.
  """
  path = os.fspath(path)
  _ensure_parent(path)
  with open(path, "wb") as f:
    for element in elements:
      f.write(tfrecord_frame(_example_bytes(element, None, None)))
  return path


def _avro_type(name: str, value: Any) -> Any:
  if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0):
    arr = np.asarray(value)
    if arr.ndim != 1:
      raise ValueError(
        f"feature {name!r}: Avro input holds flat arrays only, got shape {arr.shape}"
      )
    if arr.size == 0:
      raise ValueError(
        f"feature {name!r}: cannot infer the Avro item type of an empty array; pass `schema`"
      )
    return {"type": "array", "items": _avro_type(name, arr.reshape(-1)[0])}
  if isinstance(value, (bool, np.bool_)):
    return "boolean"
  if isinstance(value, str):
    return "string"
  if isinstance(value, bytes):
    return "bytes"
  if isinstance(value, np.int32):
    return "int"
  if isinstance(value, (int, np.integer)):
    return "long"
  if isinstance(value, np.float32):
    return "float"
  if isinstance(value, (float, np.floating)):
    return "double"
  raise ValueError(f"feature {name!r}: no Avro type for {type(value).__name__} {value!r}")


def _avro_value(value: Any) -> Any:
  if isinstance(value, np.ndarray):
    return [_avro_value(v) for v in value.tolist()]
  if isinstance(value, (list, tuple)):
    return [_avro_value(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def write_avro_input(
  path: Union[str, os.PathLike],
  clients: Clients,
  client_id_key: Optional[str] = "client_id",
  schema: Optional[Mapping[str, Any]] = None,
) -> str:
  """Writes clients as one Avro container file of flat records.

  Input of `fedbeam prepare --input-format avro --client-id-key KEY`.

  Args:
    path: the file to write (parent directories are created).
    clients: `{client_id: [element dict, ...]}`; elements become records with
      the id in the string field `client_id_key`.
    client_id_key: the field that holds the client id; None writes records
      without one (input of `--partition`; the mapping's keys are then unused).
    schema: the Avro record schema to write with. Default: derived from the
      first element: `str` -> string, `bytes` -> bytes, `bool` -> boolean,
      `np.int32` -> int, other integers -> long, `np.float32` -> float, other
      floats -> double, 1-D lists/arrays -> array of the item type.

  Returns:
    `path` as a string.

  Raises:
    ValueError: no element to derive a schema from, or a value with no Avro
      type.
  """
  import fastavro  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if schema is None:
    elements = [e for client in clients.values() for e in client]
    if not elements:
      raise ValueError("no element to derive an Avro schema from; pass `schema`")
    fields = [{"name": client_id_key, "type": "string"}] if client_id_key is not None else []
    for name in elements[0]:
      # The first non-empty value says an array's item type.
      sample = next((e[name] for e in elements if np.size(e[name]) > 0), elements[0][name])
      fields.append({"name": name, "type": _avro_type(name, sample)})
    schema = {"type": "record", "name": "ClientExample", "fields": fields}
  rows = []
  for client_id, elements in clients.items():
    for element in elements:
      row = {client_id_key: client_id} if client_id_key is not None else {}
      row.update({k: _avro_value(v) for k, v in element.items()})
      rows.append(row)
  _ensure_parent(path)
  with open(path, "wb") as f:
    # A fixed sync marker keeps the file identical from run to run.
    fastavro.writer(
      f, fastavro.parse_schema(dict(schema)), rows, codec="null", sync_marker=b"fedbeam-testing!"
    )
  return path


def _tensor_specs(element_spec: Any) -> "collections.OrderedDict[str, Any]":
  """An ElementSpec, its JSON form or a mapping of tf.TensorSpec -> OrderedDict of tf.TensorSpec."""
  if isinstance(element_spec, ElementSpec):
    return element_spec.to_tensor_specs()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if all(isinstance(v, tf.TensorSpec) for v in element_spec.values()):
    return collections.OrderedDict(element_spec)
  return ElementSpec.from_json(element_spec).to_tensor_specs()


def write_tff_sqlite_input(
  path: Union[str, os.PathLike],
  clients: Clients,
  element_spec: Any,
  split_names_by_client_id: Optional[Mapping[str, str]] = None,
) -> str:
  """Writes clients with TFF's own `save_to_sql_client_data`.

  Input of `fedbeam prepare --input-format tff-sqlite`. TFF serializes each
  element as a `tf.train.Example` (strings must be scalars; TFF's SQL parser
  reads fixed shapes only). A client with no element is written too: TFF
  lists it in its `client_metadata` table with 0 examples.

  Args:
    path: the database file to create (it must not exist).
    clients: `{client_id: [element dict, ...]}`.
    element_spec: the elements' spec: a mapping of `tf.TensorSpec`, an
      `ElementSpec` or its JSON form (`{"x": {"dtype": "float32", "shape":
      [2]}}`); every shape must be fully defined.
    split_names_by_client_id: passed to TFF (its `split_name` column).

  Returns:
    `path` as a string.

  Raises:
    ValueError: a shape is not fully defined, or an element does not fit it.
    FileExistsError: `path` exists (from TFF).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from fedbeam.runtime.tff_worker import register_worker_cleanup  # pylint: disable=g-import-not-at-top

  register_worker_cleanup()
  path = os.fspath(path)
  specs = _tensor_specs(element_spec)
  for name, spec in specs.items():
    if not spec.shape.is_fully_defined():
      raise ValueError(
        f"feature {name!r}: TFF's SQL client data needs fixed shapes, got {spec.shape}"
      )

  def columns(client_id):
    elements = clients[client_id]
    out = collections.OrderedDict()
    for name, spec in specs.items():
      shape = tuple(spec.shape.as_list())
      np_dtype = object if spec.dtype == tf.string else spec.dtype.as_numpy_dtype
      values = [
        np.asarray(
          _as_values(e[name]) if spec.dtype == tf.string else e[name], dtype=np_dtype
        ).reshape(shape)
        for e in elements
      ]
      out[name] = np.stack(values) if values else np.zeros((0,) + shape, dtype=np_dtype)
      if spec.dtype == tf.string:
        out[name] = tf.constant(
          out[name].tolist() if values else [], dtype=tf.string, shape=(len(values),) + shape
        )
    return out

  def dataset_fn(client_id):
    return tf.data.Dataset.from_tensor_slices(columns(client_id))

  _ensure_parent(path)
  tff.simulation.datasets.save_to_sql_client_data(
    list(clients), dataset_fn, path, split_names_by_client_id=split_names_by_client_id
  )
  return path


# ----------------------------------------------------------------------------
# Running the prepare job
# ----------------------------------------------------------------------------

_FORMAT_OF_SUFFIX = {
  ".tfrecord": "tfrecord",
  ".tfrecords": "tfrecord",
  ".avro": "avro",
  ".sqlite": "tff-sqlite",
  ".db": "tff-sqlite",
  ".sqlite3": "tff-sqlite",
  ".parquet": "parquet",
  ".csv": "csv",
  ".jsonl": "jsonl",
  ".json": "leaf",
}


def prepare_store(
  clients_or_input_path: Union[Clients, str, os.PathLike],
  tmp_dir: Union[str, os.PathLike],
  *,
  output: Optional[str] = None,
  beam_args: Sequence[str] = (),
  **prepare_flags: Any,
) -> str:
  """Runs the prepare job into a new store under `tmp_dir` and returns its path.

  Uses the local in-process Beam runner (the FnApiRunner) unless
  `beam_args` choose another (e.g. `["--direct_num_workers=2",
  "--direct_running_mode=multi_processing"]`).

  Args:
    clients_or_input_path: either `{client_id: [element dict, ...]}`, written
      with `write_tfrecord_input` to `tmp_dir/input/clients.tfrecord` (client
      id key `client_id`), or an input file pattern whose format comes from
      `input_format=` or the file suffix (.tfrecord, .avro, .sqlite/.db,
      .parquet, .csv, .jsonl, .json for LEAF).
    tmp_dir: a directory for the input (when given clients) and the store.
    output: the store directory; default `tmp_dir/store`.
    beam_args: Beam pipeline options, as on the `fedbeam prepare` command line.
    **prepare_flags: fields of `fedbeam.pipelines.prepare.PrepareConfig`
      (`input_format`, `client_id_key`, `element_spec`, `order_by`,
      `num_shards`, `overwrite`, `sqlite_split`, and any the job gains).
      `element_spec` may be an `ElementSpec`, its JSON form, a mapping of
      `tf.TensorSpec`, or the path of an `--element-spec` file.

  Returns:
    The path of the committed store.

  Raises:
    fedbeam.pipelines.prepare.PrepareError: the job failed (the message
      names the flag, file or record at fault).
  """
  from fedbeam.pipelines.prepare import PrepareConfig, run_prepare  # pylint: disable=g-import-not-at-top

  tmp_dir = os.fspath(tmp_dir)
  flags = dict(prepare_flags)
  if isinstance(clients_or_input_path, Mapping):
    input_path = write_tfrecord_input(
      os.path.join(tmp_dir, "input", "clients.tfrecord"),
      clients_or_input_path,
      client_id_key=flags.setdefault("client_id_key", "client_id"),
    )
    flags.setdefault("input_format", "tfrecord")
  else:
    input_path = os.fspath(clients_or_input_path)
    if "input_format" not in flags:
      suffix = os.path.splitext(input_path)[1].lower()
      if suffix not in _FORMAT_OF_SUFFIX:
        raise ValueError(f"cannot tell the input format of {input_path!r}; pass input_format=")
      flags["input_format"] = _FORMAT_OF_SUFFIX[suffix]
  spec = flags.get("element_spec")
  if spec is not None and not isinstance(spec, ElementSpec):
    if isinstance(spec, (str, os.PathLike)):
      flags.setdefault("element_spec_path", os.fspath(spec))
      flags["element_spec"] = ElementSpec.from_json_file(os.fspath(spec))
    elif isinstance(spec, Mapping) and all(isinstance(v, Mapping) for v in spec.values()):
      flags["element_spec"] = ElementSpec.from_json(spec)
    else:
      flags["element_spec"] = ElementSpec.from_tensor_specs(spec)
  output = output or os.path.join(tmp_dir, "store")
  config = PrepareConfig(input=input_path, output=output, **flags)
  run_prepare(config, list(beam_args))
  return output


# ----------------------------------------------------------------------------
# Reading and comparing stores
# ----------------------------------------------------------------------------


def read_store(
  store_path: str, split: Optional[str] = None
) -> dict[str, list[dict[str, np.ndarray]]]:
  """Reads a store through `load_client_data`: `{client_id: [element as numpy dict]}`.

  Clients come in `client_ids` order (sorted), elements in store order;
  strings are `bytes`.

  Raises:
    fedbeam.format.StoreFormatError: no committed store at `store_path`.
    ValueError: `split` is not a split of the store.
  """
  from fedbeam.runtime.client_data import load_client_data  # pylint: disable=g-import-not-at-top

  data = load_client_data(store_path, split)
  return {cid: dataset_elements(data.create_tf_dataset_for_client(cid)) for cid in data.client_ids}


def client_file(store_path: str, client_id: str, split: str = UNSPLIT) -> str:
  """The path of a client's TFRecord file in a committed local store (for fault-injection tests).

  Raises:
    fedbeam.format.StoreFormatError: no committed store at `store_path`.
  """
  metadata = read_metadata(store_path)
  rel = client_relative_path(client_id, split, metadata["num_shards"])
  return join(store_path, metadata["data_dir"], rel)


def dataset_elements(dataset: tf.data.Dataset) -> list[dict[str, np.ndarray]]:
  """The elements of a `tf.data.Dataset` of flat dicts, as numpy dicts.

  Strings are object arrays of `bytes` (kept exactly, trailing NUL bytes
  included), so they compare with `assert_elements_equal`.
  """
  return [{k: _normalized(v) for k, v in e.items()} for e in dataset.as_numpy_iterator()]


def _normalized(value: Any) -> np.ndarray:
  """A value as numpy; strings as an object array of `bytes` (numpy gives scalars dtype S)."""
  return _as_array(value)


def _expected_array(value: Any, like: np.ndarray) -> np.ndarray:
  """`value` as an array of `like`'s dtype (strings as bytes), for comparison."""
  if like.dtype == object or like.dtype.kind in ("S", "U"):
    return _as_array(value)
  return np.asarray(value).astype(like.dtype)


def _feature_difference(name: str, actual: np.ndarray, expected: Any) -> Optional[str]:
  """None if equal, else a sentence saying how feature `name` differs."""
  try:
    want = _expected_array(expected, actual)
  except (TypeError, ValueError) as e:
    return f"feature {name!r}: expected {expected!r} cannot be compared with {actual!r} ({e})"
  if want.shape != actual.shape:
    return (
      f"feature {name!r}: shape {list(actual.shape)} != expected {list(want.shape)}\n"
      f"      actual:   {actual!r}\n      expected: {want!r}"
    )
  if actual.dtype.kind == "f":
    # Bit-level equality (NaN == NaN, -0.0 != 0.0): a store keeps values exactly.
    same = np.array_equal(actual.view(f"u{actual.itemsize}"), want.view(f"u{want.itemsize}"))
  else:
    same = np.array_equal(actual, want)
  if same:
    return None
  return (
    f"feature {name!r} differs ({actual.dtype})\n"
    f"      actual:   {actual!r}\n      expected: {want!r}"
  )


def _element_difference(actual: Mapping[str, np.ndarray], expected: Element) -> Optional[str]:
  if set(actual) != set(expected):
    return f"features {sorted(actual)} != expected {sorted(expected)}"
  for name in actual:
    diff = _feature_difference(name, actual[name], expected[name])
    if diff:
      return diff
  return None


def _canonical(element: Mapping[str, np.ndarray]) -> tuple:
  return tuple(
    (k, str(v.dtype), v.shape, repr(v.tolist()) if v.dtype == object else v.tobytes())
    for k, v in sorted(element.items())
  )


def _canonical_expected(expected: Element, like: Mapping[str, np.ndarray]) -> Optional[tuple]:
  if set(expected) != set(like):
    return None
  try:
    return _canonical({k: _expected_array(expected[k], like[k]) for k in like})
  except (TypeError, ValueError):
    return None


def assert_elements_equal(
  actual: Sequence[Mapping[str, np.ndarray]],
  expected: Sequence[Element],
  ordered: bool = True,
  where: str = "",
) -> None:
  """Compares one client's elements; raises AssertionError describing the first difference.

  Expected values are converted to the actual dtype first (Python floats
  compare with float32 features, `str` with string features); values then
  compare bit for bit. With `ordered=False` the lists compare as multisets.
  """
  prefix = f"{where}: " if where else ""
  actual = [{k: _normalized(v) for k, v in a.items()} for a in actual]
  if len(actual) != len(expected):
    raise AssertionError(f"{prefix}{len(actual)} elements, expected {len(expected)}")
  if ordered:
    for i, (a, e) in enumerate(zip(actual, expected)):
      diff = _element_difference(a, e)
      if diff:
        raise AssertionError(f"{prefix}element {i}: {diff}")
    return
  if not actual:
    return
  remaining = collections.Counter(_canonical(a) for a in actual)
  for i, e in enumerate(expected):
    key = _canonical_expected(e, actual[0])
    if key is not None and remaining[key] > 0:
      remaining[key] -= 1
      continue
    # No equal element left: describe the difference to the nearest candidate.
    hint = (
      _element_difference(actual[min(i, len(actual) - 1)], e)
      or "an equal element appears fewer times in the store"
    )
    raise AssertionError(
      f"{prefix}expected element {i} {dict(e)!r} is not in the store (compared "
      f"as multisets); vs. stored element {min(i, len(actual) - 1)}: {hint}"
    )


def assert_store_equals(
  store_path: str, expected: Clients, split: Optional[str] = None, ordered: bool = True
) -> None:
  """Asserts the store (or one split) holds exactly the `expected` clients.

  Loads the store with `fedbeam.runtime.load_client_data` and compares it
  with `{client_id: [element dict, ...]}`: same client ids, and per client
  the same elements (see `assert_elements_equal`). Use `ordered=False` for
  stores written with the default content order.

  Example, in a user's pytest::

      def test_store(tmp_path):
        clients = {"a": [{"x": 1.0}], "b": [{"x": 2.0}, {"x": 3.0}]}
        store = prepare_store(clients, tmp_path)
        assert_store_equals(store, clients, ordered=False)

  Raises:
    AssertionError: naming missing and extra client ids, a client whose
      example count differs, or the first differing element and feature with
      both values.
    fedbeam.format.StoreFormatError: no committed store at `store_path`.
  """
  actual = read_store(store_path, split)
  missing = sorted(set(expected) - set(actual))
  extra = sorted(set(actual) - set(expected))
  problems = []
  if missing:
    problems.append(f"client ids missing from the store: {missing}")
  if extra:
    problems.append(f"client ids in the store but not expected: {extra}")
  counts = [
    f"{cid!r}: {len(actual[cid])} examples, expected {len(expected[cid])}"
    for cid in sorted(set(actual) & set(expected))
    if len(actual[cid]) != len(expected[cid])
  ]
  if counts:
    problems.append("example counts differ: " + "; ".join(counts))
  if not problems:
    for cid in sorted(expected):
      try:
        assert_elements_equal(actual[cid], expected[cid], ordered=ordered, where=f"client {cid!r}")
      except AssertionError as e:
        problems.append(str(e))
        break
  if problems:
    where = f"{store_path}" + (f" (split {split})" if split else "")
    raise AssertionError(
      f"store {where} differs from the expected clients:\n  " + "\n  ".join(problems)
    )
