"""How steady is a measured speed-up? Model-by-model rounds against alternating chunks of runs, on this machine.

The speed-up of a compressed network over its original is measured again and again, in two ways, alternating
trial by trial so both see the same machine:

* ``rounds``: what ``compare_latency`` did before — each model timed with a full :meth:`Profiler.measure`
  (warm-up + ``repeats`` runs), the models one after the other, three rounds, median per model;
* ``alternating``: ``compare_latency`` now — the models' runs interleaved in short chunks (one untimed run, then
  five timed ones, of A, then of B, ...) in each of three rounds (:meth:`Profiler.measure_together`).

Reported: the spread of each method's speed-ups over the trials. Both estimate the same ratio; the steadier one
is the one to publish.

    python benchmarks/side_by_side.py [--model resnet_fm] [--trials 10] [--batch 64] [--threads 1]

Writes ``benchmarks/results/side_by_side.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_plugin import LayerMergePruner, Plan
from lm_plugin.latency import compare_latency
from lm_plugin.workloads.models import create_model

OUT = Path(__file__).parent / "results" / "side_by_side.json"


def by_rounds(profiler, models, inputs, rounds=3):
    per = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            per[name].append(profiler.measure(model, inputs, warn_unstable=False).median_ms)
    return {name: statistics.median(v) for name, v in per.items()}


def summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4)
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "iqr_over_median": (q[2] - q[0]) / statistics.median(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet_fm")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=3, help="seed of the random valid plan that is compressed")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model).eval()  # latency does not depend on the weights
    x = torch.randn(args.batch, 1, 28, 28)
    pruner = LayerMergePruner(model, 1.0, example_inputs=x, backend="cpu", cache_dir=None, progress=False,
                              profiler_settings={"threads": args.threads})
    plan = Plan.sample(pruner.chain, args.seed, p_merge=0.6, p_drop=0.5, max_kernel=7)
    models = {"original": pruner.baseline(), "compressed": pruner.merge(pruner.apply(plan).eval())}
    speedups: dict[str, list[float]] = {"rounds": [], "alternating": []}
    for trial in range(args.trials):
        for method in (("rounds", "alternating") if trial % 2 == 0 else ("alternating", "rounds")):
            ms = by_rounds(pruner.profiler, models, x) if method == "rounds" else \
                compare_latency(pruner.profiler, models, x, rounds=3)
            speedups[method].append(ms["original"] / ms["compressed"])
        print(f"trial {trial}: rounds {speedups['rounds'][-1]:.3f}x  alternating {speedups['alternating'][-1]:.3f}x",
              flush=True)
    result = {"model": args.model, "batch": args.batch, "threads": args.threads, "trials": args.trials,
              "plan": plan.to_dict(), "machine": pruner.profiler.device_name, "torch": torch.__version__,
              "speedups": speedups, "summary": {k: summary(v) for k, v in speedups.items()}}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    print(f"\n{'method':<12} {'median':>8} {'min':>7} {'max':>7} {'IQR/median':>11}")
    for method, s in result["summary"].items():
        print(f"{method:<12} {s['median']:>7.3f}x {s['min']:>6.3f}x {s['max']:>6.3f}x {s['iqr_over_median']:>11.1%}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
