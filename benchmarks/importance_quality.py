"""Are the plans of a cheaper importance estimator as good? Accuracy after fine-tuning, over seeds.

For the reference workload's ``resnet_fm`` / ``mbv2_fm`` (trained with the workload recipe), one importance table
per estimator (``distill`` 10 steps, ``local``, ``tail_distill``; scored on the 1,000-image validation split) and
one latency table shared by all (CPU eager, batch 64, cached in ``--cache-dir``) give a DP plan per budget. Every
distinct plan is fine-tuned with the workload's recipe (1 epoch, OneCycle max lr 0.02) once per seed and evaluated
on the 10,000 test images after merging. Estimators whose plans coincide share the runs. Rows are saved as they
finish, so an interrupted run resumes; they are signed by the trained model's weights (runs of another training are
moved aside).

    python benchmarks/importance_quality.py --model resnet_fm --budgets 0.5 0.6 0.7 --seeds 0 1 2

Writes ``benchmarks/results/importance_quality_<model>.json`` and prints mean ± standard deviation per row.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lm_plugin import InfeasibleBudgetError, LayerMergePruner, Plan
from lm_plugin.data.datasets import data_splits
from lm_plugin.tables.importance import weights_id
from lm_plugin.train import evaluate, fit
from lm_plugin.workloads.models import trained

RESULTS = Path(__file__).parent / "results"


def plan_id(plan: Plan) -> str:
    return hashlib.sha1(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def save_runs(out: Path, saved: dict, runs: dict[str, float]) -> None:
    """Write ``saved`` with ``runs`` merged into the runs already in the file: processes running other budgets
    or seeds at the same time (one per core) add to one file instead of overwriting each other's runs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = json.loads(out.read_text()) if out.is_file() else {}
        if current.get("weights") == saved["weights"]:
            runs.update({k: v for k, v in current.get("runs", {}).items() if k not in runs})
        saved["runs"] = runs
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved, indent=1))
        tmp.replace(out)


def finetuned(model: str, pruner: LayerMergePruner, plan: Plan, seeds: list[int], splits: Any,
              label: str = "") -> list[float]:
    """Test accuracy of ``plan`` fine-tuned with the workload recipe, per seed; runs are shared with
    :func:`main` through ``importance_quality_<model>.json`` (keyed by plan id and seed; signed by the weights)."""
    out = RESULTS / f"importance_quality_{model}.json"
    saved = json.loads(out.read_text()) if out.is_file() else {}
    weights = weights_id(pruner.model)
    runs = saved.get("runs", {}) if saved.get("weights") == weights else {}
    saved = saved if saved.get("weights") == weights else {"weights": weights}
    pid, accuracies = plan_id(plan), []
    for seed in seeds:
        key = f"{pid}/{seed}"
        if key not in runs:
            trainable = pruner.apply(plan)
            fit(trainable, splits.train, epochs=1, max_lr=0.02, seed=seed, progress=False)
            runs[key] = evaluate(pruner.merge(trainable.eval()), splits.test)
            save_runs(out, saved, runs)
        accuracies.append(runs[key])
        print(f"{model} {label} plan {pid} seed {seed}: {runs[key]:.2f} %", flush=True)
    return accuracies


