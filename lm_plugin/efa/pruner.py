"""``HierarchicalPruner``: effective-filter-analysis channel pruning as a torch-pruning pruner.

Stage 1 (layer-wise) runs at construction: the redundancy report bounds every group and
:func:`~lm_plugin.efa.allocation.allocate` picks how many channels each group keeps for the cost
target. Stage 2 (filter-wise) runs in :meth:`step`, inherited from ``tp.pruner.BasePruner``: inside
each group, :class:`~lm_plugin.efa.EffectiveFilterImportance` chooses which channels go.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import ArgumentTypeError, ConfigurationError
from .allocation import Allocation, AllocationRule, allocate
from .cost import CostFn
from .gradients import LossFn, Side
from .importance import EffectiveFilterImportance
from .report import RedundancyReport, estimate_redundancy
from .spectrum import RankRule

__all__ = ["HierarchicalPruner"]


class HierarchicalPruner(tp.pruner.BasePruner):
    """Channel pruner that never prunes a group beyond its estimated redundancy.

    Args:
        model: The trained network; pruned in place by :meth:`step`.
        example_inputs: Example inputs for tracing and MAC counting (batch 1 for per-image MACs;
            for ``metric="latency"`` the batch you want timed).
        data: Calibration batches ``(inputs, targets)``. Needed unless ``report`` is given (and
            with ``iterative_steps > 1``, to re-analyse between steps).
        reduction: Fraction of ``metric`` to remove, in ``(0, 1)``; ``None`` prunes every group to
            its estimated bound (the maximum safe compression).
        metric: ``"macs"`` (default), ``"params"``, ``"latency"`` or a callable ``cost(model)``.
        report: A precomputed :func:`~lm_plugin.efa.estimate_redundancy` report of ``model``.
        tol: Rank tolerance when the report is computed here.
        rank_rule: Rank rule when the report is computed here.
        side: Gradient side when the report is computed here.
        allocation: Stage-1 rule, ``"energy"`` (default) or ``"proportional"``.
        num_batches: Calibration batches to use.
        loss_fn: ``loss_fn(outputs, targets)``; cross-entropy by default.
        ignored_layers: Layers never to prune (e.g. the classifier). Groups that no layer reads
            are never pruned anyway.
        round_to: Keep channel counts that are multiples of this, rounding *up* (never past a bound).
        iterative_steps: Reach the allocation in this many :meth:`step` calls.
        forward_fn: Passed to torch-pruning.
        output_transform: Passed to torch-pruning.
        device: Where to compute gradients.
        progress: Show progress bars.
        **kwargs: Passed to ``tp.pruner.BasePruner`` (e.g. ``customized_pruners``). Arguments
            that would override stage 1 (``pruning_ratio``, ``pruning_ratio_dict``,
            ``global_pruning``, ``importance``) are rejected.

    Attributes:
        report: The redundancy report.
        allocation: The stage-1 allocation (channels kept per group, predicted cost).

    Example:
        >>> pruner = HierarchicalPruner(model, torch.randn(1, 1, 28, 28), calib, reduction=0.4)
        >>> print(pruner.report)             # per-group bounds
        >>> pruner.step()                    # prunes in place
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        data: Iterable[Any] | None = None,
        *,
        reduction: float | None,
        metric: str | CostFn = "macs",
        report: RedundancyReport | None = None,
        tol: float = 0.01,
        rank_rule: RankRule = "energy",
        side: Side = "consumer",
        allocation: AllocationRule = "energy",
        num_batches: int | None = None,
        loss_fn: LossFn | None = None,
        ignored_layers: Sequence[nn.Module] | None = None,
        round_to: int | None = None,
        iterative_steps: int = 1,
        forward_fn: Any = None,
        output_transform: Any = None,
        device: str | torch.device | None = None,
        progress: bool = False,
        **kwargs: Any,
    ) -> None:
        forbidden = {
            "pruning_ratio",
            "pruning_ratio_dict",
            "global_pruning",
            "importance",
            "ch_sparsity",
        } & set(kwargs)
        if forbidden:
            raise ArgumentTypeError(
                f"HierarchicalPruner chooses per-group ratios itself; remove {sorted(forbidden)} "
                "(use tp.pruner.MetaPruner with EffectiveFilterImportance for fixed ratios)"
            )
        if report is None:
            if data is None:
                raise ConfigurationError("HierarchicalPruner needs calibration data (data=...) or a precomputed report")
            report = estimate_redundancy(
                model,
                example_inputs,
                data,
                tol=tol,
                rank_rule=rank_rule,
                side=side,
                num_batches=num_batches,
                loss_fn=loss_fn,
                ignored_layers=ignored_layers,
                forward_fn=forward_fn,
                output_transform=output_transform,
                measure=False,
                device=device,
                progress=progress,
            )
        self.report = report
        self.allocation: Allocation = allocate(
            report,
            reduction,
            metric,
            rule=allocation,
            round_to=round_to,
            model=model,
            example_inputs=example_inputs,
        )
        modules = dict(model.named_modules())
        ratio_dict: dict[nn.Module, float] = {}
        for g in report.groups:
            pruned = g.channels - self.allocation.kept[g.name]
            if pruned <= 0:
                continue
            # BasePruner removes F - int(F * (1 - ratio)) channels; the half-channel offset makes
            # that exactly `pruned` despite float round-off, so no group can slip past its bound.
            ratio = (pruned - 0.5) / g.channels
            for name in g.producers:
                ratio_dict[modules[name]] = ratio
        importance = EffectiveFilterImportance(
            data, report=report, loss_fn=loss_fn, num_batches=num_batches, device=device
        )
        super().__init__(
            model,
            example_inputs,
            importance=importance,
            pruning_ratio=0.0,
            pruning_ratio_dict=ratio_dict,
            ignored_layers=list(ignored_layers) if ignored_layers is not None else None,
            iterative_steps=iterative_steps,
            forward_fn=forward_fn,
            output_transform=output_transform,
            **kwargs,
        )

    def target_channels(self) -> dict[str, int]:
        """Group (root layer name) → channels it will have after the last :meth:`step`."""
        return dict(self.allocation.kept)
