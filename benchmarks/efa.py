"""Benchmark: effective-filter-analysis hierarchical pruning on the reference workload.

Part 1 — channel pruning at equal MACs. ``resnet_fm`` trained with the workload recipe is pruned by
  * ``efa``: :class:`lm_plugin.efa.HierarchicalPruner` (per-group ratios capped by the estimated
    redundancy, redundancy-aware filter choice);
  * ``l1``: torch-pruning ``MetaPruner`` + ``GroupMagnitudeImportance(p=1)``, one uniform ratio;
  * ``taylor``: ``MetaPruner`` + ``GroupTaylorImportance``, the same uniform ratio;
at several MAC reductions (the uniform ratio is chosen so that its MACs match the EFA model's), then
every model gets the same fine-tuning (workload recipe: max lr 0.02, OneCycle) and is evaluated on the
10,000 test images.

Part 2 — composition with LayerMerge at equal measured latency (run only if ``lm_plugin`` exposes
``LayerMergePruner`` with ``apply``/``merge``): LayerMerge alone, hierarchical pruning alone, and
LayerMerge followed by hierarchical pruning on the merged network, all at the same CPU latency
target and with the same total fine-tuning.

Writes ``benchmarks/results/efa.json`` and prints tables. Example::

    python benchmarks/efa.py                       # full protocol
    python benchmarks/efa.py --ft-epochs 0.25      # reduced fine-tuning (documented in the results)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_plugin.efa import HierarchicalPruner, RedundancyBoundError, estimate_redundancy  # noqa: E402
from lm_plugin.train import evaluate, fit  # noqa: E402
from lm_plugin.workloads import fashion_mnist, trained  # noqa: E402

X1 = torch.randn(1, 1, 28, 28)  # per-image MACs


def macs_params(model: nn.Module) -> tuple[float, float]:
    macs, params = tp.utils.count_ops_and_params(model, X1)
    return float(macs), float(params)


def latency_ms(model: nn.Module, batch: int) -> float:
    """Median CPU eager latency by the project's profiler (workload protocol)."""
    from lm_plugin.latency import measure

    return float(measure(model, (batch, 1, 28, 28), backend="cpu", batch_size=batch).median_ms)


def classifier(model: nn.Module) -> nn.Module:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1]


def uniform_prune(model: nn.Module, ratio: float, importance: Any) -> nn.Module:
    pruner = tp.pruner.MetaPruner(model, X1, importance, pruning_ratio=ratio, ignored_layers=[classifier(model)])
    pruner.step()
    return model


def ratio_for_macs(base: nn.Module, target_macs: float) -> float:
    """Uniform torch-pruning ratio whose MACs are closest to ``target_macs`` (bisection)."""
    lo, hi = 0.0, 0.95
    best = (float("inf"), 0.0)
    for _ in range(14):
        mid = (lo + hi) / 2
        macs = macs_params(uniform_prune(copy.deepcopy(base), mid, tp.importance.GroupMagnitudeImportance(p=1)))[0]
        best = min(best, (abs(macs - target_macs), mid))
        if macs > target_macs:
            lo = mid
        else:
            hi = mid
    return best[1]


