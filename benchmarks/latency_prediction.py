"""Predicted vs measured end-to-end latency of merged networks (CPU, PyTorch eager).

For resnet18-, resnet34- and mobilenet_v2-style networks (torchvision architectures, 10 classes) at 3x64x64,
the latency table is built once per batch size, then for several plans (the identity plan and random valid
plans of increasing compression) the deployed network is built with ``merge`` and measured with the same
profiler, interleaved with the uncompressed deploy form so both see the same machine state. Reported: per plan
the predicted and measured latency and their relative error, and the predicted vs measured speed-up over the
uncompressed network; per model the medians of both errors.

    python benchmarks/latency_prediction.py [--batches 1 16] [--plans 6] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
import torchvision

from lm_plugin import LayerMergePruner, Plan

OUT = Path(__file__).parent / "results" / "latency_prediction.json"
MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "resnet34": lambda: torchvision.models.resnet34(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
}


def _write(summary: list, rows: list, args: argparse.Namespace, pruner: LayerMergePruner) -> None:
    prof = pruner.profiler.signature()
    result = {"machine": prof.get("device_name") or platform.processor(), "threads": prof.get("threads"),
              "torch": torch.__version__, "input": [3, args.size, args.size], "max_kernel": args.max_kernel,
              "summary": summary, "rows": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--plans", type=int, default=6, help="random plans per model (plus the identity plan)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--max-kernel", type=int, default=5)
    ap.add_argument("--cache-dir", default=str(Path(__file__).parent / "results" / "cache"))
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch default)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds per plan")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows, summary = [], []
    for name in args.models:
        model = MODELS[name]().eval()
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size)
            pruner = LayerMergePruner(model, example_inputs=x, backend="cpu", max_kernel=args.max_kernel,
                                      cache_dir=args.cache_dir,
                                      profiler_settings={"warmup": 10, "repeats": 40, "threads": args.threads})
            lat = pruner.latency_model()
            plans = [("identity", Plan.identity(pruner.chain))]
            for i in range(args.plans):
                p_merge = 0.3 + 0.6 * i / max(1, args.plans - 1)
                plans.append((f"random{i}(merge={p_merge:.2f})",
                              Plan.sample(pruner.chain, 100 + i, p_merge=p_merge, p_drop=0.5,
                                          max_kernel=args.max_kernel)))
            errors, ratio_errors = [], []
            baseline = pruner.baseline()
            for label, plan in plans:
                predicted = pruner.predict_latency(plan)
                deployed = pruner.merge(pruner.apply(plan).eval())
                # Interleave plan and baseline so that both see the same machine state (shared, noisy CPUs).
                plan_ms, base_ms = [], []
                for _ in range(args.rounds):
                    base_ms.append(pruner.measure_latency(baseline))
                    plan_ms.append(pruner.measure_latency(deployed))
                measured, measured_base = statistics.median(plan_ms), statistics.median(base_ms)
                err = (predicted - measured) / measured
                pred_speedup = lat.original_ms / predicted
                meas_speedup = measured_base / measured
                ratio_err = (pred_speedup - meas_speedup) / meas_speedup
                errors.append(abs(err))
                ratio_errors.append(abs(ratio_err))
                rows.append({"model": name, "batch": batch, "plan": label, "blocks": len(plan.blocks()),
                             "predicted_ms": predicted, "measured_ms": measured, "rel_error": err,
                             "measured_baseline_ms": measured_base, "predicted_speedup": pred_speedup,
                             "measured_speedup": meas_speedup, "speedup_rel_error": ratio_err})
                print(f"{name:<13} b={batch:<3} {label:<22} blocks={len(plan.blocks()):<3} "
                      f"pred={predicted:8.3f} ms  meas={measured:8.3f} ms  err={err:+6.1%}  "
                      f"speed-up pred={pred_speedup:.2f}x meas={meas_speedup:.2f}x err={ratio_err:+6.1%}",
                      flush=True)
            summary.append({"model": name, "batch": batch, "entries": len(pruner.candidates),
                            "original_ms": lat.original_ms, "rest_ms": lat.rest_ms,
                            "median_abs_rel_error": statistics.median(errors), "max_abs_rel_error": max(errors),
                            "median_abs_speedup_error": statistics.median(ratio_errors)})
            _write(summary, rows, args, pruner)  # after every model: an interrupted run keeps what it measured
    print(f"\n{'model':<13} {'batch':>5} {'entries':>8} {'original ms':>12} {'median |err|':>13} {'max |err|':>10} "
          f"{'median |speed-up err|':>22}")
    for s in summary:
        print(f"{s['model']:<13} {s['batch']:>5} {s['entries']:>8} {s['original_ms']:>12.3f} "
              f"{s['median_abs_rel_error']:>13.1%} {s['max_abs_rel_error']:>10.1%} "
              f"{s['median_abs_speedup_error']:>22.1%}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
