"""`StoreReader`: a fedbeam store's clients as `tf.data` datasets, with TensorFlow only.

`open_store(path, split=None)` reads a committed store's metadata and manifest
and returns a `StoreReader`: client ids, each client's dataset (in eager code,
inside a `tf.function`, and from an id tensor), every client's examples in one
dataset, whole-client tensors, and per-client counts from the manifest. It
needs TensorFlow but not TensorFlow Federated (`pip install fedbeam`);
`fedbeam.runtime.client_data.StoreClientData` is the same reader as a
`tff.simulation.datasets.ClientData` (the `fedbeam[tff]` extra).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

# pylint: disable=g-direct-tensorflow-import
from tensorflow.python.data.ops import dataset_ops, structured_function, unbatch_op
from tensorflow.python.data.ops import readers as tf_readers
from tensorflow.python.ops import gen_dataset_ops

from fedbeam.format.codec import (
  PARSE_BATCH,
  has_variable_length,
  make_batch_parser,
  make_record_parser,
  records_to_elements,
)
from fedbeam.format.fs import isdir
from fedbeam.format.layout import (
  StoreFormatError,
  client_relative_path,
  client_relative_path_tf,
  join,
)
from fedbeam.format.manifest import read_manifest
from fedbeam.format.metadata import data_root, read_metadata

# pylint: enable=g-direct-tensorflow-import
from fedbeam.format.spec import ElementSpec
from fedbeam.runtime.client_file_checks import (
  RECORD_OVERHEAD_BYTES,
  ManifestFigures,
  check_client_file,
)

__all__ = [
  "ClientFileError",
  "StoreReader",
  "client_dataset_builder",
  "client_file_error",
  "open_store",
]

# Bytes of read-ahead per client file.
_READ_BUFFER_BYTES = 1 << 20
# Records per batch of a whole-client read (more than any client holds).
_WHOLE_CLIENT_BATCH = (1 << 31) - 1
# Client files read at once when streaming every client.
_PARALLEL_CLIENT_READS = 8


def _no_static_optimization() -> tf.data.Options:
  # tf.data rewrites a dataset's graph each time an iterator is made; for a
  # one-element dataset read once per client that rewrite costs more than the
  # read itself.
  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = False
  options.autotune.enabled = False
  return options


_NO_STATIC_OPTIMIZATION = _no_static_optimization()

# What a client's dataset costs (TF 2.14; bench/bench_loading.py). Building
# one eagerly traces its functions anew (~13 ms), so it comes from a function
# traced once. Iterating one is dominated by what TensorFlow does for each new
# iterator: it rewrites the dataset graph (tf.data's static optimizations, off
# here) and instantiates every function of the dataset for that iterator,
# with a grappler pass over each one it treats as multi-device (~3 ms each).
# So a client's dataset holds one function, the parse, made single-device by
# the `experimental_ints_on_device` attribute (int32 values in device memory:
# tf.data runs its functions on the CPU, where that is host memory), which
# `Dataset.map` has no argument for. Records come from the single-file reader:
# `tf.data.TFRecordDataset` adds a `flat_map` function over its file names, and
# `Dataset.unbatch` a `map` that re-encodes sparse and ragged components, which
# parsed fixed-shape features do not have. TensorFlow is pinned; without these
# internals the public ops give the same elements, more slowly.
_SINGLE_DEVICE_FUNCTION_ATTRIBUTES = {"experimental_ints_on_device": True}
_HAS_DATASET_INTERNALS = (
  hasattr(tf_readers, "_TFRecordDataset")
  and hasattr(structured_function, "StructuredFunctionWrapper")
  and hasattr(gen_dataset_ops, "map_dataset")
  and hasattr(unbatch_op, "_UnbatchDataset")
)


class _SingleDeviceMapDataset(dataset_ops.UnaryDataset):
  """`dataset.map(fn)` (sequential, cardinality kept) with `fn` a single-device function."""

  def __init__(self, input_dataset, map_func):
    self._input_dataset = input_dataset
    self._name = None
    self._map_func = structured_function.StructuredFunctionWrapper(
      map_func,
      "Dataset.map()",
      dataset=input_dataset,
      defun_kwargs=dict(_SINGLE_DEVICE_FUNCTION_ATTRIBUTES),
    )
    variant_tensor = gen_dataset_ops.map_dataset(
      input_dataset._variant_tensor,  # pylint: disable=protected-access
      self._map_func.function.captured_inputs,
      f=self._map_func.function,
      use_inter_op_parallelism=True,
      preserve_cardinality=True,
      **self._common_args,
    )
    super().__init__(input_dataset, variant_tensor)

  def _functions(self):
    return [self._map_func]

  @property
  def element_spec(self):
    return self._map_func.output_structure


def _read_records(path):
  """The serialized records of one client file (`path`: scalar tf.string)."""
  if _HAS_DATASET_INTERNALS:
    return tf_readers._TFRecordDataset(path, buffer_size=_READ_BUFFER_BYTES)  # pylint: disable=protected-access
  return tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER_BYTES)


def _map(dataset, fn):
  if _HAS_DATASET_INTERNALS:
    return _SingleDeviceMapDataset(dataset, fn)
  return dataset.map(fn)


def _unbatch_dense(dataset):
  """`dataset.unbatch()` for elements of dense tensors only."""
  if _HAS_DATASET_INTERNALS:
    return unbatch_op._UnbatchDataset(dataset)  # pylint: disable=protected-access
  return dataset.unbatch()


def client_dataset_builder(spec: ElementSpec) -> Callable[[Any], tf.data.Dataset]:
  """fn(path: scalar tf.string) -> the elements of that client file, in file order.

  Records are parsed `codec.PARSE_BATCH` at a time with one vectorized
  parse when every feature has a fixed shape, one by one otherwise: the same
  elements as `codec.records_to_elements`. tf.data's static graph
  rewrites and autotuning are off (`options()`; a consumer's `with_options`
  overrides them): for a client's dataset, built and iterated once, they cost
  more than they save.
  """
  if has_variable_length(spec):
    parse = make_record_parser(spec)

    def build(path):
      return _map(_read_records(path), parse).with_options(_NO_STATIC_OPTIMIZATION)
  else:
    parse = make_batch_parser(spec)

    def build(path):
      parsed = _map(_read_records(path).batch(PARSE_BATCH), parse)
      return _unbatch_dense(parsed).with_options(_NO_STATIC_OPTIMIZATION)

  return build


# The traced fn(path: scalar tf.string) -> client dataset, one per element
# spec, shared by every StoreReader (subsets and splits of a store trace it
# once). Called as a concrete function: a tf.function call first binds its
# arguments in Python, about half of the cost of building a client's dataset.
@functools.lru_cache(maxsize=None)
def _dataset_by_path_fn(spec: ElementSpec):
  """fn(path, num_examples) -> `client_dataset_builder(spec)(path)` holding that many elements.

  Traced once, shared by every store of that element spec. The count is
  asserted in the dataset itself (no function: `assert_cardinality` adds none),
  so a file that changes after its open check still fails when read.
  """
  build = client_dataset_builder(spec)

  def counted(path, num_examples):
    return build(path).apply(tf.data.experimental.assert_cardinality(num_examples))

  return tf.function(
    counted,
    input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64)],
    autograph=False,
  ).get_concrete_function()


class ClientFileError(IOError):
  """A client file that is missing, damaged or not what the manifest says; names the client."""


def _file_problem(client_id: str, root: str, reason: str) -> str:
  return f"the file of client {client_id!r} in store {root} {reason}; run `fedbeam validate {root}`"


# TensorFlow errors a client's read raises, and what each says about the file.
# InvalidArgument comes from the checks traced into graphs (their messages name
# the client) and from records that do not parse; FailedPrecondition from
# `assert_cardinality`.
_READ_ERRORS = (
  (tf.errors.NotFoundError, "is missing"),
  (tf.errors.DataLossError, "is damaged"),
  (tf.errors.InvalidArgumentError, "does not match the store"),
  (tf.errors.FailedPreconditionError, "does not match the manifest"),
)


def client_file_error(
  error: tf.errors.OpError, client_id: str, root: str
) -> Optional[ClientFileError]:
  """The ClientFileError for a TensorFlow error raised reading client `client_id`'s file.

  For callers that read a client inside their own graph (a `tf.function` calling
  `client_tensors_fn` or `serializable_dataset_fn`) and see TensorFlow's error
  in Python. Returns None for an error that is not about the file.
  """
  for kind, what in _READ_ERRORS:
    if isinstance(error, kind):
      detail = error.message.split("}}")[-1].strip()
      return ClientFileError(_file_problem(client_id, root, f"{what} ({detail})"))
  return None


class _ClientIterator:
  """Iterator over one client's dataset that names the client when its file is bad."""

  def __init__(self, iterator, client_id: str, root: str):
    self._iterator = iterator
    self._client_id = client_id
    self._root = root

  def __iter__(self):
    return self

  def __next__(self):
    try:
      return next(self._iterator)
    except tf.errors.OpError as e:
      mapped = client_file_error(e, self._client_id, self._root)
      if mapped is None:
        raise
      raise mapped from None

  next = __next__


