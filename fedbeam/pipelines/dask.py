"""Beam's DaskRunner with three of its bugs fixed, for `--runner=fedbeam.pipelines.dask.DaskRunner`.

Beam 2.72's `apache_beam.runners.dask.dask_runner.DaskRunner` runs each
ParDo as one Dask `map_partitions` task per partition (a bundle), and:

1. drops what a DoFn emits in `finish_bundle`: `apply_dofn_to_bundle`
   (`transform_evaluator.py`) collects the outputs before it calls
   `invoke_finish_bundle()`;
2. shares one list of outputs between every bundle of a ParDo that runs in
   one process (the receivers are built once, when the graph is built, and
   never cleared), so a bundle also returns the outputs of the bundles
   that ran before it there. That happens whenever a side input is
   computed inside a worker task: a count of 1,311 clients came out as
   6,555;
3. hands every output of a multi-output ParDo to every consumer: the graph
   visitor looks up a consumer's input by the producing transform
   (`dask_runner.py`), not by the output's tag.

This subclass changes only the ParDo translation and the visitor's lookup:
each bundle gets receivers of its own, its outputs are collected after
`finish_bundle`, and a multi-output ParDo's bag carries (tag, value) pairs
that each consumer filters to its own tag. Nothing in Beam is patched; the
fixes apply to pipelines run with this runner only. docs/upstream/dask-runner.md
describes the bugs with reproducers for Beam's maintainers, and
tests/test_dask_runner.py shows each on Beam's runner and gone on this one.

Beam resolves `--runner` by importing the module and taking the class
(`apache_beam.runners.runner.create_runner`), so the flag names the class
with dots. Needs the `dask` extra (`pip install fedbeam[dask]`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Optional

from apache_beam import DoFn, pvalue
from apache_beam.pipeline import AppliedPTransform, PipelineVisitor
from apache_beam.runners.common import (
  DoFnContext,
  DoFnInvoker,
  DoFnSignature,
  Receiver,
  _OutputHandler,
)
from apache_beam.runners.dask import dask_runner, transform_evaluator
from apache_beam.runners.runner import PipelineState
from apache_beam.transforms.sideinputs import SideInputMap

if TYPE_CHECKING:
  from apache_beam.options.pipeline_options import PipelineOptions
  from apache_beam.pipeline import Pipeline

__all__ = ["DaskRunner"]


class _BundleReceiver(Receiver):
  """Appends (tag, value) of each output to its bundle's own list."""

  def __init__(self, tag: Optional[str], out: list):
    self._tag = tag
    self._out = out

  def receive(self, windowed_value) -> None:
    self._out.append((self._tag, windowed_value.value))


class _BundleReceivers(dict):
  """Tag -> receiver, made on first use, all writing to one bundle's list."""

  def __init__(self, out: list):
    super().__init__()
    self._out = out

  def __missing__(self, tag):
    receiver = self[tag] = _BundleReceiver(tag, self._out)
    return receiver


def _run_bundle(
  items, signature: DoFnSignature, window_fn, invoker_kwargs: dict, tagged: bool
) -> list:
  """Runs one Dask partition as one bundle; returns its outputs, `finish_bundle`'s included.

  `tagged`: the ParDo has several outputs, so each output leaves as
  (tag, value), the main output's tag being None.
  """
  out: list = []
  receivers = _BundleReceivers(out)
  handler = _OutputHandler(
    window_fn=window_fn,
    main_receivers=receivers[None],
    tagged_receivers=receivers,
    per_element_output_counter=None,
    output_batch_converter=None,
    process_yields_batches=False,
    process_batch_yields_elements=False,
  )
  invoker = DoFnInvoker.create_invoker(signature, handler, **invoker_kwargs)
  invoker.invoke_setup()
  invoker.invoke_start_bundle()
  for item in items:
    invoker.invoke_process(item)
  invoker.invoke_finish_bundle()
  invoker.invoke_teardown()
  return out if tagged else [value for _, value in out]


