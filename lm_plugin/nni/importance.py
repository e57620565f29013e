"""Importance estimator that trains and scores through an NNI evaluator instead of lm_plugin's loaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from nni.compression.utils import Evaluator

from ..errors import ConfigurationError
from ..tables.estimators import DistillImportance, ImportanceEstimator
from .training import evaluate_with_evaluator, train_with_evaluator


def _qualname(obj: Any) -> str | None:
    if obj is None:
        return None
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


@dataclass
class EvaluatorImportance(ImportanceEstimator):
    """The paper's ``finetune`` estimator, trained by an NNI evaluator's training function.

    Each candidate network is trained for ``steps`` optimizer steps with the evaluator's ``training_func``,
    ``training_step`` and (re-built) optimizers, then scored. ``steps=0`` is zero-shot scoring.

    Args:
        evaluator: an NNI evaluator, initialised by a compressor (so its optimizers can be rebuilt).
        steps: optimizer steps per candidate (0: no training); default: as many as the core's default estimator.
        eval_data: if given, the metric is measured on these batches with ``metric`` (as the core
            estimators); otherwise with the evaluator's ``evaluating_func``.
        known_parameters: parameter names of the model the evaluator's optimizers were built for.

    The cache signature names the training and evaluating functions, not the data they read: use a fresh
    ``cache_dir`` (or ``cache_dir=None``) when you change the data behind the same functions.
    """

    evaluator: Evaluator | None = None
    steps: int = DistillImportance.steps  # the core default's cost per entry, not the paper's 200 steps
    known_parameters: frozenset[str] = field(default_factory=frozenset)

    name = "nni_evaluator"

    def adapt(self, model: nn.Module, original: nn.Module) -> None:
        if self.steps <= 0:
            return
        torch.manual_seed(self.seed)  # every candidate sees the same shuffles and initialisations
        train_with_evaluator(self._require(), model, self.known_parameters, max_steps=self.steps)

    def score(self, model: nn.Module) -> float:
        if self.eval_data is not None:
            return super().score(model)
        return evaluate_with_evaluator(self._require(), model)

    def settings(self) -> dict[str, Any]:
        ev = self.evaluator
        optimizers = getattr(ev, "_optimizer_helpers", [])  # how the user's optimizers are constructed
        return {**super().settings(), "max_lr": None,
                "training_func": _qualname(getattr(ev, "training_func", None)),
                "training_step": _qualname(getattr(ev, "_ori_training_step", None)),
                "evaluating_func": None if self.eval_data is not None else
                _qualname(getattr(ev, "evaluating_func", None)),
                "optimizers": [repr((_qualname(h.callable_obj), h.args[1:], h.kwargs)) for h in optimizers]}

    def _require(self) -> Evaluator:
        if self.evaluator is None:
            raise ConfigurationError("EvaluatorImportance needs evaluator=<an NNI TorchEvaluator>")
        return self.evaluator
