"""Cost of one distill importance entry with and without the teacher's logits from memory (reference workload).

The same candidates of ``resnet_fm`` (random init: the cost does not depend on the weights) are scored by
``DistillImportance`` as shipped (``MemoTeacher``: the original network's logits for a batch are computed once per
table) and by the same estimator with the teacher run at every step, entry by entry in turn so that both see the
same machine. The first entry, which fills the memory, is excluded from both.

    python benchmarks/importance_speed.py [--entries 12] [--steps 10] [--threads 1]

Writes ``benchmarks/results/importance_speed.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_plugin import LayerMergePruner
from lm_plugin.rewrite import to_trainable
from lm_plugin.tables.importance import DistillImportance, representative, single_block_plan
from lm_plugin.train import fit
from lm_plugin.workloads.data import data_splits
from lm_plugin.workloads.models import create_model

OUT = Path(__file__).parent / "results" / "importance_speed.json"


class TeacherEveryStep(DistillImportance):
    """The estimator before MemoTeacher: the original network runs at every distillation step."""

    def adapt(self, model, original):
        with self.same_batches():
            fit(model, self.train_data, steps=self.steps, max_lr=self.max_lr, teacher=original, distill_alpha=1.0,
                temperature=self.temperature, device=self.device, progress=False, seed=self.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=12)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    splits = data_splits("fashion_mnist", batch_size=128, val_size=1000)
    model = create_model("resnet_fm").eval()
    pruner = LayerMergePruner(model, 0.7, example_inputs=torch.randn(64, 1, 28, 28), backend="macs", cache_dir=None,
                              progress=False)
    gm, chain = pruner.graph_module, pruner.chain
    candidates = [c for c in pruner.candidates if c.end - c.st > 1][: args.entries + 1]
    original = copy.deepcopy(gm).eval()
    estimators = {"memo": DistillImportance(train_data=splits.train, eval_data=splits.val, steps=args.steps),
                  "every step": TeacherEveryStep(train_data=splits.train, eval_data=splits.val, steps=args.steps)}
    seconds: dict[str, list[float]] = {name: [] for name in estimators}
    scores: dict[str, list[float]] = {name: [] for name in estimators}
    for i, c in enumerate(candidates):
        plan = single_block_plan(chain, c.st, c.end, representative(c))
        for name in (estimators if i % 2 == 0 else reversed(list(estimators))):
            est = estimators[name]
            start = time.perf_counter()
            student = to_trainable(gm, chain, plan)
            est.adapt(student, original)
            scores[name].append(est.score(student))
            if i > 0:  # the first entry fills the memory
                seconds[name].append(time.perf_counter() - start)
        print(f"entry {i} {c.key}: memo {seconds['memo'][-1] if i else float('nan'):.2f}s "
              f"every step {seconds['every step'][-1] if i else float('nan'):.2f}s", flush=True)
    assert scores["memo"] == scores["every step"], "the memory must not change any score"
    med = {name: statistics.median(v) for name, v in seconds.items()}
    result = {"model": "resnet_fm", "steps": args.steps, "threads": args.threads, "entries": len(seconds["memo"]),
              "seconds": seconds, "median_s": med, "ratio": med["memo"] / med["every step"],
              "scores_equal": True, "torch": torch.__version__}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    print(f"\n{'teacher':<12} {'median s / entry':>17}")
    for name, v in med.items():
        print(f"{name:<12} {v:>17.3f}")
    print(f"memo / every step: {result['ratio']:.2f} (scores identical)\nwrote {OUT}")


if __name__ == "__main__":
    main()
