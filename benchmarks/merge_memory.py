"""Memory of construction, rewrite and the self-checking merge on big torchvision models (random init, float32).

For each model: resident memory (``/proc/self/statm``) and peak (``ru_maxrss``) after building the model, the
pruner (its traced copy), ``apply`` of a random plan and ``merge`` with the float64 self-check, plus the times.
One model and plan per process, so peaks do not carry over. Writes ``benchmarks/results/merge_memory.json`` and
prints a table.

    python benchmarks/merge_memory.py --models vgg16 regnet_y_128gf --side 32 --plans 0 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "merge_memory.json"


def _gb_now() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 1e9


def _gb_peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def worker(name: str, side: int, seed: int) -> dict:
    import torch
    import torchvision

    from lm_plugin import LayerMergePruner, Plan
    from lm_plugin.merge import check_error

    steps: dict[str, dict] = {}

    def mark(step: str, start: float) -> None:
        steps[step] = {"now_gb": _gb_now(), "peak_gb": _gb_peak(), "seconds": time.perf_counter() - start}

    t = time.perf_counter()
    model = torchvision.models.get_model(name, num_classes=10).eval()
    mark("model", t)
    t = time.perf_counter()
    pruner = LayerMergePruner(model, 0.7, torch.randn(1, 3, side, side), cache_dir=None, progress=False)
    mark("pruner", t)
    t = time.perf_counter()
    trainable = pruner.apply(Plan.sample(pruner.chain, seed))
    mark("apply", t)
    t = time.perf_counter()
    deployed = pruner.merge(trainable)
    mark("merge+check", t)
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "side": side, "plan_seed": seed, "params_m": params / 1e6, "float32_gb": params * 4 / 1e9,
            "check_error": check_error(deployed), "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "regnet_y_128gf"])
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--plans", type=int, nargs="+", default=[0, 1], help="seeds of Plan.sample")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.side, args.plans[0])))
        return
    rows = []
    for name in args.models:
        for seed in args.plans:
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--side", str(args.side),
                                  "--plans", str(seed)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=1))
    print(f"{'model':<16} {'plan':>4} {'params':>8} {'fp32 GB':>8}  " + "  ".join(f"{s:>18}" for s in rows[0]["steps"]))
    for r in rows:
        cells = "  ".join(f"{v['now_gb']:5.2f}/{v['peak_gb']:5.2f} GB {v['seconds']:4.0f}s"
                          for v in r["steps"].values())
        print(f"{r['model']:<16} {r['plan_seed']:>4} {r['params_m']:7.0f}M {r['float32_gb']:8.2f}  {cells}   "
              f"check {r['check_error']:.0e}")
    print("cells: resident / peak GB after the step, and the step's seconds")


if __name__ == "__main__":
    main()
