"""The output folder of a compression run: report.md / report.json, plan.json, figures and the models.

Layout (every file is written into a staging folder that replaces the target only when all of them are
done, so a failed run never leaves a folder that looks like a finished one):

    report.md       human-readable summary (tables, the plan, figures)
    report.json     every number of report.md, machine-readable
    plan.json       the plan (``Plan.from_json`` reads it back)
    plan.png        the plan drawn over the layers
    tradeoff.png    accuracy vs latency: DP solutions and the measured models
    trainable.pt    state dict of the fine-tuned trainable form (``lm-plugin merge`` turns it into a deploy form)
    model.ts        the merged network, TorchScript
    model.onnx      the merged network, ONNX (checked in onnxruntime when installed)
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..compress import CompressionResult, TradeoffPoint
from ..export import export_onnx, export_torchscript, onnx_error, save
from ..pruner import LayerMergePruner
from .figures import plot_plan, plot_tradeoff

__all__ = ["render_markdown", "write_run"]


def write_run(
    folder: str | Path,
    result: CompressionResult,
    pruner: LayerMergePruner,
    *,
    frontier: Sequence[TradeoffPoint] = (),
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write every output of one compression run into ``folder`` (which must exist and be empty).

    Args:
        folder: Destination (the CLI passes a staging folder and renames it when this returns).
        result: What :func:`lm_plugin.compress.compress` returned.
        pruner: The pruner that produced it (chain, tables, example inputs).
        frontier: DP solutions at other budgets, for the trade-off plot.
        context: What was run (model spec, data, settings, command line); copied into report.json.

    Returns:
        The report as written to ``report.json``.
    """
    out = Path(folder)
    start = time.perf_counter()
    example = pruner.example_inputs[0][:1]
    result.plan.to_json(str(out / "plan.json"))
    torch.save(result.trainable.state_dict(), out / "trainable.pt")
    save(result.merged, out / "merged.pt")  # lm_plugin.load("merged.pt"): the deploy form with its plan
    export_torchscript(result.merged, example, out / "model.ts")
    export_onnx(result.merged, example, out / "model.onnx")
    ort_error = onnx_error(out / "model.onnx", result.merged, pruner.example_inputs[0][:4])

    original_pred, original_meas = result.predicted_ms["original"], result.measured_ms["original"]
    measured_points = {}
    if result.accuracy:
        measured_points = {
            "original": (1.0, result.accuracy["original"]),
            "compressed": (result.measured_ms["compressed"] / original_meas, result.accuracy["compressed"]),
        }
    plot_plan(pruner.chain, result.plan, out / "plan.png",
              title=f"plan at budget {result.budget}: {len(result.plan.blocks())} convs from {pruner.chain.length}")
    plot_tradeoff([(p.predicted_ms / original_pred, p.objective) for p in frontier], measured_points,
                  out / "tradeoff.png")
    result.seconds["report"] = time.perf_counter() - start  # exports and figures; the two text files are instant

    report = {
        "lm_plugin": __version__,
        "torch": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "context": context or {},
        "chain": {"convs": pruner.chain.length, "candidates": len(pruner.candidates),
                  "searched": len(pruner.selectable()), "mode": pruner.mode,
                  "max_kernel": pruner.max_kernel},
        "importance": dict(pruner.estimator.settings()),
        **result.to_dict(),
        "onnx_error": ort_error,
        "frontier": [vars(p) for p in frontier],
        "plan_summary": result.plan.summary(pruner.chain),
        "files": sorted(["report.md", "report.json", "plan.json", "plan.png", "tradeoff.png", "trainable.pt",
                         "merged.pt", "model.ts", "model.onnx"]),
    }
    (out / "report.json").write_text(json.dumps(_finite(report), indent=1, default=str))
    (out / "report.md").write_text(render_markdown(report, result))
    return report


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _check_line(check: dict[str, Any]) -> str:
    plans = check["plans"]
    return (f"predicted vs measured on {len(plans)} deployed networks (the original and plans from mild to "
            f"aggressive, each predicted by a fit without it): error median {check['ms_error_median']:.1%}, max "
            f"{check['ms_error_max']:.1%}; speed-ups max {check['speedup_error_max']:.1%}; part outside the chain "
            f"{check['rest_ms']:.3f} ms, scale on summed blocks {check['scale']:.3f}")


