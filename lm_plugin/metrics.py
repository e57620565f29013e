"""Size and cost of a model as torch-pruning reports them: MACs, parameters, conv layers.

Counting goes through ``torch_pruning.utils.count_ops_and_params`` so that the numbers lm_plugin prints
are the numbers a torch-pruning user already knows how to read (MACs of one forward pass of the given
example inputs; parameters of the whole model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

__all__ = ["ModelCost", "count_convs", "model_cost"]


@dataclass(frozen=True)
class ModelCost:
    """Static cost of a model for one example input.

    Attributes:
        macs: Multiply-accumulates of one forward pass (torch-pruning's count, batch included).
        params: Number of parameters.
        convs: Number of ``nn.Conv2d`` layers (LayerMerge's depth measure).
    """

    macs: int
    params: int
    convs: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return asdict(self)


def count_convs(model: nn.Module) -> int:
    """Number of ``nn.Conv2d`` modules in ``model``."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def model_cost(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> ModelCost:
    """MACs, parameters and conv layers of ``model`` for ``example_inputs``.

    The model is run once without gradients in its current mode; its parameters are not changed.
    Pass a batch-1 example to get per-image MACs.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if isinstance(example_inputs, torch.Tensor):
        inputs: Any = example_inputs.to(device=device, dtype=dtype)
    else:
        inputs = tuple(x.to(device=device, dtype=dtype) for x in example_inputs)
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, inputs)
    return ModelCost(int(macs), int(params), count_convs(model))
