"""Stage 1 of hierarchical pruning: how many channels each group keeps, for a cost target.

The paper fixes the *order* (layer-wise first, capped by each layer's estimated redundancy, then
filter-wise) but not the layer-wise rule. Our choice, ``allocation="energy"`` (default): every group
drops the same fraction ``μ`` of its gradient energy, i.e. group ``g`` keeps its effective rank at
tolerance ``μ``; ``μ`` is the smallest level that meets the target and never exceeds the report's
tolerance, so no group goes beyond its bound. Groups whose spectrum decays fast (redundant ones)
give up many channels for a given ``μ``; groups with a flat spectrum give up few. The alternative
``allocation="proportional"`` prunes every group the same fraction ``λ`` of its redundancy
(``λ · (F − r)`` channels).

The search runs over the finite set of levels at which some group's channel count changes, with a
binary search, evaluating the cost either with the analytic cost model (MACs, params) or by
pruning and measuring a copy (latency, custom cost functions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ..errors import ConfigurationError
from .cost import CostFn, measure_cost, prune_copy
from .report import RedundancyReport
from .spectrum import rank_profile

AllocationRule = Literal["energy", "proportional"]

__all__ = ["Allocation", "AllocationRule", "RedundancyBoundError", "allocate"]


class RedundancyBoundError(ConfigurationError):
    """The requested reduction exceeds what the estimated redundancy bounds allow."""


@dataclass
class Allocation:
    """Per-group channel counts chosen by stage 1.

    Attributes:
        kept: Group (root layer name) → channels kept.
        channels: Group → channels before pruning.
        level: The common level found (``μ`` for ``"energy"``, ``λ`` for ``"proportional"``).
        metric: The cost metric targeted.
        base_cost: Cost of the unpruned network.
        predicted_cost: Cost of the network with this allocation (predicted or measured).
        target_cost: The cost the search aimed at or below.
    """

    kept: dict[str, int]
    channels: dict[str, int]
    level: float
    metric: str
    base_cost: float
    predicted_cost: float
    target_cost: float

    @property
    def ratios(self) -> dict[str, float]:
        """Group → pruning ratio ``1 − kept / channels``."""
        return {n: 1.0 - k / self.channels[n] for n, k in self.kept.items()}

    @property
    def reduction(self) -> float:
        """Predicted fraction of the cost removed."""
        return 1.0 - self.predicted_cost / self.base_cost if self.base_cost else 0.0


def _round_up(k: int, channels: int, round_to: int | None) -> int:
    if not round_to or round_to <= 1:
        return k
    return min(channels, math.ceil(k / round_to) * round_to)


def _kept_energy(report: RedundancyReport, level: float, round_to: int | None) -> dict[str, int]:
    kept = {}
    for g in report.groups:
        profile = rank_profile(g.singular_values, report.rank_rule)
        # smallest k with profile[k-1] <= level, never below the bound (the rank at report.tol)
        below = (profile <= level + 1e-15).nonzero()
        k = int(below[0]) + 1 if below.numel() else g.channels
        kept[g.name] = _round_up(max(k, g.rank), g.channels, round_to)
    return kept


def _kept_proportional(report: RedundancyReport, level: float, round_to: int | None) -> dict[str, int]:
    return {
        g.name: _round_up(g.channels - math.floor(level * g.redundant + 1e-9), g.channels, round_to)
        for g in report.groups
    }


def _levels(report: RedundancyReport, rule: AllocationRule) -> list[float]:
    """Every level at which some group's kept count changes, ascending, ending at the bound."""
    levels = {0.0}
    for g in report.groups:
        if rule == "energy":
            profile = rank_profile(g.singular_values, report.rank_rule)
            levels.update(float(v) for v in profile if 0.0 <= float(v) <= report.tol)
        else:
            levels.update(j / g.redundant for j in range(1, g.redundant + 1) if g.redundant)
    top = report.tol if rule == "energy" else 1.0
    return sorted(v for v in levels if v <= top) + ([top] if top not in levels else [])


