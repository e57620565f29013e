"""Cost of an importance entry, per estimator, measured side by side (reference workload).

A seeded subset of the candidate blocks of ``resnet_fm`` / ``mbv2_fm`` (trained with the workload recipe;
Fashion-MNIST, batch 128, scored on the 1,000-image validation split) is scored entry by entry by every estimator
in turn, the order rotating from entry to entry so that all see the same machine. Entries are taken in table
order (as a table build meets them), and each estimator's first entry, which fills its memories (the teacher's
logits for ``distill``, the cached prefix values for ``local``), is excluded. ``--full-table`` also times whole
tables of the named estimators (every entry, caches included): the cost a user pays.

    python benchmarks/importance_speed.py --model mbv2_fm [--entries 12] [--full-table local zero_shot]
    python benchmarks/importance_speed.py --model mbv2_fm --by-start 3 --estimators distill tail_distill

Writes ``benchmarks/results/importance_speed_<model>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from importance_quality import parse_settings

from lm_plugin import LayerMergePruner
from lm_plugin.data.datasets import data_splits
from lm_plugin.tables.estimators import (
    DistillImportance,
    FinetuneImportance,
    LocalImportance,
    TailDistillImportance,
    ZeroShotImportance,
)
from lm_plugin.tables.importance import build_importance_table, single_block_plan
from lm_plugin.workloads.models import trained

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["resnet_fm", "mbv2_fm"], default="resnet_fm")
    ap.add_argument("--entries", type=int, default=12)
    ap.add_argument("--by-start", type=int, default=0, metavar="K",
                    help="instead of --entries: every entry of K seeded block starts, caches filled per start and "
                         "counted (a table's cost)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distill-steps", type=int, default=10)
    ap.add_argument("--tail-steps", type=int, default=10, help="tail_distill steps per entry")
    ap.add_argument("--estimators", nargs="+", default=["distill", "local", "zero_shot"])
    ap.add_argument("--full-table", nargs="*", default=[], help="estimators whose whole table is timed too")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="+", default=[], metavar="NAME:KEY=VALUE,...",
                    help="estimator settings, e.g. tail_distill:eval_images=250,steps=5")
    args = ap.parse_args()
    extra = parse_settings(args.set)
    torch.set_num_threads(args.threads)
    splits = data_splits("fashion_mnist", batch_size=128, val_size=1000)
    model = trained(args.model, progress=False)
    pruner = LayerMergePruner(model, example_inputs=torch.randn(1, *splits.input_shape), backend="macs",
                              cache_dir=None, progress=False)
    gm, chain = pruner.graph_module, pruner.chain
    scored = [c for c in pruner.candidates if not c.uncompressed]
    if args.by_start:
        # What a table build pays: every entry of a few seeded block starts, in table order, caches filled once
        # per start and included (a table meets each start once).
        starts = sorted(random.Random(args.seed).sample(sorted({c.st for c in scored}), args.by_start))
        sample = [c for c in scored if c.st in starts]
    else:
        sample = sorted(random.Random(args.seed).sample(scored, min(args.entries + 1, len(scored))),
                        key=lambda c: c.key)
    factories = {
        "distill": lambda: DistillImportance(train_data=splits.train, eval_data=splits.val,
                                             **{"steps": args.distill_steps, **extra.get("distill", {})}),
        "finetune": lambda: FinetuneImportance(train_data=splits.train, eval_data=splits.val,
                                               **extra.get("finetune", {})),
        "local": lambda: LocalImportance(train_data=splits.train, eval_data=splits.val, **extra.get("local", {})),
        "tail_distill": lambda: TailDistillImportance(train_data=splits.train, eval_data=splits.val,
                                                      **{"steps": args.tail_steps, **extra.get("tail_distill", {})}),
        "zero_shot": lambda: ZeroShotImportance(eval_data=splits.val, **extra.get("zero_shot", {})),
    }
    estimators = {name: factories[name]() for name in args.estimators}
    original = copy.deepcopy(gm).eval()
    seconds: dict[str, list[float]] = {name: [] for name in estimators}
    order = list(estimators)
    for i, c in enumerate(sample):
        plan = single_block_plan(chain, c.st, c.end, c.kept)
        line = []
        for name in order[i % len(order):] + order[:i % len(order)]:
            start = time.perf_counter()
            estimators[name].score_entry(gm, original, chain, plan, None)
            if i > 0 or args.by_start:  # the first entry fills the memories (a table pays that once per start)
                seconds[name].append(time.perf_counter() - start)
                line.append(f"{name} {seconds[name][-1]:.2f}s")
        print(f"entry {i} {c.key}: " + ", ".join(line), flush=True)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    total = {name: sum(v) for name, v in seconds.items()}
    spread = {name: [min(v), max(v)] for name, v in seconds.items()}
    tables = {}
    for name in args.full_table:
        start = time.perf_counter()
        build_importance_table(gm, chain, pruner.candidates, factories[name](), progress=True)
        tables[name] = {"seconds": time.perf_counter() - start, "entries": len(scored)}
    reference = "distill" if "distill" in median else order[0]
    result = {"model": args.model, "entries": len(seconds[order[0]]), "scored_entries": len(scored),
              "seed": args.seed,
              "distill_steps": args.distill_steps, "threads": args.threads, "seconds": seconds,
              "median_s": median, "min_max_s": spread,
              "cost_vs_" + reference: {n: median[n] / median[reference] for n in median},
              "by_start": args.by_start, "total_s": total,
              "total_vs_" + reference: {n: total[n] / total[reference] for n in total},
              "settings": extra, "full_tables": tables, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__}
    # a run with settings of its own does not overwrite the defaults' results
    tag = "".join(f"_{n}-" + "-".join(f"{k}{v}" for k, v in kv.items()) for n, kv in sorted(extra.items()))
    out = RESULTS / f"importance_speed_{args.model}{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{args.model}: {len(seconds[order[0]])} entries side by side, {len(scored)} in the table")
    print(f"{'estimator':<12} {'median s':>9} {'min-max s':>13} {'vs ' + reference:>11} {'table est.':>11}")
    for name, v in median.items():
        print(f"{name:<10} {v:>9.3f} {spread[name][0]:>6.2f}-{spread[name][1]:<6.2f} "
              f"{v / median[reference]:>11.3f} {v * len(scored) / 60:>9.1f} m")
    print("summed over the entries: " + ", ".join(f"{n} {t:.1f} s ({t / total[reference]:.3f} of {reference})"
                                                    for n, t in total.items()))
    for name, t in tables.items():
        print(f"full table {name}: {t['seconds']:.1f} s for {t['entries']} entries "
              f"({t['seconds'] / t['entries']:.3f} s / entry)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
