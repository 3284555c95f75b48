"""The built-in transforms: identity, and the random affine warp's two forms."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from fedbeam import transforms


def _elements(n=6, size=(28, 28), seed=0):
  rng = np.random.default_rng(seed)
  return collections.OrderedDict(
    label=tf.constant(np.arange(n, dtype=np.int32)),
    pixels=tf.constant(rng.random((n,) + size, dtype=np.float32)),
  )


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
    np.testing.assert_array_equal(batched["pixels"][i], element["pixels"])
    assert int(batched["label"][i]) == int(element["label"]) == i


def test_affine_warp_is_a_real_warp_seeded_by_raw_id_and_index():
  elements = _elements(n=2, size=(8, 8))
  warped = transforms.random_affine("a", 1).fedbeam_batch_fn(elements)["pixels"]
  again = transforms.random_affine("a", 1).fedbeam_batch_fn(elements)["pixels"]
  other = transforms.random_affine("a", 2).fedbeam_batch_fn(elements)["pixels"]
  np.testing.assert_array_equal(warped, again)
  assert not np.array_equal(warped, elements["pixels"].numpy())
  assert not np.array_equal(warped, other)
  assert transforms.random_affine("a", 0) is None


def test_affine_keeps_channels_and_dtype():
  rng = np.random.default_rng(3)
  images = tf.constant(rng.random((3, 8, 8, 3), dtype=np.float32))
  out = transforms.random_affine("rgb", 1).fedbeam_batch_fn({"pixels": images})["pixels"]
  assert out.shape == (3, 8, 8, 3) and out.dtype == np.float32


def _tf_warp(images, inverse):
  # The coefficients spelled out, not through projective_coefficients: the oracle.
  transform = tf.constant(
    [
      [
        inverse[0, 0],
        inverse[0, 1],
        inverse[0, 2],
        inverse[1, 0],
        inverse[1, 1],
        inverse[1, 2],
        inverse[2, 0],
        inverse[2, 1],
      ]
    ],
    tf.float32,
  )
  return tf.raw_ops.ImageProjectiveTransformV3(
    images=images,
    transforms=tf.tile(transform, [images.shape[0], 1]),
    output_shape=tf.constant(images.shape[1:3]),
    fill_value=0.0,
    interpolation="BILINEAR",
    fill_mode="NEAREST",
  ).numpy()


def test_numpy_bilinear_warp_equals_tensorflows_op_bit_for_bit():
  rng = np.random.default_rng(7)
  for trial in range(200):
    height, width = (28, 28) if trial % 2 else tuple(int(d) for d in rng.integers(2, 40, 2))
    channels = 3 if trial % 5 == 0 else 1
    p = transforms.random_affine.parameters(f"client-{trial}", 1 + trial % 4)
    inverse = transforms.affine_matrix(
      p["angle_deg"],
      p["shear"],
      p["scale_x"],
      p["scale_y"],
      p["tx_frac"] * width,
      p["ty_frac"] * height,
      height,
      width,
    )
    if trial % 7 == 0:  # Far outside the image: every pixel clamps to the border.
      inverse[:2, 2] += rng.choice([-1, 1], 2) * 5 * max(height, width)
    scale = rng.choice([1.0, 255.0, 1e-3, 1e6])
    images = (rng.standard_normal((4, height, width, channels)) * scale).astype(np.float32)
    expected = _tf_warp(images, inverse)
    got = transforms.bilinear_warp(images, inverse)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(
      got.view(np.uint32),
      expected.view(np.uint32),
      err_msg=f"trial {trial}: {height}x{width}x{channels}",
    )


def test_affine_batch_form_keeps_integer_images_equal_to_the_mapped_form():
  rng = np.random.default_rng(5)
  elements = collections.OrderedDict(
    pixels=tf.constant(rng.integers(0, 256, (4, 9, 11), dtype=np.uint8))
  )
  fn = transforms.random_affine("uint8", 3)
  mapped = list(tf.data.Dataset.from_tensor_slices(elements).map(fn).as_numpy_iterator())
  batched = fn.fedbeam_batch_fn(elements)["pixels"]
  assert batched.dtype == np.uint8
  for i, element in enumerate(mapped):
    np.testing.assert_array_equal(batched[i], element["pixels"])


def test_affine_rejects_features_that_are_not_images():
  fn = transforms.random_affine("a", 1)
  with pytest.raises(ValueError, match="'pixels' must be a \\[H, W\\] or \\[H, W, C\\] image"):
    fn.fedbeam_batch_fn({"pixels": np.zeros((2, 5), np.float32)})


def test_affine_warps_a_flat_square_image_as_the_same_image_reshaped():
  # A TFRecord of 28x28 images inferred without --element-spec holds [784].
  rng = np.random.default_rng(9)
  images = rng.random((3, 28, 28), dtype=np.float32)
  fn = transforms.random_affine("f0000", 2)
  flat = fn.fedbeam_batch_fn({"pixels": images.reshape(3, 784)})["pixels"]
  square = fn.fedbeam_batch_fn({"pixels": images})["pixels"]
  assert flat.shape == (3, 784)
  np.testing.assert_array_equal(flat, square.reshape(3, 784))
  assert not np.array_equal(flat, images.reshape(3, 784))
  mapped = list(
    tf.data.Dataset.from_tensor_slices({"pixels": images.reshape(3, 784)})
    .map(fn)
    .as_numpy_iterator()
  )
  for i, element in enumerate(mapped):
    np.testing.assert_array_equal(element["pixels"], flat[i])


def test_affine_rejects_a_flat_feature_that_is_not_square_naming_its_shape():
  fn = transforms.random_affine("a", 1)
  with pytest.raises(ValueError, match=r"'pixels' must be .* got shape \[785\]"):
    fn.fedbeam_batch_fn({"pixels": np.zeros((2, 785), np.float32)})
