"""GPU latency benchmark: predicted vs measured end-to-end latency of DP plans on a CUDA card, in one command.

The project's other latency numbers come from CPUs; this script produces the GPU ones on a machine that has a card
for a few minutes. For torchvision ``resnet34`` and ``mobilenet_v2`` (1000 classes, random weights, seed 0) at
3x224x224, batch 1 and 128, in two variants — ``fp32`` and ``fp16_cl`` (half precision, channels-last) — it builds
the latency table with the ``cuda`` backend (CUDA events, L2 flushed before every timed run, cuDNN autotuning),
solves the DP at budgets 0.5 / 0.6 / 0.7 of the original latency, merges each plan, and measures every deployed
network side by side with the BN-folded original (:func:`lm_plugin.latency.compare_latency`, 3 rounds of alternating
chunks). Each row gives the predicted and measured latency, their relative error, and the predicted and measured
speed-up (the table's figure for the original over the prediction, as ``SearchResult.predicted_speedup``). The
identity plan is a row too: its measured speed-up should be 1.00x (a check of the side-by-side protocol), and its
prediction is the latency model's for the uncompressed network.

Importance is a fixed structural proxy, not an estimator: a candidate block is worth ``-(activations it removes +
convs it removes)``, so the DP compresses as little as the budget allows and each budget gives another plan. This
benchmark measures the latency side (does the table predict what the merged network runs at?); the plans are
valid LayerMerge plans, not accuracy-optimal ones. The DP is :meth:`LayerMergePruner.search` itself, with the proxy
as its importance table (``ProxyPruner``). A budget no plan meets gives a row with ``infeasible`` set.

TensorRT: when ``torch_tensorrt`` imports, the plans of every ``fp16_cl`` configuration (found with the ``cuda``
table) are also measured side by side in TensorRT (backend ``tensorrt``, one engine per network; rows with
``measure_backend: "tensorrt"``; their predicted columns are the cuda table's). They show how far plans searched
with eager-PyTorch latencies carry over to a TensorRT deployment. A TensorRT *table* (an engine per candidate
block) takes far longer than this command may: build one with ``LayerMergePruner(..., backend="tensorrt")``.
Without ``torch_tensorrt`` the JSON says why under ``tensorrt.note``.

Time guard: configurations run in the order variant, batch, model (fp32 first), the TensorRT rows last. Before
each one the script estimates its duration from those already run; when the elapsed time plus that estimate
would pass ``--max-seconds`` (default 450 s, so that the whole command stays under 8 minutes on an H100) it stops
adding rows and lists what it skipped under ``time_guard`` in the JSON. The JSON is rewritten after every
configuration, so an interrupted run keeps what it measured.

Usage (on the CUDA machine, from the repository root)::

    python benchmarks/gpu.py                        # the full run: benchmarks/results/gpu.json
    python benchmarks/gpu.py --quick                # about a minute: 3x64x64, batch 1, max_kernel 3, few runs
    python benchmarks/gpu.py --models mobilenet_v2 --batches 1 --variants fp16_cl --out /tmp/mbv2.json
    python benchmarks/gpu.py --device cpu --quick   # no GPU: the same logic with backend "cpu", tiny inputs

``--device cpu`` exists only so that the logic is testable without a GPU (``tests/test_gpu_benchmark.py``): it
times with backend ``cpu`` (eager PyTorch, fp32 only) at 3x32x32, batch 1 and 2, and defaults to
``benchmarks/results/gpu_cpu.json``; its numbers say nothing about GPUs. Latency tables go to a fresh temporary
folder (measured afresh every run) unless ``--cache-dir`` names one to reuse.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from lm_plugin import LayerMergePruner, Plan
from lm_plugin.candidates import Candidate
from lm_plugin.latency import compare_latency, get_profiler
from lm_plugin.latency.system import cpu_name, package_version
from lm_plugin.pruner import SearchResult
from lm_plugin.solve import InfeasibleBudgetError
from lm_plugin.tables.importance import representative
from lm_plugin.tables.latency import LatencyModel

RESULTS = Path(__file__).parent / "results"
BUDGETS = (0.7, 0.6, 0.5)

MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet34": lambda: torchvision.models.resnet34(num_classes=1000),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=1000),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=1000),
}

#: Profiler settings of each variant on the cuda backend.
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": torch.float32, "channels_last": False},
    "fp16_cl": {"dtype": torch.float16, "channels_last": True},
}
#: The variants whose plans are also measured in TensorRT (half precision is how TensorRT is deployed).
TENSORRT_VARIANTS = ("fp16_cl",)
#: The backend of the TensorRT rows (a name, so that a test can stand another backend in for it).
TENSORRT_BACKEND = "tensorrt"


@dataclass(frozen=True)
class Config:
    """One latency table: a model at one batch size in one variant, timed with one backend."""

    backend: str
    model: str
    batch: int
    variant: str

    def label(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model, "batch": self.batch, "variant": self.variant}


@dataclass
class Measured:
    """What a finished configuration leaves for the TensorRT rows: its deployed networks and predictions."""

    config: Config
    pruner: ProxyPruner
    deployed: dict[str, nn.Module]
    plans: dict[str, tuple[Plan, float | None]]


def proxy_importance(c: Candidate) -> float:
    """The fixed importance proxy: minus the activations and convs the block removes (its representative subset)."""
    span = c.end - c.st
    return -float((span - 1) + (span - len(representative(c))))


@dataclass(frozen=True)
class ProxyImportance:
    """What :meth:`LayerMergePruner.search` reads of an importance table: the value of every selectable entry."""

    values: dict[tuple, float]


class ProxyPruner(LayerMergePruner):
    """A pruner whose importance table is the fixed proxy, so that :meth:`search` runs the library's own DP (entries,
    fixed cost, resolution, plan construction) with no estimator and no data."""

    def importance_table(self, *, shard: tuple[int, int] | None = None) -> ProxyImportance:  # type: ignore[override]
        return ProxyImportance({c.key: proxy_importance(c) for c in self.selectable()})


def dp_plan(pruner: ProxyPruner, budget: float) -> SearchResult:
    """The DP's plan at ``budget`` (fraction of the original network's latency in the table).

    Raises:
        InfeasibleBudgetError: no plan meets the budget (``min_latency_ms``: the smallest achievable prediction).
    """
    return pruner.search(budget)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda (default); cpu only exercises the logic (backend cpu, tiny inputs)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few runs (a check that it all runs)")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                    help="default: resnet34 mobilenet_v2 (cuda), resnet18 mobilenet_v2 (cpu --quick: resnet18)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 128 (cuda), 1 2 (cpu)")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None,
                    help="default: fp32 fp16_cl (cuda); cpu times fp32 only")
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    ap.add_argument("--size", type=int, default=None, help="input side (default 224; --quick 64; cpu 32)")
    ap.add_argument("--max-kernel", type=int, default=None, help="largest merged kernel (default 7; --quick 3)")
    ap.add_argument("--rounds", type=int, default=None, help="side-by-side rounds per configuration (default 3)")
    ap.add_argument("--max-seconds", type=float, default=450.0,
                    help="stop adding configurations once the elapsed time would pass this (default 450)")
    ap.add_argument("--no-tensorrt", action="store_true", help="skip the TensorRT rows even if it imports")
    ap.add_argument("--cache-dir", default=None, help="latency table cache (default: a fresh temporary folder)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default results/gpu.json; gpu_quick.json with --quick; gpu_cpu.json on cpu)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    if cpu and args.variants and set(args.variants) - {"fp32"}:
        ap.error("--device cpu times fp32 only (the cpu backend has no channels-last option; fp16 is a GPU variant)")
    if args.models is None:
        args.models = (["resnet18"] if args.quick else ["resnet18", "mobilenet_v2"]) if cpu \
            else ["resnet34", "mobilenet_v2"]
    if args.batches is None:
        args.batches = ([1] if args.quick else [1, 2]) if cpu else ([1] if args.quick else [1, 128])
    if args.variants is None:
        args.variants = ["fp32"] if cpu else list(VARIANTS)
    if args.size is None:
        args.size = 32 if cpu else (64 if args.quick else 224)
    if args.max_kernel is None:
        args.max_kernel = 3 if args.quick else 7
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.out is None:
        args.out = str(RESULTS / ("gpu_cpu.json" if cpu else "gpu_quick.json" if args.quick else "gpu.json"))
    if any(b < 1 for b in args.batches) or args.size < 1 or args.rounds < 1:
        ap.error("batches, --size and --rounds must be positive")
    if not all(0 < b <= 1 for b in args.budgets):
        ap.error("budgets are fractions of the original latency in (0, 1]")
    return args


def profiler_settings(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """Settings of the table's profiler (the backend and batch size are passed to the pruner)."""
    runs = {"warmup": 2, "repeats": 5, "retries": 0, "max_spread": 1e6} if args.quick else {}
    if args.device == "cpu":
        return runs  # fp32, the cpu backend's defaults (private-cache flush, current thread count)
    return {**VARIANTS[variant], **runs}


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {"device": args.device, "torch": torch.__version__, "torchvision": torchvision.__version__,
                            "cuda": torch.version.cuda, "python": platform.python_version(), "cpu": cpu_name()}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        major, minor = torch.cuda.get_device_capability()
        info.update({"device_name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
                     "cudnn": torch.backends.cudnn.version(), "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "l2_cache_bytes": getattr(props, "L2_cache_size", None)})
    else:
        info.update({"device_name": cpu_name(), "threads": torch.get_num_threads()})
    return info


def tensorrt_status(args: argparse.Namespace) -> dict[str, Any]:
    """Whether the TensorRT rows run, and why not when they do not."""
    if args.device != "cuda":
        return {"available": False, "note": "skipped: --device cpu"}
    if args.no_tensorrt:
        return {"available": False, "note": "skipped: --no-tensorrt"}
    try:
        importlib.import_module("torch_tensorrt")
    except Exception as exc:  # ImportError, or a build that does not match torch
        return {"available": False, "note": f"skipped: torch_tensorrt does not import ({type(exc).__name__}: {exc})"}
    return {"available": True, "note": "plans of the cuda table measured in TensorRT",
            "torch_tensorrt": package_version("torch-tensorrt") or package_version("torch_tensorrt"),
            "tensorrt": package_version("tensorrt")}


class TimeGuard:
    """Stops adding configurations once the elapsed time plus the estimated duration of the next passes the limit."""

    def __init__(self, max_seconds: float) -> None:
        self.max_seconds = max_seconds
        self.start = time.perf_counter()
        self.durations: list[tuple[Config, float]] = []
        self.skipped: list[dict[str, Any]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def estimate(self, config: Config) -> float:
        """The longest earlier run of the same backend and model at the same batch, else of the same model, else 0."""
        for same in (lambda c: (c.backend, c.model, c.batch) == (config.backend, config.model, config.batch),
                     lambda c: (c.backend, c.model) == (config.backend, config.model)):
            seen = [s for c, s in self.durations if same(c)]
            if seen:
                return max(seen)
        return 0.0

    def allows(self, config: Config) -> bool:
        estimate = self.estimate(config)
        if self.elapsed() + estimate <= self.max_seconds:
            return True
        self.skipped.append({**config.label(), "reason": f"time guard: {self.elapsed():.0f} s elapsed + "
                             f"{estimate:.0f} s estimated > --max-seconds {self.max_seconds:g}"})
        return False

    def record(self, config: Config, seconds: float) -> None:
        self.durations.append((config, seconds))

    def summary(self) -> dict[str, Any]:
        return {"max_seconds": self.max_seconds, "elapsed_s": round(self.elapsed(), 1),
                "stopped_early": bool(self.skipped), "skipped": self.skipped}


def plan_row(config: Config, measure_backend: str, label: str, plan: Plan, budget: float | None, lat: LatencyModel,
             measured: dict[str, float]) -> dict[str, Any]:
    """One plan: the table's prediction against the deployed network measured side by side with the original.

    The predicted speed-up is the table's figure for the original over the plan's prediction, as
    :attr:`SearchResult.predicted_speedup` states it; the measured one is the original over the plan, both timed in
    the same rounds.
    """
    predicted, measured_ms, original_ms = lat.predict(plan), measured[label], measured["original"]
    predicted_speedup, measured_speedup = lat.original_ms / predicted, original_ms / measured_ms
    return {**config.label(), "table_backend": config.backend, "measure_backend": measure_backend, "plan": label,
            "budget": budget, "budget_ms": None if budget is None else budget * lat.original_ms,
            "blocks": len(plan.blocks()), "kept_convs": len(plan.kept_convs), "kept_activations": len(plan.kept_acts),
            "chain_length": plan.length, "predicted_ms": predicted, "measured_ms": measured_ms,
            "rel_error": (predicted - measured_ms) / measured_ms, "original_table_ms": lat.original_ms,
            "original_measured_ms": original_ms, "predicted_speedup": predicted_speedup,
            "measured_speedup": measured_speedup,
            "speedup_rel_error": (predicted_speedup - measured_speedup) / measured_speedup}


#: Deployed networks by model and plan: the weights are seeded, so the original and every plan merge to the same
#: network in every configuration of a model (merging, with its float64 check, takes seconds on the CPU).
DeployCache = dict[tuple[str, Plan | None], nn.Module]


def run_config(config: Config, args: argparse.Namespace, cache_dir: str,
               deploy_cache: DeployCache | None = None) -> tuple[dict, list[dict], Measured]:
    """Table, DP plans, merge, side-by-side measurement of one configuration."""
    deploy_cache = {} if deploy_cache is None else deploy_cache
    torch.manual_seed(args.seed)
    model = MODELS[config.model]().eval()
    pruner = ProxyPruner(model, example_inputs=torch.randn(1, 3, args.size, args.size), backend=config.backend,
                         batch_size=config.batch, profiler_settings=profiler_settings(args, config.variant),
                         max_kernel=args.max_kernel, cache_dir=cache_dir, progress=False, screen=None)
    t0 = time.perf_counter()
    lat = pruner.latency_model()
    table_s = time.perf_counter() - t0
    plans: dict[str, tuple[Plan, float | None]] = {"identity": (pruner.identity_plan(), None)}
    infeasible: dict[str, dict[str, Any]] = {}
    for budget in args.budgets:
        label = f"budget{budget:g}"
        try:
            plans[label] = (dp_plan(pruner, budget).plan, budget)
        except InfeasibleBudgetError as exc:
            infeasible[label] = {**config.label(), "table_backend": config.backend, "measure_backend": config.backend,
                                 "plan": label, "budget": budget, "infeasible": True,
                                 "min_predicted_ms": exc.min_latency_ms,
                                 "min_predicted_fraction": exc.min_latency_ms / lat.original_ms}
    t0 = time.perf_counter()
    if (config.model, None) not in deploy_cache:
        deploy_cache[config.model, None] = pruner.baseline()
    deployed: dict[str, nn.Module] = {"original": deploy_cache[config.model, None]}
    for label, (plan, _) in plans.items():
        if (config.model, plan) not in deploy_cache:
            deploy_cache[config.model, plan] = pruner.merge(pruner.apply(plan).eval())
        deployed[label] = deploy_cache[config.model, plan]
    merge_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    measured = compare_latency(pruner.profiler, deployed, pruner.example_inputs, rounds=args.rounds)
    measure_s = time.perf_counter() - t0
    rows = [plan_row(config, config.backend, label, plan, budget, lat, measured)
            for label, (plan, budget) in plans.items()]
    rows += infeasible.values()
    summary = {**config.label(), "input": [3, args.size, args.size], "max_kernel": args.max_kernel,
               "candidates": len(pruner.candidates), "chain_length": pruner.chain.length,
               "original_ms": lat.original_ms, "rest_ms": lat.rest_ms, "scale": getattr(lat, "scale", 1.0),
               "check_ms": lat.check_ms, "drift": lat.drift, "latency_check": _check_dict(lat),
               "table_s": round(table_s, 2), "merge_s": round(merge_s, 2), "measure_s": round(measure_s, 2),
               "signature": lat.signature}
    return summary, rows, Measured(config, pruner, deployed, plans)


def run_tensorrt(done: Measured, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The plans of a cuda configuration measured side by side in TensorRT (one engine per network and round)."""
    config, pruner = done.config, done.pruner
    profiler = get_profiler(TENSORRT_BACKEND, batch_size=config.batch, **profiler_settings(args, config.variant))
    measured = compare_latency(profiler, done.deployed, pruner.example_inputs, rounds=1)  # engines take seconds each
    lat = pruner.latency_model()
    return [plan_row(config, "tensorrt", label, plan, budget, lat, measured)
            for label, (plan, budget) in done.plans.items()]


def _check_dict(lat: LatencyModel) -> dict[str, Any] | None:
    """The latency model's own check on deployed networks, where this version of the library makes one."""
    check = getattr(lat, "check", None)
    return check.to_dict() if check is not None and hasattr(check, "to_dict") else None


def _caught(caught: list[warnings.WarningMessage]) -> list[str]:
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def errors_summary(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Median absolute relative error of the predicted latency and of the predicted speed-up over measured rows."""
    measured = [r for r in rows if "rel_error" in r]
    if not measured:
        return {"median_abs_rel_error": None, "median_abs_speedup_error": None}
    return {"median_abs_rel_error": statistics.median(abs(r["rel_error"]) for r in measured),
            "median_abs_speedup_error": statistics.median(abs(r["speedup_rel_error"]) for r in measured)}


def print_table(result: dict[str, Any]) -> None:
    head = (f"{'table/meas':<17} {'model':<13} {'batch':>5} {'variant':<8} {'plan':<10} {'blocks':>6} {'pred ms':>9} "
            f"{'meas ms':>9} {'err':>7} {'speed-up pred':>13} {'meas':>6} {'err':>7}")
    machine = result["machine"]
    print(f"\n{machine['device_name']} — torch {machine['torch']}, CUDA {machine['cuda']}")
    print(head)
    for r in result["rows"]:
        where = f"{r['table_backend']}/{r['measure_backend']}"
        if r.get("infeasible"):
            print(f"{where:<17} {r['model']:<13} {r['batch']:>5} {r['variant']:<8} {r['plan']:<10} infeasible: "
                  f"smallest predicted {r['min_predicted_fraction']:.0%} of the original")
            continue
        if "error" in r:
            print(f"{where:<17} {r['model']:<13} {r['batch']:>5} {r['variant']:<8} failed: {r['error']}")
            continue
        print(f"{where:<17} {r['model']:<13} {r['batch']:>5} {r['variant']:<8} {r['plan']:<10} {r['blocks']:>6} "
              f"{r['predicted_ms']:>9.3f} {r['measured_ms']:>9.3f} {r['rel_error']:>+7.1%} "
              f"{r['predicted_speedup']:>12.2f}x {r['measured_speedup']:>5.2f}x {r['speedup_rel_error']:>+7.1%}")
    for s in result["summary"]:
        if "error" in s:
            print(f"{s['backend']:<6} {s['model']:<13} b={s['batch']:<4} {s['variant']:<8} failed: {s['error']}")
        elif s.get("median_abs_rel_error") is not None:
            print(f"{s['backend']:<6} {s['model']:<13} b={s['batch']:<4} {s['variant']:<8} original "
                  f"{s['original_ms']:.3f} ms, median |err| {s['median_abs_rel_error']:.1%}, median |speed-up err| "
                  f"{s['median_abs_speedup_error']:.1%}, {s['seconds']:.0f} s")
    guard = result["time_guard"]
    if guard["stopped_early"]:
        print(f"time guard: stopped after {guard['elapsed_s']:.0f} s; skipped {len(guard['skipped'])} configuration(s)")
    if not result["tensorrt"]["available"]:
        print(f"TensorRT: {result['tensorrt']['note']}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to ``--out``) the result JSON."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no usable CUDA device (torch.cuda.is_available() is False); "
                         "use --device cpu to exercise the logic only")
    backend = args.device
    out = Path(args.out)
    guard = TimeGuard(args.max_seconds)
    trt = tensorrt_status(args)
    result: dict[str, Any] = {
        "benchmark": "gpu", "machine": machine_info(args), "tensorrt": trt,
        "settings": dict(vars(args)),
        "importance_proxy": "-(activations removed + convs removed) per candidate block (representative subset)",
        "summary": [], "rows": [], "time_guard": guard.summary()}

    def write() -> None:
        result["time_guard"] = guard.summary()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))

    configs = [Config(backend, m, b, v) for v in args.variants for b in args.batches for m in args.models]
    finished: list[Measured] = []
    deploy_cache: DeployCache = {}
    with contextlib.ExitStack() as stack:
        cache_dir = args.cache_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="lm_plugin_gpu_"))
        for config in configs:
            if not guard.allows(config):
                continue
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    summary, rows, done = run_config(config, args, cache_dir, deploy_cache)
            except Exception as exc:  # one configuration that fails (out of memory, say) must not lose the others
                traceback.print_exc()
                guard.record(config, time.perf_counter() - t0)
                result["summary"].append({**config.label(), "error": f"{type(exc).__name__}: {exc}",
                                          "seconds": round(time.perf_counter() - t0, 2)})
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                write()
                continue
            summary.update({"warnings": _caught(caught), "seconds": round(time.perf_counter() - t0, 2),
                            **errors_summary(rows)})
            guard.record(config, time.perf_counter() - t0)
            result["summary"].append(summary)
            result["rows"] += rows
            if trt["available"] and config.variant in TENSORRT_VARIANTS:
                finished.append(done)
            write()
            print(f"[{guard.elapsed():6.0f} s] {config.backend} {config.model} b={config.batch} {config.variant}: "
                  f"original {summary['original_ms']:.3f} ms, {len(rows)} rows",
                  flush=True)
        for done in finished:
            config = Config("tensorrt", done.config.model, done.config.batch, done.config.variant)
            if not guard.allows(config):
                continue
            t0 = time.perf_counter()
            rows, caught = [], []
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    rows = run_tensorrt(done, args)
            except Exception as exc:  # an engine that does not build must not lose the cuda rows
                rows = [{**done.config.label(), "table_backend": done.config.backend, "measure_backend": "tensorrt",
                         "error": f"{type(exc).__name__}: {exc}"}]
            result["rows"] += rows
            guard.record(config, time.perf_counter() - t0)
            result["summary"].append({**config.label(), "table_backend": done.config.backend,
                                      "original_ms": done.pruner.latency_model().original_ms,
                                      "seconds": round(time.perf_counter() - t0, 2), "warnings": _caught(caught),
                                      **errors_summary(rows)})
            write()
    write()
    print_table(result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
