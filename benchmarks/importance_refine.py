"""Screen with a cheap table, re-score with ``distill`` only what the DP picks: how many entries recover its plans?

A design study on two complete cached tables (no entry is scored here): the cheap estimator's table (``--screen``,
e.g. ``tail_distill:steps=5,fit_batch_size=16,eval_images=250``) and ``distill``'s (10 steps). Per budget and rule,
the DP solves on *optimistic* values (an entry's ``distill`` value once re-scored, else its screening value plus a
lift); the entries of its plan that are not re-scored yet take their ``distill`` values; it solves again, until the
plan has no entry left to re-score. If every lift bounded the entry's under-rating by the screen, the final plan
would be optimal under ``distill``'s values. Rules (``--rules``):

* ``none``      — no lift;
* ``shift``     — one lift for all: the largest under-rating (``distill`` − screen) among the re-scored entries;
* ``envelope``  — a lift that grows with the screening loss: the smallest concave, non-decreasing function of
  ``|screen|`` above every re-scored entry's under-rating (scale-free: a large loss may be under-rated by more);
* ``calibrated:M`` — ``envelope`` after first re-scoring a seeded sample of ``M`` entries of the better half
  (by screening value): the entries the DP picks are those the screen over-rates, so their gaps alone are biased;
* ``none_calibrated:M`` — ``none`` after first re-scoring the same seeded sample;
* ``median_calibrated:M`` — the library's ``median`` lift: the screen times the calibration sample's median
  relative under-rating, fitted on that sample alone;
* ``scaled`` / ``scaled_ls`` — no lift, but the screen put on ``distill``'s scale first: multiplied by the median
  (least-squares) ratio ``distill / screen`` of the re-scored entries;
* ``one`` — ``none``, re-scoring one new entry of the plan per round (the one the screen rates lowest).

Each run also reports ``incumbent_optimal_after``: the entries re-scored when the best plan made of re-scored entries
alone first reached ``distill``'s optimum (what a branch-and-bound stop on the gap between it and the optimistic
optimum could at best save).

It also reports how the screen ranks the entries: Spearman ρ against the exact table and, where
``importance_agreement.py`` saved a ``finetune`` reference for the model, against that reference's mean over seeds.

Reports, per rule and budget, the entries re-scored, the final plan's objective under ``distill``'s values against
``distill``'s own optimum, and whether the plans are the same. ``--finetune-seeds`` fine-tunes the final plans of
``--finetune-rules`` with the workload recipe (the runs of ``importance_quality.py``, shared through its results
file, so a plan fine-tuned there is not run again).

    python benchmarks/importance_refine.py --model mbv2_fm --cache-dir benchmarks/cache

Writes ``benchmarks/results/importance_refine_<model>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from importance_quality import parse_settings, plan_id, save_runs
from scipy.stats import spearmanr

from lm_plugin import LayerMergePruner, Plan
from lm_plugin.data.datasets import data_splits
from lm_plugin.solve import InfeasibleBudgetError
from lm_plugin.solve.screen import calibration_sample, envelope_lift, median_lift, no_lift
from lm_plugin.tables.importance import ImportanceTable, weights_id
from lm_plugin.train import evaluate, fit
from lm_plugin.workloads.models import trained

RESULTS = Path(__file__).parent / "results"
Key = tuple
Lift = Callable[[dict[Key, float], dict[Key, float], dict[Key, float]], dict[Key, float]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["resnet_fm", "mbv2_fm"], default="mbv2_fm")
    ap.add_argument("--screen", default="tail_distill:steps=5,fit_batch_size=16,eval_images=250")
    ap.add_argument("--exact", default="distill:steps=10", metavar="NAME:KEY=VALUE,...",
                    help="the exact estimator (its complete table is built if not cached), e.g. "
                         "distill:steps=10,seed=1 for another seed's table")
    ap.add_argument("--partial", action="store_true",
                    help="do not build the exact table: score the entries the rules ask for (cached), and report no "
                         "optimum, under-rating or incumbent (for an exact table too dear to complete)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    ap.add_argument("--rules", nargs="+", default=["none", "none_calibrated:8", "shift", "envelope", "calibrated:8",
                                                    "calibrated:16", "scaled", "scaled_ls", "one"])
    ap.add_argument("--samples", type=int, nargs="+", default=[0, 1, 2], help="seeds of the calibration samples")
    ap.add_argument("--tolerance", type=float, default=0.0,
                    help="stop when the incumbent (best plan of re-scored entries) is within this fraction of its "
                         "objective of the lifted optimum (the library's screen_tolerance; 0: until all exact)")
    ap.add_argument("--keep-slower", action="store_true",
                    help="skip_slower_blocks=False: every candidate, as before 2026-12-06")
    ap.add_argument("--finetune-rules", nargs="*", default=[])
    ap.add_argument("--finetune-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--cache-dir", default="benchmarks/cache")
    ap.add_argument("--output", default=None, help="results file (default results/importance_refine_<model>.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    splits = data_splits("fashion_mnist", batch_size=128, val_size=1000)
    base = trained(args.model, progress=False)
    example = torch.randn(64, *splits.input_shape)
    (name, settings), = parse_settings([args.screen]).items()

    def pruner(estimator: str, options: dict) -> LayerMergePruner:  # as importance_quality.py builds them
        return LayerMergePruner(base, 0.6, example_inputs=example, backend="cpu", importance=estimator,
                                train_data=splits.train, eval_data=splits.val, importance_settings=options,
                                cache_dir=args.cache_dir, progress=False, screen=None,  # complete tables
                                skip_slower_blocks=not args.keep_slower)

    (exact_name, exact_settings), = parse_settings([args.exact]).items()
    screen, reference = pruner(name, settings), pruner(exact_name, exact_settings)
    cheap = screen.importance_table()
    scored = set(screen.scorer.scored)  # every entry but the uncompressed single convs (0 in both tables)
    s = {k: cheap.values[k] for k in scored}
    if args.partial:
        d: dict[Key, float] = _Exact(reference)
    else:
        exact = reference.importance_table()
        d = {k: exact.values[k] for k in scored}
    if cheap.evaluated or reference.scorer.evaluated:
        print(f"note: {cheap.evaluated + reference.scorer.evaluated} entries were not cached and were scored now")

    def solve(values: dict[Key, float], budget: float):
        screen.use_importance(ImportanceTable({**cheap.values, **values}, cheap.subsets, cheap.base_metric, {}))
        return screen.search(budget)

    def incumbent(rescored: set[Key], budget: float) -> float:
        """The objective of the best plan whose every scored entry is re-scored (-inf if none meets the budget)."""
        try:
            return solve({k: d[k] if k in rescored else -1e6 for k in s}, budget).objective
        except InfeasibleBudgetError:
            return float("-inf")

    def refine(budget: float, lift: Lift, start: set[Key], one: bool = False
               ) -> tuple[set[Key], int, object, int | None]:
        rescored, rounds, optimal_after = set(start), 0, None
        best = optimum[budget]
        while True:
            rounds += 1
            if best is not None and optimal_after is None and incumbent(rescored, budget) >= best.objective - 1e-6:
                optimal_after = len(rescored)
            found = solve(lift(s, {k: d[k] for k in rescored}, {k: d[k] for k in start}), budget)
            new = [e.key for e in found.solution.entries if e.key in scored and e.key not in rescored]
            if not new:
                return rescored, rounds, found, optimal_after
            if args.tolerance > 0 and rescored:  # the library's stop on the incumbent (screen_tolerance)
                try:
                    settled = solve({k: d[k] if k in rescored else -math.inf for k in s}, budget)
                except InfeasibleBudgetError:
                    settled = None
                if settled is not None and found.objective - settled.objective <= args.tolerance * abs(
                        settled.objective):
                    return rescored, rounds, settled, optimal_after
            rescored.update(sorted(new, key=lambda k: s[k])[:1] if one else new)

    # distill's own optimum per budget (unknown without its complete table)
    optimum = {budget: None if args.partial else reference.search(budget) for budget in args.budgets}
    under_rating = None
    if not args.partial:
        gaps = [d[k] - s[k] for k in scored]
        under_rating = {"mean": statistics.mean(gaps), "sd": statistics.stdev(gaps)}
        print(f"screen under-rates by {under_rating['mean']:.1f} %p on average (sd {under_rating['sd']:.1f})")
    ranking = _ranking(args.model, s, d if not args.partial else None)
    print("Spearman of the screen: " + ", ".join(f"{k} {v:.3f}" for k, v in ranking.items() if k != "finetune_entries"),
          f"({ranking.get('finetune_entries', 0)} finetune reference entries)")
    runs = []
    for rule in args.rules:
        kind, _, m = rule.partition(":")
        lift = {"none": no_lift, "shift": shift_lift, "envelope": envelope_lift, "calibrated": envelope_lift,
                "none_calibrated": no_lift, "median_calibrated": median_lift,
                "scaled": scaled_lift(_median_ratio), "scaled_ls": scaled_lift(_least_squares_ratio),
                "one": no_lift}[kind]
        for sample in (args.samples if kind.endswith("calibrated") else [None]):
            start = set() if sample is None else calibration_sample(s, int(m), sample)
            for budget in args.budgets:
                best = optimum[budget]
                rescored, rounds, found, optimal_after = refine(budget, lift, start, one=kind == "one")
                objective = sum(d.get(e.key, 0.0) for e in found.solution.entries)
                runs.append({"rule": rule, "sample": sample, "budget": budget, "rounds": rounds,
                             "rescored": len(rescored), "entries": len(scored), "objective_under_distill": objective,
                             "distill_optimum": best and best.objective, "plan": plan_id(found.plan),
                             "plan_dict": found.plan.to_dict(), "distill_plan": best and plan_id(best.plan),
                             "same_plan": best is not None and plan_id(found.plan) == plan_id(best.plan),
                             "predicted_speedup": found.predicted_speedup,
                             "incumbent_optimal_after": optimal_after})
    if args.finetune_rules:
        _finetune(args, base, reference, splits, [r for r in runs if r["rule"] in args.finetune_rules])
    out = Path(args.output) if args.output else RESULTS / f"importance_refine_{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "screen": args.screen, "exact": args.exact,
                               "tolerance": args.tolerance, "skip_slower_blocks": not args.keep_slower,
                               "under_rating": under_rating, "ranking": ranking, "rows": runs}, indent=1))
    print(f"{args.model}: screen {args.screen}, re-scored with {args.exact}")
    print(f"{'rule':<14} {'sample':>6} {'budget':>6} {'rounds':>6} {'re-scored':>11} {'objective':>9} {'optimum':>8} "
          "same plan  plan          incumbent  fine-tuned")
    for r in runs:
        tuned = f"{r['mean']:.2f} +- {r['std']:.2f}" if "mean" in r else ""
        print(f"{r['rule']:<14} {'' if r['sample'] is None else r['sample']:>6} {r['budget']:>6} {r['rounds']:>6} "
              f"{r['rescored']:>4} of {r['entries']:<4} {r['objective_under_distill']:>9.2f} "
              f"{r['distill_optimum'] or float('nan'):>8.2f} "
              f"{r['same_plan']!s:<10} {r['plan']}  {r['incumbent_optimal_after']!s:>9}  "
              f"{tuned}")
    print(f"wrote {out}")


def _ranking(model: str, screen: dict[Key, float], exact: dict[Key, float] | None) -> dict[str, float | int]:
    """Spearman rho of the screen against the exact table (every entry searched) and, where
    ``importance_agreement.py`` saved its ``finetune`` reference for ``model``, against the mean of its seeds."""
    out = {}
    if exact is not None:
        keys = sorted(screen, key=repr)
        out["exact"] = float(spearmanr([screen[k] for k in keys], [exact[k] for k in keys])[0])
    saved = RESULTS / f"importance_agreement_{model}.json"
    if saved.is_file():
        values = json.loads(saved.read_text())["values"]
        seeds = [v for name, v in values.items() if name.split("@")[0] == "finetune"]
        keys = [k for k in seeds[0] if _key(k) in screen]
        out["finetune_entries"] = len(keys)
        if len(keys) >= 5:  # fewer ranks nothing (e.g. the reference's entries among the searched blocks only)
            reference = [statistics.mean(v[k] for v in seeds) for k in keys]
            out["finetune"] = float(spearmanr([screen[_key(k)] for k in keys], reference)[0])
            if exact is not None:
                out["exact_vs_finetune"] = float(spearmanr([exact[_key(k)] for k in keys], reference)[0])
    return out


def _key(text: str) -> Key:
    """A candidate key as ``importance_agreement.py`` saves it (its repr)."""
    return tuple(int(x) for x in text.strip("()").split(","))


class _Exact(dict):
    """The exact values, scored on first use (and cached by the scorer): a table too dear to complete."""

    def __init__(self, reference: LayerMergePruner) -> None:
        super().__init__()
        self.scorer = reference.scorer

    def __missing__(self, key: Key) -> float:
        self.update(self.scorer.score([key]))
        return super().__getitem__(key)

    def get(self, key: Key, default: float | None = None) -> float | None:
        return self[key] if key in self.scorer.scored else default


def scaled_lift(ratio: Callable[[list[tuple[float, float]]], float]) -> Lift:
    """No lift; the screen multiplied by ``ratio`` of the re-scored entries' ``(screen, distill)`` pairs."""
    def lift(screen: dict[Key, float], exact: dict[Key, float], calibration: dict[Key, float]) -> dict[Key, float]:
        pairs = [(screen[k], v) for k, v in exact.items() if screen[k] < 0]
        a = ratio(pairs) if pairs else 1.0
        return {k: exact[k] if k in exact else a * v for k, v in screen.items()}
    return lift


