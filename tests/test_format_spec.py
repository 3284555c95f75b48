"""The element spec's JSON form: what it accepts and the TensorSpecs it gives."""

import pytest
import tensorflow as tf

from fedbeam.format.spec import ElementSpec, ElementSpecError


def test_element_spec_json_accepts_only_a_variable_leading_dimension():
  spec = ElementSpec.from_json(
    {"s": {"dtype": "string", "shape": [None]}, "v": {"dtype": "int64", "shape": [None, 3]}}
  )
  assert spec.to_tensor_specs()["v"] == tf.TensorSpec([None, 3], tf.int64)
  with pytest.raises(ElementSpecError, match="only the leading dimension"):
    ElementSpec.from_json({"v": {"dtype": "int64", "shape": [3, None]}})
  with pytest.raises(ElementSpecError, match="not supported"):
    ElementSpec.from_json({"v": {"dtype": "complex64", "shape": []}})