class _ParDo(transform_evaluator.ParDo):
  """Beam's Dask ParDo translation, with receivers per bundle and output after finish_bundle."""

  def apply(self, input_bag, side_inputs=None):
    transform = self.transform
    args, kwargs = transform.raw_side_inputs
    main_input = next(iter(self.applied.main_inputs.values()))
    window_fn = main_input.windowing.windowfn if hasattr(main_input, "windowing") else None
    invoker_kwargs = dict(
      context=DoFnContext(transform.label, state=None),
      side_inputs=side_inputs,
      input_args=list(args),
      input_kwargs=kwargs,
      user_state_context=None,
      bundle_finalizer_param=DoFn.BundleFinalizerParam(),
    )
    return input_bag.map(transform_evaluator.get_windowed_value, window_fn).map_partitions(
      _run_bundle,
      DoFnSignature(transform.fn),
      window_fn,
      invoker_kwargs,
      len(self.applied.outputs) > 1,
    )


def _has_tag(item: tuple, *, tag: Optional[str]) -> bool:
  return item[0] == tag


def _value(item: tuple) -> Any:
  return item[1]


class _DaskBagVisitor(PipelineVisitor):
  """Translates each transform to a Dask bag; `bags` maps each PCollection to its own bag.

  Beam's visitor keys bags by the producing transform, so every output of a
  multi-output ParDo was one bag; here each output is its tag's share of it.
  The last bag is the one the runner computes, as in Beam.
  """

  def __init__(self, bag_kwargs: Optional[dict] = None):
    self.bag_kwargs = dict(bag_kwargs or {})
    self.bags: dict = {}

  def _op(self, node: AppliedPTransform):
    cls = transform_evaluator.TRANSLATIONS.get(node.transform.__class__, transform_evaluator.NoOp)
    if cls is transform_evaluator.ParDo:
      cls = _ParDo
    return cls(node, bag_kwargs=self.bag_kwargs)

  def visit_transform(self, node: AppliedPTransform) -> None:
    op = self._op(node)
    kws: dict = {"input_bag": None, "side_inputs": None}
    if node.inputs:
      bags = [
        None if isinstance(v, pvalue.PBegin) else self.bags[v]
        for v in node.inputs
        if isinstance(v, pvalue.PBegin) or v in self.bags
      ]
      # Flatten takes a sequence even of one bag, as in Beam's visitor.
      one = len(bags) == 1 and not isinstance(op, transform_evaluator.Flatten)
      kws["input_bag"] = bags[0] if one else bags
    if node.side_inputs:
      kws["side_inputs"] = [self._side_input(si) for si in node.side_inputs]
    bag = op.apply(**kws)
    tagged = isinstance(op, _ParDo) and len(node.outputs) > 1
    for tag, output in node.outputs.items():
      self.bags[output] = (
        bag.filter(functools.partial(_has_tag, tag=tag)).map(_value) if tagged else bag
      )

  def _side_input(self, si) -> SideInputMap:
    # pylint: disable=protected-access
    values = transform_evaluator.DaskBagWindowedIterator(
      self.bags.get(si.pvalue), si._window_mapping_fn
    )
    return SideInputMap(type(si), si._view_options(), values)


class _DaskRunnerResult(dask_runner.DaskRunnerResult):
  """Beam's result, which also closes the runner's Dask client once the job has ended.

  Beam's leaves the client open: it keeps reconnecting (and logging errors)
  after the cluster it ran on has gone.
  """

  def wait_until_finish(self, duration=None) -> str:
    try:
      return super().wait_until_finish(duration)
    finally:
      if PipelineState.is_terminal(self._state):
        self.client.close()


class DaskRunner(dask_runner.DaskRunner):
  """Beam's DaskRunner with the fixes listed in this module's docstring.

  Options are Beam's (`--dask_client_address`, `--dask_npartitions`, ...);
  without `--dask_client_address` Beam starts a `dask.distributed.LocalCluster`.
  `metrics()` of the result raises NotImplementedError, as in Beam.
  """

  @staticmethod
  def to_dask_bag_visitor(bag_kwargs: Optional[dict[str, Any]] = None) -> PipelineVisitor:
    return _DaskBagVisitor(bag_kwargs)

  def run_pipeline(self, pipeline: Pipeline, options: PipelineOptions) -> _DaskRunnerResult:
    result = super().run_pipeline(pipeline, options)
    return _DaskRunnerResult(result.client, result.futures)
