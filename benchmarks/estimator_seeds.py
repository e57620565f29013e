"""How much do an estimator's plans depend on its own seed? The noise floor for "plans as good as distill's".

An importance table is itself noisy: ``distill`` trains each entry for a few steps from a seeded run, and another
seed gives other values and, where plans are nearly tied, other plans. This script searches each budget with
``importance=ESTIMATOR`` and ``importance_settings={..., "seed": S}`` for each ``--estimator-seeds`` (a screened
search with the ``envelope`` lift, which finds the complete table's plan where its bound holds; ``--complete``: the
complete table), then fine-tunes each distinct plan with the workload recipe over ``--seeds`` (runs shared with
``importance_quality.py``). A cheaper rule whose plans fine-tune within the spread of the seeds' plans is as good
as that estimator can tell. With ``--complete`` and several seeds it also reports how far the seeds' complete
tables agree (Spearman per pair; the per-entry standard deviation over seeds, by band of mean value).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/estimator_seeds.py --model mbv2_fm --estimator-seeds 1

Writes ``benchmarks/results/estimator_seeds_<model>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import scipy.stats
import torch
from importance_quality import finetuned, parse_settings, plan_id

from lm_plugin import LayerMergePruner, ScreenedSearch
from lm_plugin.data.datasets import data_splits
from lm_plugin.workloads.models import trained

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["resnet_fm", "mbv2_fm"], default="mbv2_fm")
    ap.add_argument("--estimator", default="distill:steps=10", metavar="NAME:KEY=VALUE,...")
    ap.add_argument("--estimator-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    ap.add_argument("--complete", action="store_true", help="search the complete table (screen=None)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="fine-tuning seeds")
    ap.add_argument("--cache-dir", default="benchmarks/cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    (name, settings), = parse_settings([args.estimator]).items()
    splits = data_splits("fashion_mnist", batch_size=128, val_size=1000)
    base = trained(args.model, progress=False)
    example = torch.randn(64, *splits.input_shape)
    out = RESULTS / f"estimator_seeds_{args.model}.json"
    tables = {}
    for seed in args.estimator_seeds:
        pruner = LayerMergePruner(base, 0.6, example_inputs=example, backend="cpu", importance=name,
                                  train_data=splits.train, eval_data=splits.val,
                                  importance_settings={**settings, "seed": seed}, cache_dir=args.cache_dir,
                                  progress=True,
                                  screen=None if args.complete else ScreenedSearch("tail_distill", lift="envelope"))
        if args.complete:
            tables[seed] = pruner.importance_table().values
        plans = {}
        for budget in args.budgets:
            start = time.perf_counter()
            found = plans[budget] = pruner.search(budget)
            row = {"estimator": args.estimator, "estimator_seed": seed, "complete": args.complete, "budget": budget,
                   "plan": plan_id(found.plan), "plan_dict": found.plan.to_dict(), "objective": found.objective,
                   "predicted_speedup": found.predicted_speedup, "search_seconds": time.perf_counter() - start}
            print(f"seed {seed} budget {budget}: plan {row['plan']} objective {found.objective:.2f}", flush=True)
            _merge(out, row)
        for budget, found in plans.items() if args.seeds else []:
            accuracies = finetuned(args.model, pruner, found.plan, args.seeds, splits, f"{budget} seed {seed}")
            _merge(out, {"estimator": args.estimator, "estimator_seed": seed, "complete": args.complete,
                         "budget": budget, "accuracies": accuracies, "mean": statistics.mean(accuracies),
                         "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0})
    if len(tables) > 1:
        _merge_agreement(out, args.estimator, _agreement(tables))
    saved = json.loads(out.read_text())
    print(f"{args.model}: {args.estimator}, plans per estimator seed, fine-tuned over seeds {args.seeds}")
    for r in sorted(saved["rows"], key=lambda r: (r["budget"], r["estimator_seed"])):
        tuned = f"{r['mean']:.2f} +- {r['std']:.2f}" if "mean" in r else ""
        print(f"{r['budget']:>5} seed {r['estimator_seed']} {'complete' if r['complete'] else 'screened':<9} "
              f"{r['plan']:<13} {r['objective']:8.2f} {r['predicted_speedup']:5.2f}x {tuned}")
    for name, agreement in saved.get("agreement", {}).items():
        print(f"{name}, complete tables of seeds {agreement['seeds']}: Spearman between seeds "
              f"{', '.join(f'{r:.3f}' for r in agreement['spearman'])}; per-entry sd over seeds by mean value: "
              + ", ".join(f"[{b['from']}, {b['to']}) {b['sd']:.2f} ({b['entries']})" for b in agreement["bands"]))
    print(f"wrote {out}")


def _agreement(tables: dict[int, dict]) -> dict:
    """How far the seeds' complete tables agree: Spearman per pair, the per-entry sd by band of mean value."""
    seeds = sorted(tables)
    keys = sorted(k for k in tables[seeds[0]] if any(t[k] != 0.0 for t in tables.values()))
    values = [[tables[s][k] for k in keys] for s in seeds]
    spearman = [float(scipy.stats.spearmanr(values[i], values[j]).statistic)
                for i in range(len(seeds)) for j in range(i + 1, len(seeds))]
    bands = []
    for lo, hi in [(-5, 1), (-15, -5), (-30, -15), (-100, -30)]:
        sds = [statistics.stdev(col) for col in zip(*values) if lo <= statistics.mean(col) < hi]
        if sds:
            bands.append({"from": lo, "to": hi, "entries": len(sds),
                          "sd": (sum(sd * sd for sd in sds) / len(sds)) ** 0.5})
    return {"seeds": seeds, "spearman": spearman, "bands": bands}


def _merge_agreement(out: Path, estimator: str, agreement: dict) -> None:
    _update(out, lambda saved: saved.setdefault("agreement", {}).__setitem__(estimator, agreement))


def _merge(out: Path, row: dict) -> None:
    """Update (or add) ``row``; a row whose plan changed loses the fine-tunes of the old plan."""
    key = ("estimator", "estimator_seed", "complete", "budget")

    def change(saved: dict) -> None:
        old = next((r for r in saved["rows"] if all(r.get(k) == row[k] for k in key)), None)
        kept = {} if old is None or old.get("plan") != row.get("plan", old.get("plan")) else old
        saved["rows"] = [r for r in saved["rows"] if r is not old] + [{**kept, **row}]
    _update(out, change)


def _update(out: Path, change: Callable[[dict], None]) -> None:
    """Apply ``change`` to the results file under a lock: one process per core may share it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = json.loads(out.read_text()) if out.is_file() else {"rows": []}
        change(saved)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved, indent=1))
        tmp.replace(out)


if __name__ == "__main__":
    main()