def parse_settings(specs: list[str]) -> dict[str, dict[str, int | float]]:
    """``["tail_distill:eval_images=250,steps=5"]`` -> ``{"tail_distill": {"eval_images": 250, "steps": 5}}``."""
    out: dict[str, dict[str, int | float]] = {}
    for spec in specs:
        name, _, pairs = spec.partition(":")
        out.setdefault(name, {}).update({k: int(v) if v.lstrip("-").isdigit() else float(v)
                                         for k, v in (pair.split("=") for pair in pairs.split(",") if pair)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["resnet_fm", "mbv2_fm"], default="resnet_fm")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--estimators", nargs="+", default=["distill", "local", "tail_distill"])
    ap.add_argument("--distill-steps", type=int, default=10)
    ap.add_argument("--cache-dir", default="benchmarks/cache", help="latency and importance tables (shared)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tables-only", action="store_true", help="build the tables and stop (e.g. one per core)")
    ap.add_argument("--set", nargs="+", default=[], metavar="NAME:KEY=VALUE,...",
                    help="estimator settings, e.g. tail_distill:eval_images=250,steps=5 (a variant: its own table)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    splits = data_splits("fashion_mnist", batch_size=128, val_size=1000)
    base = trained(args.model, progress=False)
    example = torch.randn(64, *splits.input_shape)
    out = RESULTS / f"importance_quality_{args.model}.json"
    saved = json.loads(out.read_text()) if out.is_file() else {}
    weights = weights_id(base)
    if saved and saved.get("weights") != weights:  # runs of another training of the model: keep them apart
        stale = out.with_name(f"{out.stem}.{saved.get('weights', 'unsigned')}.json")
        out.rename(stale)
        print(f"{out} holds runs of other weights; moved to {stale}")
        saved = {}
    saved["weights"] = weights
    runs: dict[str, float] = saved.get("runs", {})  # "<plan id>/<seed>" -> test accuracy
    settings = {"distill": {"steps": args.distill_steps}, "local": {}, "tail_distill": {}}
    for name, values in parse_settings(args.set).items():
        settings.setdefault(name, {}).update(values)
    pruners = {name: LayerMergePruner(base, 0.6, example_inputs=example, backend="cpu", importance=name,
                                      train_data=splits.train, eval_data=splits.val,
                                      importance_settings=settings.get(name, {}), cache_dir=args.cache_dir,
                                      progress=True, screen=None)  # each estimator's complete table
               for name in args.estimators}
    table_seconds = {}
    for name, pruner in pruners.items():
        start = time.perf_counter()
        table = pruner.importance_table()
        table_seconds[name] = {"seconds": time.perf_counter() - start, "computed": table.evaluated}
        print(f"{name} table: {table_seconds[name]['seconds']:.0f} s, {table.evaluated} entries computed", flush=True)
    if args.tables_only:
        return
    rows = []
    for budget in args.budgets:
        for name, pruner in pruners.items():
            try:
                found = pruner.search(budget)
            except InfeasibleBudgetError as exc:
                rows.append({"budget": budget, "estimator": name, "infeasible": str(exc)})
                continue
            pid = plan_id(found.plan)
            accuracies = finetuned(args.model, pruner, found.plan, args.seeds, splits, f"{budget} {name}")
            runs = json.loads(out.read_text())["runs"] if out.is_file() else runs
            rows.append({"budget": budget, "estimator": name, "settings": settings.get(name, {}), "plan": pid,
                         "plan_dict": found.plan.to_dict(),
                         "predicted_speedup": found.original_ms / found.predicted_ms, "accuracies": accuracies,
                         "mean": statistics.mean(accuracies),
                         "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                         "objective": found.objective})
    saved.update({"model": args.model, "original_accuracy": base.test_accuracy, "seeds": args.seeds,
                  "distill_steps": args.distill_steps, "rows": rows, "runs": runs, "tables": table_seconds,
                  "machine": platform.processor() or platform.machine(), "threads": args.threads,
                  "torch": torch.__version__})
    save_runs(out, saved, runs)
    print(f"\n{args.model}: original {base.test_accuracy:.2f} %, fine-tuned over seeds {args.seeds}")
    print(f"{'budget':>6} {'estimator':<12} {'plan':<12} {'pred.':>6} {'acc mean':>9} {'std':>5}")
    for r in rows:
        if "infeasible" in r:
            print(f"{r['budget']:>6} {r['estimator']:<12} infeasible")
            continue
        print(f"{r['budget']:>6} {r['estimator']:<12} {r['plan']:<12} {r['predicted_speedup']:>5.2f}x "
              f"{r['mean']:>9.2f} {r['std']:>5.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
