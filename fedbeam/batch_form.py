"""The whole-client form of a per-element function: one declared protocol for both halves.

fedbeam applies two kinds of user functions element by element, as `tf.data.Dataset.map`
would: a pseudo-client transform `fn(element) -> element` (from a `make_transform_fn`,
`fedbeam.transforms`, run by the prepare pipeline) and a model's `preprocess(dataset) ->
dataset` (`fedbeam.runtime.models`, run by the simulation loop). Either may also declare the
same computation over all of one client's elements at once, stacked on axis 0: its **batch
form**. fedbeam then calls the batch form once per client instead of mapping element by
element, which costs a small client more than the work itself. The batch form must give
exactly the elements the per-element form gives, in the same order; what it receives differs
by the function it belongs to:

- of a transform `fn`: `{feature name: numpy array [n, *shape]}` in the element spec's dtypes
  (strings as `bytes` objects); it returns arrays, or anything `np.asarray` accepts, with the
  same features, dtypes and shapes (`docs/expansion-and-split.md`);
- of a `preprocess`: `{feature name: tf.Tensor [n, *shape]}`, the tensors
  `StoreClientData.client_tensors_fn` returns; it returns the model examples stacked on axis 0
  (`Dataset.from_tensor_slices` of them must equal `preprocess` of the client's dataset).

The declaration is the attribute `fedbeam_batch_fn` on the per-element function
(`BATCH_FN_ATTRIBUTE`), which transforms and models written before this module existed set by
hand (`fn.fedbeam_batch_fn = batch_fn`) and which keeps working unchanged. `with_batch_form`
sets it and checks it, `batch_form_of` is the one place fedbeam reads it, and `HasBatchForm`
is the typed shape of a function that carries one. A function whose attribute is not callable
is refused with a TypeError naming the function, instead of failing later inside a worker.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol, TypeVar, runtime_checkable

__all__ = ["BATCH_FN_ATTRIBUTE", "BatchFn", "HasBatchForm", "batch_form_of", "with_batch_form"]

BATCH_FN_ATTRIBUTE = "fedbeam_batch_fn"

# All of one client's elements stacked on axis 0 -> the result, stacked the same way.
BatchFn = Callable[[Mapping[str, Any]], Mapping[str, Any]]

_F = TypeVar("_F", bound=Callable[..., Any])


@runtime_checkable
class HasBatchForm(Protocol):
  """A per-element function (transform or preprocess) that declares its batch form."""

  fedbeam_batch_fn: BatchFn

  def __call__(self, __arg: Any) -> Any: ...


def with_batch_form(fn: _F, batch_fn: BatchFn) -> _F:
  """Declares `batch_fn` as the batch form of `fn` and returns `fn` itself.

  Raises:
    TypeError: `fn` or `batch_fn` is not callable, or `fn` takes no attributes.
  """
  if not callable(fn) or not callable(batch_fn):
    raise TypeError(
      f"with_batch_form needs two callables, got {type(fn).__name__} and {type(batch_fn).__name__}"
    )
  try:
    setattr(fn, BATCH_FN_ATTRIBUTE, batch_fn)
  except (AttributeError, TypeError) as e:
    raise TypeError(
      f"cannot declare a batch form on {fn!r}: {e}; wrap it in a Python function first"
    ) from None
  return fn


def batch_form_of(fn: Any) -> Optional[BatchFn]:
  """The batch form `fn` declares, or None when it declares none.

  Raises:
    TypeError: `fn` has a `fedbeam_batch_fn` that is not callable (named).
  """
  batch_fn = getattr(fn, BATCH_FN_ATTRIBUTE, None)
  if batch_fn is not None and not callable(batch_fn):
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    raise TypeError(
      f"{name}.{BATCH_FN_ATTRIBUTE} must be callable (the function's batch "
      f"form), got {type(batch_fn).__name__}"
    )
  return batch_fn
