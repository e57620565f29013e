"""``LayerMergePruner``: the user-facing object, in torch-pruning's habits.

It owns the traced copy of the model and its chain; ``apply(plan)`` gives the trainable form and
``merge(trainable)`` the deploy form. The user's model is never modified.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import LayerMergeError
from .merge import merge as _merge
from .plan import Plan
from .rewrite import RewriteOptions, to_trainable
from .trace import Chain, extract_chain, trace


class LayerMergePruner:
    """Depth compression of a CNN by removing activations and conv layers and merging what remains.

    Args:
        model: the network to compress (any ``nn.Module`` torch.fx can trace). It is never modified.
        budget: latency budget, a fraction of the original network's latency in ``(0, 1]`` (used by
            ``search()``).
        example_inputs: a tensor (or tuple of tensors) with the shape the network will run at; convs are
            profiled at the shapes this produces.
        ignored_layers: conv modules (or their qualified names) that must be kept as they are.
        rewrite: options of the trainable form (see :class:`lm_plugin.rewrite.RewriteOptions`).

    Example:
        >>> pruner = LayerMergePruner(model, budget=0.7, example_inputs=torch.randn(1, 3, 224, 224))
        >>> plan = Plan.sample(pruner.chain, 0)
        >>> trainable = pruner.apply(plan)      # fine-tune this
        >>> deployed = pruner.merge(trainable)  # one conv per block, BN folded
    """

    def __init__(
        self,
        model: nn.Module,
        budget: float = 0.7,
        example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
        *,
        ignored_layers: Iterable[nn.Module | str] = (),
        rewrite: RewriteOptions | None = None,
    ) -> None:
        if example_inputs is None:
            raise LayerMergeError(
                "example_inputs is required: pass a tensor shaped like one real input batch, e.g. "
                "example_inputs=torch.randn(1, 3, 224, 224)"
            )
        self.model = model
        self.budget = budget
        self.example_inputs = example_inputs
        self.rewrite = rewrite or RewriteOptions()
        self.graph_module: fx.GraphModule = trace(model, example_inputs)
        self.ignored_layers = tuple(self._names(model, ignored_layers))
        self.chain: Chain = extract_chain(self.graph_module, self.ignored_layers)

    @staticmethod
    def _names(model: nn.Module, layers: Iterable[nn.Module | str]) -> list[str]:
        names = {id(m): n for n, m in model.named_modules()}
        out = []
        for layer in layers:
            if isinstance(layer, str):
                out.append(layer)
            elif id(layer) in names:
                out.append(names[id(layer)])
            else:
                raise LayerMergeError(f"ignored_layers: {type(layer).__name__} is not a submodule of the model")
        return out

    def identity_plan(self) -> Plan:
        """The plan that keeps everything."""
        return Plan.identity(self.chain)

    def apply(self, plan: Plan) -> fx.GraphModule:
        """Trainable form of ``plan``: a new module to fine-tune, then pass to :meth:`merge`.

        Raises:
            InvalidPlanError: the plan does not fit this chain.
        """
        return to_trainable(self.graph_module, self.chain, plan, self.rewrite)

    def merge(self, trainable: fx.GraphModule) -> fx.GraphModule:
        """Deploy form: one conv per block, BN folded, exact w.r.t. ``trainable`` (in eval mode)."""
        return _merge(trainable, self.chain)
