"""DP solve time: a MobileNetV2-size table at 0.1 % latency resolution, and how it grows.

Tables are the real candidate sets of torchvision's mobilenet_v2 chain (224x224), with random latencies and
importances (solve time does not depend on the values, only on entries x bins).

    python benchmarks/dp_speed.py            # writes benchmarks/results/dp_speed.json and prints a table
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torchvision

from lm_plugin import LayerMergePruner
from lm_plugin.candidates import enumerate_candidates
from lm_plugin.solve import Entry, solve

OUT = Path(__file__).parent / "results" / "dp_speed.json"


def entries_for(chain, max_kernel: int, rng: random.Random) -> list[Entry]:
    return [Entry(c.st, c.end, c.kept, rng.uniform(0.05, 2.0), rng.uniform(-3.0, 0.0), c.key)
            for c in enumerate_candidates(chain, "layermerge", max_kernel=max_kernel)]


def time_solve(entries, length, resolution, repeats=5) -> tuple[float, float]:
    original = sum(e.latency_ms for e in entries if e.end - e.st == 1 and len(e.kept) == 1)
    budget, step = 0.6 * original, resolution * original
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        solve(entries, length, budget, step)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), budget / step


def main() -> None:
    rng = random.Random(0)
    chain = LayerMergePruner(torchvision.models.mobilenet_v2(), example_inputs=torch.randn(1, 3, 224, 224),
                             cache_dir=None).chain
    rows = []
    for max_kernel in (3, 5, 7, 9):
        entries = entries_for(chain, max_kernel, rng)
        for resolution in (1e-2, 1e-3, 1e-4):
            seconds, bins = time_solve(entries, chain.length, resolution)
            rows.append({"max_kernel": max_kernel, "entries": len(entries), "resolution": resolution,
                         "bins": round(bins), "seconds": seconds})
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "chain": "torchvision mobilenet_v2 @224", "rows": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    print(f"{'max_kernel':>10} {'entries':>8} {'resolution':>10} {'bins':>7} {'solve (s)':>10}")
    for r in rows:
        print(f"{r['max_kernel']:>10} {r['entries']:>8} {r['resolution']:>10g} {r['bins']:>7} {r['seconds']:>10.4f}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
