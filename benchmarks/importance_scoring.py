"""How many evaluation images, and which score, does a cheap estimator need? One pass, every variant.

A ``tail_distill`` (or ``local``) entry trains the block and what follows it, then runs that part on every
evaluation image: on ``mbv2_fm``, whose compute sits in its early full-resolution layers, the scoring pass is half
an entry's cost. This benchmark fits every entry of the table once (``--setting STEPSxIMAGES``) and keeps, per
evaluation image, whether the fitted network is right, its cross-entropy and its KL divergence from the original's
output. From that one pass it derives the table each scoring variant would have built — accuracy, ``-CE`` or
``-KL`` on the first N images — and reports, per variant:

* the Spearman correlation with the same pass scored by accuracy on all images (what the cheaper scoring loses),
  with ``distill``'s table (``--cache-dir``, if built) and with the saved ``finetune`` reference (mean of its seeds;
  ``benchmarks/results/importance_agreement_<model>.json``, checked to be for the same weights);
* the DP plan at each budget (latency table from ``--cache-dir``, CPU eager, batch 64, as
  ``importance_quality.py`` builds it), and whether it equals ``distill``'s plan and the all-images plan;
* the cost per entry: the measured fit, plus the measured scoring pass scaled to N images.

    python benchmarks/importance_scoring.py --model mbv2_fm --cache-dir benchmarks/cache

Writes ``benchmarks/results/importance_scoring_<model>_<setting>.json`` and prints a table.
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
import torch.nn.functional as F
from importance_quality import plan_id
from scipy.stats import spearmanr
from tqdm import tqdm

from lm_plugin import InfeasibleBudgetError, LayerMergePruner
from lm_plugin.data.datasets import data_splits
from lm_plugin.tables.estimators import LocalImportance, TailDistillImportance
from lm_plugin.tables.importance import ImportanceTable, single_block_plan, weights_id
from lm_plugin.workloads.models import trained

RESULTS = Path(__file__).parent / "results"
METRICS = ("accuracy", "-CE", "-KL")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["resnet_fm", "mbv2_fm"], default="mbv2_fm")
    ap.add_argument("--estimator", choices=["tail_distill", "local"], default="tail_distill")
    ap.add_argument("--setting", default="10x32", help="STEPSxIMAGES of the fit (tail_distill's default 10x32)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[125, 250, 500, 1000], help="evaluation images")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    ap.add_argument("--cache-dir", default="benchmarks/cache", help="latency and distill tables (shared)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps, images = (int(x) for x in args.setting.split("x"))
    splits = data_splits("fashion_mnist", batch_size=128, val_size=1000)
    base_model = trained(args.model, progress=False)
    example = torch.randn(64, *splits.input_shape)
    # the pruner of importance_quality.py (same latency table, same distill table)
    pruner = LayerMergePruner(base_model, 0.6, example_inputs=example, backend="cpu", importance="distill",
                              train_data=splits.train, eval_data=splits.val, importance_settings={"steps": 10},
                              cache_dir=args.cache_dir, progress=False, screen=None)
    gm, chain = pruner.graph_module, pruner.chain
    original = copy.deepcopy(gm).eval()
    cls = TailDistillImportance if args.estimator == "tail_distill" else LocalImportance
    estimator: LocalImportance = cls(train_data=splits.train, eval_data=splits.val, steps=steps,
                                     fit_batch_size=images)
    scored = [c for c in pruner.candidates if not c.uncompressed]
    targets = torch.cat([t for _, t in splits.val])
    sizes = sorted(set(args.sizes) | {len(targets)})

    # one pass: per entry and image, right or wrong, cross-entropy, KL from the original (kept in the cache
    # directory, so that the analysis reruns, e.g. once distill's table is complete, without the pass)
    saved_pass = Path(args.cache_dir) / f"importance_scoring_{args.model}_{args.estimator}_{args.setting}.pt"
    stamp = {"weights": weights_id(base_model), "settings": estimator.settings()}
    state = torch.load(saved_pass) if saved_pass.is_file() else {}
    if state.get("stamp") != stamp:
        state = {"stamp": stamp, "per_image": {}, "fit_s": [], "score_s": [], "teacher": None}
    per_image: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = state["per_image"]
    fit_s, score_s, teacher = state["fit_s"], state["score_s"], state["teacher"]
    todo = [c for c in scored if str(c.key) not in per_image]
    for i, c in enumerate(tqdm(todo, desc=f"{args.estimator} {args.setting}", unit="entry")):
        plan = single_block_plan(chain, c.st, c.end, c.kept)
        start = time.perf_counter()
        rest = estimator.adapted_rest(original, chain, plan, None).eval()
        middle = time.perf_counter()
        with torch.no_grad():
            logits = torch.cat([rest(*v).float() for v in estimator.evaluation.values(rest.meta["inputs"])])
        score_s.append(time.perf_counter() - middle)
        fit_s.append(middle - start)
        if teacher is None:
            with torch.no_grad():
                teacher = torch.cat([original(*b).float() for b in estimator.evaluation.batches])
        per_image[str(c.key)] = _per_image(logits, teacher, targets)
        if i % 50 == 49 or i == len(todo) - 1:
            state["teacher"] = teacher
            torch.save(state, saved_pass)
    base = _per_image(teacher, teacher, targets)

    def table(metric: str, n: int) -> dict[str, float]:
        i = METRICS.index(metric)
        sign = 100.0 if metric == "accuracy" else -1.0  # higher is better, accuracy in %
        return {k: sign * float(v[i][:n].double().mean() - base[i][:n].double().mean())
                for k, v in per_image.items()}

    variants = {f"{m}@{n}": table(m, n) for m in METRICS for n in sizes}
    full = variants[f"accuracy@{len(targets)}"]
    keys = list(full)

    distill = _stored_table(pruner)
    finetune = _finetune_reference(args.model, weights_id(base_model))
    plans = {name: _plans(pruner, values, args.budgets) for name, values in
             {**variants, **({"distill": distill} if distill else {})}.items()}
    fit_median, per_image_s = statistics.median(fit_s), statistics.median(score_s) / len(targets)
    rows = []
    for name, values in variants.items():
        n = int(name.split("@")[1])
        row = {"variant": name, "spearman_vs_all_images": _rho(values, full, keys),
               "spearman_vs_distill": _rho(values, distill, keys) if distill else None,
               "spearman_vs_finetune": _rho(values, finetune, list(finetune)) if finetune else None,
               "plans": plans[name],
               "same_plan_as_distill": [a == b for a, b in zip(plans[name], plans.get("distill", []))],
               "same_plan_as_all_images": [a == b for a, b in zip(plans[name], plans[f"accuracy@{len(targets)}"])],
               "entry_s": fit_median + per_image_s * n,
               "table_s": sum(fit_s) + sum(score_s) * n / len(targets), "values": values}
        rows.append(row)
    result = {"model": args.model, "estimator": args.estimator, "setting": args.setting, "entries": len(keys),
              "weights": weights_id(base_model), "budgets": args.budgets, "fit_median_s": fit_median,
              "score_median_s": statistics.median(score_s), "eval_images": len(targets),
              "distill_plans": plans.get("distill"), "finetune_entries": len(finetune or {}), "rows": rows,
              "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__}
    out = RESULTS / f"importance_scoring_{args.model}_{args.estimator}_{args.setting}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{args.model} {args.estimator} {args.setting}: {len(keys)} entries, fit {fit_median:.3f} s, "
          f"scoring {statistics.median(score_s):.3f} s per entry (medians, {len(targets)} images)")
    if distill:
        print("distill plans: " + " ".join(plans["distill"]))
    print(f"{'variant':<16} {'rho all':>8} {'rho dist':>8} {'rho ft':>7} {'s/entry':>8} {'table s':>8}  "
          "plans (= distill's)")
    for r in rows:
        same = "".join("=" if s else "x" for s in r["same_plan_as_distill"])
        print(f"{r['variant']:<16} {r['spearman_vs_all_images']:>8.3f} {_fmt(r['spearman_vs_distill']):>8} "
              f"{_fmt(r['spearman_vs_finetune']):>7} {r['entry_s']:>8.3f} {r['table_s']:>8.0f}  "
              f"{' '.join(r['plans'])} {same}")
    print(f"wrote {out}")


def _per_image(logits: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    correct = (logits.argmax(1) == targets).double()
    ce = F.cross_entropy(logits.double(), targets, reduction="none")
    kl = F.kl_div(F.log_softmax(logits.double(), 1), F.log_softmax(teacher.double(), 1), reduction="none",
                  log_target=True).sum(1)
    return correct.bool(), ce.float(), kl.float()


def _stored_table(pruner: LayerMergePruner) -> dict[str, float] | None:
    """distill's table if the cache holds all of it (never builds it here: that takes hours)."""
    scorer = pruner.scorer
    if scorer.missing():
        print(f"distill's table in {scorer.path} is not complete; not compared")
        return None
    values = pruner.importance_table().values
    return {str(k): values[k] for k in scorer.scored}


