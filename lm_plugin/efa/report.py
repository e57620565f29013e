"""``estimate_redundancy``: the network's maximum safe channel pruning, group by group.

For every coupled group of prunable conv/linear layers the report holds the singular values of the
group's filter-gradient matrix over a calibration set, its effective (numerical) rank ``r``, the
maximum safe pruning ratio ``1 − r / F`` and the MACs and parameters removable at that bound.
See :mod:`lm_plugin.efa.gradients` for the matrix and :mod:`lm_plugin.efa.spectrum` for the rank.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import ConfigurationError, MissingDependencyError, UnknownNameError
from .cost import CostModel, prune_copy
from .gradients import LossFn, Side, accumulate_grams
from .groups import WEIGHTED_TYPES, GroupSpec, describe_groups
from .spectrum import RankRule, effective_rank, pivoted_importance, singular_values

__all__ = ["GroupRedundancy", "RedundancyReport", "build_dependency_graph", "estimate_redundancy"]


@dataclass
class GroupRedundancy:
    """Redundancy of one coupled group of channels.

    Attributes:
        name: Qualified name of the group's root layer (the group's identifier).
        channels: Prunable channels ``F`` (filters of each producing layer).
        rank: Effective rank ``r`` of the group's filter-gradient matrix at the report's tolerance.
        singular_values: Singular values of that matrix, descending.
        importance: Filter-wise importance (redundancy-aware, see
            :func:`~lm_plugin.efa.spectrum.pivoted_importance`), in channel order.
        producers: Layers whose filters the group removes.
        consumers: Layers whose input channels the group removes.
        analysed: Layers whose gradients entered the matrix.
        columns: Columns of the matrix: the largest rank the calibration data can reveal.
        removable_macs: MACs removed when only this group is pruned to its bound.
        removable_params: Parameters removed when only this group is pruned to its bound.
        spec: The group's description (modules and channel maps).
        gram: The ``F × F`` Gram matrix the spectrum comes from (kept to re-threshold cheaply).
    """

    name: str
    channels: int
    rank: int
    singular_values: torch.Tensor
    importance: torch.Tensor
    producers: list[str]
    consumers: list[str]
    analysed: list[str]
    columns: int
    removable_macs: float = 0.0
    removable_params: float = 0.0
    spec: GroupSpec | None = field(default=None, repr=False)
    gram: torch.Tensor | None = field(default=None, repr=False)

    @property
    def redundant(self) -> int:
        """Channels that can be removed at the bound, ``F − r``."""
        return self.channels - self.rank

    @property
    def max_ratio(self) -> float:
        """Maximum safe pruning ratio ``1 − r / F``."""
        return 1.0 - self.rank / self.channels

    def prune_order(self) -> list[int]:
        """Channel indices from least to most important (ties broken by index)."""
        order = sorted(range(self.channels), key=lambda c: (float(self.importance[c]), c))
        return order

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no tensors beyond the singular values)."""
        return {
            "name": self.name,
            "channels": self.channels,
            "rank": self.rank,
            "max_ratio": self.max_ratio,
            "producers": self.producers,
            "consumers": self.consumers,
            "columns": self.columns,
            "removable_macs": self.removable_macs,
            "removable_params": self.removable_params,
            "singular_values": [float(s) for s in self.singular_values],
        }


