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
from .train import evaluate, fit

__all__ = ["CompressionResult", "FinetuneSettings", "TradeoffPoint", "compress", "tradeoff"]

#: Relative float64 error above which a merge is reported as inexact (rounding alone gives ~1e-15).
EXACTNESS_TOLERANCE = 1e-8


@dataclass(frozen=True)
class FinetuneSettings:
    """How the trainable form is fine-tuned (defaults: the reference workload's recipe).

    Attributes:
        epochs: Epochs over the training data (fractions allowed); 0 skips fine-tuning.
        max_lr: Peak learning rate of the OneCycle schedule.
        distill_alpha: Weight of distillation toward the original network (0 = plain cross-entropy).
        seed: Shuffling / initialisation seed.
    """

    epochs: float = 1.0
    max_lr: float = 0.02
    distill_alpha: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or not self.max_lr > 0 or not 0 <= self.distill_alpha <= 1:
            raise ConfigurationError(
                f"fine-tuning needs epochs >= 0, max_lr > 0 and 0 <= distill_alpha <= 1; got {self.epochs}, "
                f"{self.max_lr}, {self.distill_alpha}")


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
        test_data: Loader for the accuracy of the original and the merged network (held out: not the data the
            importance table was estimated on).
        finetune: Fine-tuning settings (default: 1 epoch, max lr 0.02 — the reference workload).
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
    if pruner.screen is None:
        say("building the importance table")
        pruner.importance_table()
    else:  # the search scores only the entries its plan needs
        say(f"building the screening table ({pruner.screen.name})")
        pruner.screen_table()
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
    if train_data is not None and settings.epochs > 0:
        say(f"fine-tuning the trainable form ({settings.epochs:g} epoch(s), max lr {settings.max_lr:g})")
        teacher = pruner.model if settings.distill_alpha > 0 else None
        fit(trainable, train_data, epochs=settings.epochs, max_lr=settings.max_lr, teacher=teacher,
            distill_alpha=settings.distill_alpha, seed=settings.seed, progress=progress, on_epoch=on_epoch)
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
        latency_check=lat.check.to_dict() if lat.check is not None else {})



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
    """One DP solution on the latency/accuracy trade-off (before any fine-tuning).

    Attributes:
        budget: The budget as a fraction of the original's predicted latency.
        predicted_ms: Predicted end-to-end latency of the chosen plan.
        estimated_accuracy: The original's metric plus the chosen blocks' summed importance (the DP objective):
            the estimator's guess of the accuracy right after compression.
        blocks: Number of blocks (merged convs) of the plan.
    """

    budget: float
    predicted_ms: float
    estimated_accuracy: float
    blocks: int


def tradeoff(pruner: LayerMergePruner, fractions: list[float] | None = None) -> list[TradeoffPoint]:
    """Solve the DP at several budgets (cheap: the tables are built once) and return the feasible solutions.

    Args:
        pruner: A pruner whose tables are built or buildable.
        fractions: Budgets as fractions of the original latency (default 0.30, 0.35, ..., 1.00).
    """
    fractions = fractions or [round(0.30 + 0.05 * i, 2) for i in range(15)]
    base = pruner.scorer.base_metric
    points = []
    for fraction in fractions:
        try:
            found = pruner.search(fraction)
        except InfeasibleBudgetError:
            continue
        points.append(TradeoffPoint(fraction, found.predicted_ms, base + found.objective, len(found.plan.blocks())))
    return points
