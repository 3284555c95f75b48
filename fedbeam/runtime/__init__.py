"""Reading stores (TensorFlow), loading them as TFF ClientData, client work, the simulation loop.

Names are imported lazily: `import fedbeam.runtime.train` (for its argument
parser) must not pay for importing TensorFlow Federated. `StoreReader` and
`open_store` (`fedbeam.runtime.store_reader`) need TensorFlow only; the other
names need TensorFlow Federated (the `fedbeam[tff]` extra).
"""

import importlib

_EXPORTS = {
  "StoreReader": "fedbeam.runtime.store_reader",
  "open_store": "fedbeam.runtime.store_reader",
  "StoreClientData": "fedbeam.runtime.client_data",
  "load_client_data": "fedbeam.runtime.client_data",
  "register_worker_cleanup": "fedbeam.runtime.tff_worker",
  "stop_tff_workers": "fedbeam.runtime.tff_worker",
  "build_model_delta_client_work": "fedbeam.runtime.client_work",
  "SimulationLoop": "fedbeam.runtime.simulation",
  "SimulationConfig": "fedbeam.runtime.simulation",
  "ModelSpec": "fedbeam.runtime.models",
  "get_model": "fedbeam.runtime.models",
}


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'fedbeam.runtime' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
