"""Gradient Gram matrices of coupled groups over a calibration set.

For group ``g`` with ``F`` channels, calibration batch ``b`` and layer ``l`` of the group, the rows of
``l``'s weight gradient that belong to each channel form an ``(F, d_l)`` block ``R_{g,l,b}``
(:func:`~lm_plugin.efa.groups.slice_rows`). The group's *filter-gradient matrix* is the horizontal
concatenation ``M_g = [R_{g,l,b}]`` over layers and batches. We never store ``M_g``: we accumulate its
``F × F`` Gram matrix ``K_g = M_g M_gᵀ``, whose eigenvalues are the squared singular values of ``M_g``.
``K_g`` is, up to a scale, the channel-by-channel block trace of the empirical Fisher (the curvature
of the second-order Taylor expansion of the pruning error), which is why its rank counts the
channel directions the loss actually depends on.

Each layer's contribution is divided by its trace before the layers are summed, so that every layer
of a coupled group weighs equally whatever the scale of its gradients (a classifier's gradients are
often orders of magnitude larger than a 3×3 conv's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigurationError
from ..train import split_batch
from .groups import GroupSpec, LayerSlice, slice_rows

Side = Literal["consumer", "producer", "both"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["GroupGram", "Side", "accumulate_grams"]


@dataclass
class GroupGram:
    """The accumulated Gram matrix of one group.

    Attributes:
        gram: ``(F, F)`` Gram matrix ``K = M Mᵀ`` of the group's filter-gradient matrix (each layer
            normalised to unit trace, then summed).
        columns: Number of columns of ``M``: the largest rank the calibration data can reveal.
        layers: Names of the layers whose gradients entered ``M``.
        batches: Number of calibration batches seen.
    """

    gram: torch.Tensor
    columns: int
    layers: list[str]
    batches: int


def _selected(spec: GroupSpec, side: Side) -> list[LayerSlice]:
    if side == "both":
        return list(spec.slices)
    chosen = [s for s in spec.slices if s.role == side]
    # Depthwise producers are the only per-channel layers some groups have; when the consumer side
    # is empty (not expected for analysable groups) fall back to every slice rather than nothing.
    return chosen or list(spec.slices)


def _forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _move(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_move(v, device) for v in x)
    return x


def accumulate_grams(
    model: nn.Module,
    specs: Sequence[GroupSpec],
    data: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
    side: Side = "consumer",
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[GroupGram]:
    """Accumulate each group's gradient Gram matrix over calibration batches.

    The model is run in eval mode (BatchNorm uses its running statistics, so a batch's gradient
    does not depend on which other samples share the batch); parameters and their ``.grad`` are
    left untouched.

    Args:
        model: The network.
        specs: The groups to analyse (from :func:`~lm_plugin.efa.groups.describe_groups`).
        data: Iterable of ``(inputs, targets)`` batches. Each batch contributes one gradient
            sample, so many small batches (16–64 images) reveal more than a few large ones.
        loss_fn: ``loss_fn(outputs, targets)``; cross-entropy by default.
        num_batches: Use at most this many batches (all by default).
        side: Which layers of a group enter its matrix: ``"consumer"`` (the layers reading the
            channels; default), ``"producer"`` (the filters themselves) or ``"both"``.
        device: Where to compute; defaults to the model's device.
        progress: Show a progress bar.

    Returns:
        One :class:`GroupGram` per spec, in order.

    Raises:
        ValueError: If ``data`` yields no batch, or the loss is not finite.
    """
    if side not in ("consumer", "producer", "both"):
        raise ConfigurationError(f"side must be 'consumer', 'producer' or 'both', got {side!r}")
    if num_batches is not None and num_batches < 1:
        raise ConfigurationError(f"num_batches must be >= 1, got {num_batches}")
    param = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    criterion = loss_fn if loss_fn is not None else F.cross_entropy

    layer_sets = [_selected(spec, side) for spec in specs]
    weights: dict[nn.Module, nn.Parameter] = {}
    for layers in layer_sets:
        for s in layers:
            weights.setdefault(s.module, s.module.weight)
    modules = list(weights)
    params = [weights[m] for m in modules]
    position = {m: i for i, m in enumerate(modules)}

    # Per (group, layer) Gram, normalised per layer at the end.
    grams = [
        [torch.zeros(spec.channels, spec.channels, dtype=torch.float64, device=dev) for _ in layers]
        for spec, layers in zip(specs, layer_sets)
    ]
    columns = [[0 for _ in layers] for layers in layer_sets]
    usable = [[True for _ in layers] for layers in layer_sets]

    was_training = model.training
    flags = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(True)
    batches = 0
    bar = tqdm(total=num_batches, desc="EFA gradients", disable=not progress, leave=False)
    try:
        for batch in data:
            if num_batches is not None and batches >= num_batches:
                break
            inputs, targets = split_batch(batch)
            inputs, targets = _move(inputs, dev), _move(targets, dev)
            with torch.enable_grad():
                loss = criterion(_forward(model, inputs), targets)
                if not torch.isfinite(loss):
                    raise ConfigurationError(
                        f"calibration loss is {loss.item()} on batch {batches}; check the data and model")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for g_idx, (spec, layers) in enumerate(zip(specs, layer_sets)):
                for l_idx, layer in enumerate(layers):
                    grad = grads[position[layer.module]]
                    if grad is None or not usable[g_idx][l_idx]:
                        continue
                    rows = slice_rows(grad.detach(), layer, spec.channels)
                    if rows is None:
                        usable[g_idx][l_idx] = False
                        continue
                    rows = rows.to(torch.float64)
                    grams[g_idx][l_idx] += rows @ rows.T
                    columns[g_idx][l_idx] += rows.shape[1]
            batches += 1
            bar.update(1)
    finally:
        bar.close()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if batches == 0:
        raise ConfigurationError("the calibration data yielded no batches")

    results = []
    for spec, layers, g_list, c_list, ok in zip(specs, layer_sets, grams, columns, usable):
        total = torch.zeros(spec.channels, spec.channels, dtype=torch.float64, device=dev)
        names, cols = [], 0
        for layer, gram, col, good in zip(layers, g_list, c_list, ok):
            trace = float(torch.trace(gram))
            if not good or trace <= 0.0:
                continue
            total += gram / trace
            names.append(layer.name)
            cols += col
        results.append(GroupGram(gram=total.cpu(), columns=cols, layers=names, batches=batches))
    return results
