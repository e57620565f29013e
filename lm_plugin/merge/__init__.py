"""Stage 6 of the data flow: trainable form -> deploy form (exactly merged convolutions)."""

from .algebra import LinearConv
from .check import merge_error, output_error
from .deploy import check_error, deploy_plan, internal_layers, merge

__all__ = ["LinearConv", "check_error", "deploy_plan", "internal_layers", "merge", "merge_error", "output_error"]
