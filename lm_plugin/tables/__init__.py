"""Stage 3 of the data flow: the latency and importance tables over a chain's candidate blocks."""

from .conv_block import ConvBlockSpec, conv_block_key, conv_block_module
from .latency import LatencyModel, build_latency_model

__all__ = ["ConvBlockSpec", "LatencyModel", "build_latency_model", "conv_block_key", "conv_block_module"]
