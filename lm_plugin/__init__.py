"""lm_plugin: LayerMerge depth compression for the torch-pruning / NNI ecosystem.

Data flow: trace -> chain -> candidate blocks -> latency & importance tables -> solve -> plan
-> trainable form (fine-tune) -> merged deploy form.
"""

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
    "InvalidPlanError",
    "LayerMergeError",
    "LayerMergePruner",
    "MergeError",
    "NoChainError",
    "Plan",
    "RewriteOptions",
    "UntraceableModelError",
    "__version__",
    "inspect_model",
]
