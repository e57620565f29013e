"""Coupled channel groups of a torch-pruning dependency graph, described for the analysis.

A torch-pruning group is the set of layers whose channels must be removed together (a conv, its BN,
every conv/linear that reads it, and across residual adds or concats every other producer of the
same channels). The effective filter analysis works per group, so that its bound can really be
applied: channel ``c`` of a group is one row of the group's gradient matrix, whatever layers share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn

Role = Literal["producer", "consumer"]

#: Layer types whose weights enter the gradient matrix.
WEIGHTED_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class LayerSlice:
    """One conv/linear layer's share of a group: which of its channels belong to which group channel.

    Attributes:
        module: The layer.
        name: Its qualified name in the model.
        role: ``"producer"`` if the group removes the layer's output channels (its filters),
            ``"consumer"`` if it removes input channels (the layer reads the group's channels).
        idxs: Indices along the pruned dimension of the layer.
        root_idxs: For each entry of ``idxs``, the group channel it belongs to (a flatten before a
            linear layer maps one channel to several input features).
    """

    module: nn.Module
    name: str
    role: Role
    idxs: list[int]
    root_idxs: list[int]


@dataclass
class GroupSpec:
    """A prunable coupled group, as the analysis sees it.

    Attributes:
        root: The group's root layer (torch-pruning's first out-channel item); identifies the group.
        name: The root layer's qualified name.
        channels: Number of prunable channels ``F`` of the group.
        slices: The conv/linear layers of the group and their channel maps.
        members: Qualified names of every module whose channels the group prunes (BN included).
        dims: ``(module, "in" | "out", number of indices)`` for every module the group prunes; the
            cost model uses it to scale each layer's MACs and parameters.
    """

    root: nn.Module
    name: str
    channels: int
    slices: list[LayerSlice] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    dims: list[tuple[nn.Module, str, int]] = field(default_factory=list)

    @property
    def producers(self) -> list[str]:
        """Names of the layers whose filters (output channels) the group removes."""
        return [s.name for s in self.slices if s.role == "producer"]

    @property
    def consumers(self) -> list[str]:
        """Names of the layers whose input channels the group removes."""
        return [s.name for s in self.slices if s.role == "consumer"]


def _plain(idxs: Sequence[object]) -> list[int]:
    return [int(i) for i in idxs]


def describe_group(DG: tp.DependencyGraph, group: tp.Group) -> GroupSpec | None:
    """Describe one torch-pruning group; ``None`` for groups the analysis cannot use.

    A group is unusable when no conv/linear layer reads its channels (the network's output layer:
    pruning it would change the output), when it has fewer than two channels, or when torch-pruning
    could not map some of its indices back to the root (``None`` root indices).
    """
    root = group[0].dep.target.module
    name = DG._module2name.get(root, type(root).__name__)
    channels = len(group[0].idxs)
    spec = GroupSpec(root=root, name=name, channels=channels)
    for item in group.items:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        if not isinstance(module, nn.Module):
            continue  # unwrapped nn.Parameter
        mod_name = DG._module2name.get(module)
        if mod_name is not None and mod_name not in spec.members:
            spec.members.append(mod_name)
        if DG.is_out_channel_pruning_fn(dep.handler):
            spec.dims.append((module, "out", len(idxs)))
        elif DG.is_in_channel_pruning_fn(dep.handler):
            spec.dims.append((module, "in", len(idxs)))
        if not isinstance(module, WEIGHTED_TYPES):
            continue
        if DG.is_out_channel_pruning_fn(dep.handler):
            role: Role = "producer"
        elif DG.is_in_channel_pruning_fn(dep.handler):
            role = "consumer"
        else:
            continue
        root_idxs = list(item.root_idxs)
        if any(r is None for r in root_idxs):
            return None
        spec.slices.append(LayerSlice(module, mod_name or type(module).__name__, role, _plain(idxs), _plain(root_idxs)))
    if channels < 2 or not spec.consumers:
        return None
    return spec


def describe_groups(
    DG: tp.DependencyGraph,
    ignored_layers: Iterable[nn.Module] = (),
    root_module_types: Sequence[type[nn.Module]] = WEIGHTED_TYPES,
) -> list[GroupSpec]:
    """All analysable groups of ``DG``, in torch-pruning's order.

    Args:
        DG: A built dependency graph.
        ignored_layers: Layers (and their submodules) never to prune, as in torch-pruning.
        root_module_types: Layer types that may root a group.

    Returns:
        One :class:`GroupSpec` per prunable group that has at least one consuming layer.
    """
    ignored: list[nn.Module] = []
    for layer in ignored_layers:
        ignored.extend(layer.modules())
    specs = []
    for group in DG.get_all_groups(ignored_layers=ignored, root_module_types=tuple(root_module_types)):
        spec = describe_group(DG, group)
        if spec is not None:
            specs.append(spec)
    return specs


def slice_rows(grad: torch.Tensor, layer: LayerSlice, channels: int) -> torch.Tensor | None:
    """Rows of ``layer``'s weight gradient that belong to each group channel.

    Args:
        grad: Gradient of the layer's ``weight``.
        layer: The layer's slice of the group.
        channels: Number of group channels ``F``.

    Returns:
        An ``(F, d)`` matrix whose row ``c`` concatenates every gradient entry of the layer tied
        to group channel ``c`` (for a consumer: the weights reading channel ``c``; for a producer:
        filter ``c``), or ``None`` if the layer's layout is not supported (grouped transposed conv)
        or its channels do not map evenly onto the group's.
    """
    module = layer.module
    transposed = bool(getattr(module, "transposed", False))
    groups = int(getattr(module, "groups", 1))
    idx = torch.as_tensor(layer.idxs, device=grad.device)
    if layer.role == "producer":
        if transposed:
            if groups != 1:
                return None
            rows = grad.transpose(0, 1).index_select(0, idx).flatten(1)
        else:
            rows = grad.index_select(0, idx).flatten(1)
    else:
        if transposed:
            if groups != 1:
                return None
            rows = grad.index_select(0, idx).flatten(1)
        elif grad.dim() == 2 or groups == 1:  # linear, or dense conv: input channels are dim 1
            rows = grad.transpose(0, 1).index_select(0, idx).flatten(1)
        else:
            # Grouped conv: input channel i is read only by the output channels of its group.
            out_per, in_per = grad.shape[0] // groups, grad.shape[1]
            pieces = [grad[(i // in_per) * out_per : (i // in_per + 1) * out_per, i % in_per] for i in layer.idxs]
            rows = torch.stack(pieces).flatten(1)
    # Order rows by (group channel, layer index) so that, e.g., the k-th spatial position of a
    # flattened channel lines up with the k-th position of every other channel.
    order = sorted(range(len(layer.idxs)), key=lambda j: (layer.root_idxs[j], layer.idxs[j]))
    per_channel, rem = divmod(len(order), channels)
    if rem or per_channel == 0 or max(layer.root_idxs) >= channels:
        return None
    counts = torch.bincount(torch.as_tensor(layer.root_idxs), minlength=channels)
    if bool((counts != per_channel).any()):
        return None
    rows = rows[torch.as_tensor(order, device=rows.device)]
    return rows.reshape(channels, -1)