def _finetune_line(tuned: dict[str, Any]) -> str:
    line = f"{tuned.get('settings', '')}; {tuned.get('epochs', 0)} epoch(s) trained"
    history = tuned.get("history")
    if history:
        line += (f", validation accuracy per epoch {', '.join(f'{v:.2f}' for v in history)} %, kept epoch "
                 f"{tuned['best_epoch']} ({'no further gain' if tuned['stopped'] == 'plateau' else 'the cap'})")
        if tuned.get("val_original") is not None:
            line += f"; the original scores {tuned['val_original']:.2f} % there"
    return line


def _estimate_line(estimate: dict[str, Any]) -> str:
    actual = estimate.get("actual_s")
    return estimate["summary"].rstrip(".") + (f"; took {actual:.0f} s" if actual is not None else "")


def render_markdown(report: dict[str, Any], result: CompressionResult) -> str:
    """The report as Markdown: summary table, the plan, figures, how it was measured."""
    ctx = report.get("context", {})
    lat = report.get("latency_settings", {})
    lines = [f"# LayerMerge report — {ctx.get('model', 'model')}", ""]
    if ctx.get("command"):
        lines += [f"Command: `{ctx['command']}`", ""]
    if ctx.get("data_notes"):  # where importance was scored and which split the accuracy is on
        lines += ["Data: " + "; ".join(ctx["data_notes"]) + ".", ""]
    lines += ["## Summary", "", "| | original | compressed |", "|---|---:|---:|"]
    lines += [f"| {name} | {o} | {c} |" for name, o, c in result.rows(ctx.get("accuracy_split", "test"))]
    lines += ["", f"**{result.headline()}**.", ""]
    lines += [f"> **Warning:** {w}" for w in result.warnings()] + ([""] if result.warnings() else [])
    ort = report.get("onnx_error")
    lines += [f"Merge check: float64 relative error {result.merge_error:.1e} "
              f"({'exact' if result.exact else 'NOT EXACT — please report this'}); the float32 deploy form "
              f"differs from the trainable form by {result.float32_deviation:.1e} (rounding)"
              + (f"; ONNX in onnxruntime vs PyTorch: {ort:.1e}" if ort is not None else "") + ".", ""]
    lines += ["## Plan", "", "```", report["plan_summary"], "```", "", "![plan](plan.png)", "",
              "Green: conv kept as is; blue: convs merged into one; grey: conv dropped. Filled circles: kept "
              "activations; open circles: removed.", "",
              "## Accuracy vs latency", "", "![trade-off](tradeoff.png)", "",
              ("Grey, right axis: the DP's best plan at 15 budgets — predicted latency and objective (summed "
               "importance: the predicted change of the metric before fine-tuning, capped at 0, the original's "
               "value at budget 1.0); it never falls as the budget grows. Markers: the measured models."
               if report.get("frontier") else
               "Markers: the measured models. No trade-off sweep was run (with a screened search it scores more "
               "importance entries; `--tradeoff` asks for it)."), ""]
    lines += ["## How this was measured", "",
              f"- Latency: backend `{lat.get('backend')}` on {lat.get('device_name')}, threads {lat.get('threads')}, "
              f"batch {lat.get('batch_size')}, {lat.get('dtype')}, torch {lat.get('torch')}; original = the "
              "uncompressed network with BN folded; both measured side by side in interleaved rounds (medians).",
              *([f"- Latency model: {_check_line(result.latency_check)}."] if result.latency_check else []),
              f"- Importance: `{report['importance'].get('estimator')}` "
              f"({', '.join(f'{k}={v}' for k, v in report['importance'].items() if k != 'estimator')})"
              + (f"; screened search with `{report['screen']['estimator'].get('estimator')}`: "
                 f"{report['screen']['scored_entries']} of {report['screen']['table_entries']} entries scored"
                 + (f" (`{report['screen']['lift']}` lift)" if report['screen'].get("lift") else "")
                 if report.get("screen") else "") + ".",
              f"- Chain: {report['chain']['convs']} convs, {report['chain']['candidates']} candidate blocks"
              + (f" ({report['chain']['searched']} searched; the others are not faster than the layers they replace)"
                 if report['chain'].get("searched", report['chain']['candidates']) < report['chain']['candidates']
                 else "") + ", "
              f"mode `{report['chain']['mode']}`, max kernel {report['chain']['max_kernel']}.",
              *([f"- Fine-tuning: {_finetune_line(result.finetune)}."] if result.finetune else []),
              *([f"- Time estimate before the importance stage: {_estimate_line(result.estimate)}."]
                if result.estimate else []),
              "- Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items())
              + f"; total {sum(result.seconds.values()):.1f}.", "",
              "## Files", ""]
    lines += [f"- `{name}`" for name in report["files"]]
    return "\n".join(lines) + "\n"
