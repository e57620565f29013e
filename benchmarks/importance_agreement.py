"""Do the cheap importance estimators rank candidate blocks like the paper's fine-tune estimator?

A small residual CNN is trained on real data (scikit-learn digits by default, or the reference Fashion-MNIST
subset with --dataset fashion); every candidate block is scored by ``finetune`` (the paper's estimator, the
reference), ``distill`` (few-step distillation) and ``zero_shot``. Reported: Spearman rank correlation with the
reference over the entries that compress something, and each estimator's cost relative to the reference.

    python benchmarks/importance_agreement.py [--dataset digits|fashion] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn
from scipy.stats import spearmanr

from lm_plugin import LayerMergePruner
from lm_plugin.tables.importance import (
    DistillImportance,
    FinetuneImportance,
    ZeroShotImportance,
    build_importance_table,
)
from lm_plugin.train import evaluate, fit
from lm_plugin.workloads.data import digits, fashion_mnist

OUT = Path(__file__).parent / "results" / "importance_agreement.json"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=["digits", "fashion"], default="digits")
    ap.add_argument("--steps", type=int, default=100, help="fine-tune steps per entry (reference estimator)")
    ap.add_argument("--distill-steps", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.dataset == "digits":
        train, test, size = digits(64, train=True), digits(256, train=False), 8
    else:
        train = fashion_mnist(train=True, batch_size=128, subset=10000)
        test = fashion_mnist(train=False, batch_size=512, subset=2000)
        size = 28
    model = small_resnet()
    fit(model, train, epochs=8 if args.dataset == "digits" else 2, max_lr=0.1, seed=0)
    model.eval()
    accuracy = evaluate(model, test)
    pruner = LayerMergePruner(model, example_inputs=torch.randn(1, 1, size, size), cache_dir=None)
    estimators = {
        "finetune": FinetuneImportance(train_data=train, eval_data=test, steps=args.steps),
        "distill": DistillImportance(train_data=train, eval_data=test, steps=args.distill_steps),
        "zero_shot": ZeroShotImportance(eval_data=test),
    }
    tables, seconds = {}, {}
    for name, est in estimators.items():
        t0 = time.perf_counter()
        tables[name] = build_importance_table(pruner.graph_module, pruner.chain, pruner.candidates, est)
        seconds[name] = time.perf_counter() - t0
    ref = tables["finetune"]
    keys = [c.key for c in pruner.candidates if not (c.end - c.st == 1 and ref.subsets[c.key] == (c.end,))]
    rows = []
    for name in estimators:
        rho = spearmanr([ref.values[k] for k in keys], [tables[name].values[k] for k in keys]).statistic
        rows.append({"estimator": name, "spearman_vs_finetune": float(rho), "seconds": seconds[name],
                     "cost_vs_finetune": seconds[name] / seconds["finetune"]})
    result = {"dataset": args.dataset, "model_accuracy": accuracy, "entries": len(keys),
              "finetune_steps": args.steps, "distill_steps": args.distill_steps,
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "rows": rows, "values": {n: {str(k): t.values[k] for k in keys} for n, t in tables.items()}}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    print(f"{args.dataset}: model accuracy {accuracy:.2f} %, {len(keys)} scored entries")
    print(f"{'estimator':<10} {'spearman':>9} {'seconds':>9} {'cost':>7}")
    for r in rows:
        print(f"{r['estimator']:<10} {r['spearman_vs_finetune']:>9.3f} {r['seconds']:>9.1f} "
              f"{r['cost_vs_finetune']:>7.3f}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
