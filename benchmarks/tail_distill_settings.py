"""How few steps does ``tail_distill`` need? Cost in table order and agreement with ``finetune``, per setting.

For each setting ``STEPSxIMAGES`` (SGD steps × images per step), a run of consecutive entries in table order
(``--start``, ``--count``: the cost a table build pays, the cached prefix values mostly reused) is timed, and the
entries of the saved ``finetune`` reference (``benchmarks/results/importance_agreement_<model>.json``, same
weights: checked on its saved ``zero_shot`` values) are scored for the Spearman correlation. Reference workload
models, importance on the 1,000-image validation split, training batches of 128.

    python benchmarks/tail_distill_settings.py --model mbv2_fm --settings 10x32 5x32 10x16 5x16

Writes ``benchmarks/results/tail_distill_settings_<model>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from lm_plugin import LayerMergePruner
from lm_plugin.data.datasets import data_splits
from lm_plugin.tables.estimators import TailDistillImportance, ZeroShotImportance
from lm_plugin.tables.importance import single_block_plan
from lm_plugin.workloads.models import trained

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["resnet_fm", "mbv2_fm"], default="mbv2_fm")
    ap.add_argument("--settings", nargs="+", default=["10x32", "5x32", "10x16", "5x16"])
    ap.add_argument("--start", type=int, default=300, help="first entry (table order) of the timed run")
    ap.add_argument("--count", type=int, default=25, help="entries timed (the first one, filling caches, excluded)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    splits = data_splits("fashion_mnist", batch_size=128, val_size=1000)
    model = trained(args.model, progress=False)
    pruner = LayerMergePruner(model, example_inputs=torch.randn(1, *splits.input_shape), backend="macs",
                              cache_dir=None, progress=False)
    gm, chain = pruner.graph_module, pruner.chain
    original = copy.deepcopy(gm).eval()
    scored = [c for c in pruner.candidates if not c.uncompressed]
    by_key = {str(c.key): c for c in scored}
    results = json.loads((RESULTS / f"importance_agreement_{args.model}.json").read_text())
    saved = results["values"]
    reference = saved["finetune"]
    zero = ZeroShotImportance(eval_data=splits.val)
    base = zero.score(original)

    def value(estimator, c) -> float:
        plan = single_block_plan(chain, c.st, c.end, c.kept)
        return estimator.score_entry(gm, original, chain, plan, None) - base

    # the same weights: the saved zero_shot values if there are any, else the saved accuracy
    drift = max(abs(value(zero, by_key[k]) - saved["zero_shot"][k]) for k in reference) \
        if "zero_shot" in saved else abs(base - results["model_accuracy"])
    if drift > 1e-6:
        raise SystemExit(f"the saved reference is for other weights (zero_shot differs by {drift}); rerun "
                         "benchmarks/importance_agreement.py first")
    segment = scored[args.start:args.start + args.count]
    rows = []
    for setting in args.settings:
        steps, images = (int(x) for x in setting.split("x"))
        estimator = TailDistillImportance(train_data=splits.train, eval_data=splits.val, steps=steps,
                                          fit_batch_size=images)
        seconds = []
        for i, c in enumerate(segment):
            start = time.perf_counter()
            value(estimator, c)
            if i:
                seconds.append(time.perf_counter() - start)
        ours = {k: value(estimator, by_key[k]) for k in reference}
        rho = spearmanr([reference[k] for k in reference], [ours[k] for k in reference]).statistic
        rows.append({"setting": setting, "steps": steps, "images_per_step": images,
                     "median_s": statistics.median(seconds), "min_max_s": [min(seconds), max(seconds)],
                     "spearman_vs_finetune": float(rho), "values": ours})
        print(f"{setting}: {statistics.median(seconds):.3f} s / entry, spearman {rho:.3f}", flush=True)
    out = RESULTS / f"tail_distill_settings_{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "segment": [args.start, args.count],
                               "reference_entries": len(reference), "rows": rows, "threads": args.threads,
                               "machine": platform.processor() or platform.machine(),
                               "torch": torch.__version__}, indent=1))
    print(f"{'setting':<8} {'s / entry':>9} {'spearman':>9}")
    for r in rows:
        print(f"{r['setting']:<8} {r['median_s']:>9.3f} {r['spearman_vs_finetune']:>9.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
