"""Quality benchmark: accuracy vs measured CPU speed-up, LayerMerge against its baselines (reference workload).

For each model (``resnet_fm``, ``mbv2_fm``: ../shared/WORKLOAD.md) trained with the workload recipe and each
latency budget (a fraction of the BN-folded original's measured latency, CPU eager, batch 64):

* ``layermerge``  — activations and convs selected jointly (LayerMerge, this library's default);
* ``act_only``    — activations only, every conv kept (the 2023 depth-compression method);
* ``layer_only``  — convs only, every activation kept;
* ``channel_tp``  — torch-pruning ``MetaPruner`` + ``GroupMagnitudeImportance(p=1)``, one uniform ratio chosen
  by bisection so that the pruned network's *measured* latency matches LayerMerge's at that budget.

Every compressed model gets the same fine-tuning (1 epoch, OneCycle max lr 0.02, cross-entropy) and is evaluated on
the 10,000 test images; every latency is the BN-folded deploy form measured side by side with the original in
interleaved rounds (speed-ups are ratios from one run). The three depth modes share one importance table
(same estimator, same candidates where they overlap) and one latency table.

Per-method speed-ups are measured right after each fine-tune, minutes apart, and on a shared machine they drift
with the load. So at the end every compressed architecture of the model (rebuilt from its plan or tp ratio:
latency does not depend on the weights) is timed once more, all together with the original in interleaved rounds
(``--joint-rounds``); ``speedup_joint`` is the figure to compare methods by, and the plot uses it.
``--remeasure`` redoes only this step from an existing JSON.

Interrupted runs resume: the latency and importance tables are cached entry by entry, and every finished row is
kept in ``pareto_<model>.partial.json`` (deleted once a run has covered all its rows) and reused by a rerun with
the same settings. Two processes can share the work of one model on two cores: the importance table with
``--importance-shard``, the rows by giving each process other ``--budgets`` and finishing with a run over all
budgets, which only adds the joint timing.

    python benchmarks/pareto.py                                    # both models, budgets 0.4 0.5 0.6 0.7
    python benchmarks/pareto.py --models resnet_fm --budgets 0.5 0.6
    python benchmarks/pareto.py --models resnet_fm --remeasure       # joint re-timing of an existing result
    # the importance table on two cores: a helper worker, and the main run as the other worker
    taskset -c 1 python benchmarks/pareto.py --models mbv2_fm --importance-shard 1/2 --importance-only &
    taskset -c 0 python benchmarks/pareto.py --models mbv2_fm --importance-shard 0/2

Writes ``benchmarks/results/pareto_<model>.json`` and ``pareto_<model>.png``; prints a table.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_plugin import LayerMergePruner
from lm_plugin.compress import FinetuneSettings, compress
from lm_plugin.data.datasets import data_splits
from lm_plugin.latency import compare_latency
from lm_plugin.metrics import model_cost
from lm_plugin.plan import Plan
from lm_plugin.solve import InfeasibleBudgetError
from lm_plugin.train import evaluate, fit
from lm_plugin.workloads import trained

RESULTS = Path(__file__).parent / "results"
MODES = ("layermerge", "act_only", "layer_only")
X1 = torch.randn(1, 1, 28, 28)


def tp_prune(model: nn.Module, ratio: float) -> nn.Module:
    """Uniform channel pruning of every coupled group except the classifier's outputs."""
    model = copy.deepcopy(model).eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, X1, tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=ratio,
                                  ignored_layers=[head])
    pruner.step()
    return model