@dataclass
class RedundancyReport:
    """Result of :func:`estimate_redundancy`.

    Attributes:
        groups: One entry per analysed group, in torch-pruning's order.
        tol: Rank tolerance used.
        rank_rule: Rank rule used (``"energy"`` or ``"relative"``).
        side: Which layers of a group entered its matrix.
        batches: Calibration batches used.
        base_macs: MACs of the unpruned network (per ``example_inputs`` batch).
        base_params: Parameters of the unpruned network.
        bound_macs: MACs of the network pruned to every group's bound (measured on a pruned copy).
        bound_params: Parameters of that network.
    """

    groups: list[GroupRedundancy]
    tol: float
    rank_rule: RankRule
    side: Side
    batches: int
    base_macs: float
    base_params: float
    bound_macs: float
    bound_params: float
    _cost: CostModel | None = field(default=None, repr=False, compare=False)

    def __getitem__(self, name: str) -> GroupRedundancy:
        for g in self.groups:
            if g.name == name:
                return g
        raise UnknownNameError(f"no analysed group is rooted at {name!r}; groups: {[g.name for g in self.groups]}")

    def __iter__(self) -> Iterator[GroupRedundancy]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def max_macs_reduction(self) -> float:
        """Fraction of the network's MACs removable with every group at its bound."""
        return 1.0 - self.bound_macs / self.base_macs if self.base_macs else 0.0

    @property
    def max_params_reduction(self) -> float:
        """Fraction of the network's parameters removable with every group at its bound."""
        return 1.0 - self.bound_params / self.base_params if self.base_params else 0.0

    @property
    def redundant_channels(self) -> int:
        """Channels removable at the bounds, summed over groups."""
        return sum(g.redundant for g in self.groups)

    @property
    def total_channels(self) -> int:
        """Prunable channels, summed over groups."""
        return sum(g.channels for g in self.groups)

    def kept_at_bound(self) -> dict[str, int]:
        """Channels each group keeps at its bound (its effective rank)."""
        return {g.name: g.rank for g in self.groups}

    def with_tolerance(self, tol: float, rank_rule: RankRule | None = None) -> RedundancyReport:
        """A copy of this report re-thresholded at another tolerance, without new gradients.

        The bound totals (``bound_macs``, ``bound_params``) are re-predicted with the analytic
        cost model rather than re-measured.
        """
        rule = rank_rule or self.rank_rule
        groups = []
        for g in self.groups:
            rank = effective_rank(g.singular_values, tol, rule)
            groups.append(dataclasses.replace(g, rank=rank))
        report = dataclasses.replace(self, groups=groups, tol=tol, rank_rule=rule)
        specs = [g.spec for g in groups]
        if self._cost is not None and all(s is not None for s in specs):
            kept = report.kept_at_bound()
            report.bound_macs = self._cost.predict(kept, "macs")
            report.bound_params = self._cost.predict(kept, "params")
            for g in groups:
                g.removable_macs = self.base_macs - self._cost.predict({g.name: g.rank}, "macs")
                g.removable_params = self.base_params - self._cost.predict({g.name: g.rank}, "params")
        report._cost = self._cost
        return report

    def table(self, max_rows: int | None = None) -> str:
        """A per-group text table: channels, rank, bound, removable MACs/params, top spectrum."""
        header = (
            f"{'group (root layer)':<34} {'F':>5} {'rank':>5} {'max ratio':>9} "
            f"{'-MACs':>9} {'-params':>9}  σ₁ … (normalised)"
        )
        lines = [header, "-" * len(header)]
        rows = self.groups if max_rows is None else self.groups[:max_rows]
        for g in rows:
            sv = g.singular_values
            top = sv[:4] / sv[0] if sv.numel() and float(sv[0]) > 0 else sv[:4]
            spectrum = " ".join(f"{float(s):.2f}" for s in top)
            lines.append(
                f"{_short(g.name, 34):<34} {g.channels:>5} {g.rank:>5} {g.max_ratio:>9.1%} "
                f"{_human(g.removable_macs):>9} {_human(g.removable_params):>9}  {spectrum}"
            )
        if max_rows is not None and len(self.groups) > max_rows:
            lines.append(f"… {len(self.groups) - max_rows} more groups")
        lines.append("-" * len(header))
        lines.append(
            f"{'network':<34} {self.total_channels:>5} {self.total_channels - self.redundant_channels:>5} "
            f"{self.redundant_channels / max(self.total_channels, 1):>9.1%} "
            f"{_human(self.base_macs - self.bound_macs):>9} {_human(self.base_params - self.bound_params):>9}"
        )
        lines.append(
            f"max safe reduction: {self.max_macs_reduction:.1%} of MACs, {self.max_params_reduction:.1%} of "
            f"parameters (rank rule {self.rank_rule!r}, tol {self.tol:g}, {self.side} side, "
            f"{self.batches} calibration batches)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary of the report."""
        return {
            "tol": self.tol,
            "rank_rule": self.rank_rule,
            "side": self.side,
            "batches": self.batches,
            "base_macs": self.base_macs,
            "base_params": self.base_params,
            "bound_macs": self.bound_macs,
            "bound_params": self.bound_params,
            "max_macs_reduction": self.max_macs_reduction,
            "max_params_reduction": self.max_params_reduction,
            "groups": [g.to_dict() for g in self.groups],
        }

    def plot(self, path: str | Path | None = None, groups: Sequence[str] | None = None, ax: Any = None) -> Any:
        """Plot the normalised singular-value spectra (log scale), one line per group.

        A marker on each line shows the group's effective rank. Needs matplotlib
        (``pip install matplotlib``).

        Args:
            path: If given, save the figure there.
            groups: Names of the groups to draw (all by default).
            ax: A matplotlib ``Axes`` to draw into; a new figure is made otherwise.

        Returns:
            The matplotlib ``Axes``.
        """
        try:
            import matplotlib

            if ax is None and path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise MissingDependencyError("RedundancyReport.plot needs matplotlib: pip install matplotlib") from exc
        selected = [g for g in self.groups if groups is None or g.name in groups]
        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4.5))
        for g in selected:
            sv = g.singular_values
            if sv.numel() == 0 or float(sv[0]) <= 0:
                continue
            y = (sv / sv[0]).clamp_min(1e-12).numpy()
            x = [i + 1 for i in range(len(y))]
            (line,) = ax.semilogy(x, y, label=f"{g.name} (r={g.rank}/{g.channels})")
            ax.plot([g.rank], [y[g.rank - 1]], "o", color=line.get_color())
        ax.set_xlabel("singular value index")
        ax.set_ylabel("σᵢ / σ₁")
        ax.set_title(f"filter-gradient spectra ({self.rank_rule} rule, tol {self.tol:g})")
        ax.legend(fontsize="x-small", ncol=2)
        if path is not None:
            ax.figure.savefig(path, dpi=120, bbox_inches="tight")
        return ax


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def build_dependency_graph(
    model: nn.Module, example_inputs: Any, forward_fn: Any = None, output_transform: Any = None
) -> tp.DependencyGraph:
    """Build torch-pruning's dependency graph without leaving the model in eval mode."""
    was_training = model.training
    try:
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, forward_fn=forward_fn, output_transform=output_transform
        )
    finally:
        model.train(was_training)


