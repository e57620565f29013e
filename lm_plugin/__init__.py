"""lm_plugin: LayerMerge depth compression for the torch-pruning / NNI ecosystem.

Data flow: trace -> chain -> candidate blocks -> latency & importance tables -> solve -> plan
-> trainable form (fine-tune) -> merged deploy form.

The workflow needs one import::

    from lm_plugin import LayerMergePruner, compress
"""

from . import data, workloads
from .budget import DEFAULT_BUDGET, Budget
from .compress import CompressionResult, FinetuneSettings, compress, tradeoff
from .data import DataSplits, data_splits, image_folder
from .errors import (
    ConfigurationError,
    InvalidPlanError,
    LayerMergeError,
    MergeError,
    NoChainError,
    UntraceableModelError,
)
from .export import export_onnx, export_torchscript, load, save
from .inspect import CompressibilityReport, inspect_model
from .plan import Plan
from .pruner import LayerMergePruner, SearchResult
from .rewrite import RewriteOptions
from .screening import ScreenedSearch
from .solve import InfeasibleBudgetError
from .trace import Chain
from .train import evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BUDGET",
    "Budget",
    "Chain",
    "CompressibilityReport",
    "CompressionResult",
    "ConfigurationError",
    "DataSplits",
    "FinetuneSettings",
    "InfeasibleBudgetError",
    "InvalidPlanError",
    "LayerMergeError",
    "LayerMergePruner",
    "MergeError",
    "NoChainError",
    "Plan",
    "RewriteOptions",
    "ScreenedSearch",
    "SearchResult",
    "UntraceableModelError",
    "__version__",
    "compress",
    "data",
    "data_splits",
    "evaluate",
    "export_onnx",
    "export_torchscript",
    "fit",
    "image_folder",
    "inspect_model",
    "load",
    "save",
    "tradeoff",
    "workloads",
]
