"""``EffectiveFilterImportance``: stage 2 (filter-wise) of hierarchical pruning, as a torch-pruning
importance criterion.

It scores the channels of a group by the same analysis that bounds the group
(:func:`~lm_plugin.efa.spectrum.pivoted_importance` on the group's filter-gradient Gram matrix):
channels whose gradient rows are explained by other channels (duplicates, linear combinations, dead
channels) score lowest. It works with any torch-pruning pruner, e.g. ``tp.pruner.MetaPruner`` with
uniform ratios, not only with :class:`~lm_plugin.efa.HierarchicalPruner`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch_pruning as tp

from ..errors import ConfigurationError, LayerMergeRuntimeError
from .gradients import LossFn, Side, accumulate_grams
from .groups import WEIGHTED_TYPES, GroupSpec, describe_group, describe_groups
from .report import RedundancyReport
from .spectrum import pivoted_importance

__all__ = ["EffectiveFilterImportance"]


def _producer_key(DG: tp.DependencyGraph, group: tp.Group) -> frozenset[str]:
    """Identify a group by the names of the layers whose filters it removes. Unlike the root layer,
    this set does not depend on which layers the pruner ignores; unlike module identity, it survives
    ``copy.deepcopy`` (a report of a model also serves a copy of it)."""
    return frozenset(
        DG._module2name.get(item.dep.target.module, str(id(item.dep.target.module)))
        for item in group.items
        if isinstance(item.dep.target.module, WEIGHTED_TYPES) and DG.is_out_channel_pruning_fn(item.dep.handler)
    )


def _spec_key(spec: GroupSpec) -> frozenset[str]:
    return frozenset(spec.producers)


class EffectiveFilterImportance(tp.importance.Importance):
    """Redundancy-aware channel importance from calibration gradients.

    On first use, the gradients of every group of the pruner's dependency graph are accumulated
    over the calibration data in one pass; scores are cached until the group's channel count
    changes (after a pruning step), when the analysis is redone on the pruned network.

    Args:
        data: Calibration batches ``(inputs, targets)``. Optional when ``report`` is given and the
            pruner prunes in one step.
        report: A :class:`~lm_plugin.efa.RedundancyReport` of the same model (or of an unmodified
            copy: groups are matched by layer names), whose scores are reused instead of
            recomputing gradients while the group's channel count is unchanged.
        loss_fn: ``loss_fn(outputs, targets)``; cross-entropy by default.
        num_batches: Use at most this many calibration batches.
        side: Which layers of a group enter its gradient matrix (see
            :func:`~lm_plugin.efa.estimate_redundancy`).
        device: Where to compute gradients; defaults to the model's device.

    Example:
        >>> imp = EffectiveFilterImportance(calibration_loader)
        >>> pruner = tp.pruner.MetaPruner(model, x, imp, pruning_ratio=0.3, ignored_layers=[model.fc])
        >>> pruner.step()
    """

    def __init__(
        self,
        data: Iterable[Any] | None = None,
        *,
        report: RedundancyReport | None = None,
        loss_fn: LossFn | None = None,
        num_batches: int | None = None,
        side: Side = "consumer",
        device: str | torch.device | None = None,
    ) -> None:
        if data is None and report is None:
            raise ConfigurationError("EffectiveFilterImportance needs calibration data, a report, or both")
        self.data = data
        self.loss_fn = loss_fn
        self.num_batches = num_batches
        self.side = report.side if report is not None else side
        self.device = device
        self._scores: dict[frozenset[str], torch.Tensor] = {}
        self._report_scores: dict[frozenset[str], torch.Tensor] = {}
        if report is not None:
            for g in report.groups:
                if g.spec is not None:
                    self._report_scores[_spec_key(g.spec)] = g.importance

    @classmethod
    def from_report(cls, report: RedundancyReport, data: Iterable[Any] | None = None) -> EffectiveFilterImportance:
        """Reuse a report's analysis (``data`` enables re-analysis after the network changes)."""
        return cls(data, report=report)

    def reset(self) -> None:
        """Forget cached scores (the report's are kept until they go stale)."""
        self._scores.clear()

    def _analyse(self, DG: tp.DependencyGraph, group: tp.Group) -> None:
        if self.data is None:
            raise LayerMergeRuntimeError(
                "the report's analysis does not match the network any more (it was pruned or changed); "
                "pass calibration data to EffectiveFilterImportance so that it can re-analyse"
            )
        keys = {_spec_key(s): s for s in describe_groups(DG)}
        target = describe_group(DG, group)
        if target is not None and _producer_key(DG, group) not in keys:
            keys[_producer_key(DG, group)] = target
        ordered = list(keys.items())
        grams = accumulate_grams(
            DG.model,
            [s for _, s in ordered],
            self.data,
            loss_fn=self.loss_fn,
            num_batches=self.num_batches,
            side=self.side,
            device=self.device,
        )
        self._scores = {key: pivoted_importance(gg.gram) for (key, _), gg in zip(ordered, grams)}

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor | None:
        """Scores of the group's channels (higher = keep), aligned with the group's root indices.

        Returns ``None`` for groups the analysis cannot score (no consuming layer), which
        torch-pruning pruners skip.
        """
        DG = group._DG
        key = _producer_key(DG, group)
        channels = DG.get_out_channels(group[0].dep.target.module)
        scores = self._scores.get(key)
        if scores is None or scores.numel() != channels:
            scores = self._report_scores.get(key)
            if scores is not None and scores.numel() != channels:
                self._report_scores.pop(key)
                scores = None
        if scores is None:
            with torch.enable_grad():
                self._analyse(DG, group)
            scores = self._scores.get(key)
            if scores is None or scores.numel() != channels:
                return None
        idxs = torch.as_tensor([int(i) for i in group[0].root_idxs], dtype=torch.long)
        return scores[idxs]
