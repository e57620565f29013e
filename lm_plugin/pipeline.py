"""Compose compressions: LayerMerge, channel pruning (torch-pruning or NNI) and quantisation, in any order.

One job: run an ordered list of optional stages on a model and tabulate what each one did. After *every*
stage the model is checked (it runs on the example inputs and its output has the original's shape), and its
test accuracy, measured latency (side by side with the original, interleaved), MACs, parameters and size are
recorded.

```python
from lm_plugin.pipeline import run_pipeline

result = run_pipeline(
    model,
    ["layermerge", ("channel_prune_tp", {"macs_ratio": 0.7}), "quantize_torch"],
    example_inputs=torch.randn(64, 1, 8, 8),   # the batch latency is measured at
    train_data=train, test_data=test,
)
print(result.table())
result.final  # the last stage's model
```

Stages are looked up in :data:`STAGES` (name → :class:`StageSpec`); :func:`register_stage` adds one. A stage is a
function ``stage(model, ctx, **settings) -> StageOutput``: it must not modify ``model`` (copy it first), and the
keyword arguments it declares are its settings.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .errors import LayerMergeError
from .latency import Profiler, compare_latency, get_profiler
from .metrics import count_convs, model_cost
from .trace.graph import normalize_inputs
from .train import evaluate, fit

__all__ = [
    "STAGES",
    "LayerMergeHandoff",
    "PipelineContext",
    "PipelineError",
    "PipelineResult",
    "StageOutput",
    "StageRecord",
    "StageSpec",
    "list_stages",
    "register_stage",
    "run_pipeline",
]


class PipelineError(LayerMergeError):
    """A pipeline was misconfigured, or one of its stages produced a model that does not work."""


# ---------------------------------------------------------------------------------------------- the contract
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


Stage = Callable[..., StageOutput]


@dataclass(frozen=True)
class StageSpec:
    """A registered stage.

    Attributes:
        fn: ``fn(model, ctx, **settings) -> StageOutput``.
        final: The output cannot be trained or traced again (quantised): nothing may follow the stage.
    """

    fn: Stage
    final: bool = False

    @property
    def defaults(self) -> dict[str, Any]:
        """The stage's settings and their defaults."""
        params = list(inspect.signature(self.fn).parameters.values())[2:]
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


#: Registered stages, by name.
STAGES: dict[str, StageSpec] = {}


def register_stage(name: str, fn: Stage | None = None, *, final: bool = False) -> Any:
    """Register ``fn`` as stage ``name`` (usable as a decorator: ``@register_stage("my_stage")``).

    Args:
        name: The name used in the stage list.
        fn: ``fn(model, ctx, *, setting=default, ...) -> StageOutput``; must not modify ``model``.
        final: True if its output is quantised (no stage may follow it).
    """

    def add(f: Stage) -> Stage:
        if name in STAGES:
            raise ValueError(f"a stage named {name!r} is already registered")
        STAGES[name] = StageSpec(f, final)
        return f

    return add(fn) if fn is not None else add


def list_stages() -> list[str]:
    """Names of the registered stages."""
    return sorted(STAGES)