def estimate_redundancy(
    model: nn.Module,
    example_inputs: Any,
    data: Iterable[Any],
    *,
    tol: float = 0.01,
    rank_rule: RankRule = "energy",
    side: Side = "consumer",
    num_batches: int | None = None,
    loss_fn: LossFn | None = None,
    ignored_layers: Sequence[nn.Module] | None = None,
    root_module_types: Sequence[type[nn.Module]] = WEIGHTED_TYPES,
    forward_fn: Any = None,
    output_transform: Any = None,
    measure: bool = True,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> RedundancyReport:
    """Estimate every prunable group's maximum safe pruning ratio from calibration gradients.

    For each coupled channel group (torch-pruning's ``get_pruning_group``; a residual stage or a
    concat is one group), the gradients of the group's layers over the calibration batches form a
    filter-gradient matrix with one row per channel. Its effective rank ``r`` under ``tol`` is the
    number of channel directions the loss depends on; ``1 − r / F`` bounds the group's pruning ratio.

    Args:
        model: The trained network (not modified).
        example_inputs: Example inputs for tracing and for counting MACs (use batch size 1 to get
            per-image MACs).
        data: Calibration batches ``(inputs, targets)``; each batch adds one gradient sample per
            layer, so prefer many small batches (e.g. 32–64 batches of 16–64 images).
        tol: Rank tolerance in ``(0, 1)``. With the default ``"energy"`` rule, the fraction of the
            group's gradient energy (the trace of its Fisher block) the kept directions may lose.
            The default 0.01 was chosen so that pruning a single group of a trained CNN to its
            bound costs well under a point of accuracy after brief fine-tuning (docs/efa.md).
        rank_rule: ``"energy"`` (default) or ``"relative"`` (``σᵢ > tol·σ₁``).
        side: Layers whose gradients form a group's matrix: ``"consumer"`` (layers reading the
            channels; default, detects duplicated or dead channels exactly), ``"producer"`` (the
            filters' own gradients, the paper's literal reading) or ``"both"``.
        num_batches: Use at most this many calibration batches.
        loss_fn: ``loss_fn(outputs, targets)``; cross-entropy by default.
        ignored_layers: Layers never to prune (torch-pruning convention). Groups that no layer
            reads (the classifier's output) are skipped automatically.
        root_module_types: Layer types that root groups.
        forward_fn: Passed to torch-pruning's tracer for models with unusual call signatures.
        output_transform: Passed to torch-pruning's tracer.
        measure: Measure ``bound_macs`` / ``bound_params`` on a copy pruned at every bound
            (exact); otherwise predict them with the analytic cost model (faster on big models).
        device: Where to compute gradients; defaults to the model's device.
        progress: Show a progress bar over calibration batches.

    Returns:
        A :class:`RedundancyReport`.

    Raises:
        ValueError: For bad arguments or calibration data that yields nothing.
    """
    if not 0.0 < tol < 1.0:
        raise ConfigurationError(f"tol must be in (0, 1), got {tol}")
    if rank_rule not in ("energy", "relative"):
        raise ConfigurationError(f"rank_rule must be 'energy' or 'relative', got {rank_rule!r}")
    DG = build_dependency_graph(model, example_inputs, forward_fn, output_transform)
    specs = describe_groups(DG, ignored_layers or (), root_module_types)
    if not specs:
        raise ConfigurationError(
            "the model has no prunable channel group read by another layer; nothing to analyse "
            "(check ignored_layers and root_module_types)"
        )
    grams = accumulate_grams(
        model,
        specs,
        data,
        loss_fn=loss_fn,
        num_batches=num_batches,
        side=side,
        device=device,
        progress=progress,
    )
    cost = CostModel(model, example_inputs, specs)
    groups = []
    under_sampled = []
    for spec, gg in zip(specs, grams):
        sv = singular_values(gg.gram)
        rank = effective_rank(sv, tol, rank_rule)
        if gg.columns < spec.channels:
            under_sampled.append(f"{spec.name} ({gg.columns} columns < {spec.channels} channels)")
        groups.append(
            GroupRedundancy(
                name=spec.name,
                channels=spec.channels,
                rank=rank,
                singular_values=sv.float(),
                importance=pivoted_importance(gg.gram),
                producers=spec.producers,
                consumers=spec.consumers,
                analysed=gg.layers,
                columns=gg.columns,
                removable_macs=cost.base["macs"] - cost.predict({spec.name: rank}, "macs"),
                removable_params=cost.base["params"] - cost.predict({spec.name: rank}, "params"),
                spec=spec,
                gram=gg.gram,
            )
        )
    if under_sampled:
        warnings.warn(
            "too few calibration batches to reveal the full rank of "
            + ", ".join(under_sampled)
            + "; their bounds are over-estimated. Pass more (smaller) calibration batches.",
            stacklevel=2,
        )
    kept = {g.name: g.rank for g in groups}
    if measure:
        pruned = prune_copy(model, example_inputs, {g.name: g.prune_order()[: g.redundant] for g in groups})
        bound_macs, bound_params = (float(v) for v in tp.utils.count_ops_and_params(pruned, example_inputs))
    else:
        bound_macs, bound_params = cost.predict(kept, "macs"), cost.predict(kept, "params")
    report = RedundancyReport(
        groups=groups,
        tol=tol,
        rank_rule=rank_rule,
        side=side,
        batches=grams[0].batches,
        base_macs=cost.base["macs"],
        base_params=cost.base["params"],
        bound_macs=bound_macs,
        bound_params=bound_params,
    )
    report._cost = cost
    return report