class _ClientDataset(dataset_ops.UnaryUnchangedStructureDataset):
  """The dataset of one client: iterating it names the client on read errors.

  `problem`, when set, is why the file failed its open check: iterating raises
  it as ClientFileError, and the wrapped dataset (a `_failing_dataset`) raises
  it as InvalidArgumentError for consumers that iterate a transformation of
  this dataset. Graph-mode consumers (tf.function, TFF computations) see
  TensorFlow's errors: the checks' messages name the client, a record CRC
  failure raises DataLossError naming the file.
  """

  def __init__(self, input_dataset, client_id: str, root: str, problem: Optional[str] = None):
    self._input_dataset = input_dataset
    self._client_id = client_id
    self._root = root
    self._problem = problem
    super().__init__(input_dataset, input_dataset._variant_tensor)  # pylint: disable=protected-access

  def __iter__(self):
    if self._problem is not None:
      raise ClientFileError(self._problem)
    return _ClientIterator(super().__iter__(), self._client_id, self._root)


def _failing_dataset(element_spec, message: str) -> tf.data.Dataset:
  """A dataset of `element_spec` whose first read raises InvalidArgumentError(message).

  Stands in for a client file that failed its open check, so that no
  consumer (`.batch()`, a tf.function) hands the file to TensorFlow's reader.
  """

  def fail(_):
    with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
      return tf.nest.map_structure(
        lambda s: tf.zeros([0 if d is None else d for d in s.shape], s.dtype), element_spec
      )

  return tf.data.Dataset.range(1).map(fail)


