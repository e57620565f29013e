"""Cost of a channel-pruned network: a fast analytic model (MACs, params) and real measurements.

Stage 1 of the hierarchical pruner searches over per-group channel counts; re-pruning and
re-counting a copy of the network for every candidate would be slow, so the search uses
:class:`CostModel`. It takes torch-pruning's per-layer MAC and parameter counts of the unpruned
network once, and scales each conv/linear/norm layer by the fraction of its input and output
channels a candidate keeps (``keep_in · keep_out`` for dense and grouped convs and linears,
``keep_out`` for depthwise convs and norms). Parameter-free layers (activations, pooling) are held
constant, so the predicted reduction is slightly *smaller* than the real one, never larger.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import ConfigurationError
from .groups import GroupSpec

CostFn = Callable[[nn.Module], float]

__all__ = ["CostFn", "CostModel", "latency_ms", "measure_cost", "prune_copy"]


class CostModel:
    """Predicts MACs and parameters of the network after pruning each group to a channel count.

    Args:
        model: The unpruned network.
        example_inputs: Inputs to count MACs with (MACs are per ``example_inputs`` batch).
        specs: The groups a candidate may prune.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, specs: Sequence[GroupSpec]):
        macs, params, layer_macs, layer_params = tp.utils.count_ops_and_params(model, example_inputs, layer_wise=True)
        self.base = {"macs": float(macs), "params": float(params)}
        self.specs = list(specs)
        self._layer = {
            m: (float(layer_macs.get(m) or 0.0), float(layer_params.get(m) or 0.0))
            for m in model.modules()
            if isinstance(
                m,
                (
                    nn.modules.conv._ConvNd,
                    nn.Linear,
                    nn.modules.batchnorm._NormBase,
                    nn.LayerNorm,
                    nn.GroupNorm,
                ),
            )
        }
        # Sizes of the pruned dimensions, taken from the modules themselves.
        self._size: dict[tuple[nn.Module, str], int] = {}
        for spec in self.specs:
            for module, dim, _ in spec.dims:
                if module in self._layer:
                    self._size[(module, dim)] = _dim_size(module, dim)

    def predict(self, kept: Mapping[str, int], metric: str = "macs") -> float:
        """Predicted ``metric`` (``"macs"`` or ``"params"``) when group ``name`` keeps ``kept[name]``
        channels (groups not in ``kept`` are left whole)."""
        if metric not in self.base:
            raise ConfigurationError(f"the analytic cost model knows 'macs' and 'params', not {metric!r}")
        pruned: dict[tuple[nn.Module, str], float] = {}
        for spec in self.specs:
            k = kept.get(spec.name)
            if k is None or k >= spec.channels:
                continue
            frac = (spec.channels - k) / spec.channels
            for module, dim, count in spec.dims:
                if module in self._layer:
                    pruned[(module, dim)] = pruned.get((module, dim), 0.0) + frac * count
        col = 0 if metric == "macs" else 1
        total = self.base[metric]
        touched = {m for m, _ in pruned}
        for module in touched:
            base = self._layer[module][col]
            keep_out = 1.0 - pruned.get((module, "out"), 0.0) / max(self._size.get((module, "out"), 1), 1)
            keep_in = 1.0 - pruned.get((module, "in"), 0.0) / max(self._size.get((module, "in"), 1), 1)
            if _is_depthwise(module) or not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                factor = keep_out
            else:
                factor = keep_in * keep_out
            total -= base * (1.0 - factor)
        return total


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


def _dim_size(module: nn.Module, dim: str) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if dim == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if dim == "out" else module.in_features
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        return int(torch.tensor(module.normalized_shape).prod())
    return 1


@torch.inference_mode()
def latency_ms(model: nn.Module, example_inputs: Any, warmup: int = 8, runs: int = 30) -> float:
    """Median eager-mode latency of ``model(example_inputs)`` in milliseconds (eval mode).

    Measured by the project's profiler (:mod:`lm_plugin.latency`) on the model's device with the current thread
    count, following the workload's protocol (≥ 8 warm-up runs, median of ≥ 30). Timings on a shared machine are
    noisy: compare ratios measured together.
    """
    from ..latency import measure  # local: keeps importing lm_plugin.efa light

    param = next(model.parameters(), None)
    backend = "cuda" if param is not None and param.is_cuda else "cpu"
    return measure(model, example_inputs, backend=backend, warmup=warmup, repeats=runs).median_ms


def measure_cost(model: nn.Module, example_inputs: Any, metric: str | CostFn) -> float:
    """Measure ``metric`` on a real model: ``"macs"`` / ``"params"`` by torch-pruning's counter,
    ``"latency"`` by :func:`latency_ms`, or any callable ``metric(model) -> float``."""
    if callable(metric):
        return float(metric(model))
    if metric in ("macs", "params"):
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
        return float(macs if metric == "macs" else params)
    if metric == "latency":
        return latency_ms(model, example_inputs)
    raise ConfigurationError(f"metric must be 'macs', 'params', 'latency' or a callable, got {metric!r}")


def prune_copy(
    model: nn.Module,
    example_inputs: Any,
    prune_idxs: Mapping[str, Sequence[int]],
) -> nn.Module:
    """Deep-copy ``model`` and remove, from the group rooted at each named layer, the given channels.

    Args:
        model: The network (left untouched).
        example_inputs: Inputs to trace the copy's dependency graph.
        prune_idxs: Root layer name → channel indices to remove from its group.

    Returns:
        The pruned copy.
    """
    clone = copy.deepcopy(model)
    DG = tp.DependencyGraph().build_dependency(clone, example_inputs=example_inputs)
    modules = dict(clone.named_modules())
    for name, idxs in prune_idxs.items():
        if not idxs:
            continue
        root = modules[name]
        pruner = DG.get_pruner_of_module(root)
        group = DG.get_pruning_group(root, pruner.prune_out_channels, [int(i) for i in idxs])
        if DG.check_pruning_group(group):
            group.prune()
    return clone
