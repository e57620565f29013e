"""What a screened search costs from a cold cache, against a complete ``distill`` table, in one run.

``LayerMergePruner(..., importance="distill", screen="tail_distill")`` on the reference workload (the pruner of
``importance_quality.py``: CPU eager latency table, batch 64, ``distill`` 10 steps, scored on the 1,000-image
validation split). The importance caches start empty (a fresh directory that holds only the latency table from
``--cache-dir``); the run builds the screen's table, then searches each budget in turn (later budgets reuse the
entries earlier ones scored, as a user's sweep would). Every ``distill`` entry it scores is timed, so the cost of the
complete table is estimated from the same run: ``entries × mean seconds per distill entry``, over every candidate
that compresses (the table before slower blocks were skipped, the issue's baseline) and over the blocks searched.
The plans are compared with those of the complete ``distill`` table in ``--cache-dir`` when it is there.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/screened_search.py --model mbv2_fm

Writes ``benchmarks/results/screened_search_<model>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from importance_quality import finetuned, parse_settings, plan_id

from lm_plugin import LayerMergePruner, ScreenedSearch
from lm_plugin.data.datasets import data_splits
from lm_plugin.solve import DEFAULT_LIFT, DEFAULT_TOLERANCE, LIFTS
from lm_plugin.workloads.models import trained

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["resnet_fm", "mbv2_fm"], default="mbv2_fm")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    ap.add_argument("--cache-dir", default="benchmarks/cache", help="latency table, complete distill table")
    ap.add_argument("--set", default="", metavar="distill:KEY=VALUE,...",
                    help="settings of the exact estimator (default: the workload's distill, 10 steps), e.g. "
                         "distill:fit_batch_size=32,eval_images=250; its cost is then compared with entries of "
                         "the workload's distill timed in the same run (--reference-entries)")
    ap.add_argument("--reference-entries", type=int, default=12,
                    help="with --set: a seeded sample of entries scored with the workload's distill, timed "
                         "between the searches (the cost the complete table is estimated from)")
    ap.add_argument("--calibration", type=int, default=None, help="screen_calibration (default: the library's)")
    ap.add_argument("--lift", default=DEFAULT_LIFT, choices=sorted(LIFTS),
                    help=f"screen_lift (the library's default: {DEFAULT_LIFT})")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help=f"screen_tolerance (the library's default: {DEFAULT_TOLERANCE}; 0: until the plan is all "
                         "exact)")
    ap.add_argument("--keep-slower", action="store_true",
                    help="skip_slower_blocks=False: search and score every candidate, as before 2026-12-06")
    ap.add_argument("--output", default=None,
                    help="results file (default results/screened_search_<model><settings>.json)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[],
                    help="fine-tune each plan with the workload recipe over these seeds (runs shared with "
                         "importance_quality.py)")
    args = ap.parse_args()
    exact = parse_settings([args.set]).get("distill", {}) if args.set else {}
    torch.set_num_threads(1)
    splits = data_splits("fashion_mnist", batch_size=128, val_size=1000)
    base = trained(args.model, progress=False)
    example = torch.randn(64, *splits.input_shape)

    def pruner(cache: str | Path, settings: dict | None = None, **screen) -> LayerMergePruner:
        screen.setdefault("screen", None)  # the reference: distill's complete table
        return LayerMergePruner(base, 0.6, example_inputs=example, backend="cpu", importance="distill",
                                train_data=splits.train, eval_data=splits.val,
                                importance_settings={"steps": 10, **(settings or {})},
                                cache_dir=cache, progress=False, skip_slower_blocks=not args.keep_slower, **screen)

    reference = pruner(args.cache_dir)
    cold = Path(tempfile.mkdtemp(prefix="screened-"))
    try:
        for f in Path(args.cache_dir).glob("latency-*.sqlite"):
            shutil.copy(f, cold / f.name)
        calibration = {} if args.calibration is None else {"calibration": args.calibration}
        screened = pruner(cold, exact, screen=ScreenedSearch("tail_distill", lift=args.lift, tolerance=args.tolerance,
                                                             **calibration))
        sample: list[list] = []
        reference_s: dict = {}
        if exact:
            cold_reference = pruner(cold)  # a cold table of its own: every sampled entry is computed
            reference_s = cold_reference.scorer.entry_seconds  # the workload's distill, timed in this run
            sample = [list(k) for k in random.Random(0).sample(sorted(cold_reference.scorer.scored),
                                                               args.reference_entries)]
            chunk = -(-len(sample) // (len(args.budgets) + 1))

            def reference_chunk() -> None:  # between the searches, so both are timed under the same load
                cold_reference.scorer.score([tuple(k) for k in sample[:chunk]])
                del sample[:chunk]
            reference_chunk()
        screened.latency_model()
        start = time.perf_counter()
        screened.screen_table()
        screen_s = time.perf_counter() - start
        entry_s = screened.scorer.entry_seconds  # the distill entries the screened search computes, timed
        rows = []
        complete = not reference.scorer.missing()  # never built here: that takes hours
        for budget in args.budgets:
            if sample:
                reference_chunk()
            before, start = len(entry_s), time.perf_counter()
            found = screened.search(budget)
            row = {"budget": budget, "seconds": time.perf_counter() - start, "scored_entries": found.scored_entries,
                   "new_entries": len(entry_s) - before, "cumulative_entries": len(entry_s),
                   "table_entries": found.table_entries, "objective": found.objective,
                   "predicted_speedup": found.predicted_speedup, "plan": plan_id(found.plan)}
            if complete:
                best = reference.search(budget)
                row.update(distill_plan=plan_id(best.plan), distill_objective=best.objective,
                           same_plan=found.plan == best.plan)
            rows.append(row)
            print(f"budget {budget}: {row['new_entries']} new distill entries, {time.perf_counter() - start:.0f} s",
                  flush=True)
        if sample:
            reference_chunk()
        for row, budget in zip(rows, args.budgets):
            if args.seeds:
                found = screened.search(budget)  # all cached now
                accuracies = finetuned(args.model, screened, found.plan, args.seeds, splits, f"{budget} screened")
                row.update(accuracies=accuracies, mean=statistics.mean(accuracies),
                           std=statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0)
    finally:
        shutil.rmtree(cold, ignore_errors=True)
    entry_times, reference_times = list(entry_s.values()), list(reference_s.values())
    mean_entry = statistics.mean(entry_times)
    mean_reference = statistics.mean(reference_times) if reference_times else mean_entry
    # the baseline: distill's complete table of every candidate (what a table cost before slower blocks
    # were skipped); and the complete table of the blocks searched now
    every = sum(1 for c in screened.candidates if not c.uncompressed)
    table_s, searched_s = mean_reference * every, mean_reference * rows[0]["table_entries"]
    rescoring = 0.0
    for row in rows:
        rescoring += row["seconds"]
        row["cost_fraction_cumulative"] = (screen_s + rescoring) / table_s
        row["cost_fraction_alone"] = (screen_s + row["scored_entries"] * mean_entry) / table_s
        row["cost_fraction_alone_of_searched_table"] = (screen_s + row["scored_entries"] * mean_entry) / searched_s
    result = {"model": args.model, "exact_settings": screened.estimator.settings() | {"train": None, "eval": None},
              "screen_s": screen_s, "exact_entry_s_mean": mean_entry,
              "exact_entry_s_median": statistics.median(entry_times), "exact_entries_timed": len(entry_s),
              "distill_entry_s_mean": mean_reference, "distill_entries_timed": len(reference_s) or len(entry_s),
              "complete_table_s_estimate": table_s, "complete_table_entries": every,
              "searched_table_s_estimate": searched_s, "rows": rows,
              "screen": screened.screen.settings(), "calibration": screened.screening.calibration,
              "lift": screened.screening.lift, "tolerance": screened.screening.tolerance,
              "skip_slower_blocks": screened.skip_slower_blocks,
              "machine": platform.processor() or platform.machine(), "threads": 1, "torch": torch.__version__}
    suffix = "".join(f"_{k}{v}" for k, v in sorted(exact.items()))
    suffix += "" if args.calibration is None else f"_calibration{args.calibration}"
    suffix += "" if args.lift == "envelope" else f"_lift{args.lift}"  # the envelope's runs came first
    # runs before screen_tolerance and skip_slower_blocks existed had neither
    suffix += "" if args.keep_slower and args.tolerance == 0 else f"_tolerance{args.tolerance}"
    suffix += "_keepslower" if args.keep_slower else ""
    out = Path(args.output) if args.output else RESULTS / f"screened_search_{args.model}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{args.model}: screen table {screen_s:.0f} s; exact {mean_entry:.2f} s per entry (mean of "
          f"{len(entry_s)}); distill {mean_reference:.2f} s per entry, complete table ~{table_s / 60:.0f} min "
          f"({every} entries; {rows[0]['table_entries']} searched)")
    print(f"{'budget':>6} {'scored':>6} {'new':>4} {'alone':>6} {'sweep':>6} {'objective':>9} {'distill':>8} same plan")
    for r in rows:
        print(f"{r['budget']:>6} {r['scored_entries']:>6} {r['new_entries']:>4} {r['cost_fraction_alone']:>6.3f} "
              f"{r['cost_fraction_cumulative']:>6.3f} {r['objective']:>9.2f} {r.get('distill_objective', 0):>8.2f} "
              f"{r.get('same_plan', '')}" + (f"  fine-tuned {r['mean']:.2f} ± {r['std']:.2f}" if "mean" in r else ""))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
