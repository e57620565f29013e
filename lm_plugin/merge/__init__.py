"""Stage 6 of the data flow: trainable form -> deploy form (exactly merged convolutions)."""

from .algebra import LinearConv
from .deploy import merge

__all__ = ["LinearConv", "merge"]
