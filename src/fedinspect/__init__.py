"""fedinspect: privacy-preserving federated visual anomaly detection for manufacturing."""

__version__ = "0.1.0"
