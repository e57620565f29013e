"""How steady is this machine's CPU timing? The same network, measured again and again with the latency protocol.

Every published latency is a median of many timed runs, and the profiler re-measures (then warns about) a figure
whose own spread is large. What that cannot see is the machine changing speed *between* measurements — another
tenant of a shared host, frequency scaling, a job on the other core. This script measures the BN-folded deploy
form of each reference model over and over for ``--seconds`` and reports the spread of those medians. If the
spread is wide, absolute predictions in ms cannot be checked on this machine (the table is built minutes before
the network is measured), while speed-ups measured side by side still can.

    python benchmarks/timing_noise.py [--models resnet_fm mbv2_fm] [--seconds 150] [--batch 64] [--threads 1]

Writes ``benchmarks/results/timing_noise.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_plugin import LayerMergePruner
from lm_plugin.workloads.models import create_model

OUT = Path(__file__).parent / "results" / "timing_noise.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mbv2_fm", "resnet_fm"])
    ap.add_argument("--seconds", type=float, default=150.0, help="how long to keep measuring each model")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    for name in args.models:
        model = create_model(name).eval()  # latency does not depend on the weights
        x = torch.randn(args.batch, 1, 28, 28)
        pruner = LayerMergePruner(model, 1.0, example_inputs=x, backend="cpu", cache_dir=None, progress=False,
                                  profiler_settings={"threads": args.threads})
        deployed = pruner.baseline()
        start, samples = time.time(), []
        while time.time() - start < args.seconds:
            m = pruner.profiler.measure(deployed, pruner.example_inputs, warn_unstable=False)
            samples.append({"t": round(time.time() - start, 2), "median_ms": m.median_ms, "spread": m.spread})
        ms = [s["median_ms"] for s in samples]
        results.append({"model": name, "batch": args.batch, "measurements": len(ms), "min_ms": min(ms),
                        "median_ms": statistics.median(ms), "max_ms": max(ms), "max_over_min": max(ms) / min(ms),
                        "median_abs_dev": statistics.median(abs(v - statistics.median(ms)) for v in ms)
                        / statistics.median(ms),
                        "median_within_spread": statistics.median(s["spread"] for s in samples),
                        "samples": samples})
        print(f"{name}: {len(ms)} measurements", flush=True)
    sig = pruner.profiler.signature()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": sig.get("device_name") or platform.processor(), "threads": args.threads,
                               "torch": torch.__version__, "seconds": args.seconds, "results": results}, indent=1))
    print(f"\n{'model':<10} {'n':>4} {'min ms':>8} {'median ms':>10} {'max ms':>8} {'max/min':>8} "
          f"{'MAD/median':>11} {'spread within':>14}")
    for r in results:
        print(f"{r['model']:<10} {r['measurements']:>4} {r['min_ms']:>8.2f} {r['median_ms']:>10.2f} "
              f"{r['max_ms']:>8.2f} {r['max_over_min']:>8.2f} {r['median_abs_dev']:>11.1%} "
              f"{r['median_within_spread']:>14.2f}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