def deployed(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """BN folded, nothing merged: how a channel-pruned network is deployed (the same rule as the originals)."""
    return LayerMergePruner(model, 1.0, example_inputs=example, cache_dir=None, progress=False).baseline()


def tp_at_latency(base: nn.Module, target_ratio: float, pruner: LayerMergePruner, example: torch.Tensor,
                  steps: int = 7) -> tuple[float, nn.Module]:
    """Uniform tp ratio whose pruned network's measured latency / original is closest to ``target_ratio``."""
    original = pruner.baseline()
    lo, hi, best = 0.0, 0.9, (float("inf"), 0.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        ms = compare_latency(pruner.profiler, {"o": original, "p": deployed(tp_prune(base, mid), example)}, example,
                             rounds=1)
        rel = ms["p"] / ms["o"]
        best = min(best, (abs(rel - target_ratio), mid))
        lo, hi = (mid, hi) if rel > target_ratio else (lo, mid)
    return best[1], tp_prune(base, best[1])


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any] | None:
    splits = data_splits("fashion_mnist", batch_size=128, val_size=args.val_size)
    base = trained(name, progress=not args.quiet)
    example = torch.randn(args.batch, *splits.input_shape)
    settings = FinetuneSettings(epochs=args.ft_epochs, max_lr=0.02)
    importance = {"steps": args.importance_steps}
    recorded = {"finetune_epochs": args.ft_epochs, "finetune_max_lr": 0.02, "importance": "distill",
                "importance_steps": args.importance_steps, "val_size": args.val_size, "batch": args.batch,
                "rounds": args.rounds}
    # Rows finished by an interrupted run with the same settings are kept, not recomputed: one row is a
    # 1-epoch fine-tune, and mbv2_fm's full run takes hours on a 2-core machine. Processes running other
    # budgets of the same model at the same time share the file (rows are merged under a lock), so a final run
    # over all budgets only does the joint timing.
    partial = PartialRows(RESULTS / f"pareto_{name}.partial.json", recorded)
    done = partial.finished()
    rows = partial.rows
    record = partial.add

    pruners = {mode: LayerMergePruner(base, 0.6, example_inputs=example, mode=mode, backend="cpu",
                                      importance="distill", train_data=splits.train, eval_data=splits.val,
                                      importance_settings=importance, cache_dir=args.cache_dir,
                                      progress=not args.quiet, screen=None)  # the complete distill table
               for mode in MODES}
    if args.importance_shard is not None:  # several processes build the importance table together
        pruners["layermerge"].importance_table(shard=args.importance_shard)
    if args.importance_only:
        return None
    base_acc = evaluate(base, splits.test)
    for budget in args.budgets:
        lm_rel = None
        for mode in MODES:
            start = time.time()
            done.update(partial.finished())  # rows another process has finished meanwhile
            if (budget, mode) in done:
                row = done[(budget, mode)]
                record(row)
                if mode == "layermerge" and "measured_ms" in row:
                    lm_rel = row["measured_ms"]["compressed"] / row["measured_ms"]["original"]
                print(f"{name} {budget} {mode}: kept from {partial.path.name}", flush=True)
                continue
            try:
                result = compress(pruners[mode], budget, train_data=splits.train, test_data=splits.test,
                                  finetune=settings, rounds=args.rounds, progress=not args.quiet)
            except InfeasibleBudgetError as exc:
                record({"model": name, "budget": budget, "method": mode, "infeasible": str(exc)})
                print(f"{name} {budget} {mode}: infeasible")
                continue
            rel = result.measured_ms["compressed"] / result.measured_ms["original"]
            lm_rel = rel if mode == "layermerge" else lm_rel
            record({"model": name, "budget": budget, "method": mode, "accuracy": result.accuracy["compressed"],
                    "original_accuracy": result.accuracy["original"], "speedup": result.speedup,
                    "measured_ms": result.measured_ms, "predicted_ms": result.predicted_ms,
                    "convs": result.cost["compressed"].convs, "macs": result.cost["compressed"].macs,
                    "params": result.cost["compressed"].params, "plan": result.plan.to_dict(),
                    "merge_error": result.merge_error, "seconds": time.time() - start})
            print(f"{name} {budget} {mode}: acc {result.accuracy['compressed']:.2f} speed-up {result.speedup:.2f}x",
                  flush=True)
        if lm_rel is None:
            continue
        done.update(partial.finished())
        if (budget, "channel_tp") in done:
            record(done[(budget, "channel_tp")])
            print(f"{name} {budget} channel_tp: kept from {partial.path.name}", flush=True)
            continue
        start = time.time()
        ratio, pruned = tp_at_latency(base, lm_rel, pruners["layermerge"], example)
        fit(pruned, splits.train, epochs=settings.epochs, max_lr=settings.max_lr, seed=settings.seed,
            progress=not args.quiet)
        pruned.eval()
        ms = compare_latency(pruners["layermerge"].profiler,
                             {"original": pruners["layermerge"].baseline(), "compressed": deployed(pruned, example)},
                             example, rounds=args.rounds)
        cost = model_cost(pruned, X1)
        acc = evaluate(pruned, splits.test)
        record({"model": name, "budget": budget, "method": "channel_tp", "ratio": ratio, "accuracy": acc,
                "original_accuracy": base_acc, "speedup": ms["original"] / ms["compressed"], "measured_ms": ms,
                "convs": cost.convs, "macs": cost.macs, "params": cost.params, "seconds": time.time() - start})
        print(f"{name} {budget} channel_tp (ratio {ratio:.3f}): acc {acc:.2f} speed-up "
              f"{ms['original'] / ms['compressed']:.2f}x", flush=True)
    sig = pruners["layermerge"].profiler.signature()
    out: dict[str, Any] = {"model": name, "original_accuracy": base_acc, "budgets": args.budgets, "rows": rows,
           "settings": recorded,
           "machine": {"cpu": sig.get("device_name"), "threads": sig.get("threads"), "torch": torch.__version__,
                       "python": platform.python_version()}}
    remeasure(out, base, pruners["layermerge"], example, args.joint_rounds)
    save(out)
    partial.close()
    return out


class PartialRows:
    """The finished rows of a model's run, kept in a JSON file that several processes may share.

    Every :meth:`add` merges this process's rows with the file's under a lock and replaces the file atomically, so
    neither an interrupt nor a second process (running other budgets) loses a row.
    """

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path, self.settings = path, settings
        self.rows: list[dict[str, Any]] = []

    def finished(self) -> dict[tuple[float, str], dict[str, Any]]:
        """Rows in the file (this and other processes'), by (budget, method)."""
        return resumable_rows(self.path, self.settings)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = {**self.finished(), **{(r["budget"], r["method"]): r for r in self.rows}}
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"settings": self.settings, "rows": list(merged.values())}, indent=1))
            tmp.replace(self.path)  # atomic: an interrupt never leaves half a file

    def close(self) -> None:
        """Delete the file once this run's result covers every row in it; keep rows other processes added."""
        mine = {(r["budget"], r["method"]) for r in self.rows}
        if not set(self.finished()) - mine:
            self.path.unlink(missing_ok=True)


