"""The whole LayerMerge workflow on one pruner: search → fine-tune the trainable form → merge → check → measure.

This is what the CLI's ``compress`` and ``demo`` commands, the pipeline's LayerMerge stage and the quality
benchmark run, so that they all compress the same way:

```python
from lm_plugin import LayerMergePruner, compress

pruner = LayerMergePruner(model, 0.6, x, train_data=train, eval_data=val)
result = compress(pruner, test_data=test)  # fine-tunes on the pruner's train_data
print(result.summary())
result.merged  # the deploy form
```
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from .budget import Budget
from .errors import ConfigurationError
from .latency import compare_latency, get_profiler
from .merge import check_error, output_error
from .metrics import ModelCost, model_cost
from .plan import Plan
from .pruner import LayerMergePruner
from .solve import InfeasibleBudgetError
from .train import evaluate, fit, fit_until_plateau

__all__ = ["CompressionResult", "FinetuneSettings", "TradeoffPoint", "compress", "tradeoff"]

#: Relative float64 error above which a merge is reported as inexact (rounding alone gives ~1e-15).
EXACTNESS_TOLERANCE = 1e-8

#: An accuracy loss (percentage points) above which the summary says what to try.
FAR_BELOW = 3.0


#: ``FinetuneSettings(epochs=AUTO)``: fine-tune until the validation accuracy stops improving (the default).
AUTO = "auto"


@dataclass(frozen=True)
class FinetuneSettings:
    """How the trainable form is fine-tuned.

    The default, ``epochs="auto"``, trains one-epoch cycles whose peak learning rate halves each time and stops
    when the accuracy on the validation data (the pruner's ``eval_data`` unless ``compress`` is given
    ``val_data``) has not improved by ``min_delta`` for ``patience`` epochs, or after ``max_epochs``; the best
    epoch's weights are kept (:func:`lm_plugin.train.fit_until_plateau`). So a short dataset gets few epochs and a
    plan that lost much gets more, without a number to guess. A number instead trains exactly that many epochs with
    one OneCycle schedule (the reference workload's recipe is 1 epoch).

    Attributes:
        epochs: ``"auto"`` (default), or epochs over the training data (fractions allowed; 0 skips fine-tuning).
        max_lr: Peak learning rate (of the first cycle with ``"auto"``).
        distill_alpha: Weight of distillation toward the original network (0 = plain cross-entropy).
        seed: Shuffling / initialisation seed.
        max_epochs: Cap of ``"auto"``.
        patience: Epochs without a gain of ``min_delta`` before ``"auto"`` stops.
        min_delta: The gain of validation accuracy (percentage points) that counts as improving.
    """

    epochs: float | str = AUTO
    max_lr: float = 0.02
    distill_alpha: float = 0.0
    seed: int = 0
    max_epochs: int = 10
    patience: int = 1
    min_delta: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.epochs, str):
            if self.epochs != AUTO:
                raise ConfigurationError(f"fine-tuning epochs must be a number or {AUTO!r}; got {self.epochs!r}")
        elif self.epochs < 0:
            raise ConfigurationError(f"fine-tuning needs epochs >= 0, got {self.epochs}")
        if not self.max_lr > 0 or not 0 <= self.distill_alpha <= 1:
            raise ConfigurationError(
                f"fine-tuning needs max_lr > 0 and 0 <= distill_alpha <= 1; got {self.max_lr}, {self.distill_alpha}")
        if self.max_epochs < 1 or self.patience < 1 or self.min_delta < 0:
            raise ConfigurationError(f"fine-tuning needs max_epochs >= 1, patience >= 1 and min_delta >= 0; got "
                                     f"{self.max_epochs}, {self.patience}, {self.min_delta}")

    @property
    def auto(self) -> bool:
        """True when the number of epochs is decided by the validation accuracy."""
        return self.epochs == AUTO

    def describe(self) -> str:
        """One line for logs and reports."""
        what = (f"until validation accuracy stops improving (at most {self.max_epochs} epochs, patience "
                f"{self.patience})" if self.auto else f"{self.epochs:g} epoch(s)")
        return what + f", max lr {self.max_lr:g}" + (f", distillation {self.distill_alpha:g}"
                                                      if self.distill_alpha else "")


@dataclass
class CompressionResult:
    """Everything one compression run produced and measured.

    Attributes:
        plan: The plan the DP chose.
        trainable: The fine-tuned trainable form (fx GraphModule, eval mode).
        merged: The deploy form (one conv per block, BN folded).
        budget: The budget that was asked for.
        budget_ms: The budget in ms of the latency table's backend.
        predicted_ms: Predicted end-to-end latency of the plan and of the original (``"original"``).
        measured_ms: Side-by-side measured latency of the BN-folded original and the merged network, with the
            latency table's backend.
        runtime_ms: The same side by side in each deployment runtime asked for (``{"onnxruntime":
            {"original": ms, "compressed": ms}}``): the exported models, timed where users deploy them.
        accuracy: Test accuracy (%) of the original and the merged network, if test data was given.
        cost: MACs (per image) / params / conv layers of the original and the merged network.
        merge_error: Float64 relative error of the merge algebra, merged vs trainable (exact ≈ 1e-15).
        float32_deviation: Relative output difference of the float32 merged network from the trainable form
            (rounding of the merged kernels, ~1e-7).
        seconds: Wall-clock seconds of each stage.
        latency_settings: The profiler's signature (backend, device, threads, batch, torch version).
        screen: With a screened search: the screen's settings and the entries scored with the importance
            estimator (``{"estimator": {...}, "scored_entries": n, "table_entries": m}``); empty otherwise.
        latency_check: The latency model's self-check (:meth:`LatencyCheck.to_dict`): predicted vs measured
            deployed networks, out of sample; empty for analytic backends.
        finetune: How the trainable form was fine-tuned: the settings, epochs trained and, with ``"auto"``, the
            validation accuracy after each epoch (``history``), the epoch kept and why it stopped; the original's
            validation accuracy (``val_original``) when it was measured.
        estimate: The importance stage's time estimate made before it ran (:meth:`TableEstimate.to_dict`), with the
            actual seconds next to it.
    """

    plan: Plan
    trainable: fx.GraphModule
    merged: fx.GraphModule
    budget: Budget
    budget_ms: float
    predicted_ms: dict[str, float]
    measured_ms: dict[str, float]
    runtime_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)
    cost: dict[str, ModelCost] = field(default_factory=dict)
    merge_error: float = float("nan")
    float32_deviation: float = float("nan")
    seconds: dict[str, float] = field(default_factory=dict)
    latency_settings: dict[str, Any] = field(default_factory=dict)
    screen: dict[str, Any] = field(default_factory=dict)
    latency_check: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    estimate: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Measured speed-up of the merged network over the BN-folded original."""
        return self.measured_ms["original"] / self.measured_ms["compressed"]

    def runtime_speedup(self, runtime: str) -> float:
        """Measured speed-up in a deployment runtime (see ``runtime_ms``)."""
        ms = self.runtime_ms[runtime]
        return ms["original"] / ms["compressed"]

    @property
    def exact(self) -> bool:
        """True if the merged network matches the trainable form to float64 rounding."""
        return self.merge_error <= EXACTNESS_TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (models excluded; the plan as in ``plan.json``)."""
        return {
            "budget": str(self.budget),
            "budget_ms": self.budget_ms,
            "plan": self.plan.to_dict(),
            "predicted_ms": self.predicted_ms,
            "measured_ms": self.measured_ms,
            "speedup": self.speedup,
            "runtime_ms": self.runtime_ms,
            "runtime_speedup": {name: self.runtime_speedup(name) for name in self.runtime_ms},
            "accuracy": self.accuracy,
            "cost": {k: v.to_dict() for k, v in self.cost.items()},
            "merge_error": self.merge_error,
            "float32_deviation": self.float32_deviation,
            "exact": self.exact,
            "seconds": self.seconds,
            "latency_settings": self.latency_settings,
            "screen": self.screen,
            "latency_check": self.latency_check,
            "finetune": self.finetune,
            "estimate": self.estimate,
            "warnings": self.warnings(),
        }

    def rows(self, accuracy_split: str = "test") -> list[tuple[str, str, str]]:
        """The before/after table, ``(quantity, original, compressed)`` formatted: the one source of every summary
        (:meth:`summary` on the terminal, the report's Markdown table).

        Args:
            accuracy_split: which split the accuracy was measured on (``"test"``, or ``"val"`` without a test split).
        """
        rows = []
        if self.accuracy:
            rows.append((f"{accuracy_split} accuracy (%)", f"{self.accuracy['original']:.2f}",
                         f"{self.accuracy['compressed']:.2f}"))
        rows.append(("measured latency (ms)", f"{self.measured_ms['original']:.3f}",
                     f"{self.measured_ms['compressed']:.3f}"))
        for name, ms in self.runtime_ms.items():
            rows.append((f"{name} latency (ms)", f"{ms['original']:.3f}", f"{ms['compressed']:.3f}"))
        rows.append(("predicted latency (ms)", f"{self.predicted_ms['original']:.3f}",
                     f"{self.predicted_ms['compressed']:.3f}"))
        if self.cost:
            o, c = self.cost["original"], self.cost["compressed"]
            rows += [("MACs per image (M)", f"{o.macs / 1e6:.2f}", f"{c.macs / 1e6:.2f}"),
                     ("parameters (k)", f"{o.params / 1e3:.1f}", f"{c.params / 1e3:.1f}"),
                     ("conv layers", str(o.convs), str(c.convs))]
        return rows

    def warnings(self) -> list[str]:
        """What a user must not miss: the compressed network measured no faster than the original in a runtime
        that timed it, or the latency model predicting deployed networks worse than its tolerance."""
        out = []
        timed = {"the table's backend": self.measured_ms, **self.runtime_ms}
        backend = self.latency_settings.get("backend", "the table's backend")
        for name, ms in timed.items():
            if ms["compressed"] >= ms["original"]:
                where = f"{backend} (the table's backend)" if name == "the table's backend" else name
                advice = ("build the table with this runtime (backend=" + repr(name) + ")"
                          if name != "the table's backend" else "rebuild the table on a quiet machine")
                out.append(f"SLOWER THAN THE ORIGINAL in {where}: {ms['compressed']:.3f} ms vs {ms['original']:.3f} "
                           f"ms. The plan was chosen for {backend}'s latencies; {advice}, or ask for a milder "
                           "budget.")
        if self.accuracy and self.accuracy["original"] - self.accuracy["compressed"] > FAR_BELOW:
            drop = self.accuracy["original"] - self.accuracy["compressed"]
            epochs = self.finetune.get("epochs")
            trained = f"after {epochs} epoch(s) of fine-tuning" if epochs else "without fine-tuning"
            out.append(f"the compressed network is {drop:.2f} %p less accurate than the original {trained}. Try "
                       "fine-tuning longer (--finetune-epochs 10, or FinetuneSettings(epochs=10)), distillation "
                       "toward the original (--distill-alpha 0.5), or a milder budget.")
        check = self.latency_check
        if check and check.get("ms_error_max", 0.0) > check.get("tolerance", float("inf")):
            out.append(f"the latency model predicted deployed networks within {check['ms_error_max']:.0%} only "
                       f"(tolerance {check['tolerance']:.0%}): the budget is met only that closely.")
        return out

    def headline(self) -> str:
        """One line: measured speed-up(s), accuracy change, merge check."""
        tail = f"measured speed-up {self.speedup:.2f}x (budget {self.budget}, {self.budget_ms:.3f} ms)"
        for name in self.runtime_ms:
            tail += f", {self.runtime_speedup(name):.2f}x in {name}"
        if self.accuracy:
            tail += f", accuracy change {self.accuracy['compressed'] - self.accuracy['original']:+.2f} %p"
        return tail + f"; merge error {self.merge_error:.1e} ({'exact' if self.exact else 'NOT EXACT'})"

    def summary(self, accuracy_split: str = "test") -> str:
        """The before/after table every entry point prints (:meth:`rows`), then :meth:`headline`."""
        rows = [("", "original", "compressed"), *self.rows(accuracy_split)]
        width = max(len(r[0]) for r in rows)
        lines = [f"{a:<{width}}  {b:>10}  {c:>10}" for a, b, c in rows]
        return "\n".join([*lines, self.headline(), *(f"WARNING: {w}" for w in self.warnings())])


def compress(
    pruner: LayerMergePruner,
    budget: float | str | Budget | None = None,
    *,
    train_data: Any = None,
    val_data: Any = None,
    test_data: Any = None,
    finetune: FinetuneSettings | None = None,
    rounds: int = 3,
    runtimes: Sequence[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> CompressionResult:
    """Search, fine-tune, merge, verify and measure, with the pruner's tables and profiler.

    Args:
        pruner: A configured :class:`LayerMergePruner` (its model is never modified).
        budget: Overrides the pruner's budget.
        train_data: Loader of ``(inputs, targets)`` for fine-tuning (default: the pruner's ``train_data``); with
            neither, the trainable form is merged as is.
        val_data: Loader on which ``epochs="auto"`` fine-tuning decides when to stop (default: the pruner's
            ``eval_data``, the importance split; never the test data).
        test_data: Loader for the accuracy of the original and the merged network (held out: not the data the
            importance table was estimated on).
        finetune: Fine-tuning settings (default: :class:`FinetuneSettings`, until validation accuracy stops
            improving).
        rounds: Interleaved rounds of the side-by-side latency measurement.
        runtimes: Deployment runtimes in which the exported original and merged networks are also timed side
            by side (``result.runtime_ms``). Default: ``("cpu",)`` (eager PyTorch) when the table is ONNX
            Runtime's, else ``("onnxruntime",)`` where it is installed; ``()`` for none.
        progress: Show progress bars while fine-tuning.
        log: Called with a line of text at the start of each stage (e.g. ``print``).
        on_epoch: Called as ``on_epoch(epoch, trainable)`` after each fine-tuning epoch (model in eval mode),
            e.g. to report intermediate accuracy to NNI.

    Returns:
        The plan, the models and every measured number.

    Raises:
        InfeasibleBudgetError: no plan meets the budget (the message gives the smallest achievable latency).
    """
    say = log or (lambda _msg: None)
    settings = finetune or FinetuneSettings()
    train_data = train_data if train_data is not None else pruner.train_data
    val_data = val_data if val_data is not None else pruner.eval_data
    seconds: dict[str, float] = {}
    target = Budget.parse(budget) if budget is not None else pruner.budget

    start = time.perf_counter()
    say("building the latency table")
    lat = pruner.latency_model()
    seconds["latency_table"] = time.perf_counter() - start
    if lat.check is not None:
        say(lat.check.summary())
    pruner.check_budget(target)  # an impossible budget is refused now, before any importance entry is scored

    start = time.perf_counter()
    estimate = pruner.estimate_importance()
    say(estimate.summary())
    pruner.search_tables()
    seconds["importance_table"] = time.perf_counter() - start

    start = time.perf_counter()
    found = pruner.search(target)
    plan = found.plan
    seconds["solve"] = time.perf_counter() - start
    screen = pruner.screen_summary(found)
    if screen:
        say(f"screened search: {found.scored_entries} of {found.table_entries} entries scored with "
            f"{pruner.estimator.name}")
    say(plan.summary(pruner.chain))

    start = time.perf_counter()
    trainable = pruner.apply(plan)
    tuned = _finetune(trainable, pruner, train_data, val_data, settings, progress, say, on_epoch)
    trainable.eval()
    seconds["finetune"] = time.perf_counter() - start

    start = time.perf_counter()
    say("merging")
    merged = pruner.merge(trainable)  # checks itself in float64 and raises if it is wrong
    error = check_error(merged)
    deviation = output_error(trainable, merged, pruner.example_inputs)
    seconds["merge"] = time.perf_counter() - start

    start = time.perf_counter()
    say(f"measuring latency side by side ({rounds} rounds)")
    # The fair baseline is the original as it would be deployed: BN folded, nothing merged.
    pair = {"original": pruner.baseline(), "compressed": merged}
    measured = compare_latency(pruner.profiler, pair, pruner.example_inputs, rounds=rounds)
    runtime_ms: dict[str, dict[str, float]] = {}
    for runtime in _runtimes(runtimes, pruner):
        say(f"measuring latency side by side in {runtime}")
        profiler = get_profiler(runtime, batch_size=pruner.profiler.batch_size,
                                **({"threads": pruner.profiler.threads} if pruner.profiler.threads else {}))
        runtime_ms[runtime] = compare_latency(profiler, pair, pruner.example_inputs, rounds=rounds)
    seconds["measure"] = time.perf_counter() - start

    accuracy: dict[str, float] = {}
    if test_data is not None:
        start = time.perf_counter()
        say("evaluating")
        accuracy = {"original": evaluate(pruner.model, test_data), "compressed": evaluate(merged, test_data)}
        seconds["evaluate"] = time.perf_counter() - start
    one = tuple(x[:1] for x in pruner.example_inputs)
    cost = {"original": model_cost(pruner.model, one), "compressed": model_cost(merged, one)}
    return CompressionResult(
        plan=plan, trainable=trainable, merged=merged, budget=target, budget_ms=target.to_ms(lat.original_ms),
        predicted_ms={"original": found.original_ms, "compressed": found.predicted_ms}, measured_ms=measured,
        runtime_ms=runtime_ms,
        accuracy=accuracy, cost=cost, merge_error=error, float32_deviation=deviation, seconds=seconds,
        latency_settings=dict(pruner.profiler.signature()), screen=screen,
        latency_check=lat.check.to_dict() if lat.check is not None else {}, finetune=tuned,
        estimate={**estimate.to_dict(), "actual_s": seconds["importance_table"]})


#: Epochs of ``epochs="auto"`` fine-tuning when there is no validation data to decide with.
AUTO_WITHOUT_VALIDATION = 3


def _finetune(trainable: fx.GraphModule, pruner: LayerMergePruner, train_data: Any, val_data: Any,
              settings: FinetuneSettings, progress: bool, say: Callable[[str], None],
              on_epoch: Callable[[int, nn.Module], None] | None) -> dict[str, Any]:
    """Fine-tune the trainable form as ``settings`` say; return what happened (``CompressionResult.finetune``)."""
    record: dict[str, Any] = {"settings": settings.describe(), "epochs": 0}
    if train_data is None or settings.epochs == 0:
        say("no fine-tuning" + (" (no training data)" if train_data is None else ""))
        return record
    teacher = pruner.model if settings.distill_alpha > 0 else None
    common = {"teacher": teacher, "distill_alpha": settings.distill_alpha, "progress": progress}
    if settings.auto and val_data is not None:
        original = evaluate(pruner.model, val_data)
        say(f"fine-tuning {settings.describe()}; the original scores {original:.2f} % on the validation data")

        def each(epoch: int, model: nn.Module, value: float) -> None:
            say(f"  epoch {epoch}: validation accuracy {value:.2f} %")
            if on_epoch is not None:
                on_epoch(epoch, model)

        done = fit_until_plateau(trainable, train_data, val_data, max_epochs=settings.max_epochs,
                                 patience=settings.patience, min_delta=settings.min_delta, max_lr=settings.max_lr,
                                 seed=settings.seed, on_epoch=each, **common)
        say(f"  kept epoch {done.best_epoch} of {done.epochs} ({done.best:.2f} %; stopped: "
            f"{'no further gain' if done.stopped == 'plateau' else 'the cap'})")
        return {**record, "epochs": done.epochs, "best_epoch": done.best_epoch, "stopped": done.stopped,
                "history": list(done.history), "val_original": original}
    epochs = AUTO_WITHOUT_VALIDATION if settings.auto else settings.epochs
    if settings.auto:
        say(f"no validation data to decide when to stop: fine-tuning {epochs} epochs (pass val_data= or a number)")
    else:
        say(f"fine-tuning the trainable form ({settings.describe()})")
    fit(trainable, train_data, epochs=float(epochs), max_lr=settings.max_lr, seed=settings.seed, on_epoch=on_epoch,
        **common)
    return {**record, "epochs": epochs}


def _runtimes(asked: Sequence[str] | None, pruner: LayerMergePruner) -> tuple[str, ...]:
    """ONNX Runtime where installed, or eager PyTorch when the table is ONNX Runtime's: both CPU numbers are always
    in front of the user."""
    if asked is not None:
        return tuple(asked)
    table_backend = pruner.profiler.signature().get("backend")
    if table_backend == "onnxruntime":
        return ("cpu",)
    has_ort = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
    return ("onnxruntime",) if has_ort else ()


@dataclass(frozen=True)
class TradeoffPoint:
    """One point of the DP's latency/objective trade-off (before any fine-tuning).

    Attributes:
        budget: The budget as a fraction of the original's predicted latency.
        predicted_ms: Predicted end-to-end latency of the plan.
        objective: The plan's summed importance: the change of the importance metric the estimator predicts right
            after compression, before fine-tuning; 0 for the original, and capped at 0 (a positive sum is the
            estimator's noise, not a plan better than the original). A ranking of plans, not a forecast of the
            fine-tuned accuracy.
        blocks: Number of blocks (merged convs) of the plan.
    """

    budget: float
    predicted_ms: float
    objective: float
    blocks: int


def tradeoff(pruner: LayerMergePruner, fractions: Sequence[float] | None = None) -> list[TradeoffPoint]:
    """The best plan at several budgets, as the DP guarantees them: for the trade-off plot and choosing a budget.

    A plan that meets a budget meets every larger one, so the curve never falls as the budget grows: each point is
    the better of its own solve and the point below it (a screened search solves on partly estimated values and
    can come out lower). At budget 1.0 and above the point is the original network (objective 0): it meets the
    budget, and no plan is predicted better than it (objectives are capped at 0).

    Cost: with a complete importance table (no screen), one DP solve per budget — seconds. With a screened search,
    each budget may score exact entries its plans need that no earlier search scored, possibly as many as the
    search itself (the CLI sweeps only with ``--tradeoff``).

    Args:
        pruner: A pruner whose tables are built or buildable.
        fractions: Budgets as fractions of the original latency (default 0.30, 0.35, ..., 1.00).

    Returns:
        The feasible budgets' points, in increasing budget.
    """
    fractions = sorted(fractions or [round(0.30 + 0.05 * i, 2) for i in range(15)])
    original = TradeoffPoint(1.0, pruner.latency_model().original_ms, 0.0, pruner.chain.length)
    points: list[TradeoffPoint] = []
    for fraction in fractions:
        if fraction >= 1.0:  # the original meets it, and nothing is predicted better than the original
            points.append(dataclasses.replace(original, budget=fraction))
            continue
        try:
            found = pruner.search(fraction)
        except InfeasibleBudgetError:
            continue
        point = TradeoffPoint(fraction, found.predicted_ms, min(found.objective, 0.0), len(found.plan.blocks()))
        if points and points[-1].objective > point.objective:
            point = dataclasses.replace(points[-1], budget=fraction)
        points.append(point)
    return points
