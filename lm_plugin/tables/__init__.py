"""Stage 3 of the data flow: the latency and importance tables over a chain's candidate blocks."""

from .latency import LatencyModel, build_latency_model

__all__ = ["LatencyModel", "build_latency_model"]
