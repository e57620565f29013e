"""Channel-pruning stages: ``channel_prune_tp`` (torch-pruning) and ``channel_prune_nni`` (NNI).

Both prune the model they receive, or, directly after ``layermerge``, LayerMerge's trainable form, which they
then merge again and check in float64 (see :class:`~lm_plugin.pipeline.LayerMergeHandoff`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from ...compress import EXACTNESS_TOLERANCE
from ...merge import check_error
from ...metrics import model_cost
from ..contract import LayerMergeHandoff, PipelineContext, PipelineError, StageOutput
from ..registry import register_stage

__all__ = ["channel_prune_nni_stage", "channel_prune_tp_stage"]


def _names_to_modules(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise PipelineError(f"no module(s) named {missing} in the model this stage received (its modules: "
                            f"{[n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))][:12]} ...)")
    return [modules[n] for n in names]


def _classifiers(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[nn.Module]:
    """Linear layers whose width is the model's output width (the head: never channel-pruned)."""
    with torch.no_grad():
        width = model(*inputs).shape[-1]
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == width]


def _trainable_names(hand: LayerMergeHandoff, names: Iterable[str]) -> list[str]:
    """Module names of the merged network (what the user sees) as module names of the trainable form.

    A merged conv keeps the name of its block's first conv but produces the channels of the block's last one,
    so keeping it unpruned means ignoring every conv of its block in the trainable form.
    """
    chain, plan = hand.pruner.chain, hand.plan
    blocks: dict[str, list[str]] = {}
    for st, end in plan.blocks():
        kept = [j for j in range(st + 1, end + 1) if j in plan.kept_convs]
        if kept:
            blocks[chain.conv(kept[0]).name] = [chain.conv(j).name for j in kept]
    return [n for name in names for n in blocks.get(name, [name])]


def _merge_pruned(hand: LayerMergeHandoff, trainable: nn.Module, ctx: PipelineContext,
                  notes: dict[str, Any]) -> StageOutput:
    """Merge a channel-pruned, fine-tuned copy of the hand-off's trainable form; check it; hand it on."""
    trainable.eval()
    merged = hand.pruner.merge(trainable)
    # the merge's own float64 check: rounding is ~1e-15 there, so anything larger is a real mismatch (a bug)
    error = check_error(merged)
    if not error <= EXACTNESS_TOLERANCE:
        raise PipelineError(f"merging the channel-pruned trainable form is not exact (float64 relative error "
                            f"{error:.1e}); please report this model")
    # a further channel-pruning stage right after this one can again prune the trainable form
    ctx.layermerge = LayerMergeHandoff(hand.pruner, hand.plan, trainable, merged)
    notes.update(path="trainable", merge_error=error, exact=True)
    return StageOutput(merged, notes=notes, extras={"trainable": trainable, "pruner": hand.pruner})


