"""Fine-tune saved plans over more seeds: is a difference between two estimators' plans beyond the seed spread?

Takes plans by id from the results of ``importance_quality.py``, ``importance_refine.py`` and ``estimator_seeds.py``
(their ``plan_dict``)
and fine-tunes each with the workload recipe for ``--seeds``; runs are shared with ``importance_quality.py``
through ``importance_quality_<model>.json`` (keyed by plan id and seed), so a run is never repeated.

    python benchmarks/more_seeds.py --model resnet_fm --plans ccfb6e148709 --distill-budgets 0.5 --seeds 3 4

Prints mean ± sd per plan over every seed saved for it, and Welch's t-test of each plan against the first one.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import scipy.stats
import torch
from importance_quality import finetuned, plan_id

from lm_plugin import LayerMergePruner, Plan
from lm_plugin.data.datasets import data_splits
from lm_plugin.workloads.models import trained

RESULTS = Path(__file__).parent / "results"


def saved_plans(model: str) -> dict[str, dict]:
    """Every plan the quality and refine studies saved, by id."""
    plans: dict[str, dict] = {}
    refine = sorted(RESULTS.glob(f"importance_refine_{model}*.json"))
    for path in [RESULTS / f"importance_quality_{model}.json", *refine, RESULTS / f"estimator_seeds_{model}.json"]:
        if path.is_file():
            for row in json.loads(path.read_text()).get("rows", []):
                if "plan_dict" in row:
                    plans.setdefault(row["plan"], row["plan_dict"])
    return plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["resnet_fm", "mbv2_fm"], default="resnet_fm")
    ap.add_argument("--plans", nargs="*", default=[], help="plan ids (12 hex digits)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--distill-budgets", type=float, nargs="*", default=[],
                    help="also (first) the plans of the complete distill (10 steps) table in --cache-dir at these "
                         "budgets")
    ap.add_argument("--cache-dir", default="benchmarks/cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    plans = saved_plans(args.model)
    splits = data_splits("fashion_mnist", batch_size=128, val_size=1000)
    base = trained(args.model, progress=False)
    if args.distill_budgets:
        reference = LayerMergePruner(base, 0.6, example_inputs=torch.randn(64, *splits.input_shape), backend="cpu",
                                     importance="distill", train_data=splits.train, eval_data=splits.val,
                                     importance_settings={"steps": 10}, cache_dir=args.cache_dir, progress=False,
                                     screen=None)
        for budget in reversed(args.distill_budgets):  # first: the plans the others are compared with
            plan = reference.search(budget).plan
            plans[plan_id(plan)] = plan.to_dict()
            args.plans.insert(0, plan_id(plan))
    unknown = [p for p in args.plans if p not in plans]
    if unknown:
        raise SystemExit(f"no saved plan {unknown} for {args.model}")
    args.plans = list(dict.fromkeys(args.plans))
    pruner = LayerMergePruner(base, 0.6, example_inputs=torch.randn(64, *splits.input_shape), backend="cpu",
                              cache_dir=None, progress=False)
    for pid in args.plans:
        finetuned(args.model, pruner, Plan.from_dict(plans[pid]), args.seeds, splits, "more seeds")
    runs = json.loads((RESULTS / f"importance_quality_{args.model}.json").read_text())["runs"]
    accuracies = {pid: [v for k, v in runs.items() if k.startswith(pid + "/")] for pid in args.plans}
    first = args.plans[0]
    for pid, acc in accuracies.items():
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        versus = ""
        if pid != first and len(acc) > 1 and len(accuracies[first]) > 1:  # Welch's t-test against the first plan
            p = scipy.stats.ttest_ind(acc, accuracies[first], equal_var=False).pvalue
            versus = f", {statistics.mean(acc) - statistics.mean(accuracies[first]):+.2f} %p vs {first} (p = {p:.3f})"
        print(f"{args.model} plan {pid}: {statistics.mean(acc):.2f} ± {spread:.2f} over {len(acc)} seeds{versus}")


if __name__ == "__main__":
    main()
