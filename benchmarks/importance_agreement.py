"""Do the cheap importance estimators rank candidate blocks like the paper's fine-tune estimator?

Models: ``digits`` (a small residual CNN trained here on scikit-learn digits) or the reference workload's
``resnet_fm`` / ``mbv2_fm`` (trained with the workload recipe; Fashion-MNIST, importance scored on the 1,000-image
validation split of the training set, as ``benchmarks/pareto.py`` does). The reference, ``finetune``, and
``distill`` score a seeded random subset of the entries that compress something (``--entries``; all of them on
digits); the cheap estimators (``local``, ``zero_shot``) score every entry. Reported: Spearman rank correlation
with the reference over the subset, and seconds per entry of each estimator (run one after the other, so the
ratios are indicative; ``benchmarks/importance_speed.py`` measures cost side by side).

    python benchmarks/importance_agreement.py --model digits
    python benchmarks/importance_agreement.py --model resnet_fm --entries 16 --cache-dir benchmarks/cache
    python benchmarks/importance_agreement.py --model mbv2_fm --entries 10 --subset-only --cache-dir benchmarks/cache

``NAME@SEED`` runs an estimator with another seed (``finetune@1``: how well the reference agrees with itself); with
several reference seeds, the correlation with their mean is reported too.

Writes ``benchmarks/results/importance_agreement_<model>.json`` and prints a table; the file is signed by the
model's weights, and a rerun with other estimators keeps the values saved for the same weights. ``--cache-dir``
keeps every table (entry by entry, resumable).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
from scipy.stats import spearmanr

from lm_plugin import LayerMergePruner
from lm_plugin.data.datasets import data_splits, digits
from lm_plugin.tables.estimators import (
    DistillImportance,
    FinetuneImportance,
    LocalImportance,
    TailDistillImportance,
    ZeroShotImportance,
)
from lm_plugin.tables.importance import ImportanceTable, build_importance_table, weights_id
from lm_plugin.train import evaluate, fit
from lm_plugin.workloads.models import trained

RESULTS = Path(__file__).parent / "results"


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b, self.relu = conv_bn(c, c), conv_bn(c, c), nn.ReLU()

    def forward(self, x):
        return self.relu(self.b(self.relu(self.a(x))) + x)


def small_resnet(width: int = 24) -> nn.Module:
    return nn.Sequential(conv_bn(1, width), nn.ReLU(), Block(width), conv_bn(width, width), nn.ReLU(),
                         Block(width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def workload(name: str):
    """(model, train batches, importance batches, example input) of one benchmark model."""
    if name == "digits":
        torch.manual_seed(0)
        train, test = digits(64, train=True), digits(256, train=False)
        model = small_resnet()
        fit(model, train, epochs=8, max_lr=0.1, seed=0, progress=False)
        return model.eval(), train, test, torch.randn(1, 1, 8, 8)
    splits = data_splits("fashion_mnist", batch_size=128, val_size=1000)
    return trained(name, progress=False), splits.train, splits.val, torch.randn(1, *splits.input_shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["digits", "resnet_fm", "mbv2_fm"], default="digits")
    ap.add_argument("--entries", type=int, default=0, help="entries scored by finetune/distill (0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the entry subset")
    ap.add_argument("--finetune-steps", type=int, default=200, help="reference: fine-tune steps per entry")
    ap.add_argument("--distill-steps", type=int, default=10)
    ap.add_argument("--tail-steps", type=int, default=10, help="tail_distill steps per entry")
    ap.add_argument("--estimators", nargs="+", default=["finetune", "distill", "local", "zero_shot"])
    ap.add_argument("--subset-only", action="store_true", help="score every estimator on the subset only")
    ap.add_argument("--extra", nargs="*", default=[], metavar="ST,END,KH,KW,G",
                    help="entries the expensive estimators score besides the subset (e.g. where two plans differ); "
                         "reported apart, not in the correlation")
    ap.add_argument("--cache-dir", default=None, help="keep the tables here (resumable, reusable)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, train, evaluation, example = workload(args.model)
    accuracy = evaluate(model, evaluation)
    weights = weights_id(model)
    pruner = LayerMergePruner(model, example_inputs=example, backend="macs", cache_dir=None, progress=False)
    scored = [c for c in pruner.candidates if not c.uncompressed]
    subset = scored if not args.entries or args.entries >= len(scored) else \
        sorted(random.Random(args.seed).sample(scored, args.entries), key=lambda c: c.key)
    extra_keys = [tuple(int(v) for v in e.split(",")) for e in args.extra]
    extra = [c for c in scored if c.key in extra_keys and c not in subset]
    if len(extra) != len(set(extra_keys) - {c.key for c in subset}):
        raise SystemExit(f"--extra: not all of {extra_keys} are scored entries of {args.model}")
    factories = {
        "finetune": lambda: FinetuneImportance(train_data=train, eval_data=evaluation, steps=args.finetune_steps),
        "distill": lambda: DistillImportance(train_data=train, eval_data=evaluation, steps=args.distill_steps),
        "local": lambda: LocalImportance(train_data=train, eval_data=evaluation),
        "tail_distill": lambda: TailDistillImportance(train_data=train, eval_data=evaluation, steps=args.tail_steps),
        "zero_shot": lambda: ZeroShotImportance(eval_data=evaluation),
    }
    expensive = {"finetune", "distill"}
    tables, per_entry = {}, {}
    for name in args.estimators:
        candidates = subset + extra if name.partition("@")[0] in expensive or args.subset_only else scored
        start = time.perf_counter()
        kind, _, seed = name.partition("@")  # "finetune@1": the estimator with another seed
        estimator = factories[kind]()
        estimator.seed = int(seed) if seed else estimator.seed
        tables[name] = build_importance_table(pruner.graph_module, pruner.chain, candidates, estimator,
                                              cache_dir=args.cache_dir, progress=True)
        seconds = time.perf_counter() - start
        per_entry[name] = seconds / max(tables[name].evaluated, 1) if tables[name].evaluated else None
        print(f"{name}: {len(candidates)} entries, {seconds:.1f} s ({tables[name].evaluated} computed)", flush=True)
    out = RESULTS / f"importance_agreement_{args.model}.json"
    saved = json.loads(out.read_text()) if out.is_file() else {}
    if saved.get("weights") == weights:  # the same trained model: keep the estimators this run did not score
        for name in tables:  # and the cost of a table this run found cached
            if per_entry[name] is None:
                per_entry[name] = (saved.get("seconds_per_entry") or {}).get(name)
        for name, values in saved["values"].items():
            if name not in tables:
                by_key = {c.key: values[str(c.key)] for c in scored if str(c.key) in values}
                tables[name] = ImportanceTable(by_key, {}, float("nan"), {"estimator": name, "saved": str(out)})
                per_entry[name] = saved.get("seconds_per_entry", {}).get(name)
    keys = [c.key for c in subset]
    reference = "finetune" if "finetune" in tables else args.estimators[0]
    # several reference seeds (finetune, finetune@1, ...): their mean is a less noisy reference
    seeds = [n for n in tables if n.partition("@")[0] == reference and all(k in tables[n].values for k in keys)]
    mean = [sum(tables[n].values[k] for n in seeds) / len(seeds) for k in keys] if len(seeds) > 1 else None
    rows = []
    for name, table in tables.items():
        if any(k not in table.values for k in keys):
            print(f"{name}: not every reference entry is in its table; left out")
            continue
        ours = [table.values[k] for k in keys]
        rho = spearmanr([tables[reference].values[k] for k in keys], ours).statistic
        rows.append({"estimator": name, "spearman_vs_" + reference: float(rho), "seconds_per_entry": per_entry[name],
                     "entries": len(table.values), "from_saved_results": name not in args.estimators,
                     **({"spearman_vs_seed_mean": float(spearmanr(mean, ours).statistic)} if mean else {})})
    result = {"model": args.model, "model_accuracy": accuracy, "scored_entries": len(scored),
              "subset": len(keys), "seed": args.seed, "finetune_steps": args.finetune_steps,
              "distill_steps": args.distill_steps, "reference": reference,
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows, "weights": weights, "seconds_per_entry": per_entry,
              "reference_seeds": seeds,
              "values": {n: {str(k): t.values[k] for k in t.values} for n, t in tables.items()},
              "extra": {str(c.key): {n: t.values.get(c.key) for n, t in tables.items()} for c in extra}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{args.model}: accuracy {accuracy:.2f} % on the importance batches, {len(scored)} scored entries, "
          f"reference subset {len(keys)}")
    print(f"{'estimator':<12} {'spearman':>9} {'vs mean':>8} {'s / entry':>10}")
    for r in rows:
        cost = r["seconds_per_entry"]
        print(f"{r['estimator']:<12} {r['spearman_vs_' + reference]:>9.3f} "
              f"{r.get('spearman_vs_seed_mean', float('nan')):>8.3f} {'cached' if cost is None else f'{cost:.2f}':>10}")
    for c in extra:
        print(f"extra {c.key}: " + ", ".join(f"{n} {t.values[c.key]:.2f}" for n, t in tables.items()
                                              if c.key in t.values))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
