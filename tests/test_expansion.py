"""Pseudo-client expansion against TFF 0.87's own `TransformingClientData`.

The raw clients are written with TFF's `save_to_sql_client_data`; that
database is both the input of the prepare job and, loaded with TFF's
`load_and_parse_sql_client_data`, the base of a `TransformingClientData` that
reproduces the seed's id scheme. The store loaded with `load_client_data` must
hold the same client ids and the same datasets, element for element.
"""

import collections
import os

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedbeam import testing
from fedbeam.format.codec import encode_examples
from fedbeam.format.layout import StoreFormatError
from fedbeam.format.manifest import read_manifest
from fedbeam.format.metadata import metadata_path, read_metadata
from fedbeam.format.spec import ElementSpec, FeatureSpec
from fedbeam.pipelines.expansion import (
  ExpansionError,
  PlanPseudoClients,
  PseudoClientSizes,
  apply_transform,
  expansion_plan,
  pseudo_client_id,
  pseudo_clients_of,
)
from fedbeam.pipelines.prepare import PrepareError
from fedbeam.runtime.client_data import StoreClientData, load_client_data
from fedbeam.transforms import AffineTransform, random_affine

ELEMENT_SPEC = collections.OrderedDict(
  label=tf.TensorSpec([], tf.int32), pixels=tf.TensorSpec([28, 28], tf.float32)
)
SPEC = ElementSpec((FeatureSpec("label", "int32", ()), FeatureSpec("pixels", "float32", (28, 28))))
MULTI_PROCESSING = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]

# Written out of order on purpose; "dave" has no example (TFF lists it in
# client_metadata with 0 examples). Sorted: alice bob carol dave erin frank grace.
RAW_SIZES = {"frank": 3, "alice": 2, "grace": 1, "carol": 4, "dave": 0, "bob": 5, "erin": 2}


def _image(rng):
  """A 28x28 float32 image with structure (a bright blob on a dark background)."""
  yy, xx = np.mgrid[0:28, 0:28]
  cy, cx = rng.uniform(8, 20, size=2)
  blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(8, 30))
  return (blob + 0.05 * rng.random((28, 28))).astype(np.float32)


