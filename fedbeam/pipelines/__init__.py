"""The prepare pipeline: input files -> a store of one TFRecord file per client (Beam code only).

The front door:

- `PrepareConfig`: what a job reads, does and writes (the `fedbeam prepare` flags).
- `PrepareStore(config)`: the whole job as one `PTransform`, for a `beam.Pipeline` of your own
  (`pipeline | "Prepare" >> PrepareStore(config)`); in: the pipeline root, out: a singleton
  PCollection with the committed store's metadata dict.
- `run_prepare(config, beam_args)`: builds and runs that pipeline (what `fedbeam prepare`
  does), with a lease on the data directory and errors that name their cause; returns a
  `PrepareResult`, raises `PrepareError`.
- `local_runner_scope()`: the context manager `run_prepare` enters around a run on Beam's local
  FnApiRunner (Beam 2.72's data-plane race fixed, two speed-ups, glibc malloc thresholds);
  everything is restored on exit. Nothing here changes Beam or the process otherwise.
- The stages `PrepareStore` chains, each a `PTransform` documented with what goes in and out:
  `ReadClientInput`, `InferElementSpec`, `GroupByClient`, `PlanPseudoClients`,
  `ExpandPseudoClients`, `PseudoClientSizes`, `CheckEmptyClients`, `SplitTrainTest`,
  `WriteStore`.

Names are imported on first use, so a Beam worker importing one module of this package does
not import the others. Nothing here imports tensorflow_federated, so Beam workers do not pay
for it.
"""

import importlib

_EXPORTS = {
  "PrepareConfig": "fedbeam.pipelines.prepare",
  "PrepareError": "fedbeam.pipelines.prepare",
  "PrepareResult": "fedbeam.pipelines.prepare",
  "PrepareStore": "fedbeam.pipelines.prepare",
  "run_prepare": "fedbeam.pipelines.prepare",
  "local_runner_scope": "fedbeam.pipelines.local_runner",
  "ReadClientInput": "fedbeam.pipelines.sources",
  "InferElementSpec": "fedbeam.pipelines.spec_inference",
  "GroupByClient": "fedbeam.pipelines.grouping",
  "PlanPseudoClients": "fedbeam.pipelines.expansion",
  "ExpandPseudoClients": "fedbeam.pipelines.expansion",
  "PseudoClientSizes": "fedbeam.pipelines.expansion",
  "CheckEmptyClients": "fedbeam.pipelines.checks",
  "SplitTrainTest": "fedbeam.pipelines.split",
  "WriteStore": "fedbeam.pipelines.store_writer",
}


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'fedbeam.pipelines' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