def _least_squares_ratio(pairs: list[tuple[float, float]]) -> float:
    return sum(x * y for x, y in pairs) / sum(x * x for x, _ in pairs)


def _median_ratio(pairs: list[tuple[float, float]]) -> float:
    return statistics.median(y / x for x, y in pairs)


def shift_lift(screen: dict[Key, float], exact: dict[Key, float], calibration: dict[Key, float]) -> dict[Key, float]:
    lift = max([0.0] + [v - screen[k] for k, v in exact.items()])
    return {k: exact[k] if k in exact else v + lift for k, v in screen.items()}


def _finetune(args: argparse.Namespace, base: torch.nn.Module, reference: LayerMergePruner, splits, rows) -> None:
    """Fine-tune each row's plan per seed (the workload recipe), sharing importance_quality.py's runs."""
    out = RESULTS / f"importance_quality_{args.model}.json"
    saved = json.loads(out.read_text()) if out.is_file() else {}
    if saved.get("weights") != weights_id(base):
        raise SystemExit(f"{out} is for other weights; run importance_quality.py first")
    runs: dict[str, float] = saved.get("runs", {})
    for row in rows:
        plan = Plan.from_dict(row["plan_dict"])
        for seed in args.finetune_seeds:
            key = f"{row['plan']}/{seed}"
            if key not in runs:
                trainable = reference.apply(plan)
                fit(trainable, splits.train, epochs=1, max_lr=0.02, seed=seed, progress=False)
                runs[key] = evaluate(reference.merge(trainable.eval()), splits.test)
                save_runs(out, saved, runs)
            print(f"{args.model} {row['budget']} {row['rule']} plan {row['plan']} seed {seed}: {runs[key]:.2f} %",
                  flush=True)
        accuracies = [runs[f"{row['plan']}/{seed}"] for seed in args.finetune_seeds]
        row.update(accuracies=accuracies, mean=statistics.mean(accuracies),
                   std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0)


if __name__ == "__main__":
    main()