def make_clients(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return {
    cid: [{"label": np.int32(rng.integers(0, 62)), "pixels": _image(rng)} for _ in range(n)]
    for cid, n in sizes.items()
  }


def prepare(db, tmp_path, name, beam_args=(), **flags):
  """Runs the prepare job on the TFF database `db`, keeping the database's row order."""
  return testing.prepare_store(
    db,
    tmp_path,
    output=str(tmp_path / name),
    beam_args=beam_args,
    element_spec=ELEMENT_SPEC,
    order_by="@input",
    **flags,
  )


def assert_not_committed(output):
  assert not os.path.exists(metadata_path(str(output)))
  with pytest.raises(StoreFormatError):
    load_client_data(str(output))


# --- make_transform_fns used below (module level, so they pickle by reference) ---


def index_shift(raw_client_id, index):
  """Never None: adds index + 1 to every pixel, so index 0 is visible in the data."""
  del raw_client_id
  return lambda x: {"label": x["label"], "pixels": x["pixels"] + float(index + 1)}


def factory_raises(raw_client_id, index):
  if raw_client_id == "carol" and index == 2:
    raise RuntimeError("no warp for this pseudo-client")
  return None


def fn_raises_when_traced(raw_client_id, index):
  if raw_client_id == "bob" and index == 1:

    def fn(x):
      raise ValueError("cannot warp this element")

    return fn
  return None


def fn_fails_when_run(raw_client_id, index):
  if raw_client_id == "erin" and index == 1:

    def fn(x):
      with tf.control_dependencies([tf.debugging.assert_negative(x["label"], message="bad label")]):
        return {"label": tf.identity(x["label"]), "pixels": x["pixels"]}

    return fn
  return None


def drops_label(raw_client_id, index):
  if raw_client_id == "frank" and index == 1:
    return lambda x: {"pixels": x["pixels"]}
  return None


def widens_label(raw_client_id, index):
  if raw_client_id == "alice" and index == 2:
    return lambda x: {"label": tf.cast(x["label"], tf.int64), "pixels": x["pixels"]}
  return None


# --- the oracle --------------------------------------------------------------


def tff_transforming(base, make_transform_fn, num_transformed_clients=None):
  """TFF 0.87's TransformingClientData reproducing the seed's id scheme over `base`."""
  raw_ids = sorted(base.client_ids)
  unchanged = num_transformed_clients is None or num_transformed_clients == len(raw_ids)

  def make(client_id):
    if isinstance(client_id, tf.Tensor):
      client_id = client_id.numpy().decode("utf-8")
    if unchanged:
      raw, index = client_id, 0
    else:
      raw, suffix = client_id.rsplit("_", 1)
      index = int(suffix)
    fn = make_transform_fn(raw, index)
    return (lambda x: x) if fn is None else fn

  if unchanged:
    return tff.simulation.datasets.TransformingClientData(base, make)
  n = num_transformed_clients
  k, g = divmod(n, len(raw_ids))
  digits = len(str(n - 1))
  remainder = set(raw_ids[:g])

  def expand(raw):
    return [f"{raw}_{i:0{digits}d}" for i in range(k + (1 if raw in remainder else 0))]

  def reduce(client_id):
    return tf.strings.regex_replace(client_id, "_[0-9]+$", "")

  return tff.simulation.datasets.TransformingClientData(base, make, expand, reduce)


def tff_elements(client_data):
  out = {}
  for cid in client_data.client_ids:
    ds = client_data.create_tf_dataset_for_client(cid)
    out[cid] = [{k: np.asarray(v) for k, v in e.items()} for e in ds.as_numpy_iterator()]
  return out


def assert_matches_tff(store, expected):
  """Same ids in the same order; labels exactly, pixels to float tolerance."""
  loaded = load_client_data(store)
  assert isinstance(loaded, StoreClientData)
  assert loaded.client_ids == list(expected)
  assert loaded.element_type_structure == ELEMENT_SPEC
  actual = testing.read_store(store)
  for cid, want in expected.items():
    got = actual[cid]
    assert len(got) == len(want), cid
    for i, (a, e) in enumerate(zip(got, want)):
      assert a["label"].dtype == e["label"].dtype == np.int32
      assert a["label"] == e["label"], (cid, i)
      assert a["pixels"].dtype == e["pixels"].dtype == np.float32
      np.testing.assert_allclose(
        a["pixels"], e["pixels"], rtol=1e-6, atol=1e-6, err_msg=f"client {cid!r} element {i}"
      )


# --- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_db(tmp_path_factory):
  path = tmp_path_factory.mktemp("raw") / "raw.sqlite"
  return testing.write_tff_sqlite_input(path, make_clients(RAW_SIZES), ELEMENT_SPEC)


@pytest.fixture(scope="module")
def tff_base(raw_db):
  return tff.simulation.datasets.load_and_parse_sql_client_data(raw_db, ELEMENT_SPEC)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  return tmp_path_factory.mktemp("stores")


@pytest.fixture(scope="module")
def affine_23(raw_db, work):
  return prepare(
    raw_db,
    work,
    "affine_23",
    num_transformed_clients=23,
    transform="fedbeam.transforms:random_affine",
  )


# --- the plan ----------------------------------------------------------------


def test_plan_of_seven_raw_clients():
  assert expansion_plan(7, 23) == (3, 2, 2)
  assert expansion_plan(7, 100) == (14, 2, 2)
  assert expansion_plan(7, 7) == (1, 0, 0)
  assert expansion_plan(7, None) == (1, 0, 0)
  assert expansion_plan(7, 14) == (2, 0, 2)
  assert pseudo_client_id("alice", 3, 2) == "alice_03"


# --- oracle equality ---------------------------------------------------------


def test_random_affine_23_equals_tff(affine_23, tff_base):
  expected = tff_elements(tff_transforming(tff_base, random_affine, 23))
  assert len(expected) == 23
  # 23 = 3 * 7 + 2: the first two raw ids in sorted order get a fourth pseudo-client.
  assert [c for c in expected if c.endswith("_03")] == ["alice_03", "bob_03"]
  assert "alice_00" in expected and "grace_02" in expected and "grace_03" not in expected
  assert_matches_tff(affine_23, expected)
  # Index 0 is the identity, index > 0 is a warp.
  assert expected["bob_00"][0]["pixels"].tolist() != expected["bob_01"][0]["pixels"].tolist()


def test_random_affine_100_equals_tff(raw_db, work, tff_base):
  store = prepare(
    raw_db,
    work,
    "affine_100",
    num_transformed_clients=100,
    transform="fedbeam.transforms:random_affine",
  )
  expected = tff_elements(tff_transforming(tff_base, random_affine, 100))
  # 100 = 14 * 7 + 2: indices 00..13, and 14 for alice and bob; two digits (len(str(99))).
  assert len(expected) == 100
  assert sorted(c for c in expected if c.endswith("_14")) == ["alice_14", "bob_14"]
  assert "carol_13" in expected and "carol_14" not in expected
  assert_matches_tff(store, expected)


@pytest.mark.parametrize("n", [23, 100])
def test_identity_expansion_equals_tff(raw_db, work, tff_base, n):
  store = prepare(raw_db, work, f"identity_{n}", num_transformed_clients=n)
  expected = tff_elements(tff_transforming(tff_base, lambda raw, i: None, n))
  assert len(expected) == n
  # Identity pseudo-clients are bit-for-bit copies of their raw client.
  testing.assert_store_equals(store, expected)
  raw = tff_elements(tff_base)
  for cid, elements in expected.items():
    testing.assert_elements_equal(elements, raw[cid.rsplit("_", 1)[0]], where=cid)
  metadata = read_metadata(store)
  assert metadata["parameters"]["transform"] == "fedbeam.transforms:identity"
  assert metadata["parameters"]["num_transformed_clients"] == n


@pytest.mark.parametrize("n", [7, None])
def test_unchanged_ids_apply_index_zero(raw_db, work, tff_base, n):
  store = prepare(raw_db, work, f"unchanged_{n}", num_transformed_clients=n, transform=index_shift)
  expected = tff_elements(tff_transforming(tff_base, index_shift, n))
  assert list(expected) == sorted(RAW_SIZES)
  assert_matches_tff(store, expected)
  raw = tff_elements(tff_base)
  np.testing.assert_array_equal(expected["bob"][0]["pixels"], raw["bob"][0]["pixels"] + 1.0)
  metadata = read_metadata(store)
  rows = list(read_manifest(store, metadata))
  assert sorted((r["client_id"], r["raw_client_id"], r["pseudo_index"]) for r in rows) == [
    (c, c, 0) for c in sorted(RAW_SIZES)
  ]


def test_manifest_records_raw_client_and_index(affine_23):
  metadata = read_metadata(affine_23)
  rows = sorted(read_manifest(affine_23, metadata), key=lambda r: r["client_id"])
  assert len(rows) == 23
  for row in rows:
    raw, suffix = row["client_id"].rsplit("_", 1)
    assert row["raw_client_id"] == raw
    assert row["pseudo_index"] == int(suffix)
    assert len(suffix) == 2
    assert row["num_examples"] == RAW_SIZES[raw]
  per_raw = collections.Counter(r["raw_client_id"] for r in rows)
  assert per_raw == {"alice": 4, "bob": 4, "carol": 3, "dave": 3, "erin": 3, "frank": 3, "grace": 3}
  assert metadata["parameters"]["transform"] == "fedbeam.transforms:random_affine"
  # The empty raw client expands to empty pseudo-clients, which are kept by default.
  assert metadata["empty_clients"]["found"] == 3
  assert metadata["empty_clients"]["sample"] == ["dave_00", "dave_01", "dave_02"]


def test_ids_with_digit_suffixes_and_non_ascii(work, tmp_path_factory):
  sizes = {"a": 2, "a_1": 1, "a_10": 3, "a_1_0": 1, "naïve": 2, "日本_7": 1, "🙂 space": 2}
  db = testing.write_tff_sqlite_input(
    tmp_path_factory.mktemp("odd") / "odd.sqlite", make_clients(sizes, seed=3), ELEMENT_SPEC
  )
  base = tff.simulation.datasets.load_and_parse_sql_client_data(db, ELEMENT_SPEC)
  n = 16  # k = 2, g = 2, two digits.
  store = prepare(
    db, work, "odd_ids", num_transformed_clients=n, transform="fedbeam.transforms:random_affine"
  )
  expected = tff_elements(tff_transforming(base, random_affine, n))
  assert len(expected) == n
  # Sorted raw ids: a, a_1, a_10, a_1_0, naïve, ... so "a" and "a_1" get index 02.
  assert set(expected) == {
    "a_00",
    "a_01",
    "a_02",
    "a_1_00",
    "a_1_01",
    "a_1_02",
    "a_10_00",
    "a_10_01",
    "a_1_0_00",
    "a_1_0_01",
    "naïve_00",
    "naïve_01",
    "日本_7_00",
    "日本_7_01",
    "🙂 space_00",
    "🙂 space_01",
  }
  assert_matches_tff(store, expected)
  rows = {r["client_id"]: r for r in read_manifest(store, read_metadata(store))}
  assert (rows["a_01"]["raw_client_id"], rows["a_01"]["pseudo_index"]) == ("a", 1)
  assert (rows["a_1_00"]["raw_client_id"], rows["a_1_00"]["pseudo_index"]) == ("a_1", 0)
  assert (rows["a_1_0_01"]["raw_client_id"], rows["a_1_0_01"]["pseudo_index"]) == ("a_1_0", 1)
  assert (rows["日本_7_01"]["raw_client_id"], rows["日本_7_01"]["pseudo_index"]) == ("日本_7", 1)
  assert load_client_data(store).num_examples("a_10_01") == 3


def test_in_process_and_multi_processing_stores_are_byte_identical(raw_db, work, affine_23):
  other = prepare(
    raw_db,
    work,
    "affine_23_mp",
    beam_args=MULTI_PROCESSING,
    num_transformed_clients=23,
    transform="fedbeam.transforms:random_affine",
  )

  def files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
      for name in names:
        path = os.path.join(dirpath, name)
        with open(path, "rb") as f:
          out[os.path.relpath(path, root)] = f.read()
    return out

  a, b = files(affine_23), files(other)
  assert sorted(a) == sorted(b)
  assert len([p for p in a if p.endswith(".tfrecord")]) == 23
  assert [p for p in a if a[p] != b[p]] == []


# --- errors ------------------------------------------------------------------


def test_fewer_transformed_than_raw_clients_fails(raw_db, work):
  out = work / "too_few"
  with pytest.raises(PrepareError) as e:
    prepare(raw_db, work, "too_few", num_transformed_clients=5)
  assert str(e.value) == (
    "--num-transformed-clients 5 is smaller than the number of raw clients "
    "(7); expansion cannot drop clients (pass at least 7)"
  )
  assert_not_committed(out)


@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_transformed_clients_fails(raw_db, work, n):
  with pytest.raises(PrepareError, match=rf"^--num-transformed-clients must be positive, got {n}$"):
    prepare(raw_db, work, f"non_positive_{n}", num_transformed_clients=n)
  assert_not_committed(work / f"non_positive_{n}")


@pytest.mark.parametrize(
  "reference, message",
  [
    (
      "fedbeam_no_such_module:fn",
      "--transform 'fedbeam_no_such_module:fn': cannot import module 'fedbeam_no_such_module': "
      "ModuleNotFoundError: No module named 'fedbeam_no_such_module'",
    ),
    (
      "fedbeam.transforms:no_such_transform",
      "--transform 'fedbeam.transforms:no_such_transform': module 'fedbeam.transforms' has no "
      "attribute 'no_such_transform'",
    ),
    ("fedbeam.transforms", "--transform 'fedbeam.transforms': expected 'module:function'"),
  ],
)
def test_transform_that_cannot_be_imported_fails(raw_db, work, reference, message):
  name = "bad_ref_" + reference.replace(":", "_").replace(".", "_")
  with pytest.raises(PrepareError) as e:
    prepare(raw_db, work, name, num_transformed_clients=14, transform=reference)
  assert str(e.value) == message
  assert_not_committed(work / name)


@pytest.mark.parametrize(
  "transform, message",
  [
    (
      factory_raises,
      "make_transform_fn('carol', 2) raised RuntimeError: no warp for this pseudo-client",
    ),
    (fn_raises_when_traced, "transform for raw client 'bob', index 1 raised ValueError:"),
    (fn_fails_when_run, "transform for raw client 'erin', index 1 raised InvalidArgumentError:"),
    (
      drops_label,
      "transform for raw client 'frank', index 1 changed the element structure: expected "
      "features ['label', 'pixels'], got",
    ),
    (
      widens_label,
      "transform for raw client 'alice', index 2 changed feature 'label' from "
      "TensorSpec(shape=(), dtype=tf.int32, name=None) to "
      "TensorSpec(shape=(), dtype=tf.int64, name=None)",
    ),
  ],
  ids=lambda v: v.__name__ if callable(v) else "",
)
def test_failing_transform_names_raw_client_and_index(raw_db, work, transform, message):
  name = f"failing_{transform.__name__}"
  with pytest.raises(PrepareError) as e:
    prepare(raw_db, work, name, num_transformed_clients=21, transform=transform)
  assert str(e.value).startswith(message), str(e.value)
  if transform is fn_raises_when_traced:
    assert "cannot warp this element" in str(e.value)
  if transform is fn_fails_when_run:
    assert "bad label" in str(e.value)
  assert_not_committed(work / name)


def _with_batch_form(batch_fn):
  """A make_transform_fn whose fn is the identity per element and `batch_fn` in batch."""

  def make(raw_client_id, index):
    del raw_client_id, index
    fn = lambda element: element  # noqa: E731
    fn.fedbeam_batch_fn = batch_fn
    return fn

  return make


def _raise(elements):
  raise RuntimeError("no batch today")


@pytest.mark.parametrize(
  "batch_fn, message",
  [
    (_raise, "raised RuntimeError: no batch today"),
    (
      lambda e: {"pixels": e["pixels"]},
      "changed the element structure: expected features ['label', 'pixels'], got ['pixels']",
    ),
    (
      lambda e: dict(e, label=e["label"].astype(np.int64)),
      "changed feature 'label' from int32 to int64",
    ),
    (
      lambda e: dict(e, pixels=e["pixels"][:, :27]),
      "changed the shape of feature 'pixels' from [28, 28] to [27, 28]",
    ),
    (
      lambda e: dict(e, label=e["label"][:-1]),
      "returned (2,) values of feature 'label' for 3 elements",
    ),
  ],
  ids=["raises", "drops", "widens", "crops", "short"],
)
def test_bad_batch_form_names_raw_client_and_index(batch_fn, message):
  spec = SPEC
  records = encode_examples(
    {"label": np.arange(3, dtype=np.int32), "pixels": np.zeros((3, 28, 28), np.float32)}, spec, 3
  )
  with pytest.raises(ExpansionError) as e:
    apply_transform(_with_batch_form(batch_fn), "dave", 2, records, spec)
  assert str(e.value) == f"transform for raw client 'dave', index 2 {message}"


def test_batch_form_receives_numpy_and_may_return_tensors():
  spec = SPEC
  columns = {
    "label": np.arange(3, dtype=np.int32),
    "pixels": np.arange(3 * 784, dtype=np.float32).reshape(3, 28, 28),
  }
  records = encode_examples(columns, spec, 3)
  seen = []

  def batch_fn(elements):
    seen.append({k: type(v) for k, v in elements.items()})
    return {k: tf.constant(v) * (2 if k == "pixels" else 1) for k, v in elements.items()}

  out = apply_transform(_with_batch_form(batch_fn), "dave", 1, records, spec)
  assert seen == [{"label": np.ndarray, "pixels": np.ndarray}]
  doubled = dict(columns, pixels=columns["pixels"] * 2)
  assert out == encode_examples(doubled, spec, 3)


# --- the built-in affine transform --------------------------------------------


def test_random_affine_index_zero_is_identity():
  assert random_affine("client_a", 0) is None
  assert AffineTransform(feature="image")("x", 0) is None


def test_random_affine_is_a_deterministic_warp_that_keeps_the_label():
  rng = np.random.default_rng(7)
  element = collections.OrderedDict(label=tf.constant(5, tf.int32), pixels=tf.constant(_image(rng)))
  first = random_affine("client_a", 1)(element)
  again = AffineTransform()("client_a", 1)(element)
  np.testing.assert_array_equal(first["pixels"].numpy(), again["pixels"].numpy())
  assert random_affine.parameters("client_a", 1) == AffineTransform().parameters("client_a", 1)
  assert isinstance(first, collections.OrderedDict)
  assert first["label"].dtype == tf.int32 and int(first["label"]) == 5
  assert first["pixels"].dtype == tf.float32 and first["pixels"].shape == (28, 28)
  original = element["pixels"].numpy()
  warped = first["pixels"].numpy()
  # A real warp: most pixels move, the image's mass moves too, values stay in range.
  assert np.mean(np.abs(warped - original) > 1e-3) > 0.3
  assert not np.allclose(warped, original, atol=1e-2)
  assert warped.min() >= original.min() - 1e-6 and warped.max() <= original.max() + 1e-6
  # Other pseudo-clients draw other warps.
  other = random_affine("client_a", 2)(element)["pixels"].numpy()
  assert not np.allclose(other, warped, atol=1e-3)
  assert random_affine.parameters("client_a", 1) != random_affine.parameters("client_b", 1)
  params = random_affine.parameters("client_a", 1)
  assert abs(params["angle_deg"]) <= 20 and abs(params["shear"]) <= 0.2
  assert abs(params["scale_x"] - 1) <= 0.1 and abs(params["tx_frac"]) <= 0.1


class _FixedWarp(AffineTransform):
  """An AffineTransform whose warp is given, to check the geometry."""

  def parameters(self, raw_client_id, index):
    return {
      "angle_deg": 90.0,
      "shear": 0.0,
      "scale_x": 1.0,
      "scale_y": 1.0,
      "tx_frac": 0.0,
      "ty_frac": 0.0,
    }


def test_affine_warp_geometry_quarter_turn_is_rot90():
  image = np.random.default_rng(1).random((9, 9)).astype(np.float32)
  turned = _FixedWarp()("x", 1)({"pixels": tf.constant(image)})["pixels"].numpy()
  np.testing.assert_allclose(turned, np.rot90(image, k=-1), atol=1e-5)
  flat = AffineTransform(
    max_rotation_deg=0, max_shear=0, max_scale_change=0, max_translation_frac=0
  )
  same = flat("x", 1)({"pixels": tf.constant(image)})["pixels"].numpy()
  np.testing.assert_allclose(same, image, atol=1e-6)


def _expanded_ids(n):
  """Pseudo-client ids TFF's TransformingClientData scheme gives RAW_SIZES, with raw ids."""
  k, g, digits = expansion_plan(len(RAW_SIZES), n)
  out = []
  for j, raw in enumerate(sorted(RAW_SIZES)):
    for index in range(k + (1 if j < g else 0)):
      out.append((pseudo_client_id(raw, index, digits) if digits else raw, raw))
  return sorted(out)


@pytest.mark.parametrize("n", [None, 7, 23, 100])
def test_pseudo_client_sizes_plan_every_expanded_client_with_its_raw_count(n):
  want = [(cid, raw, RAW_SIZES[raw]) for cid, raw in _expanded_ids(n)]
  with TestPipeline() as p:
    raw_sizes = p | beam.Create(sorted(RAW_SIZES.items()))
    made_here = raw_sizes | "Alone" >> PseudoClientSizes(n)
    plan = raw_sizes | beam.Keys() | PlanPseudoClients(n)
    shared = raw_sizes | "WithPlan" >> PseudoClientSizes(n, plan=plan)
    assert_that(made_here, equal_to(want), label="SizesAlone")
    assert_that(shared, equal_to(want), label="SizesWithPlan")
    assert_that(plan["num_raw"], equal_to([len(RAW_SIZES)]), label="NumRaw")


@pytest.mark.parametrize("n", [None, 23])
def test_pseudo_clients_of_names_each_raw_clients_share(n):
  k, g, _ = expansion_plan(len(RAW_SIZES), n)
  remainder_last = sorted(RAW_SIZES)[g - 1] if g else None
  got = sorted(
    (cid, raw)
    for raw in RAW_SIZES
    for cid, _ in pseudo_clients_of(raw, len(RAW_SIZES), remainder_last, n)
  )
  assert got == _expanded_ids(n)
  assert [i for _, i in pseudo_clients_of("alice", len(RAW_SIZES), remainder_last, n)] == list(
    range(k + (1 if g else 0))
  )


def test_a_batch_form_that_is_not_callable_names_raw_client_and_index():
  records = encode_examples(
    {"label": np.arange(3, dtype=np.int32), "pixels": np.zeros((3, 28, 28), np.float32)}, SPEC, 3
  )
  with pytest.raises(ExpansionError) as e:
    apply_transform(_with_batch_form("not a function"), "dave", 2, records, SPEC)
  assert str(e.value).startswith("transform for raw client 'dave', index 2: ")
  assert "fedbeam_batch_fn must be callable" in str(e.value)
