"""The built-in transforms: identity, and the random affine warp's two forms."""

import collections

import numpy as np
import tensorflow as tf

from fedbeam import transforms


def _elements(n=6, size=(28, 28), seed=0):
  rng = np.random.default_rng(seed)
  return collections.OrderedDict(
      label=tf.constant(np.arange(n, dtype=np.int32)),
      pixels=tf.constant(rng.random((n,) + size, dtype=np.float32)))


def test_identity_transforms_nothing():
  assert transforms.identity("any", 0) is None
  assert transforms.identity("any", 7) is None


def test_affine_batch_form_equals_mapping_element_by_element():
  elements = _elements()
  fn = transforms.random_affine("writer_1", 2)
  mapped = list(tf.data.Dataset.from_tensor_slices(elements).map(fn).as_numpy_iterator())
  batched = fn.fedbeam_batch_fn(elements)
  assert list(batched) == ["label", "pixels"]
  for i, element in enumerate(mapped):
    np.testing.assert_array_equal(batched["pixels"][i].numpy(), element["pixels"])
    assert int(batched["label"][i]) == int(element["label"]) == i


def test_affine_warp_is_a_real_warp_seeded_by_raw_id_and_index():
  elements = _elements(n=2, size=(8, 8))
  warped = transforms.random_affine("a", 1).fedbeam_batch_fn(elements)["pixels"].numpy()
  again = transforms.random_affine("a", 1).fedbeam_batch_fn(elements)["pixels"].numpy()
  other = transforms.random_affine("a", 2).fedbeam_batch_fn(elements)["pixels"].numpy()
  np.testing.assert_array_equal(warped, again)
  assert not np.array_equal(warped, elements["pixels"].numpy())
  assert not np.array_equal(warped, other)
  assert transforms.random_affine("a", 0) is None


def test_affine_keeps_channels_and_dtype():
  rng = np.random.default_rng(3)
  images = tf.constant(rng.random((3, 8, 8, 3), dtype=np.float32))
  out = transforms.random_affine("rgb", 1).fedbeam_batch_fn({"pixels": images})["pixels"]
  assert out.shape == (3, 8, 8, 3) and out.dtype == tf.float32
