"""lm_plugin: LayerMerge depth compression for the torch-pruning / NNI ecosystem.

Data flow: trace -> chain -> candidate blocks -> latency & importance tables -> solve -> plan
-> trainable form (fine-tune) -> merged deploy form.
"""

from . import data
from .data import DataSplits, data_splits, image_folder
from .errors import InvalidPlanError, LayerMergeError, MergeError, NoChainError, UntraceableModelError
from .inspect import CompressibilityReport, inspect_model
from .plan import Plan
from .pruner import LayerMergePruner
from .rewrite import RewriteOptions
from .trace import Chain

__version__ = "0.1.0"

__all__ = [
    "Chain",
    "CompressibilityReport",
    "DataSplits",
    "InvalidPlanError",
    "LayerMergeError",
    "LayerMergePruner",
    "MergeError",
    "NoChainError",
    "Plan",
    "RewriteOptions",
    "UntraceableModelError",
    "__version__",
    "data",
    "data_splits",
    "image_folder",
    "inspect_model",
]
