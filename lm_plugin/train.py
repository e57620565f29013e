"""The package's one training loop: SGD + OneCycle, optional distillation, and evaluation helpers.

Every method in ``lm_plugin`` (LayerMerge importance tables, fine-tuning after compression, the
effective-filter-analysis pruner, benchmarks) trains through :func:`fit`, so that methods compared in
a benchmark differ only in what they compress, never in how they are trained.

The defaults are the reference recipe of the project's workload: SGD with Nesterov momentum 0.9,
weight decay 5e-4 and a OneCycle learning-rate schedule peaking at ``max_lr``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import ArgumentTypeError, ConfigurationError, TrainingDivergedError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]

__all__ = ["PlateauRecord", "distillation_loss", "evaluate", "fit", "fit_until_plateau", "predict_logits",
           "seeded_shuffle", "split_batch"]


@contextlib.contextmanager
def seeded_shuffle(loader: Any, seed: int | None) -> Iterator[None]:
    """Inside the block, a loader with its own ``torch.Generator`` (``DataLoader(..., generator=g)``) shuffles as
    from ``seed``; the generator's state is put back afterwards.

    Such a loader advances its generator every epoch, so without this a run would see other batches depending on
    how many epochs the loader served before it in the process (a seeded run would not be reproducible, and the
    run's effect would leak into the next one). Nothing happens without ``seed`` or without such a generator (a
    loader that shuffles with the global RNG is seeded by :func:`fit`).
    """
    generator = getattr(loader, "generator", None)
    if seed is None or not isinstance(generator, torch.Generator):
        yield
        return
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """Return ``(inputs, targets)`` from a loader batch.

    Args:
        batch: A ``(inputs, targets, ...)`` tuple or list, as yielded by a ``DataLoader`` over a
            supervised dataset.

    Returns:
        The inputs and the targets.

    Raises:
        TypeError: If the batch is not a sequence with at least two items.
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ArgumentTypeError(
        "expected loader batches of the form (inputs, targets); got "
        f"{type(batch).__name__}. Wrap your dataset so that it yields (inputs, targets) pairs."
    )


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` if given, else the device of ``model``'s first parameter (the CPU for a parameterless one)."""
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """Hinton-style knowledge-distillation loss, ``T² · KL(softmax(t/T) ‖ softmax(s/T))``.

    The ``T²`` factor keeps the gradient scale independent of the temperature, so that
    ``distill_alpha`` in :func:`fit` means the same thing at every temperature.

    Args:
        student_logits: ``(N, C)`` logits of the model being trained.
        teacher_logits: ``(N, C)`` logits of the teacher.
        temperature: Softening temperature ``T > 0``.

    Returns:
        The scalar loss, averaged over the batch.
    """
    if temperature <= 0:
        raise ConfigurationError(f"temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def _cycle(loader: Iterable[Any]) -> Iterator[Any]:
    # Re-iterating the loader (not itertools.cycle) reshuffles every epoch and caches nothing.
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigurationError("the training loader yielded no batches")


def _num_steps(loader: Iterable[Any], epochs: float | None, steps: int | None) -> int:
    if steps is not None:
        if steps < 1:
            raise ConfigurationError(f"steps must be >= 1, got {steps}")
        return int(steps)
    if epochs is None or epochs <= 0:
        raise ConfigurationError(f"epochs must be > 0, got {epochs}")
    try:
        per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigurationError("the loader has no len(); pass steps= instead of epochs=") from exc
    if per_epoch == 0:
        raise ConfigurationError("the training loader is empty")
    return max(1, math.ceil(epochs * per_epoch))


def fit(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    epochs: float | None = 1.0,
    steps: int | None = None,
    max_lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    teacher: nn.Module | None = None,
    distill_alpha: float = 0.0,
    temperature: float = 4.0,
    loss_fn: LossFn | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    seed: int | None = None,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place with SGD and a OneCycle learning-rate schedule.

    Args:
        model: The network to train. Its parameters are updated in place; its train/eval mode is
            restored on return.
        loader: Iterable of ``(inputs, targets)`` batches, usually a ``DataLoader``.
        epochs: Length of training in passes over ``loader``; fractions are allowed (``0.5`` trains
            on half an epoch's batches). Ignored when ``steps`` is given.
        steps: Length of training in optimiser steps; overrides ``epochs``.
        max_lr: Peak learning rate of the OneCycle schedule.
        momentum: SGD momentum.
        nesterov: Use Nesterov momentum.
        weight_decay: L2 weight decay applied to every parameter.
        teacher: Optional teacher network for knowledge distillation. It is run in eval mode
            without gradients and is not modified.
        distill_alpha: Weight of the distillation loss in ``[0, 1]``; the task loss gets
            ``1 - distill_alpha``. Requires ``teacher`` when ``> 0``.
        temperature: Distillation temperature.
        loss_fn: Task loss ``loss_fn(outputs, targets)``; cross-entropy by default.
        device: Where to train; defaults to the device of the model's parameters.
        progress: Show a tqdm progress bar.
        seed: If given, seeds torch's global RNG first (loader shuffling that uses the global
            generator, dropout) and the loader's own shuffling generator for the run
            (:func:`seeded_shuffle`), for reproducible runs.
        on_epoch: Called as ``on_epoch(epoch, model)`` (epoch counted from 1, model in eval mode) after each
            full pass over ``loader`` and after the last step, e.g. to report intermediate accuracy.

    Returns:
        The same ``model`` object, trained.

    Raises:
        ValueError: For inconsistent arguments (no trainable parameters, ``distill_alpha`` outside
            ``[0, 1]`` or without a teacher, non-positive length).
    """
    if not 0.0 <= distill_alpha <= 1.0:
        raise ConfigurationError(f"distill_alpha must be in [0, 1], got {distill_alpha}")
    if distill_alpha > 0 and teacher is None:
        raise ConfigurationError("distill_alpha > 0 needs a teacher model")
    if max_lr <= 0:
        raise ConfigurationError(f"max_lr must be > 0, got {max_lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigurationError("the model has no trainable parameters")
    total = _num_steps(loader, epochs, steps)
    if seed is not None:
        torch.manual_seed(seed)

    dev = resolve_device(model, device)
    model.to(dev)
    task_loss = loss_fn if loss_fn is not None else F.cross_entropy
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.to(dev).eval()

    optimizer = torch.optim.SGD(
        params, lr=max_lr, momentum=momentum, nesterov=nesterov and momentum > 0, weight_decay=weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total)

    try:
        per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = total  # an unsized loader: one "epoch" is the whole run
    was_training = model.training
    model.train()
    with seeded_shuffle(loader, seed), tqdm(total=total, desc="train", disable=not progress, leave=False) as bar:
        try:
            for step, batch in enumerate(_cycle(loader)):
                if step >= total:
                    break
                inputs, targets = split_batch(batch)
                inputs, targets = _to_device(inputs, dev), _to_device(targets, dev)
                outputs = _forward(model, inputs)
                loss = task_loss(outputs, targets)
                if teacher is not None and distill_alpha > 0:
                    with torch.no_grad():
                        teacher_out = _forward(teacher, inputs)
                    kd = distillation_loss(outputs, teacher_out, temperature)
                    loss = (1.0 - distill_alpha) * loss + distill_alpha * kd
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"training loss became {loss.item()} at step {step}; lower max_lr or check the data"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if on_epoch is not None and ((step + 1) % per_epoch == 0 or step + 1 == total):
                    model.eval()
                    on_epoch(math.ceil((step + 1) / per_epoch), model)
                    model.train()
        finally:
            model.train(was_training)
            if teacher is not None:
                teacher.train(teacher_was_training)
    return model


@dataclass(frozen=True)
class PlateauRecord:
    """What :func:`fit_until_plateau` did.

    Attributes:
        history: The validation metric after each epoch.
        best_epoch: The epoch whose weights the model holds at the end (counted from 1).
        stopped: ``"plateau"`` (no gain for ``patience`` epochs) or ``"cap"`` (``max_epochs`` reached).
    """

    history: tuple[float, ...]
    best_epoch: int
    stopped: str

    @property
    def epochs(self) -> int:
        """Epochs trained."""
        return len(self.history)

    @property
    def best(self) -> float:
        """The validation metric of the weights the model holds."""
        return self.history[self.best_epoch - 1]


def fit_until_plateau(
    model: nn.Module,
    loader: Iterable[Any],
    val_loader: Iterable[Any],
    *,
    max_epochs: int = 10,
    patience: int = 1,
    min_delta: float = 0.05,
    decay: float = 0.5,
    max_lr: float = 0.1,
    metric: str | MetricFn = "accuracy",
    seed: int | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, nn.Module, float], None] | None = None,
    **fit_kwargs: Any,
) -> PlateauRecord:
    """Train ``model`` in place until its validation metric stops improving.

    Each epoch is one OneCycle cycle of :func:`fit` whose peak learning rate is ``decay`` times the previous one
    (restarts with shrinking peaks: every epoch ends at a low learning rate, so each is a finished model that can
    be evaluated and kept). Training stops after ``patience`` epochs that improve the metric by less than
    ``min_delta`` over the best so far, or after ``max_epochs``; the model ends with the best epoch's weights, so an
    epoch that did not help costs only its time.

    Args:
        model: The network to train (in place).
        loader: Training batches ``(inputs, targets)``; must have a ``len()``.
        val_loader: Batches the metric is measured on after each epoch (held out from ``loader``).
        max_epochs: Cap on the number of epochs.
        patience: Epochs without a gain of ``min_delta`` before stopping.
        min_delta: The smallest gain of the metric that counts as improving (accuracy: percentage points).
        decay: Factor on the peak learning rate from one epoch to the next (1.0: the same peak every epoch).
        max_lr: Peak learning rate of the first epoch.
        metric: What :func:`evaluate` measures on ``val_loader``; higher is better.
        seed: Seeds epoch ``k`` with ``seed + k - 1`` (reproducible, and each epoch shuffles differently).
        progress: Show progress bars.
        on_epoch: Called as ``on_epoch(epoch, model, value)`` after each epoch (model in eval mode).
        **fit_kwargs: Passed to :func:`fit` (``teacher``, ``distill_alpha``, ``weight_decay``, ``device`` ...).

    Returns:
        The metric after each epoch, the epoch whose weights were kept and why training stopped.
    """
    if max_epochs < 1 or patience < 1 or not 0 < decay <= 1 or min_delta < 0:
        raise ConfigurationError(f"fit_until_plateau needs max_epochs >= 1, patience >= 1, 0 < decay <= 1 and "
                                 f"min_delta >= 0; got {max_epochs}, {patience}, {decay}, {min_delta}")
    history: list[float] = []
    best_epoch, best_state, reference, stale = 0, None, -math.inf, 0
    stopped = "cap"
    for epoch in range(1, max_epochs + 1):
        fit(model, loader, epochs=1.0, max_lr=max_lr * decay ** (epoch - 1), progress=progress,
            seed=None if seed is None else seed + epoch - 1, **fit_kwargs)
        value = evaluate(model, val_loader, metric)
        history.append(value)
        if on_epoch is not None:
            was_training = model.training
            model.eval()
            on_epoch(epoch, model, value)
            model.train(was_training)
        if best_epoch == 0 or value > history[best_epoch - 1]:
            best_epoch = epoch
            best_state = copy.deepcopy(model.state_dict())
        if value >= reference + min_delta:
            reference, stale = value, 0
        else:
            stale += 1
            if stale >= patience:
                stopped = "plateau"
                break
    if best_epoch != len(history):
        model.load_state_dict(best_state)
    return PlateauRecord(tuple(history), best_epoch, stopped)


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: Iterable[Any], device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over ``loader`` and collect its outputs.

    Args:
        model: The network.
        loader: Iterable of ``(inputs, targets)`` batches.
        device: Where to run; defaults to the device of the model's parameters.

    Returns:
        ``(outputs, targets)`` concatenated over all batches, on the CPU.
    """
    dev = resolve_device(model, device)
    was_training = model.training
    model.to(dev).eval()
    outs: list[torch.Tensor] = []
    tgts: list[torch.Tensor] = []
    try:
        for batch in loader:
            inputs, targets = split_batch(batch)
            outs.append(_forward(model, _to_device(inputs, dev)).float().cpu())
            tgts.append(torch.as_tensor(targets).cpu())
    finally:
        model.train(was_training)
    if not outs:
        raise ConfigurationError("the evaluation loader yielded no batches")
    return torch.cat(outs), torch.cat(tgts)


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return 100.0 * (outputs.argmax(dim=-1) == targets).float().mean().item()


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    metric: str | MetricFn = "accuracy",
    device: str | torch.device | None = None,
) -> float:
    """Evaluate ``model`` on ``loader``.

    Args:
        model: The network; evaluated in eval mode, its mode is restored afterwards.
        loader: Iterable of ``(inputs, targets)`` batches.
        metric: ``"accuracy"`` for top-1 accuracy in percent, or a callable
            ``metric(outputs, targets) -> float`` called once on the outputs and targets of the
            whole loader.
        device: Where to run; defaults to the device of the model's parameters.

    Returns:
        The metric value.
    """
    metric_fn = metric_function(metric)
    outputs, targets = predict_logits(model, loader, device)
    return float(metric_fn(outputs, targets))


def metric_function(metric: str | MetricFn) -> MetricFn:
    """The function ``metric(outputs, targets) -> float`` that ``metric`` names (see :func:`evaluate`)."""
    if isinstance(metric, str):
        if metric != "accuracy":
            raise ConfigurationError(f"unknown metric {metric!r}; use 'accuracy' or a callable")
        return _accuracy
    if callable(metric):
        return metric
    raise ArgumentTypeError(f"metric must be 'accuracy' or a callable, got {type(metric).__name__}")
