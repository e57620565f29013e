"""Drive an NNI ``Evaluator``'s own training loop on a model it was not built for.

NNI evaluators rebuild the user's optimizers for whatever model they are bound to, matching parameters *by
name* against the model the optimizers were created for. LayerMerge's rewritten networks keep the names of the
layers they keep, and add a few new ones (merged or inserted layers); those new parameters are appended to the
optimizers' first group (NNI's own rule for parameters it adds), so that nothing new is left frozen.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from typing import Any

import torch.nn as nn
from nni.compression.utils import Evaluator

from ..errors import ConfigurationError


class _StepLimitReached(Exception):
    """Raised from the optimizer step once ``max_steps`` steps are done (a training_func may ignore max_steps)."""


def _new_parameters(model: nn.Module, known: Collection[str]) -> dict[str, list[nn.Parameter]]:
    groups: dict[str, list[nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        if name not in known and param.requires_grad:
            groups[name.rpartition(".")[0]].append(param)
    return dict(groups)


def train_with_evaluator(evaluator: Evaluator, model: nn.Module, known_parameters: Collection[str], *,
                         max_steps: int | None = None, max_epochs: int | None = None) -> nn.Module:
    """Train ``model`` in place with ``evaluator``'s training function and optimizers.

    Args:
        evaluator: an initialised NNI evaluator (a compressor's ``evaluator``; its optimizers were traced with
            ``nni.trace``).
        model: the network to train (any module; typically a LayerMerge trainable form).
        known_parameters: parameter names of the model the evaluator's optimizers were built for; parameters of
            ``model`` with other names are added to the first optimizer's first parameter group.
        max_steps: optimizer steps to train for. Passed to the training function and also enforced: training
            stops after that many ``optimizer.step()`` calls even if the function ignores ``max_steps``.
        max_epochs: epochs, passed to the training function (NNI's meaning).

    Returns:
        ``model``, trained.

    Raises:
        ValueError: neither ``max_steps`` nor ``max_epochs`` is given.
    """
    if max_steps is None and max_epochs is None:
        raise ConfigurationError("give max_steps or max_epochs: how long the evaluator's training function should run")
    evaluator.bind_model(model)
    try:
        new = _new_parameters(model, set(known_parameters))
        if new:
            evaluator.patch_optim_param_group(new)
        if max_steps is not None:
            done = [0]

            def count() -> None:
                done[0] += 1
                if done[0] >= max_steps:
                    raise _StepLimitReached

            evaluator.patch_optimizer_step([], [count])
        try:
            evaluator.train(max_steps=max_steps, max_epochs=max_epochs)
        except _StepLimitReached:
            pass
    finally:
        evaluator.unbind_model()
    return model


def evaluate_with_evaluator(evaluator: Evaluator, model: nn.Module) -> float:
    """The evaluator's metric of ``model`` (its ``evaluating_func``; a dict metric's ``"default"``).

    Raises:
        ValueError: the evaluator has no evaluating function, or it returned no number.
    """
    was_training = model.training
    model.eval()
    evaluator.bind_model(model)
    try:
        result: Any = evaluator.evaluate()
    finally:
        evaluator.unbind_model()
        model.train(was_training)
    metric = result[0] if isinstance(result, tuple) else result
    if metric is None:
        raise ConfigurationError(
            "the NNI evaluator returned no metric: build it with evaluating_func=... (returning a number, higher "
            "is better, or a dict with a 'default' number), or pass eval_data=<DataLoader> to LayerMergePruner."
        )
    return float(metric)