def resumable_rows(path: Path, settings: dict[str, Any]) -> dict[tuple[float, str], dict[str, Any]]:
    """Rows of an interrupted run, by (budget, method); none when the file is absent or its settings differ."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        print(f"ignoring {path.name}: not valid JSON (interrupted while writing?)", flush=True)
        return {}
    if data.get("settings") != settings:
        print(f"ignoring {path.name}: written with other settings {data.get('settings')}", flush=True)
        return {}
    return {(row["budget"], row["method"]): row for row in data["rows"]}


def save(out: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"pareto_{out['model']}.json").write_text(json.dumps(out, indent=1))
    plot(out, RESULTS / f"pareto_{out['model']}.png")


def remeasure(out: dict[str, Any], base: nn.Module, pruner: LayerMergePruner, example: torch.Tensor,
              rounds: int) -> None:
    """Time every compressed architecture of ``out`` together with the original, in interleaved rounds.

    Architectures are rebuilt from the recorded plans (deploy form of the untuned trainable form) and tp ratios;
    identical architectures (two modes can select the same plan) are timed once.
    """
    models: dict[str, nn.Module] = {"original": pruner.baseline()}
    keys: list[str | None] = []
    for r in out["rows"]:
        if "plan" in r:
            key = json.dumps(r["plan"], sort_keys=True)
            if key not in models:
                models[key] = pruner.merge(pruner.apply(Plan.from_dict(r["plan"])))
        elif "ratio" in r:
            key = f"tp:{r['ratio']}"
            if key not in models:
                models[key] = deployed(tp_prune(base, r["ratio"]), example)
        else:
            key = None
        keys.append(key)
    ms = compare_latency(pruner.profiler, models, example, rounds=rounds)
    for r, key in zip(out["rows"], keys, strict=True):
        if key is not None:
            r["joint_ms"] = ms[key]
            r["speedup_joint"] = ms["original"] / ms[key]
    out["joint"] = {"original_ms": ms["original"], "rounds": rounds, "models": len(models)}


def speedup(r: dict[str, Any]) -> float:
    """The side-by-side figure when the result has one, else the per-method one."""
    return r.get("speedup_joint", r["speedup"])


def plot(out: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for method, marker in zip((*MODES, "channel_tp"), "os^D", strict=True):
        pts = sorted((speedup(r), r["accuracy"]) for r in out["rows"] if r["method"] == method and "accuracy" in r)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=method)
    for r in out["rows"]:  # which budget each point was searched (or latency-matched) at
        if "accuracy" in r and r["method"] == "layermerge":
            ax.annotate(f"{r['budget']:g}", (speedup(r), r["accuracy"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color="C0")
    ax.axhline(out["original_accuracy"], color="grey", ls="--", lw=1, label="original")
    joint = "all timed together" if "joint" in out else "timed per method"
    ax.set_xlabel(f"measured CPU speed-up\n(batch 64, {joint}; BN-folded original = 1)")
    ax.set_ylabel("test accuracy after 1 epoch fine-tuning (%)")
    ax.set_title(out["model"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def table(out: dict[str, Any]) -> str:
    lines = [f"{out['model']} (original {out['original_accuracy']:.2f} %)",
             f"{'budget':>6}  {'method':<11} {'acc %':>6} {'Δacc':>6} {'speed-up':>8} {'joint':>6} {'pred':>6} "
             f"{'convs':>5} {'MMACs':>6}"]
    for r in out["rows"]:
        if "accuracy" not in r:
            lines.append(f"{r['budget']:>6}  {r['method']:<11} infeasible")
            continue
        joint = f"{r['speedup_joint']:>5.2f}x" if "speedup_joint" in r else f"{'—':>6}"
        pred = r.get("predicted_ms")
        pred = f"{pred['original'] / pred['compressed']:>5.2f}x" if pred else f"{'—':>6}"
        lines.append(f"{r['budget']:>6}  {r['method']:<11} {r['accuracy']:>6.2f} "
                     f"{r['accuracy'] - out['original_accuracy']:>+6.2f} {r['speedup']:>7.2f}x {joint} {pred} "
                     f"{r['convs']:>5} {r['macs'] / 1e6:>6.2f}")
    return "\n".join(lines)


def shard_spec(text: str) -> tuple[int, int]:
    """``"0/2"`` -> ``(0, 2)``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/2, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"need 0 <= I < N, got {text!r}")
    return index, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet_fm", "mbv2_fm"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--ft-epochs", type=float, default=1.0)
    ap.add_argument("--importance-steps", type=int, default=10)
    ap.add_argument("--val-size", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache-dir", default=str(RESULTS / "cache"))
    ap.add_argument("--joint-rounds", type=int, default=9, help="interleaved rounds of the final joint timing")
    ap.add_argument("--remeasure", action="store_true",
                    help="only redo the joint timing of an existing benchmarks/results/pareto_<model>.json")
    ap.add_argument("--importance-shard", type=shard_spec, metavar="I/N",
                    help="build the importance table as worker I of N processes sharing --cache-dir (one per core)")
    ap.add_argument("--importance-only", action="store_true",
                    help="stop after the importance table (a helper worker for --importance-shard)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    for name in args.models:
        if args.remeasure:
            out = json.loads((RESULTS / f"pareto_{name}.json").read_text())
            base = trained(name, progress=not args.quiet)
            example = torch.randn(args.batch, 1, 28, 28)
            pruner = LayerMergePruner(base, 0.6, example_inputs=example, backend="cpu", cache_dir=args.cache_dir,
                                      progress=not args.quiet)
            remeasure(out, base, pruner, example, args.joint_rounds)
            save(out)
        else:
            out = run_model(name, args)
            if out is None:
                continue
        print(table(out), flush=True)


if __name__ == "__main__":
    main()
