"""Built-in `make_transform_fn`s for pseudo-client expansion.

A `make_transform_fn(raw_client_id: str, index: int)` returns `fn(element) ->
element` (as in `tf.data.Dataset.map`) or None for "no transformation"
(the contract of `tff.simulation.TransformingClientData`). A `fn` may also
declare a batch form (`fedbeam.batch_form.with_batch_form(fn, batch_fn)`, which
sets `fn.fedbeam_batch_fn`): `batch_fn(elements) -> elements`, the same transform
applied to all of a client's elements stacked on axis 0 as numpy arrays; the pipeline
then calls it once per pseudo-client instead of mapping element by element
(the built-in affine warp does, in numpy, and tests pin both forms to the same
bits). Reference them
from the CLI as `fedbeam.transforms:identity` or
`fedbeam.transforms:random_affine`.

"For images, make_transform_fn('client_a', 0) may be the identity, while
make_transform_fn('client_a', 1) may be a random rotation whose angle is
determined by a hash of 'client_a' and 1." -- the seed's TransformingClientData
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import numpy as np

from fedbeam.batch_form import with_batch_form
from fedbeam.seeded_hash import seeded_int

__all__ = [
  "identity",
  "transform_seed",
  "affine_matrix",
  "projective_coefficients",
  "bilinear_warp",
  "AffineTransform",
  "random_affine",
]


def identity(raw_client_id: str, index: int) -> None:
  """Every pseudo-client holds its raw client's examples unchanged."""
  del raw_client_id, index
  return None


def transform_seed(raw_client_id: str, index: int, salt: str = "") -> int:
  """A 63-bit seed from a stable hash of (salt, raw id, index); never Python's hash()."""
  return seeded_int(salt, raw_client_id, index, bits=63)