def taylor_prune(model: nn.Module, ratio: float, calib: Any) -> nn.Module:
    """Uniform-ratio Taylor pruning; gradients accumulated over the calibration batches first."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for x, y in calib:
        F.cross_entropy(model(x), y).backward()
    uniform_prune(model, ratio, tp.importance.GroupTaylorImportance())
    model.zero_grad(set_to_none=True)
    return model


def finetune_and_eval(model: nn.Module, train_loader: Any, test_loader: Any, epochs: float) -> dict[str, float]:
    before = evaluate(model, test_loader)
    start = time.perf_counter()
    if epochs > 0:
        fit(model, train_loader, epochs=epochs, max_lr=0.02, progress=False, seed=0)
    seconds = time.perf_counter() - start
    macs, params = macs_params(model)
    return {
        "acc_before_ft": before,
        "acc": evaluate(model, test_loader),
        "macs": macs,
        "params": params,
        "ft_seconds": seconds,
    }


def channel_pruning(base: nn.Module, report: Any, levels: list[float], loaders: dict[str, Any], ft: float) -> list[dict]:
    base_macs, _ = macs_params(base)
    rows = []
    for level in levels:
        print(f"\n== MAC reduction target {level:.0%}", flush=True)
        efa_model = copy.deepcopy(base)
        try:
            pruner = HierarchicalPruner(
                efa_model, X1, loaders["calib"], reduction=level, report=report, ignored_layers=[efa_model.fc]
            )
        except RedundancyBoundError as exc:
            print(f"   skipped: {exc}")
            rows.append({"target_reduction": level, "skipped": str(exc)})
            continue
        pruner.step()
        efa_macs = macs_params(efa_model)[0]
        ratio = ratio_for_macs(base, efa_macs)
        models = {
            "efa": efa_model,
            "l1": uniform_prune(copy.deepcopy(base), ratio, tp.importance.GroupMagnitudeImportance(p=1)),
            "taylor": taylor_prune(copy.deepcopy(base), ratio, loaders["calib"]),
        }
        for method, model in models.items():
            res = finetune_and_eval(model, loaders["train"], loaders["test"], ft)
            res.update(method=method, target_reduction=level, mac_reduction=1 - res["macs"] / base_macs)
            if method != "efa":
                res["uniform_ratio"] = ratio
            else:
                res["group_ratios"] = pruner.allocation.ratios
            rows.append(res)
            print(
                f"   {method:<7} MACs {res['macs'] / 1e6:6.2f}M (-{res['mac_reduction']:.1%})  "
                f"acc {res['acc_before_ft']:5.2f} -> {res['acc']:5.2f}  ({res['ft_seconds']:.0f}s ft)",
                flush=True,
            )
    return rows


def layermerge_available() -> bool:
    try:
        import lm_plugin
    except ImportError:
        return False
    cls = getattr(lm_plugin, "LayerMergePruner", None)
    return cls is not None and hasattr(cls, "apply") and hasattr(cls, "merge") and hasattr(lm_plugin, "Plan")


def layermerge_composition(base: nn.Module, loaders: dict[str, Any], ft: float, args: argparse.Namespace) -> dict:
    """LayerMerge alone vs hierarchical pruning alone vs LayerMerge then hierarchical pruning,
    at the same measured latency (batch 64), each with ``ft`` epochs of fine-tuning in total."""
    from lm_plugin import LayerMergePruner, Plan

    batch = 64
    lat0 = latency_ms(base, batch)
    lm = LayerMergePruner(base, 0.7, example_inputs=X1)
    # Candidate plans (the DP search is not used here): merge-all and seeded random plans, timed
    # in their merged (deploy) form before any fine-tuning; merging is exact, so timing is too.
    candidates = {"merge_all": Plan.merge_all(lm.chain)}
    for seed in range(args.lm_plans):
        candidates[f"sample_{seed}"] = Plan.sample(lm.chain, seed)
    timed = []
    for name, plan in candidates.items():
        merged = lm.merge(lm.apply(plan).eval())
        timed.append((latency_ms(merged, batch), name, plan))
        print(f"   plan {name:<10} merged latency {timed[-1][0]:.2f} ms (base {lat0:.2f} ms)", flush=True)
    timed.sort(key=lambda t: t[0])
    fastest_lat, fastest_name, fastest_plan = timed[0]
    target = fastest_lat  # the latency every method must reach
    milder = [t for t in timed if target / t[0] < 0.97 and t[0] < lat0 * 0.99]
    result: dict[str, Any] = {"base_latency_ms": lat0, "target_latency_ms": target, "batch": batch, "methods": {}}

    def record(method: str, model: nn.Module, extra: dict) -> None:
        lat = latency_ms(model, batch)
        macs, params = macs_params(model)
        acc = evaluate(model, loaders["test"])
        result["methods"][method] = {"latency_ms": lat, "speedup": lat0 / lat, "macs": macs, "params": params,
                                     "acc": acc, **extra}
        print(f"   {method:<16} latency {lat:6.2f} ms ({lat0 / lat:.2f}x)  MACs {macs / 1e6:5.2f}M  acc {acc:5.2f}",
              flush=True)

    # 1) LayerMerge alone: the fastest plan, fine-tuned in trainable form, then merged.
    trainable = lm.apply(fastest_plan)
    fit(trainable, loaders["train"], epochs=ft, max_lr=0.02, progress=False, seed=0)
    record("layermerge", lm.merge(trainable.eval()), {"plan": fastest_name})

    def efa_to_latency(model: nn.Module, target_ms: float) -> nn.Module:
        base_ms = latency_ms(model, batch)
        reduction = 1 - target_ms / base_ms
        x = torch.randn(batch, 1, 28, 28)
        HierarchicalPruner(model, x, loaders["calib"], reduction=reduction,
                           metric=lambda m: latency_ms(m, batch), ignored_layers=[classifier(model)]).step()
        return model

    # 2) Hierarchical pruning alone, to the same latency.
    try:
        alone = efa_to_latency(copy.deepcopy(base), target)
        fit(alone, loaders["train"], epochs=ft, max_lr=0.02, progress=False, seed=0)
        record("efa", alone, {})
    except RedundancyBoundError as exc:
        result["methods"]["efa"] = {"skipped": str(exc)}
        print(f"   efa alone skipped: {exc}")

    # 3) LayerMerge (a milder plan) then hierarchical pruning of the merged network to the target.
    if milder:
        lat1, name1, plan1 = max(milder, key=lambda t: t[0]) if args.lm_mild == "mildest" else milder[0]
        trainable = lm.apply(plan1)
        fit(trainable, loaders["train"], epochs=ft / 2, max_lr=0.02, progress=False, seed=0)
        merged = lm.merge(trainable.eval())
        try:
            combo = efa_to_latency(merged, target)
            fit(combo, loaders["train"], epochs=ft / 2, max_lr=0.02, progress=False, seed=0)
            record("layermerge+efa", combo, {"plan": name1, "plan_latency_ms": lat1})
        except RedundancyBoundError as exc:
            result["methods"]["layermerge+efa"] = {"skipped": str(exc)}
            print(f"   layermerge+efa skipped: {exc}")
    else:
        result["methods"]["layermerge+efa"] = {"skipped": "no milder LayerMerge plan among the candidates"}
    return result


def machine() -> dict[str, Any]:
    try:
        from lm_plugin.latency.system import cpu_name

        cpu = cpu_name()
    except Exception:  # noqa: BLE001 - descriptive only
        cpu = platform.processor()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=float, nargs="+", default=[0.3, 0.45, 0.6], help="MAC reductions")
    parser.add_argument("--ft-epochs", type=float, default=1.0, help="fine-tuning epochs per model (workload: 1)")
    parser.add_argument("--calib-batches", type=int, default=64, help="calibration batches of 32 images")
    parser.add_argument("--tol", type=float, default=0.01, help="rank tolerance of the estimate")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--lm-plans", type=int, default=6, help="random LayerMerge plans to time")
    parser.add_argument("--lm-mild", choices=["mildest", "fastest"], default="mildest",
                        help="which slower plan precedes hierarchical pruning in the composition")
    parser.add_argument("--skip-layermerge", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "efa.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    base = trained("resnet_fm", progress=False)
    loaders = {
        "train": fashion_mnist(train=True, batch_size=128, seed=0),
        "test": fashion_mnist(train=False, batch_size=500),
        "calib": fashion_mnist(train=True, batch_size=32, subset=32 * args.calib_batches, seed=1),
    }
    base_acc = evaluate(base, loaders["test"])
    base_macs, base_params = macs_params(base)
    print(f"resnet_fm: {base_acc:.2f} % test accuracy, {base_macs / 1e6:.2f} M MACs, {base_params / 1e3:.1f} k params")

    t0 = time.perf_counter()
    report = estimate_redundancy(base, X1, loaders["calib"], tol=args.tol, ignored_layers=[base.fc])
    analysis_s = time.perf_counter() - t0
    print(report)
    print(f"(analysis: {analysis_s:.1f} s)")

    rows = channel_pruning(base, report, args.levels, loaders, args.ft_epochs)

    composition: dict[str, Any] | None = None
    if args.skip_layermerge:
        print("\nLayerMerge composition: skipped (--skip-layermerge)")
    elif not layermerge_available():
        print("\nLayerMerge composition: skipped (lm_plugin.LayerMergePruner with apply/merge not available)")
    else:
        print("\n== LayerMerge composition at equal latency (batch 64)")
        composition = layermerge_composition(base, loaders, args.ft_epochs, args)

    result = {
        "command": "python benchmarks/efa.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "workload": {"model": "resnet_fm", "base_acc": base_acc, "base_macs": base_macs, "base_params": base_params,
                     "ft_epochs": args.ft_epochs, "ft_max_lr": 0.02, "calib_images": 32 * args.calib_batches},
        "estimate": {**report.to_dict(), "analysis_seconds": analysis_s},
        "channel_pruning": rows,
        "layermerge_composition": composition,
        "total_seconds": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_summary(result)
    print(f"\nwrote {args.out} ({result['total_seconds'] / 60:.1f} min)")
    return result


def print_summary(result: dict) -> None:
    print("\n| target | method | MACs (M) | MAC reduction | acc before FT | acc after FT |")
    print("|---|---|---|---|---|---|")
    for r in result["channel_pruning"]:
        if "skipped" in r:
            print(f"| {r['target_reduction']:.0%} | all | — | — | — | skipped: beyond estimated redundancy |")
            continue
        print(f"| {r['target_reduction']:.0%} | {r['method']} | {r['macs'] / 1e6:.2f} | {r['mac_reduction']:.1%} | "
              f"{r['acc_before_ft']:.2f} | {r['acc']:.2f} |")
    comp = result.get("layermerge_composition")
    if comp:
        print(f"\n| method (target {comp['target_latency_ms']:.2f} ms, base {comp['base_latency_ms']:.2f} ms) | "
              "latency (ms) | speed-up | MACs (M) | acc |")
        print("|---|---|---|---|---|")
        for name, m in comp["methods"].items():
            if "skipped" in m:
                print(f"| {name} | — | — | — | skipped: {m['skipped'][:60]} |")
            else:
                print(f"| {name} | {m['latency_ms']:.2f} | {m['speedup']:.2f}x | {m['macs'] / 1e6:.2f} | {m['acc']:.2f} |")


if __name__ == "__main__":
    main()