@register_stage("channel_prune_tp")
def channel_prune_tp_stage(model: nn.Module, ctx: PipelineContext, *, macs_ratio: float = 0.6,
                           max_pruning_ratio: float = 0.9, iterative_steps: int = 30,
                           ignored_layers: Sequence[str] = (), round_to: int | None = None,
                           global_pruning: bool = False, epochs: float = 1.0, max_lr: float = 0.02,
                           seed: int = 0) -> StageOutput:
    """torch-pruning channel pruning (``MetaPruner`` + ``GroupMagnitudeImportance(p=1)``) to a MACs ratio.

    Prunes in small steps until the model's MACs are at most ``macs_ratio`` of the received model's (coupled
    channels — residual streams — are found by torch-pruning's ``DependencyGraph``), then fine-tunes. The
    classifier and ``ignored_layers`` (module names) are never pruned.

    Directly after ``layermerge`` it prunes LayerMerge's trainable form instead (BatchNorms still there, so
    fine-tuning works as usual), leaving block-internal convs alone, fine-tunes it, merges it and checks the
    merge in float64 (``notes["path"] == "trainable"``); the MACs counted are those of the merged network.
    Otherwise it prunes the model it receives (``notes["path"] == "received"``).
    """
    import torch_pruning as tp

    if not 0 < macs_ratio <= 1:
        raise PipelineError(f"macs_ratio must be in (0, 1], got {macs_ratio}")
    hand = ctx.handoff(model)
    _names_to_modules(model, ignored_layers)  # the user names modules of the model this stage receives
    if hand is not None:
        target = copy.deepcopy(hand.trainable).eval()
        # channels inside a merged block vanish at merge time: pruning them would cost accuracy for nothing
        ignored = (hand.pruner.internal_layers(target)
                   + _names_to_modules(target, _trainable_names(hand, ignored_layers)))

        def deployed_macs(m: nn.Module) -> int:  # the target refers to the network that will be deployed
            return model_cost(hand.pruner.merge(m), ctx.one).macs
    else:
        target = copy.deepcopy(model).eval()
        ignored = _names_to_modules(target, ignored_layers)

        def deployed_macs(m: nn.Module) -> int:
            return model_cost(m, ctx.one).macs
    ignored += _classifiers(target, ctx.one)
    base = deployed_macs(target)
    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(target, ctx.one, tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=max_pruning_ratio, iterative_steps=iterative_steps,
                                      ignored_layers=ignored, round_to=round_to, global_pruning=global_pruning)
        macs, steps = base, 0
        while macs > macs_ratio * base and steps < iterative_steps:
            pruner.step()
            steps += 1
            macs = deployed_macs(target)
    ctx.finetune(target, epochs, max_lr, seed)
    notes: dict[str, Any] = {"steps": steps, "macs_ratio_reached": macs / base}
    if hand is None:
        return StageOutput(target, notes={**notes, "path": "received"})
    return _merge_pruned(hand, target, ctx, notes)


@register_stage("channel_prune_nni")
def channel_prune_nni_stage(model: nn.Module, ctx: PipelineContext, *, sparse_ratio: float = 0.5,
                            op_types: Sequence[str] = ("Conv2d",), exclude_op_names: Sequence[str] = (),
                            epochs: float = 1.0, max_lr: float = 0.02, seed: int = 0) -> StageOutput:
    """NNI ``L1NormPruner`` masks, made physical with :func:`lm_plugin.nni.speedup`, then fine-tuned.

    ``exclude_op_names`` lists modules never pruned (the classifier never is). NNI's speedup resolves coupled
    channels (residual adds) itself, so the reached sparsity can be lower than ``sparse_ratio``.

    Directly after ``layermerge`` it prunes LayerMerge's trainable form instead (BatchNorms still there),
    excluding block-internal convs, fine-tunes it, merges it and checks the merge in float64
    (``notes["path"] == "trainable"``); ``sparse_ratio`` then applies to the trainable form's prunable convs.
    Otherwise it prunes the model it receives (``notes["path"] == "received"``).
    """
    from nni.compression.pruning import L1NormPruner

    from ...nni import speedup

    hand = ctx.handoff(model)
    _names_to_modules(model, exclude_op_names)  # the user names modules of the model this stage receives
    target = copy.deepcopy(hand.trainable if hand is not None else model).eval()
    names = {id(m): n for n, m in target.named_modules()}
    exclude = [names[id(m)] for m in _classifiers(target, ctx.one)]
    if hand is not None:
        # channels inside a merged block vanish at merge time: pruning them would cost accuracy for nothing
        exclude += [names[id(m)] for m in hand.pruner.internal_layers(target)]
        exclude += _trainable_names(hand, exclude_op_names)
    else:
        exclude += list(exclude_op_names)
    config: dict[str, Any] = {"op_types": list(op_types), "sparse_ratio": sparse_ratio,
                              "exclude_op_names": exclude}
    pruner = L1NormPruner(target, [config])
    _, masks = pruner.compress()
    pruner.unwrap_model()
    # A GraphModule is given its own graph: re-tracing it would trace *through* the leaf functions it calls
    # (the trainable form's cropped skips), which NNI's mask propagation cannot replay.
    target = speedup(target, masks, ctx.one, graph_module=target if isinstance(target, fx.GraphModule) else None)
    ctx.finetune(target, epochs, max_lr, seed)
    notes: dict[str, Any] = {"masked_modules": len(masks)}
    if hand is None:
        return StageOutput(target, notes={**notes, "path": "received"})
    return _merge_pruned(hand, target, ctx, notes)