class StoreReader:
  """The clients of one or more splits of a store, read with TensorFlow alone.

  Built by `open_store` (or `StoreReader.from_store`). Client ids are sorted;
  membership checks are O(1); `num_examples(client_id)` comes from the
  manifest. Each client's dataset has exactly the element spec of the input
  (`element_type_structure`), and `serializable_dataset_fn` is traceable by
  `tf.function`. `fedbeam.runtime.client_data.StoreClientData` adds TFF's
  `ClientData` contract on top.
  """

  def __init__(
    self,
    root: str,
    metadata: Mapping[str, Any],
    splits: Sequence[str],
    rows: Mapping[str, tuple[str, int, int]],
    ordered: bool = False,
  ):
    """Use `open_store`. `rows` maps client id -> (split, num_examples, num_bytes).

    `client_ids` are sorted, or in the order of `rows` when `ordered`.
    """
    self._root = root.rstrip("/") if root != "/" else root
    self._data_root = data_root(self._root, metadata)
    self._metadata = dict(metadata)
    self._splits = tuple(splits)
    self._rows = dict(rows)
    self._client_ids = list(self._rows) if ordered else sorted(self._rows)
    self._spec = ElementSpec.from_metadata(metadata["element_spec"])
    self._element_type_structure = self._spec.to_tensor_specs()
    self._num_shards = int(metadata["num_shards"])
    self._path_fn = self._build_path_fn()
    self._build = client_dataset_builder(self._spec)
    self._dataset_by_path = None  # traced on the first dataset, shared per element spec
    self._dataset_by_id = None
    self._figures = None  # ManifestFigures, built for the first traced read
    self._dataset_fn = self._build_dataset_fn()
    self._client_tensors_fn = None

  @classmethod
  def from_store(cls, path: str, split: Optional[str] = None) -> StoreReader:
    """Reads a committed store's metadata and manifest: a `cls` over `split`'s clients.

    Args:
      path: the store directory (local or gs://...).
      split: a split name (e.g. "train", "test"), or None for every client of
        every split.

    Returns:
      An instance of `cls` (`StoreReader`, or a subclass such as
      `StoreClientData`).

    Raises:
      StoreFormatError: no committed store at `path`, an unsupported format
        version, a damaged manifest, or manifest rows that disagree with the
        metadata's per-split figures (`_manifest_rows`).
      ValueError: `split` is not a split of the store, or it has no client, or
        (with `split` None) a client id is in several splits.
    """
    metadata = read_metadata(path)
    names = [s["name"] for s in metadata["splits"]]
    if split is not None and split not in names:
      raise ValueError(f"split {split!r} is not in store {path}; its splits are {names}")
    wanted = set(names) if split is None else {split}
    rows = _manifest_rows(path, metadata, wanted)
    if not rows:
      raise ValueError(f"store {path} has no client in split(s) {sorted(wanted)}")
    data_dir = data_root(path, metadata)
    for name in sorted({r[0] for r in rows.values()}):
      if not isdir(join(data_dir, name)):
        raise StoreFormatError(
          f"store {path} is damaged: the directory of split {name!r} "
          f"({join(data_dir, name)}) is missing"
        )
    return cls(path, metadata, sorted(wanted), rows)

  # -- Client datasets --------------------------------------------------------

  @property
  def client_ids(self) -> list[str]:
    return self._client_ids

  @property
  def element_type_structure(self) -> Mapping[str, tf.TensorSpec]:
    return self._element_type_structure

  @property
  def serializable_dataset_fn(self) -> Callable[[str], tf.data.Dataset]:
    """fn(client_id) -> tf.data.Dataset, traceable by tf.function (no py_function)."""
    return self._dataset_fn

  def create_tf_dataset_for_client(self, client_id: str) -> tf.data.Dataset:
    """The client's examples in store order, read when the dataset is iterated.

    Building it traces nothing (the pipeline is traced once per element spec).
    tf.data's static graph rewrites and autotuning are off in its `options()`.

    Raises:
      ValueError: `client_id` is not a client of this ClientData (named).
    """
    if client_id not in self._rows:
      raise ValueError(
        f"client id {client_id!r} is not a client of this ClientData "
        f"(store {self._root}, splits {list(self._splits)})"
      )
    return self._client_dataset(client_id)

  def create_tf_dataset_from_all_clients(
    self, seed: Optional[Union[int, Sequence[int]]] = None
  ) -> tf.data.Dataset:
    """Every client's examples, clients in TFF's seeded order, files read in parallel.

    Same order as TFF's implementation: clients shuffled by
    `np.random.RandomState(seed)`, each client's examples together. `seed`:
    None, an int or a sequence of ints, as `np.random.RandomState` takes.
    """
    client_ids = list(self._client_ids)
    np.random.RandomState(seed=seed).shuffle(client_ids)
    paths = [join(self._data_root, self._relative_path(cid)) for cid in client_ids]
    files = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
    if has_variable_length(self._spec):
      records = files.interleave(
        lambda p: tf.data.TFRecordDataset(p, buffer_size=_READ_BUFFER_BYTES),
        cycle_length=1,
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
      )
      return records_to_elements(records, self._spec)
    # Each client file becomes one batch of all its records; several files are
    # read at once, and deterministic interleaving of one-element inputs keeps
    # the clients in order (an empty client contributes no batch).
    whole_clients = files.interleave(
      lambda p: tf.data.TFRecordDataset(p, buffer_size=_READ_BUFFER_BYTES).batch(
        _WHOLE_CLIENT_BATCH
      ),
      cycle_length=_PARALLEL_CLIENT_READS,
      block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
    return whole_clients.map(
      make_batch_parser(self._spec), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    ).unbatch()

  # -- Store extras -----------------------------------------------------------

  @property
  def root(self) -> str:
    return self._root

  @property
  def splits(self) -> tuple[str, ...]:
    return self._splits

  @property
  def metadata(self) -> dict[str, Any]:
    return dict(self._metadata)

  @property
  def element_spec(self) -> ElementSpec:
    return self._spec

  def __contains__(self, client_id: str) -> bool:
    return client_id in self._rows

  def __len__(self) -> int:
    return len(self._client_ids)

  def num_examples(self, client_id: str) -> int:
    """Examples of a client, from the manifest. Raises ValueError for an unknown id."""
    try:
      return self._rows[client_id][1]
    except KeyError:
      raise ValueError(f"client id {client_id!r} is not a client of this ClientData") from None

  def split_of(self, client_id: str) -> str:
    """The split directory holding a client."""
    try:
      return self._rows[client_id][0]
    except KeyError:
      raise ValueError(f"client id {client_id!r} is not a client of this ClientData") from None

  def subset(self, client_ids: Iterable[str]) -> "StoreReader":
    """A reader of this type over some of these clients, with `client_ids` in the given order.

    Raises ValueError for an id that is not a client here, or no id.
    """
    rows = {}
    for cid in client_ids:
      if cid not in self._rows:
        raise ValueError(f"client id {cid!r} is not a client of this ClientData")
      rows[cid] = self._rows[cid]
    if not rows:
      raise ValueError("a ClientData needs at least one client")
    splits = sorted({r[0] for r in rows.values()})
    return type(self)(self._root, self._metadata, splits, rows, ordered=True)

  # -- Internals --------------------------------------------------------------

  def _relative_path(self, client_id: str) -> str:
    return client_relative_path(client_id, self._rows[client_id][0], self._num_shards)

  def _build_path_fn(self):
    """fn(client_id: scalar tf.string) -> the client file's path, in TF ops."""
    data_root, num_shards = self._data_root, self._num_shards
    splits = self._splits
    if len(splits) == 1:
      only = splits[0]
      split_of_id = lambda cid: tf.constant(only)  # noqa: E731
    else:
      # Several splits: the id -> split table holds only the clients outside
      # the largest split (the test clients, typically few); every other id
      # maps to the largest split without a lookup entry.
      counts = {s: 0 for s in splits}
      for row in self._rows.values():
        counts[row[0]] += 1
      largest = max(splits, key=lambda s: (counts[s], s))
      keys = [cid for cid, row in self._rows.items() if row[0] != largest]
      values = [self._rows[cid][0] for cid in keys]

      def split_of_id(cid):
        if not keys:
          return tf.constant(largest)
        table = tf.lookup.StaticHashTable(
          tf.lookup.KeyValueTensorInitializer(
            tf.constant(keys, tf.string), tf.constant(values, tf.string)
          ),
          default_value=largest,
        )
        return table.lookup(cid)

    def path_fn(client_id):
      client_id = tf.convert_to_tensor(client_id, tf.string)
      rel = client_relative_path_tf(client_id, split_of_id(client_id), num_shards)
      return tf.strings.join([data_root, "/", rel])

    return path_fn

  def client_file_error(
    self, error: tf.errors.OpError, client_id: str
  ) -> Optional[ClientFileError]:
    """`client_file_error(error, client_id, root)` for this store (None: not a file error)."""
    return client_file_error(error, client_id, self._root)

  def _client_path(self, client_id: str) -> str:
    """The file of a known client."""
    return join(self._data_root, self._relative_path(client_id))

  def _open_check(self, client_id: str, path: Optional[str] = None) -> Optional[str]:
    """Why a known client's file (at `path`, if the caller has it) fails its check against
    the manifest (message), or None."""
    _, num_examples, num_bytes = self._rows[client_id]
    reason = check_client_file(path or self._client_path(client_id), num_examples, num_bytes)
    return None if reason is None else _file_problem(client_id, self._root, reason)

  def _manifest_figures(self) -> ManifestFigures:
    if self._figures is None:
      ids = list(self._rows)
      self._figures = ManifestFigures(
        ids, [self._rows[c][1] for c in ids], [self._rows[c][2] for c in ids]
      )
    return self._figures

  def _checked_graph_dataset(self, client_id, path, found, num_examples, num_bytes):
    """The client's dataset traced into the current graph, checked against the manifest.

    The file's size is compared with `num_bytes` when the dataset is made (an
    Assert whose message names the client and the store; TF has no op that
    stats a file, so the file is read once more for it), its count with
    `num_examples` as it is read (`assert_cardinality`, TensorFlow's message).
    An id the manifest lacks (`found` False) is not checked: its read fails as
    before (NotFoundError).
    """
    size = tf.cast(tf.strings.length(tf.io.read_file(path)), tf.int64)
    # StringLength is int32: compare sizes modulo 2^32 so files over 2 GiB still pass.
    low = lambda x: tf.bitwise.bitwise_and(x, 0xFFFFFFFF)  # noqa: E731
    check = tf.debugging.Assert(
      tf.logical_or(tf.logical_not(found), tf.equal(low(size), low(num_bytes))),
      [
        "the file of client",
        client_id,
        f"in store {self._root} is",
        size,
        "bytes, the manifest says",
        num_bytes,
        f"; run `fedbeam validate {self._root}`",
      ],
    )
    with tf.control_dependencies([check]):
      dataset = self._build(path)
    return dataset.apply(
      tf.data.experimental.assert_cardinality(
        tf.where(found, num_examples, tf.constant(-1, tf.int64))
      )
    )

  def _client_dataset(self, client_id: str, wrap: bool = True) -> tf.data.Dataset:
    """The dataset of a known client, checked against its manifest row.

    Eagerly the file is checked in Python first (`check_client_file`); a file
    that fails gives a dataset that raises naming the client, and TensorFlow
    never opens it. Inside a traced function the checks go into that graph.
    `wrap`: return the `_ClientDataset` that maps read errors to ClientFileError.
    """
    file_path = self._client_path(client_id)
    path = tf.constant(file_path, tf.string)
    _, num_examples, num_bytes = self._rows[client_id]
    problem = None
    if tf.executing_eagerly():
      problem = self._open_check(client_id, file_path)
      if problem is not None:
        dataset = _failing_dataset(self._element_type_structure, problem)
      else:
        if self._dataset_by_path is None:
          self._dataset_by_path = _dataset_by_path_fn(self._spec)
        dataset = self._dataset_by_path(path, tf.constant(num_examples, tf.int64))
    else:  # Inside a traced function: the pipeline goes into that graph.
      dataset = self._checked_graph_dataset(
        tf.constant(client_id),
        path,
        tf.constant(True),
        tf.constant(num_examples, tf.int64),
        tf.constant(num_bytes, tf.int64),
      )
    return _ClientDataset(dataset, client_id, self._root, problem) if wrap else dataset

  def _build_dataset_fn(self):
    """The `serializable_dataset_fn`: the path in TF ops, so any id tensor works.

    Traced (inside a tf.function or a TFF computation) it builds the checked
    pipeline in place, the manifest's figures looked up from the id. Called
    eagerly with a client's id it checks the file in Python like
    `create_tf_dataset_for_client` (without the ClientFileError wrapper: the
    dataset raises TensorFlow's errors, as a traced one does); an id that is
    not a client runs a tf.function traced on the first call, whose read fails.
    """
    build, path_fn = self._build, self._path_fn

    def dataset_fn(client_id):
      if not tf.executing_eagerly():
        found, num_examples, num_bytes = self._manifest_figures().lookup(client_id)
        return self._checked_graph_dataset(
          client_id, path_fn(client_id), found, num_examples, num_bytes
        )
      cid = client_id
      if isinstance(cid, tf.Tensor):
        cid = cid.numpy()
      if isinstance(cid, bytes):
        cid = cid.decode("utf-8", "surrogateescape")
      if cid in self._rows:
        return self._client_dataset(cid, wrap=False)
      if self._dataset_by_id is None:
        self._dataset_by_id = tf.function(
          lambda cid: build(path_fn(cid)),
          input_signature=[tf.TensorSpec([], tf.string)],
          autograph=False,
        )
      return self._dataset_by_id(client_id)

    return dataset_fn

  @property
  def client_tensors_fn(self) -> "_ClientTensorsFn":
    """fn(client_id) -> `OrderedDict` of every example of a client, stacked on axis 0.

    One read of the file and one vectorized parse, no per-example dataset
    iteration: the fastest way to feed a client update (`fedbeam train` slices
    batches from it in-graph). The records read are checked against the
    manifest in-graph: their number against `num_examples`, their framed size
    (16 bytes per record plus its data, which is the file's size once every
    record has been read) against `num_bytes`; a mismatch raises
    InvalidArgumentError naming the client and the store. Called eagerly, the
    file is first checked in Python as `create_tf_dataset_for_client` does, and
    any failure raises ClientFileError naming the client; traced into a caller's
    graph, map TensorFlow's errors with `client_file_error`. Unknown ids fail
    inside TensorFlow (NotFoundError), or with ValueError when called eagerly.

    Raises:
      ValueError: the element spec has a variable-length feature (a stacked
        tensor would pad it).
    """
    if self._client_tensors_fn is None:
      if has_variable_length(self._spec):
        raise ValueError(
          "client_tensors_fn needs fixed-shape features; this store has "
          f"variable-length ones ({self._spec.to_json()})"
        )
      parse, path_fn = make_batch_parser(self._spec), self._path_fn
      figures = self._manifest_figures()
      no_record = tf.zeros([0], tf.string)
      root = self._root

      @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
      def client_tensors(client_id):
        found, num_examples, num_bytes = figures.lookup(client_id)
        records = _read_records(path_fn(client_id))
        # An empty client yields no batch; the appended empty batch stands in.
        whole = (
          records.batch(_WHOLE_CLIENT_BATCH)
          .concatenate(tf.data.Dataset.from_tensors(no_record))
          .take(1)
          .with_options(_NO_STATIC_OPTIMIZATION)
        ).get_single_element()
        count = tf.size(whole, out_type=tf.int64)
        framed = RECORD_OVERHEAD_BYTES * count + tf.reduce_sum(
          tf.cast(tf.strings.length(whole), tf.int64)
        )
        check = tf.debugging.Assert(
          tf.logical_or(
            tf.logical_not(found),
            tf.logical_and(tf.equal(count, num_examples), tf.equal(framed, num_bytes)),
          ),
          [
            "the file of client",
            client_id,
            f"in store {root} holds",
            count,
            "records in",
            framed,
            "bytes, the manifest says",
            num_examples,
            "records in",
            num_bytes,
            f"bytes; run `fedbeam validate {root}`",
          ],
        )
        with tf.control_dependencies([check]):
          return parse(whole)

      self._client_tensors_fn = _ClientTensorsFn(self, client_tensors)
    return self._client_tensors_fn


class _ClientTensorsFn:
  """`client_tensors_fn`: its tf.function, with Python's checks and errors when called eagerly."""

  def __init__(self, client_data: StoreReader, function):
    self._client_data = client_data
    self._function = function

  def __call__(self, client_id):
    if not tf.executing_eagerly():
      return self._function(client_id)
    cid = client_id.numpy() if isinstance(client_id, tf.Tensor) else client_id
    cid = cid.decode("utf-8", "surrogateescape") if isinstance(cid, bytes) else cid
    data = self._client_data
    if cid not in data:
      raise ValueError(f"client id {cid!r} is not a client of this ClientData (store {data.root})")
    problem = data._open_check(cid)  # pylint: disable=protected-access
    if problem is not None:
      raise ClientFileError(problem)
    try:
      return self._function(tf.constant(cid, tf.string))
    except tf.errors.OpError as e:
      mapped = data.client_file_error(e, cid)
      if mapped is None:
        raise
      raise mapped from None

  def get_concrete_function(self, *args, **kwargs):
    return self._function.get_concrete_function(*args, **kwargs)


def _manifest_rows(
  path: str, metadata: Mapping[str, Any], wanted: Optional[set] = None
) -> dict[str, tuple[str, int, int]]:
  """The manifest rows of the `wanted` splits (default all) as client id -> (split, num_examples,
  num_bytes), every row checked.

  `read_manifest` bounds each row on its own (non-negative counts that fit
  the bytes). The rows must also agree with the metadata, which another step
  of the job wrote: every split a row names is in `metadata["splits"]`, ids
  are unique within a split, only an empty client has 0 bytes, and each
  split's clients, examples, bytes and empty clients add up to its entry. An
  id may be in several splits (a store of TFF's splits kept,
  `--keep-sqlite-splits`), but not in two wanted ones: one ClientData has
  one dataset per id.

  Raises:
    StoreFormatError: naming the store, the client or split, and the figures.
    ValueError: an id is in two wanted splits; the message names them.
  """
  splits = {s["name"]: s for s in metadata["splits"]}
  totals = {name: [0, 0, 0, 0] for name in splits}
  rows: dict[str, tuple[str, int, int]] = {}
  seen: set = set()
  shared: Optional[tuple] = None
  for row in read_manifest(path, metadata):
    cid, split = row["client_id"], row["split"]
    where = f"store {path} is damaged: manifest row of client {cid!r}"
    if split not in totals:
      raise StoreFormatError(
        f"{where} names split {split!r}, which the metadata does not "
        f"list (its splits are {sorted(splits)})"
      )
    if (split, cid) in seen:
      raise StoreFormatError(f"{where} appears twice in split {split!r}")
    seen.add((split, cid))
    num_examples, num_bytes = int(row["num_examples"]), int(row["num_bytes"])
    if (num_examples == 0) != (num_bytes == 0):
      raise StoreFormatError(
        f"{where} has num_examples {num_examples} in num_bytes {num_bytes}: only an empty "
        "client has 0 bytes"
      )
    if wanted is None or split in wanted:
      if cid in rows and shared is None:
        shared = (cid, rows[cid][0], split)
      rows[cid] = (split, num_examples, num_bytes)
    t = totals[split]
    t[0] += 1
    t[1] += num_examples
    t[2] += num_bytes
    t[3] += num_examples == 0
  for name, t in totals.items():
    for i, field in enumerate(("num_clients", "num_examples", "num_bytes", "num_empty_clients")):
      if field in splits[name] and int(splits[name][field]) != t[i]:
        raise StoreFormatError(
          f"store {path} is damaged: split {name!r} has {field} {splits[name][field]} in "
          f"the metadata but {t[i]} in the manifest; run `fedbeam validate {path}`"
        )
  if shared is not None:
    cid, one, other = shared
    raise ValueError(
      f"store {path}: client {cid!r} is in splits {one!r} and {other!r}; load "
      "one split at a time (load_client_data(path, split=...))"
    )
  return rows


def open_store(path: str, split: Optional[str] = None) -> StoreReader:
  """Opens a committed store for reading with TensorFlow: `StoreReader.from_store(path, split)`.

  Args:
    path: the store directory (local or gs://...).
    split: a split name (e.g. "train", "test"), or None for every client of
      every split.

  Returns:
    A `StoreReader` over the clients of `split` (or of every split).

  Raises:
    StoreFormatError: no committed store at `path`, an unsupported format
      version, a damaged manifest, or manifest rows that disagree with the
      metadata's per-split figures.
    ValueError: `split` is not a split of the store, or it has no client, or
      (with `split` None) a client id is in several splits.
  """
  return StoreReader.from_store(path, split)
