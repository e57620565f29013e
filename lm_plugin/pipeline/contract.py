"""The contract between the pipeline and its stages: what a stage is given and what it returns.

A stage is ``stage(model, ctx, **settings) -> StageOutput``: ``ctx`` is the :class:`PipelineContext` (the
original, the data, the profiler, fine-tuning and calibration helpers, and the ``layermerge`` stage's
:class:`LayerMergeHandoff`); the result is a :class:`StageOutput`. A stage that finds the model or its settings
unusable raises :class:`PipelineError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import LayerMergeError
from ..latency import Profiler
from ..train import fit

__all__ = ["LayerMergeHandoff", "PipelineContext", "PipelineError", "StageOutput"]


class PipelineError(LayerMergeError):
    """A pipeline was misconfigured, or one of its stages produced a model that does not work."""

@dataclass
class LayerMergeHandoff:
    """What the ``layermerge`` stage leaves behind for the stage after it.

    Channel pruning right after LayerMerge should prune the *trainable form* (BatchNorms still there, so it
    fine-tunes with the usual recipe) and merge afterwards, rather than prune the BN-free merged network. The
    merged network cannot be turned back into its trainable form, so the ``layermerge`` stage keeps it here.

    Attributes:
        pruner: The :class:`lm_plugin.pruner.LayerMergePruner` (its ``merge`` and ``internal_layers``).
        plan: The plan the trainable form was built from.
        trainable: The fine-tuned trainable form (eval mode). Stages must not modify it (copy it first).
        merged: ``pruner.merge(trainable)``: the model the stage handed on. The hand-off only applies to a
            stage that receives exactly this object.
    """

    pruner: Any
    plan: Any
    trainable: nn.Module
    merged: nn.Module


@dataclass
class PipelineContext:
    """What every stage may use besides the model it is given.

    Attributes:
        original: The user's model (never modified).
        example_inputs: One input batch at the batch size latency is measured at.
        train_data: ``(inputs, targets)`` loader for fine-tuning and calibration (None: no fine-tuning).
        test_data: Held-out loader for accuracy.
        val_data: Loader LayerMerge's importance table is estimated on (default: ``train_data``).
        profiler: The profiler every latency is measured with.
        rounds: Interleaved rounds of each side-by-side latency measurement.
        cache_dir: LayerMerge's table cache (``"default"``, a path, or None for no cache).
        progress: Show progress bars.
        log: Called with one line of text per event.
        layermerge: Set by the ``layermerge`` stage (and kept up to date by channel pruning that merges
            again); use :meth:`handoff` to read it.
    """

    original: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    train_data: Any
    test_data: Any
    val_data: Any
    profiler: Profiler
    rounds: int = 3
    cache_dir: Any = "default"
    progress: bool = False
    log: Callable[[str], None] = field(default=lambda _msg: None)
    layermerge: LayerMergeHandoff | None = None

    def handoff(self, model: nn.Module) -> LayerMergeHandoff | None:
        """The LayerMerge hand-off if ``model`` is the merged network it produced (the stage directly
        follows ``layermerge``), else None. Identity, not equality: any stage in between breaks the link."""
        return self.layermerge if self.layermerge is not None and self.layermerge.merged is model else None

    @property
    def one(self) -> tuple[torch.Tensor, ...]:
        """Batch-1 example inputs (per-image MACs)."""
        return tuple(x[:1] for x in self.example_inputs)

    def finetune(self, model: nn.Module, epochs: float, max_lr: float, seed: int = 0) -> None:
        """Fine-tune ``model`` in place with the package's one training loop (skipped without train data)."""
        if self.train_data is not None and epochs > 0:
            self.log(f"  fine-tuning {epochs:g} epoch(s), max lr {max_lr:g}")
            fit(model, self.train_data, epochs=epochs, max_lr=max_lr, seed=seed, progress=self.progress)
        model.eval()

    def calibration_batches(self, count: int) -> Iterable[torch.Tensor]:
        """The inputs of the first ``count`` training batches (calibration of quantisers)."""
        source = self.train_data if self.train_data is not None else [(self.example_inputs[0], None)]
        for i, batch in enumerate(source):
            if i >= count:
                break
            yield batch[0]


@dataclass
class StageOutput:
    """What a stage returns.

    Attributes:
        model: The compressed model (a new module, or a modified *copy* of the input).
        precision: ``"fp32"``, ``"int8"`` (real integer kernels) or ``"int8 (simulated)"`` (fake quantisation).
        notes: Anything worth keeping in the result (JSON-able).
        extras: Objects worth keeping that are not JSON-able (e.g. a pruned trainable form); not serialized.
    """

    model: nn.Module
    precision: str = "fp32"
    notes: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
