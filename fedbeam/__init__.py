"""fedbeam: federated client datasets precomputed with Apache Beam, loaded as TFF ClientData."""

__version__ = "0.1.0"

__all__ = ["__version__"]