def _finetune_reference(model: str, weights: str) -> dict[str, float] | None:
    """The mean over the saved finetune seeds, for these weights."""
    path = RESULTS / f"importance_agreement_{model}.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("weights") != weights:
        print(f"{path} is for other weights; no finetune reference")
        return None
    seeds = [v for name, v in saved["values"].items() if name.split("@")[0] == "finetune"]
    keys = set.intersection(*(set(v) for v in seeds)) if seeds else set()
    return {k: statistics.mean(v[k] for v in seeds) for k in sorted(keys)} or None


def _plans(pruner: LayerMergePruner, values: dict[str, float], budgets: list[float]) -> list[str]:
    # the pruner's DP on these values (single convs left as they are score 0, as in a built table)
    pruner.use_importance(ImportanceTable({c.key: values.get(str(c.key), 0.0) for c in pruner.candidates},
                                          {c.key: c.kept for c in pruner.candidates}, 0.0, {}))
    out = []
    for b in budgets:
        try:
            out.append(plan_id(pruner.search(b).plan))
        except InfeasibleBudgetError:
            out.append("infeasible")
    return out


def _rho(a: dict[str, float], b: dict[str, float] | None, keys: list[str]) -> float:
    assert b is not None
    keys = [k for k in keys if k in a and k in b]
    return float(spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