def allocate(
    report: RedundancyReport,
    reduction: float | None,
    metric: str | CostFn = "macs",
    *,
    rule: AllocationRule = "energy",
    round_to: int | None = None,
    model: nn.Module | None = None,
    example_inputs: Any = None,
) -> Allocation:
    """Choose per-group channel counts that remove at least ``reduction`` of ``metric``.

    Args:
        report: The redundancy estimate; no group is pruned beyond its bound (its rank).
        reduction: Fraction of the cost to remove, in ``(0, 1)``; e.g. 0.4 keeps ≤ 60 % of the MACs.
            ``None`` prunes every group to its bound (the maximum safe compression).
        metric: ``"macs"`` or ``"params"`` (analytic, fast), ``"latency"`` (median eager latency of
            ``model(example_inputs)``, measured on pruned copies) or a callable ``cost(model)``.
        rule: ``"energy"`` (default) or ``"proportional"``; see the module docstring.
        round_to: Keep channel counts that are multiples of this (rounded up, never past a bound).
        model: The network; needed for measured metrics.
        example_inputs: Its inputs; needed for measured metrics.

    Returns:
        The smallest-level :class:`Allocation` that meets the target (its ``target_cost`` is the
        predicted cost at the bounds when ``reduction`` is ``None``).

    Raises:
        RedundancyBoundError: If even every group at its bound cannot remove ``reduction``.
        ValueError: For bad arguments.
    """
    if reduction is not None and not 0.0 < reduction < 1.0:
        raise ConfigurationError(f"reduction must be in (0, 1) or None, got {reduction}")
    if rule not in ("energy", "proportional"):
        raise ConfigurationError(f"rule must be 'energy' or 'proportional', got {rule!r}")
    kept_at = _kept_energy if rule == "energy" else _kept_proportional
    channels = {g.name: g.channels for g in report.groups}

    analytic = isinstance(metric, str) and metric in ("macs", "params")
    if analytic:
        if report._cost is None:
            raise ConfigurationError("this report has no cost model; build it with estimate_redundancy()")
        cost_model = report._cost
        metric_name = str(metric)

        def cost_of(kept: dict[str, int]) -> float:
            return cost_model.predict(kept, metric_name)

        base = cost_model.base[metric_name]
    else:
        if model is None or example_inputs is None:
            raise ConfigurationError("a measured metric (latency or a callable) needs model= and example_inputs=")
        if isinstance(metric, str) and metric != "latency":
            raise ConfigurationError(f"metric must be 'macs', 'params', 'latency' or a callable, got {metric!r}")
        metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
        orders = {g.name: g.prune_order() for g in report.groups}

        def cost_of(kept: dict[str, int]) -> float:
            idxs = {n: orders[n][: channels[n] - k] for n, k in kept.items()}
            return measure_cost(prune_copy(model, example_inputs, idxs), example_inputs, metric)

        base = measure_cost(model, example_inputs, metric)

    levels = _levels(report, rule)
    best_kept = kept_at(report, levels[-1], round_to)
    best_cost = cost_of(best_kept)
    if reduction is None:
        return Allocation(best_kept, channels, levels[-1], metric_name, base, best_cost, best_cost)
    target = (1.0 - reduction) * base
    if best_cost > target:
        raise RedundancyBoundError(
            f"removing {reduction:.1%} of {metric_name} exceeds the estimated redundancy: with every group at "
            f"its bound the network keeps {best_cost / base:.1%} (max reduction {1 - best_cost / base:.1%} at "
            f"tol={report.tol:g}). Lower the target, or re-estimate with a larger tol "
            "(report.with_tolerance(...)) if you accept pruning past the estimated safe bound."
        )
    best_level = levels[-1]
    lo, hi = 0, len(levels) - 1  # invariant: levels[hi] meets the target
    while lo < hi:
        mid = (lo + hi) // 2
        kept = kept_at(report, levels[mid], round_to)
        cost = cost_of(kept)
        if cost <= target:
            hi, best_kept, best_cost, best_level = mid, kept, cost, levels[mid]
        else:
            lo = mid + 1
    return Allocation(
        kept=best_kept,
        channels=channels,
        level=best_level,
        metric=metric_name,
        base_cost=base,
        predicted_cost=best_cost,
        target_cost=target,
    )
