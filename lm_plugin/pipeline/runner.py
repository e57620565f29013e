"""Running a pipeline: :func:`run_pipeline` runs the stages in order, checks the model after each and measures
it (accuracy, latency side by side with the original, MACs, parameters, size, convs)."""

from __future__ import annotations

import copy
import io
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import LayerMergeError
from ..latency import Profiler, compare_latency, get_profiler
from ..metrics import count_convs, model_cost
from ..trace.graph import normalize_inputs
from ..train import evaluate
from .contract import PipelineContext, PipelineError, StageOutput
from .records import PipelineResult, StageRecord
from .registry import STAGES, list_stages

__all__ = ["run_pipeline"]


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
    # metrics.count_convs counts nn.Conv2d only; torch.ao's quantised Conv2d / ConvReLU2d are not nn.Conv2d
    # subclasses, so an int8 model would report 0 convs without the second term.
    quantized = sum(type(m).__name__ in ("Conv2d", "ConvReLU2d") and not isinstance(m, nn.Conv2d)
                    for m in model.modules())
    return count_convs(model) + quantized


def _size_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
