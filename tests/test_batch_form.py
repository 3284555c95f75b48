"""The declared batch form of a per-element function (`fedbeam.batch_form`)."""

import numpy as np
import pytest

from fedbeam import batch_form, transforms


def _per_element(element):
  return element


def test_with_batch_form_declares_it_and_returns_the_function_itself():
  def fn(element):
    return element

  def batch_fn(elements):
    return elements

  assert batch_form.with_batch_form(fn, batch_fn) is fn
  assert batch_form.batch_form_of(fn) is batch_fn
  assert fn.fedbeam_batch_fn is batch_fn  # The attribute earlier code set by hand.
  assert isinstance(fn, batch_form.HasBatchForm)


def test_a_batch_form_set_by_hand_is_read_as_before():
  def fn(element):
    return element

  fn.fedbeam_batch_fn = lambda elements: elements
  assert batch_form.batch_form_of(fn) is fn.fedbeam_batch_fn


def test_a_function_without_a_batch_form_has_none():
  assert batch_form.batch_form_of(_per_element) is None
  assert not isinstance(_per_element, batch_form.HasBatchForm)


def test_a_batch_form_that_is_not_callable_is_refused_naming_the_function():
  def fn(element):
    return element

  fn.fedbeam_batch_fn = "warp_all"
  with pytest.raises(TypeError, match=r"fn\.fedbeam_batch_fn must be callable"):
    batch_form.batch_form_of(fn)
  with pytest.raises(TypeError, match="two callables"):
    batch_form.with_batch_form(fn, "warp_all")


def test_a_function_that_takes_no_attributes_is_refused():
  with pytest.raises(TypeError, match="cannot declare a batch form on"):
    batch_form.with_batch_form(len, lambda elements: elements)


def test_the_builtin_affine_transform_declares_its_numpy_batch_form():
  fn = transforms.random_affine("a", 1)
  batch_fn = batch_form.batch_form_of(fn)
  assert batch_fn is not None
  out = batch_fn({"pixels": np.zeros((2, 8, 8), np.float32), "label": np.arange(2)})
  assert out["pixels"].shape == (2, 8, 8) and list(out["label"]) == [0, 1]
