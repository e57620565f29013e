"""Stage 1 of the data flow: model -> fx graph -> chain IR."""

from .chain import Chain, ChainConv, ChainPosition, Residual
from .extract import extract_chain
from .graph import trace

__all__ = ["Chain", "ChainConv", "ChainPosition", "Residual", "extract_chain", "trace"]
