"""Parquet record batches as ColumnBatches: columnar encoding equals the row-by-row one."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedbeam.format.spec import ElementSpec
from fedbeam.pipelines.column_batches import encode_columns
from fedbeam.pipelines.example_records import as_input_records, encode_record, input_size
from fedbeam.pipelines.parquet_source import _ReadParquetFile
from fedbeam.pipelines.records import InputError
from fedbeam.pipelines.spec_inference import InferElementSpecFn


def _batches(tmp_path, table, batch_rows=None):
  path = str(tmp_path / "in.parquet")
  pq.write_table(table, path)
  return path, list(_ReadParquetFile("cid").process(path))


def _row_by_row(batch, spec):
  return [(r.client_id, r.position, encode_record(r, spec)) for r in as_input_records(batch)]


def _table(n=50):
  rng = np.random.RandomState(0)
  pixels = rng.uniform(size=(n, 4, 3)).astype(np.float32)
  rows = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 3)
  return pa.table(
    {
      "cid": [f"c{i % 7}" for i in range(n)],
      "label": pa.array(rng.randint(0, 200, size=n), pa.int64()),
      "pixels": pa.FixedSizeListArray.from_arrays(rows, 4),
      "name": [f"n{i}" for i in range(n)],
    }
  )


def test_encode_columns_gives_the_records_encode_record_gives(tmp_path):
  _, batches = _batches(tmp_path, _table())
  assert [input_size(b) for b in batches] == [50]
  for dtype in ("int64", "uint8", "float32"):
    spec = ElementSpec.from_json(
      {
        "label": {"dtype": dtype, "shape": []},
        "name": {"dtype": "string", "shape": []},
        "pixels": {"dtype": "float32", "shape": [4, 3]},
      }
    )
    fast = encode_columns(batches[0], spec)
    assert fast is not None and fast == _row_by_row(batches[0], spec)
  # Nested values keep their shape: a 4x3 value does not fit [12].
  flat = ElementSpec.from_json(
    {
      "label": {"dtype": "int64", "shape": []},
      "name": {"dtype": "string", "shape": []},
      "pixels": {"dtype": "float32", "shape": [12]},
    }
  )
  assert encode_columns(batches[0], flat) is None
  with pytest.raises(InputError, match="'pixels' has shape \\[4, 3\\], which does not fit"):
    _row_by_row(batches[0], flat)


def test_encode_columns_leaves_rows_that_need_checks_to_the_row_by_row_way(tmp_path):
  path, batches = _batches(tmp_path, _table())
  spec = ElementSpec.from_json(
    {
      "label": {"dtype": "int8", "shape": []},
      "name": {"dtype": "string", "shape": []},
      "pixels": {"dtype": "float32", "shape": [4, 3]},
    }
  )
  assert encode_columns(batches[0], spec) is None
  with pytest.raises(InputError, match=rf"{path} row \d+ .*'label' has value \d+ outside"):
    _row_by_row(batches[0], spec)
  wrong_shape = ElementSpec.from_json(
    {
      "label": {"dtype": "int64", "shape": []},
      "name": {"dtype": "string", "shape": []},
      "pixels": {"dtype": "float32", "shape": [3, 4]},
    }
  )
  assert encode_columns(batches[0], wrong_shape) is None
  with pytest.raises(InputError, match="'pixels' has shape \\[4, 3\\]"):
    _row_by_row(batches[0], wrong_shape)


def test_variable_length_columns_are_encoded_row_by_row_with_their_dims(tmp_path):
  table = pa.table({"cid": ["a", "b", "c"], "tokens": pa.array([[[1, 2]], [], [[3, 4], [5, 6]]])})
  path, batches = _batches(tmp_path, table)
  spec = ElementSpec.from_json({"tokens": {"dtype": "int64", "shape": [None, 2]}})
  assert encode_columns(batches[0], spec) is None
  records = list(as_input_records(batches[0]))
  assert [r.features["tokens"].dims for r in records] == [(1, 2), (0, None), (2, 2)]
  assert [r.source for r in records] == [f"{path} row {i}" for i in range(3)]
  assert len(_row_by_row(batches[0], spec)) == 3


def _infer(elements):
  fn = InferElementSpecFn()
  acc = fn.create_accumulator()
  for element in elements:
    acc = fn.add_input(acc, element)
  return fn.extract_output(fn.merge_accumulators([acc]))


def test_spec_inference_adds_a_column_batch_at_once_as_its_rows_would(tmp_path):
  table = pa.table(
    {
      "cid": ["a", "b", "c"],
      "tokens": pa.array([[[1, 2]], [], [[3, 4], [5, 6]]]),
      "pixels": pa.array([[[0.5] * 3] * 2] * 3, pa.list_(pa.list_(pa.float32()))),
      "label": pa.array([1, 2, 3], pa.uint8()),
    }
  )
  _, batches = _batches(tmp_path, table)
  whole = _infer(batches)
  assert whole == _infer(list(as_input_records(batches[0])))
  assert whole.to_json() == {
    "label": {"dtype": "uint8", "shape": []},
    "pixels": {"dtype": "float32", "shape": [2, 3]},
    "tokens": {"dtype": "int64", "shape": [None, 2]},
  }


def test_spec_inference_names_the_rows_whose_inner_dims_differ(tmp_path):
  table = pa.table({"cid": ["a", "b", "c"], "m": pa.array([[[1, 2]], [[1, 2]], [[1, 2, 3]]])})
  path, batches = _batches(tmp_path, table)
  with pytest.raises(InputError, match=rf"{path} row 0 and .* in {path} row 2; only the leading"):
    _infer(batches)
