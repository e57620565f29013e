"""Screen with a cheap table, re-score with ``distill`` only what the DP picks: how many entries recover its plans?

A design study on two complete cached tables (no entry is scored here): the cheap estimator's table (``--screen``,
e.g. ``tail_distill:steps=5,fit_batch_size=16,eval_images=250``) and ``distill``'s (10 steps). Per budget, the DP
solves on the screening values; the entries of its plan take their ``distill`` values; it solves again, until the
plan has no entry left to re-score. ``--shift`` lifts every entry not yet re-scored by the largest gap
(``distill`` − screen) seen among the re-scored ones, so that an entry the screen under-rates is still tried
(an optimistic bound: if it held for every entry, the final plan would be optimal under ``distill``'s values).
Reports the entries re-scored, the final plan's objective under ``distill``'s values against ``distill``'s own
optimum, and whether the plans are the same.

    python benchmarks/importance_refine.py --model mbv2_fm --cache-dir benchmarks/cache

Writes ``benchmarks/results/importance_refine_<model>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from importance_quality import parse_settings, plan_id

from lm_plugin import LayerMergePruner
from lm_plugin.tables.importance import ImportanceTable
from lm_plugin.workloads.data import data_splits
from lm_plugin.workloads.models import trained

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["resnet_fm", "mbv2_fm"], default="mbv2_fm")
    ap.add_argument("--screen", default="tail_distill:steps=5,fit_batch_size=16,eval_images=250")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    ap.add_argument("--cache-dir", default="benchmarks/cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    splits = data_splits("fashion_mnist", batch_size=128, val_size=1000)
    base = trained(args.model, progress=False)
    example = torch.randn(64, *splits.input_shape)
    (name, settings), = parse_settings([args.screen]).items()

    def pruner(estimator: str, options: dict) -> LayerMergePruner:  # as importance_quality.py builds them
        return LayerMergePruner(base, 0.6, example_inputs=example, backend="cpu", importance=estimator,
                                train_data=splits.train, eval_data=splits.val, importance_settings=options,
                                cache_dir=args.cache_dir, progress=False)

    screen, reference = pruner(name, settings), pruner("distill", {"steps": 10})
    cheap, exact = screen.importance_table(), reference.importance_table()
    if cheap.evaluated or exact.evaluated:
        print(f"note: {cheap.evaluated + exact.evaluated} entries were not cached and were scored now")
    # every entry but the uncompressed single convs (which score 0 in both tables)
    scored = {c.key for c in screen.candidates if not (c.end - c.st == 1 and c.kept == (c.end,))}
    rows = []
    for shift in (False, True):
        for budget in args.budgets:
            best = reference.search(budget)
            rescored: set = set()
            lift, rounds = 0.0, 0
            while True:
                rounds += 1
                values = {k: exact.values[k] if k in rescored else cheap.values[k] + (lift if k in scored else 0.0)
                          for k in cheap.values}
                screen._importance = ImportanceTable(values, cheap.subsets, cheap.base_metric, {})
                found = screen.search(budget)
                new = [e.key for e in found.solution.entries if e.key in scored and e.key not in rescored]
                if not new:
                    break
                rescored.update(new)
                if shift:
                    lift = max(0.0, max(exact.values[k] - cheap.values[k] for k in rescored))
            objective = sum(exact.values[e.key] for e in found.solution.entries)
            rows.append({"shift": shift, "budget": budget, "rounds": rounds, "rescored": len(rescored),
                         "entries": len(scored), "lift": lift, "objective_under_distill": objective,
                         "distill_optimum": best.objective, "plan": plan_id(found.plan),
                         "distill_plan": plan_id(best.plan), "same_plan": plan_id(found.plan) == plan_id(best.plan)})
    out = RESULTS / f"importance_refine_{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "screen": args.screen, "rows": rows}, indent=1))
    print(f"{args.model}: screen {args.screen}, re-scored with distill (10 steps)")
    print(f"{'shift':<6} {'budget':>6} {'rounds':>6} {'re-scored':>10} {'objective':>9} {'optimum':>8} same plan")
    for r in rows:
        print(f"{r['shift']!s:<6} {r['budget']:>6} {r['rounds']:>6} {r['rescored']:>4} of {r['entries']:<4} "
              f"{r['objective_under_distill']:>9.2f} {r['distill_optimum']:>8.2f} {r['same_plan']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