def affine_matrix(
  angle_deg: float,
  shear: float,
  scale_x: float,
  scale_y: float,
  tx: float,
  ty: float,
  height: int,
  width: int,
) -> np.ndarray:
  """3x3 matrix mapping output pixel (x, y, 1) to input pixel, for a warp about the center.

  The forward warp is: move the center to the origin, scale, shear, rotate,
  move back and translate by (tx, ty) pixels. Image warps sample the input,
  so this returns the inverse of that forward map.
  """
  cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
  a = math.radians(angle_deg)
  to_origin = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], dtype=np.float64)
  scale = np.diag([scale_x, scale_y, 1.0])
  shear_m = np.array([[1, shear, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
  rotate = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
  back = np.array([[1, 0, cx + tx], [0, 1, cy + ty], [0, 0, 1]], dtype=np.float64)
  forward = back @ rotate @ shear_m @ scale @ to_origin
  # Closed-form inverse of an affine map [[A, t], [0, 1]]: [[A^-1, -A^-1 t], [0, 1]]
  # (np.linalg.inv costs more than the warp of a small client).
  (a, b), (c, d) = forward[:2, :2]
  det = a * d - b * c
  a_inv = np.array([[d, -b], [-c, a]]) / det
  out = np.eye(3)
  out[:2, :2] = a_inv
  out[:2, 2] = -a_inv @ forward[:2, 2]
  return out


def _image_dims(feature: str, shape: Optional[tuple]) -> tuple[int, int, Optional[int]]:
  """(height, width, channels or None) of one image of `shape` (without the batch axis).

  [H, W] and [H, W, C] are images as they are. A flat [n] feature whose n is a
  perfect square is a square one-channel image stored row by row: what a
  TFRecord of 28x28 images inferred without --element-spec holds ([784]).

  Raises:
    ValueError: any other shape, naming the feature and the shape.
  """
  if shape is None:
    raise ValueError(f"feature {feature!r} must be an image of known shape, got unknown rank")
  if len(shape) in (2, 3) and all(d is not None for d in shape):
    return int(shape[0]), int(shape[1]), (int(shape[2]) if len(shape) == 3 else None)
  if len(shape) == 1 and shape[0] is not None:
    side = math.isqrt(int(shape[0]))
    if side > 0 and side * side == int(shape[0]):
      return side, side, None
  raise ValueError(
    f"feature {feature!r} must be a [H, W] or [H, W, C] image of known height "
    f"and width, or a flat square image [H*H], got shape {list(shape)}"
  )


def projective_coefficients(inverse: np.ndarray) -> np.ndarray:
  """The 8 float32 coefficients [a0, a1, a2, b0, b1, b2, c0, c1] of TensorFlow's projective
  warp ops, from a 3x3 map of output to input pixels normalized so that its last entry is 1."""
  return np.asarray(inverse, np.float32).reshape(-1)[:8]


def bilinear_warp(images: np.ndarray, inverse: np.ndarray) -> np.ndarray:
  """Warps float32 images [N, H, W, C] by one projective map, as TensorFlow does.

  `inverse` (3x3) maps output pixel (x, y, 1) to input pixel coordinates.
  Computes, in float32 and in the same order of operations, what
  `tf.raw_ops.ImageProjectiveTransformV3(interpolation="BILINEAR",
  fill_mode="NEAREST", fill_value=0)` computes (its kernel in
  tensorflow/core/kernels/image/image_ops.h), so the two agree bit for bit
  (`tests/test_transforms.py` pins them). All images share the map, so the
  sampling positions and weights are computed once for the batch.
  """
  n, height, width, channels = images.shape
  t = projective_coefficients(inverse)
  out_y, out_x = np.meshgrid(
    np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij"
  )
  projection = t[6] * out_x + t[7] * out_y + np.float32(1)
  in_x = (t[0] * out_x + t[1] * out_y + t[2]) / projection
  in_y = (t[3] * out_x + t[4] * out_y + t[5]) / projection
  # fill_mode NEAREST clamps the sampling position into the image.
  x = np.minimum(np.maximum(in_x, np.float32(0)), np.float32(width - 1))
  y = np.minimum(np.maximum(in_y, np.float32(0)), np.float32(height - 1))
  x_floor, y_floor = np.floor(x), np.floor(y)
  x_ceil, y_ceil = x_floor + np.float32(1), y_floor + np.float32(1)
  # The ceiling may fall one past the last row or column, where TensorFlow
  # reads fill_value (0): pad with it rather than branch. Pixels go first, so
  # each read gathers whole rows (one pixel of every image and channel).
  padded = np.zeros((height + 1, width + 1, n, channels), np.float32)
  padded[:height, :width] = images.transpose(1, 2, 0, 3)
  flat = padded.reshape((height + 1) * (width + 1), n * channels)
  corner = (y_floor.astype(np.intp) * (width + 1) + x_floor.astype(np.intp)).reshape(-1)
  v00, v01, v10, v11 = (
    np.take(flat, corner + offset, axis=0) for offset in (0, 1, width + 1, width + 2)
  )
  w_x_floor = (x_ceil - x).reshape(-1, 1)
  w_x_ceil = (x - x_floor).reshape(-1, 1)
  w_y_floor = (y_ceil - y).reshape(-1, 1)
  w_y_ceil = (y - y_floor).reshape(-1, 1)
  # In place, in TensorFlow's order: (x_ceil - x) * v00 + (x - x_floor) * v01
  # for each row, then the same across the rows (products commute exactly).
  for weight, value in ((w_x_floor, v00), (w_x_ceil, v01), (w_x_floor, v10), (w_x_ceil, v11)):
    np.multiply(value, weight, out=value)
  value_y_floor = np.add(v00, v01, out=v00)
  value_y_ceil = np.add(v10, v11, out=v10)
  np.multiply(value_y_floor, w_y_floor, out=value_y_floor)
  np.multiply(value_y_ceil, w_y_ceil, out=value_y_ceil)
  out = np.add(value_y_floor, value_y_ceil, out=value_y_floor)
  return out.reshape(height, width, n, channels).transpose(2, 0, 1, 3)


@dataclasses.dataclass(frozen=True)
class AffineTransform:
  """A make_transform_fn: a random affine warp of one image feature per pseudo-client.

  Index 0 is the identity (returns None); index i > 0 warps `feature` (a
  [H, W] or [H, W, C] float image, or a flat [H*H] square one-channel image,
  as a TFRecord input inferred without --element-spec holds) by a rotation, shear, scale and
  translation drawn from a generator seeded by a hash of (raw id, i), so
  every rerun and every worker draws the same warp. Other features pass
  through. Pixels outside the source repeat the nearest border pixel, which
  suits both white (EMNIST) and black (digits) backgrounds.
  """

  feature: str = "pixels"
  max_rotation_deg: float = 20.0
  max_shear: float = 0.2
  max_scale_change: float = 0.1
  max_translation_frac: float = 0.1

  def parameters(self, raw_client_id: str, index: int) -> dict[str, float]:
    """The warp of pseudo-client `index` of `raw_client_id`."""
    rng = np.random.default_rng(transform_seed(raw_client_id, index, "affine"))
    return {
      "angle_deg": float(rng.uniform(-self.max_rotation_deg, self.max_rotation_deg)),
      "shear": float(rng.uniform(-self.max_shear, self.max_shear)),
      "scale_x": float(1.0 + rng.uniform(-self.max_scale_change, self.max_scale_change)),
      "scale_y": float(1.0 + rng.uniform(-self.max_scale_change, self.max_scale_change)),
      "tx_frac": float(rng.uniform(-self.max_translation_frac, self.max_translation_frac)),
      "ty_frac": float(rng.uniform(-self.max_translation_frac, self.max_translation_frac)),
    }

  def __call__(self, raw_client_id: str, index: int) -> Optional[Callable[[Any], Any]]:
    if index == 0:
      return None
    params = self.parameters(raw_client_id, index)
    feature = self.feature

    def inverse(height: int, width: int) -> np.ndarray:
      return affine_matrix(
        params["angle_deg"],
        params["shear"],
        params["scale_x"],
        params["scale_y"],
        params["tx_frac"] * width,
        params["ty_frac"] * height,
        height,
        width,
      )

    def warp(element):
      # What tf.data maps (traced, graph mode): TensorFlow's projective warp op.
      import tensorflow as tf  # pylint: disable=g-import-not-at-top

      image = element[feature]
      known = image.shape.rank is not None
      height, width, channels = _image_dims(
        feature, tuple(image.shape.as_list()) if known else None
      )
      transform = tf.constant(projective_coefficients(inverse(height, width))[np.newaxis])
      batch = tf.reshape(tf.cast(image, tf.float32), [height, width, channels or 1])
      warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=batch[tf.newaxis],
        transforms=transform,
        output_shape=tf.constant([height, width]),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
      )[0]
      out = dict(element)
      out[feature] = tf.cast(tf.reshape(warped, tf.shape(image)), image.dtype)
      return type(element)(out)

    def warp_all(elements):
      # What the pipeline calls: every element of the pseudo-client at once,
      # in numpy, so a worker need not load TensorFlow.
      images = np.asarray(elements[feature])
      height, width, channels = _image_dims(feature, images.shape[1:])
      batch = images.astype(np.float32, copy=False).reshape(
        len(images), height, width, channels or 1
      )
      warped = bilinear_warp(batch, inverse(height, width))
      out = dict(elements)
      out[feature] = warped.reshape(images.shape).astype(images.dtype, copy=False)
      return type(elements)(out)

    return with_batch_form(warp, warp_all)


random_affine = AffineTransform()
"""The default random affine make_transform_fn on the `pixels` feature."""
