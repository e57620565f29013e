"""Effective filter analysis and hierarchical channel pruning (Zhou et al. 2022) on torch-pruning.

* :func:`estimate_redundancy` — per coupled group of channels, the spectrum and effective rank of
  the filter-gradient matrix over a calibration set, the maximum safe pruning ratio
  ``1 − rank / filters``, and the MACs / parameters removable at that bound.
* :class:`EffectiveFilterImportance` — a ``tp.importance.Importance`` that ranks channels inside a
  group by the same analysis (redundant channels first).
* :class:`HierarchicalPruner` — a ``tp.pruner.BasePruner``: stage 1 allocates per-group ratios for
  a MACs / params / latency target, never above a group's bound; stage 2 picks the channels.

See ``docs/efa.md`` for the method, the choices made where the paper is silent, and results.
"""

from .allocation import Allocation, RedundancyBoundError, allocate
from .cost import CostModel, latency_ms, measure_cost, prune_copy
from .importance import EffectiveFilterImportance
from .pruner import HierarchicalPruner
from .report import GroupRedundancy, RedundancyReport, estimate_redundancy
from .spectrum import effective_rank, pivoted_importance, singular_values

__all__ = [
    "Allocation",
    "CostModel",
    "EffectiveFilterImportance",
    "GroupRedundancy",
    "HierarchicalPruner",
    "RedundancyBoundError",
    "RedundancyReport",
    "allocate",
    "effective_rank",
    "estimate_redundancy",
    "latency_ms",
    "measure_cost",
    "pivoted_importance",
    "prune_copy",
    "singular_values",
]
