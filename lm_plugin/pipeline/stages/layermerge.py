"""The ``layermerge`` stage: LayerMerge on whatever model it receives; leaves a hand-off for the next stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ...compress import FinetuneSettings, compress
from ...pruner import LayerMergePruner
from ...screening import ScreenedSearch
from ...solve import InfeasibleBudgetError
from ..contract import LayerMergeHandoff, PipelineContext, StageOutput
from ..registry import register_stage

__all__ = ["layermerge_stage"]


@register_stage("layermerge")
def layermerge_stage(model: nn.Module, ctx: PipelineContext, *, budget: float | str = 0.7, mode: str = "layermerge",
                     importance: str = "distill", importance_settings: dict[str, Any] | None = None,
                     screen: str | ScreenedSearch | None = "auto",
                     ignored_layers: Sequence[str] = (), max_kernel: int | None = 7, epochs: float | str = "auto",
                     max_lr: float = 0.02, distill_alpha: float = 0.0, clip_budget: bool = False,
                     seed: int = 0) -> StageOutput:
    """LayerMerge (:func:`lm_plugin.compress.compress`) on whatever model it receives.

    Settings: ``budget`` (fraction of the received model's measured latency, or ``"12ms"``), ``mode``,
    ``importance`` / ``importance_settings``, ``screen`` (a screened search: a name or a
    :class:`~lm_plugin.screening.ScreenedSearch`; ``"auto"`` by default, ``None`` for the complete table),
    ``ignored_layers`` (conv names never merged), ``max_kernel``,
    fine-tuning (``epochs``: ``"auto"`` until the validation accuracy stops improving, or a number; ``max_lr``,
    ``distill_alpha``, ``seed``), ``clip_budget`` (an unreachable budget
    becomes the smallest reachable latency, noted in the result, instead of an error).
    """
    pruner = LayerMergePruner(model, budget, ctx.example_inputs, ignored_layers=tuple(ignored_layers), mode=mode,
                              max_kernel=max_kernel, backend=ctx.profiler, cache_dir=ctx.cache_dir,
                              progress=ctx.progress, importance=importance, train_data=ctx.train_data,
                              eval_data=ctx.val_data, importance_settings=importance_settings, screen=screen)
    notes: dict[str, Any] = {}
    target: Any = None
    if clip_budget:
        try:
            pruner.search()
        except InfeasibleBudgetError as exc:
            # a little above the minimum: the DP rounds latencies to its resolution
            target = f"{exc.min_latency_ms * 1.01:.6f}ms"
            notes["budget_clipped_to"] = target
            ctx.log(f"  budget {budget} is unreachable; using the smallest reachable latency {target}")
    settings = FinetuneSettings(epochs=epochs if ctx.train_data is not None else 0, max_lr=max_lr,
                                distill_alpha=distill_alpha, seed=seed)
    result = compress(pruner, target, train_data=ctx.train_data, finetune=settings, rounds=ctx.rounds,
                      progress=ctx.progress)
    notes.update(plan=result.plan.to_dict(), merge_error=result.merge_error, exact=result.exact,
                 predicted_ms=result.predicted_ms, speedup_over_input=result.speedup)
    # the merged network has no BatchNorm left; a channel-pruning stage right after this one prunes the
    # trainable form instead and merges it again (see LayerMergeHandoff)
    ctx.layermerge = LayerMergeHandoff(pruner, result.plan, result.trainable, result.merged)
    return StageOutput(result.merged, notes=notes, extras={"trainable": result.trainable, "pruner": pruner})