# ------------------------------------------------------------------------------------------------ records
@dataclass
class StageRecord:
    """Measurements of the model after one stage (the first record is the original).

    Attributes:
        name: Stage name (``"original"`` for the first row; ``name#2`` when a stage repeats).
        settings: The settings it was run with.
        accuracy: Test accuracy (%) (None without test data).
        latency_ms: Measured median latency of this model.
        original_ms: The original's latency measured side by side with it (same run).
        macs: MACs per image (torch-pruning's count). For quantised stages: the count of the float model they
            quantised (the same multiply-accumulates, done in int8 or simulated).
        params: Parameters (for int8 models: the packed weights and biases).
        size_bytes: Size of the serialized ``state_dict``.
        convs: Conv layers.
        precision: ``"fp32"``, ``"int8"`` or ``"int8 (simulated)"``.
        seconds: Wall-clock seconds of the stage (measurement excluded).
        notes: The stage's notes.
        model: The model (not serialized).
        extras: The stage's non-JSON objects (not serialized).
    """

    name: str
    settings: dict[str, Any]
    accuracy: float | None
    latency_ms: float
    original_ms: float
    macs: int
    params: int
    size_bytes: int
    convs: int
    precision: str = "fp32"
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def speedup(self) -> float:
        """Measured speed-up over the original, from the same side-by-side run."""
        return self.original_ms / self.latency_ms

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the model excluded)."""
        return {
            "name": self.name, "settings": _jsonable(self.settings), "accuracy": self.accuracy,
            "latency_ms": self.latency_ms, "original_ms": self.original_ms, "speedup": self.speedup,
            "macs": self.macs, "params": self.params, "size_bytes": self.size_bytes, "convs": self.convs,
            "precision": self.precision, "seconds": self.seconds, "notes": _jsonable(self.notes),
        }


@dataclass
class PipelineResult:
    """One record per stage, the original first.

    Attributes:
        records: :class:`StageRecord` s in order.
        latency_settings: The profiler's signature (backend, threads, batch size, torch version).
        baseline: What "original" latency means (the BN-folded original when it could be folded).
    """

    records: list[StageRecord]
    latency_settings: dict[str, Any]
    baseline: str

    @property
    def final(self) -> nn.Module:
        """The last stage's model."""
        model = self.records[-1].model
        assert model is not None
        return model

    def __getitem__(self, name: str) -> StageRecord:
        for record in self.records:
            if record.name == name:
                return record
        raise KeyError(f"no stage {name!r}; stages: {[r.name for r in self.records]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"stages": [r.to_dict() for r in self.records], "latency_settings": _jsonable(self.latency_settings),
                "baseline": self.baseline}

    def to_json(self, indent: int = 2) -> str:
        """``to_dict()`` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """A readable text table: one row per stage, cumulative from the original."""
        header = ("stage", "precision", "acc (%)", "latency (ms)", "orig (ms)", "speed-up", "MACs (M)",
                  "params (k)", "size (KB)", "convs")
        rows = [header]
        for r in self.records:
            rows.append((
                r.name, r.precision, "-" if r.accuracy is None else f"{r.accuracy:.2f}", f"{r.latency_ms:.3f}",
                f"{r.original_ms:.3f}", f"{r.speedup:.2f}x", f"{r.macs / 1e6:.3f}", f"{r.params / 1e3:.1f}",
                f"{r.size_bytes / 1024:.1f}", str(r.convs)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        s = self.latency_settings
        lines.append(f"latency: {s.get('backend')} batch {s.get('batch_size')}, {s.get('threads')} thread(s), "
                     f"median of {self.records[0].notes.get('rounds', '?')} interleaved rounds; 'orig' is the "
                     f"{self.baseline} timed in the same run.")
        if any(r.precision != "fp32" for r in self.records):
            lines.append("MACs of quantised rows: the float model's count (same multiply-accumulates, in int8 or "
                         "simulated); params of int8 rows: packed weights and biases.")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- running
def run_pipeline(
    model: nn.Module,
    stages: Sequence[str | tuple[str, dict[str, Any]]],
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    train_data: Any = None,
    test_data: Any = None,
    val_data: Any = None,
    backend: str | Profiler = "cpu",
    profiler_settings: dict[str, Any] | None = None,
    rounds: int = 3,
    cache_dir: Any = "default",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> PipelineResult:
    """Run ``stages`` in order on a copy of ``model``, measuring after each.

    Args:
        model: The trained network (never modified).
        stages: Stage names, or ``(name, settings)`` pairs, in the order to run them (see :data:`STAGES`;
            ``STAGES[name].defaults`` lists a stage's settings).
        example_inputs: One input batch at the batch size latency is measured at (e.g. ``randn(64, 1, 8, 8)``).
        train_data: Loader for fine-tuning and calibration.
        test_data: Held-out loader; accuracy is reported after every stage when given.
        val_data: Loader LayerMerge's importance table is estimated on (default ``train_data``).
        backend: Latency backend (default ``"cpu"``; int8 models only run on CPU) or a ready profiler.
        profiler_settings: Profiler settings (``warmup``, ``repeats``, ``threads`` ...).
        rounds: Interleaved rounds of every side-by-side measurement.
        cache_dir: LayerMerge's table cache.
        progress: Show progress bars.
        log: Called with a line of text at each event (e.g. ``print``).

    Returns:
        A :class:`PipelineResult`: ``.table()``, ``.to_dict()``, ``.final``.

    Raises:
        PipelineError: unknown stage or setting, a stage after a quantising stage, or a stage whose model does
            not run or has the wrong output shape.
    """
    plan = _parse_stages(stages)
    say = log or (lambda _msg: None)
    inputs = normalize_inputs(example_inputs)
    if isinstance(backend, Profiler):
        profiler = backend
    else:
        profiler = get_profiler(backend, batch_size=inputs[0].shape[0], **(profiler_settings or {}))
    ctx = PipelineContext(model, inputs, train_data, test_data, val_data if val_data is not None else train_data,
                          profiler, rounds, cache_dir, progress, say)
    model = model.eval()
    reference = _output_shape(model, inputs, "original")
    baseline, baseline_name = _folded(model)

    say("measuring the original")
    original_ms = compare_latency(profiler, {"original": baseline}, inputs, rounds=rounds)["original"]
    records = [_record(ctx, "original", {}, model, StageOutput(model, notes={"rounds": rounds}), 0.0,
                       original_ms, original_ms, model_cost(model, ctx.one).macs)]
    current, seen = model, {}
    for name, settings in plan:
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}#{seen[name]}"
        say(f"stage {label} {settings or ''}")
        float_macs = model_cost(current, ctx.one).macs
        start = time.perf_counter()
        try:
            out = STAGES[name].fn(current, ctx, **settings)
        except PipelineError:
            raise
        except LayerMergeError as exc:
            raise PipelineError(f"stage {label} failed: {exc}") from exc
        seconds = time.perf_counter() - start
        out.model.eval()
        shape = _output_shape(out.model, inputs, label)
        if shape != reference:
            raise PipelineError(f"stage {label} changed the output shape from {tuple(reference)} to {tuple(shape)}")
        say(f"  measuring {label} side by side with the original")
        measured = compare_latency(profiler, {"original": baseline, label: out.model}, inputs, rounds=rounds)
        records.append(_record(ctx, label, settings, out.model, out, seconds, measured[label], measured["original"],
                               float_macs))
        current = out.model
    if len(records) > 1:  # the original's own row: the median of all its side-by-side figures (less noisy)
        records[0].latency_ms = records[0].original_ms = statistics.median(r.original_ms for r in records)
    return PipelineResult(records, dict(profiler.signature()), baseline_name)


def _parse_stages(stages: Sequence[str | tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(stages, str):
        raise PipelineError(f"stages must be a list of stage names, e.g. [{stages!r}]")
    plan: list[tuple[str, dict[str, Any]]] = []
    for item in stages:
        name, settings = (item, {}) if isinstance(item, str) else (item[0], dict(item[1] or {}))
        if name not in STAGES:
            raise PipelineError(f"unknown stage {name!r}; registered stages: {', '.join(list_stages())}")
        unknown = set(settings) - set(STAGES[name].defaults)
        if unknown:
            raise PipelineError(f"stage {name!r} has no setting(s) {sorted(unknown)}; its settings (defaults): "
                                f"{STAGES[name].defaults}")
        plan.append((name, settings))
    for (name, _), (after, _) in zip(plan, plan[1:]):
        if STAGES[name].final:
            raise PipelineError(f"stage {after!r} cannot follow {name!r}: a quantised model cannot be fine-tuned or "
                                "rewritten; put quantisation last")
    return plan


def _output_shape(model: nn.Module, inputs: tuple[torch.Tensor, ...], label: str) -> torch.Size:
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as exc:  # whatever a broken model raises
        raise PipelineError(f"the model after stage {label} does not run on the example inputs: "
                            f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(out, torch.Tensor):
        raise PipelineError(f"the model after stage {label} returned {type(out).__name__}, expected a tensor")
    if not torch.isfinite(out).all():
        raise PipelineError(f"the model after stage {label} returned non-finite outputs")
    return out.shape


def _folded(model: nn.Module) -> tuple[nn.Module, str]:
    """The original with BatchNorm folded into its convs (how it would be deployed), if fx can trace it."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(model).eval()), "original (BatchNorm folded)"
    except Exception:  # untraceable: time it as it is
        return model, "original"


def _record(ctx: PipelineContext, name: str, settings: dict[str, Any], model: nn.Module, out: StageOutput,
            seconds: float, latency_ms: float, original_ms: float, float_macs: int) -> StageRecord:
    accuracy = evaluate(model, ctx.test_data) if ctx.test_data is not None else None
    if out.precision == "fp32":
        cost = model_cost(model, ctx.one)
        macs, params = cost.macs, cost.params
    else:
        macs, params = float_macs, _weight_count(model)
    ctx.log(f"  {name}: accuracy {accuracy}, {latency_ms:.3f} ms (original {original_ms:.3f} ms)")
    return StageRecord(name, settings, accuracy, latency_ms, original_ms, macs, params, _size_bytes(model),
                       _conv_count(model), out.precision, seconds, out.notes, model, out.extras)


def _weight_count(model: nn.Module) -> int:
    """Parameters, counting the packed weights and biases of quantised modules (which are not Parameters)."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if callable(getattr(m, "_weight_bias", None)):  # torch.ao quantised Conv2d / Linear
            total += sum(t.numel() for t in m._weight_bias() if t is not None)
    return total


def _conv_count(model: nn.Module) -> int:
    quantized = sum(type(m).__name__ in ("Conv2d", "ConvReLU2d") and not isinstance(m, nn.Conv2d)
                    for m in model.modules())
    return count_convs(model) + quantized


def _size_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


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
    from .compress import EXACTNESS_TOLERANCE
    from .merge import merge_error

    trainable.eval()
    merged = hand.pruner.merge(trainable)
    # float64: rounding is ~1e-15 there, so anything larger is a real mismatch (a bug), not noise
    error = merge_error(trainable, hand.pruner.merge, ctx.example_inputs)
    if not error <= EXACTNESS_TOLERANCE:
        raise PipelineError(f"merging the channel-pruned trainable form is not exact (float64 relative error "
                            f"{error:.1e}); please report this model")
    # a further channel-pruning stage right after this one can again prune the trainable form
    ctx.layermerge = LayerMergeHandoff(hand.pruner, hand.plan, trainable, merged)
    notes.update(path="trainable", merge_error=error, exact=True)
    return StageOutput(merged, notes=notes, extras={"trainable": trainable, "pruner": hand.pruner})


# -------------------------------------------------------------------------------------------------- stages
@register_stage("layermerge")
def layermerge_stage(model: nn.Module, ctx: PipelineContext, *, budget: float | str = 0.7, mode: str = "layermerge",
                     importance: str = "distill", importance_settings: dict[str, Any] | None = None,
                     ignored_layers: Sequence[str] = (), max_kernel: int | None = 7, epochs: float = 1.0,
                     max_lr: float = 0.02, distill_alpha: float = 0.0, clip_budget: bool = False,
                     seed: int = 0) -> StageOutput:
    """LayerMerge (:func:`lm_plugin.compress.compress`) on whatever model it receives.

    Settings: ``budget`` (fraction of the received model's measured latency, or ``"12ms"``), ``mode``,
    ``importance`` / ``importance_settings``, ``ignored_layers`` (conv names never merged), ``max_kernel``,
    fine-tuning (``epochs``, ``max_lr``, ``distill_alpha``, ``seed``), ``clip_budget`` (an unreachable budget
    becomes the smallest reachable latency, noted in the result, instead of an error).
    """
    from .compress import FinetuneSettings, compress
    from .pruner import LayerMergePruner
    from .solve import InfeasibleBudgetError

    pruner = LayerMergePruner(model, budget, ctx.example_inputs, ignored_layers=tuple(ignored_layers), mode=mode,
                              max_kernel=max_kernel, backend=ctx.profiler, cache_dir=ctx.cache_dir,
                              progress=ctx.progress, importance=importance, train_data=ctx.train_data,
                              eval_data=ctx.val_data, importance_settings=importance_settings)
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

    from .nni import speedup

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


@register_stage("quantize_nni", final=True)
def quantize_nni_stage(model: nn.Module, ctx: PipelineContext, *, calibration_batches: int = 8,
                       op_types: Sequence[str] = ("Conv2d", "Linear"),
                       target_names: Sequence[str] = ("_input_", "weight", "_output_"), quant_dtype: str = "int8",
                       quant_scheme: str = "affine") -> StageOutput:
    """NNI ``PtqQuantizer``: *simulated* int8 (fake quantisation around float kernels).

    Reports the accuracy int8 would have; the model still computes in float32 (plus the quantise/dequantise
    ops), so it is slower than its input. For real int8 speed use ``quantize_torch``.
    """
    import nni
    import torch.nn.functional as F
    from nni.compression import TorchEvaluator
    from nni.compression.quantization import PtqQuantizer

    model = copy.deepcopy(model).eval()

    def calibrate(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            for x in ctx.calibration_batches(calibration_batches):
                m(x)
        return 0.0

    def training_func(m: nn.Module, optimizer: Any, training_step: Any, lr_scheduler: Any = None,
                      max_steps: int | None = None, max_epochs: int | None = None) -> None:
        calibrate(m)  # PTQ: observers record ranges on forward passes; nothing is trained

    def training_step(batch: Any, m: nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.0)
    evaluator = TorchEvaluator(training_func, optimizer, training_step, dummy_input=ctx.one[0],
                               evaluating_func=calibrate)
    config = [{"op_types": list(op_types), "target_names": list(target_names), "quant_dtype": quant_dtype,
               "quant_scheme": quant_scheme, "granularity": "default"}]
    quantizer = PtqQuantizer(model, config, evaluator)
    model, calibration = quantizer.compress(max_steps=calibration_batches, max_epochs=None)
    return StageOutput(model, "int8 (simulated)", {"quantized_modules": sorted(calibration)})


@register_stage("quantize_torch", final=True)
def quantize_torch_stage(model: nn.Module, ctx: PipelineContext, *, engine: str = "x86",
                         calibration_batches: int = 8) -> StageOutput:
    """PyTorch int8 post-training static quantisation for CPU (FX graph mode), calibrated on training batches.

    ``engine`` is the quantised backend and qconfig (``"x86"``, ``"fbgemm"``, ``"qnnpack"`` ...); it is made
    ``torch.backends.quantized.engine`` for the whole process, since the model must run with the engine it
    was packed for.
    """
    # torch.ao.quantization's FX path still works on torch 2.14 (checked: int8 conv/linear kernels, ~2x faster
    # on CPU here) but warns that it is deprecated in favour of torchao's pt2e flow; the warnings are silenced
    # here and the path may need replacing when torch drops it.
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if engine not in torch.backends.quantized.supported_engines:
        raise PipelineError(f"quantised engine {engine!r} is not available here; available: "
                            f"{torch.backends.quantized.supported_engines}")
    torch.backends.quantized.engine = engine
    model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*reduce_range.*")
        prepared = prepare_fx(model, get_default_qconfig_mapping(engine), ctx.one)
        with torch.no_grad():
            for x in ctx.calibration_batches(calibration_batches):
                prepared(x)
        quantized = convert_fx(prepared)
    return StageOutput(quantized, "int8", {"engine": engine})

