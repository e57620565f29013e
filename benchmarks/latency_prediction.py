"""Predicted vs measured end-to-end latency of merged networks (CPU): per model, and per process state.

Two modes.

**Plans** (no ``--states``): for resnet18-, resnet34- and mobilenet_v2-style networks (torchvision architectures,
10 classes) at 3x64x64, the latency table is built once per batch size, then for several plans (the identity plan
and random valid plans of increasing compression) the deployed network is built with ``merge`` and measured with
the same profiler, interleaved with the uncompressed deploy form so both see the same machine state. Reported: per
plan the predicted and measured latency and their relative error, and the predicted vs measured speed-up over the
uncompressed network; per model the medians of both errors.

    python benchmarks/latency_prediction.py [--batches 1 16] [--plans 6] [--size 64]

**Process states** (``--states``, issue 34): does the table depend on what the process that built it did before?
For each model (``resnet_fm`` at 1x28x28 batch 64, torchvision ``mobilenet_v2(num_classes=10)`` at 3x64x64 batch
1), backend (``cpu``: eager PyTorch, ``onnxruntime``) and state, the table is built with a fresh cache folder, one
intra-op thread, in a new process that

- ``fresh``: builds it right away;
- ``trained``: first loads a Fashion-MNIST-sized training set (60000x1x28x28 float; the real one if it is on this
  machine, else random data of that size) and trains resnet_fm for 60 SGD steps at batch 128, keeps the data alive,
  then builds it (what ``compress``, the CLI and NNI trials do);
- ``nni_trial``: is a real NNI trial (``nni.experiment.Experiment('local')``, one trial, web server on 127.0.0.1)
  doing what ``trained`` does, reporting with ``nni.report_final_result``.

That process predicts the latency of the identity plan and of random plans from mild to aggressive (plans whose
blocks are all in the table) and saves their deployed networks and the deployed original (``torch.save``). The
*truth* is measured afterwards in another new process that does nothing else: every network side by side with the
original (:func:`lm_plugin.latency.compare_latency`), with the table's profiler settings (in a measurement worker,
or in that process with ``worker=None``), and also the other way, for reference. Reported per (model, backend,
where timed, state): median and max over the plans of |predicted - measured| / measured of the speed-up
(original / plan) and of the milliseconds, and the latency model's own self-check (``model.check``). resnet_fm on
``cpu`` is also run with ``worker=None`` (the table timed in the building process, as before the worker) in every
state: the "before" rows. The issue's goal: speed-up error median <= 5 %, max <= 15 %; ms error median <= 10 %.

    OMP_NUM_THREADS=1 python benchmarks/latency_prediction.py --states fresh trained nni_trial
    python benchmarks/latency_prediction.py --quick      # resnet_fm/cpu, small inputs, 2 plans: a few minutes

Writes ``benchmarks/results/latency_prediction_states.json`` (``--out``); ``--workdir`` keeps the tables, saved
networks and each process's log (default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm_plugin import LayerMergePruner, Plan  # noqa: E402

OUT = Path(__file__).parent / "results" / "latency_prediction.json"
STATES_OUT = Path(__file__).parent / "results" / "latency_prediction_states.json"
MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "resnet34": lambda: torchvision.models.resnet34(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
}


# ==================================================================================================== plans mode
def _write(summary: list, rows: list, args: argparse.Namespace, pruner: LayerMergePruner) -> None:
    prof = pruner.profiler.signature()
    result = {"machine": prof.get("device_name") or platform.processor(), "threads": prof.get("threads"),
              "torch": torch.__version__, "input": [3, args.size, args.size], "max_kernel": args.max_kernel,
              "summary": summary, "rows": rows}
    out = Path(args.out) if args.out else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


def plans_main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    rows, summary = [], []
    for name in args.models or list(MODELS):
        model = MODELS[name]().eval()
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size)
            pruner = LayerMergePruner(model, example_inputs=x, backend="cpu", max_kernel=args.max_kernel,
                                      cache_dir=args.cache_dir,
                                      profiler_settings={"warmup": 10, "repeats": 40, "threads": args.threads})
            lat = pruner.latency_model()
            plans = [("identity", Plan.identity(pruner.chain))]
            n_plans = args.plans if args.plans is not None else 6
            for i in range(n_plans):
                p_merge = 0.3 + 0.6 * i / max(1, n_plans - 1)
                plans.append((f"random{i}(merge={p_merge:.2f})",
                              Plan.sample(pruner.chain, 100 + i, p_merge=p_merge, p_drop=0.5,
                                          max_kernel=args.max_kernel)))
            errors, ratio_errors = [], []
            baseline = pruner.baseline()
            for label, plan in plans:
                predicted = pruner.predict_latency(plan)
                deployed = pruner.merge(pruner.apply(plan).eval())
                # Interleave plan and baseline so that both see the same machine state (shared, noisy CPUs).
                plan_ms, base_ms = [], []
                for _ in range(args.rounds or 3):
                    base_ms.append(pruner.measure_latency(baseline))
                    plan_ms.append(pruner.measure_latency(deployed))
                measured, measured_base = statistics.median(plan_ms), statistics.median(base_ms)
                err = (predicted - measured) / measured
                pred_speedup = lat.original_ms / predicted
                meas_speedup = measured_base / measured
                ratio_err = (pred_speedup - meas_speedup) / meas_speedup
                errors.append(abs(err))
                ratio_errors.append(abs(ratio_err))
                rows.append({"model": name, "batch": batch, "plan": label, "blocks": len(plan.blocks()),
                             "predicted_ms": predicted, "measured_ms": measured, "rel_error": err,
                             "measured_baseline_ms": measured_base, "predicted_speedup": pred_speedup,
                             "measured_speedup": meas_speedup, "speedup_rel_error": ratio_err})
                print(f"{name:<13} b={batch:<3} {label:<22} blocks={len(plan.blocks()):<3} "
                      f"pred={predicted:8.3f} ms  meas={measured:8.3f} ms  err={err:+6.1%}  "
                      f"speed-up pred={pred_speedup:.2f}x meas={meas_speedup:.2f}x err={ratio_err:+6.1%}",
                      flush=True)
            summary.append({"model": name, "batch": batch, "entries": len(pruner.candidates),
                            "original_ms": lat.original_ms, "rest_ms": lat.rest_ms,
                            "median_abs_rel_error": statistics.median(errors), "max_abs_rel_error": max(errors),
                            "median_abs_speedup_error": statistics.median(ratio_errors)})
            _write(summary, rows, args, pruner)  # after every model: an interrupted run keeps what it measured
    print(f"\n{'model':<13} {'batch':>5} {'entries':>8} {'original ms':>12} {'median |err|':>13} {'max |err|':>10} "
          f"{'median |speed-up err|':>22}")
    for s in summary:
        print(f"{s['model']:<13} {s['batch']:>5} {s['entries']:>8} {s['original_ms']:>12.3f} "
              f"{s['median_abs_rel_error']:>13.1%} {s['max_abs_rel_error']:>10.1%} "
              f"{s['median_abs_speedup_error']:>22.1%}")
    print(f"wrote {Path(args.out) if args.out else OUT}")


# =============================================================================================== states mode
STATES = ("fresh", "trained", "nni_trial")
BACKENDS = ("cpu", "onnxruntime")
#: model -> (input shape without batch, batch size); --quick: smaller.
STATE_MODELS: dict[str, dict[str, Any]] = {
    "resnet_fm": {"input": (1, 28, 28), "batch": 64, "quick_input": (1, 28, 28), "quick_batch": 8},
    "mobilenet_v2": {"input": (3, 64, 64), "batch": 1, "quick_input": (3, 32, 32), "quick_batch": 1},
}
#: The issue's goal.
GOAL = {"speedup_median": 0.05, "speedup_max": 0.15, "ms_median": 0.10}
#: The trained state: a Fashion-MNIST-sized training set, this many SGD steps at this batch size.
TRAIN_IMAGES, TRAIN_STEPS, TRAIN_BATCH = 60000, 60, 128
_KEEP: list[Any] = []  # what the trained state keeps alive while the table is built


def _state_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights in every process (timings do not depend on them; merging does)
    if name == "resnet_fm":
        from lm_plugin.workloads.models import resnet_fm

        return resnet_fm().eval()
    if name == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(num_classes=10).eval()
    raise SystemExit(f"unknown model {name!r}; states mode knows {', '.join(STATE_MODELS)}")


def _profiler_settings(job: dict[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = {"threads": 1}
    if job["quick"]:
        settings |= {"warmup": 3, "repeats": 10}
    if job["timed_in"] == "caller":
        settings["worker"] = None
    return settings


def _fashion_mnist_offline() -> Any:
    """The real training set if it is on this machine (never downloaded here), else None."""
    from lm_plugin.data import datasets as data

    raw = data.default_data_root() / "FashionMNIST" / "raw"
    local = all((raw / name).is_file() for name in data._FM_FILES) or all(
        (data.DEBIAN_FASHION_MNIST_DIR / f"{name}.gz").is_file() for name in data._FM_FILES)
    return data.fashion_mnist_tensors() if local else None


def _train_first(job: dict[str, Any]) -> dict[str, Any]:
    """The trained state: load the data, train resnet_fm for a few dozen steps, keep the data alive."""
    from torch.utils.data import DataLoader, TensorDataset

    from lm_plugin.workloads.models import resnet_fm

    start = time.perf_counter()
    dataset = _fashion_mnist_offline()
    if dataset is not None:
        source = "fashion_mnist (real, found on this machine)"
    else:
        source = (f"random: Fashion-MNIST is not on this machine (no download attempted), so {TRAIN_IMAGES} random "
                  "1x28x28 float images of the same size stand in")
        g = torch.Generator().manual_seed(0)
        dataset = TensorDataset(torch.randn(TRAIN_IMAGES, 1, 28, 28, generator=g),
                                torch.randint(0, 10, (TRAIN_IMAGES,), generator=g))
    loader = DataLoader(dataset, batch_size=TRAIN_BATCH, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    net = resnet_fm().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = 10 if job["quick"] else TRAIN_STEPS
    losses: list[float] = []
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if len(losses) == steps:
            break
    net.eval()
    _KEEP.extend([dataset, loader, net, opt])  # alive while the table is built, as in compress
    return {"data": source, "images": len(dataset), "steps": len(losses), "batch": TRAIN_BATCH,
            "loss_first": losses[0], "loss_last": losses[-1], "seconds": time.perf_counter() - start}


def _choose_plans(pruner: LayerMergePruner, lat: Any, count: int) -> list[dict[str, Any]]:
    """The identity plan and ``count`` seeded random plans from mild to aggressive, all of whose blocks are in the
    table (the same plans in every process: the chain and the seeds are)."""
    chain = pruner.chain
    identity = Plan.identity(chain)
    chosen = [{"label": "identity", "plan": identity, "seed": None, "p_merge": 0.0}]
    seen = {identity}
    for i in range(count):
        p_merge = 0.3 + 0.65 * i / max(1, count - 1)
        for attempt in range(100):
            seed = 1000 * (i + 1) + attempt
            plan = Plan.sample(chain, seed, p_merge=p_merge, p_drop=0.5, max_kernel=pruner.max_kernel)
            if plan not in seen and lat.covers(plan):
                seen.add(plan)
                chosen.append({"label": f"p{i}(merge={p_merge:.2f})", "plan": plan, "seed": seed,
                               "p_merge": p_merge})
                break
    return chosen


def build_role(job_path: Path) -> int:
    """A build process: set up the state, build the table, predict, save the deployed networks."""
    job = json.loads(job_path.read_text())
    out = Path(job["dir"])
    started = time.time()
    record: dict[str, Any] = {"pid": os.getpid(), "state": job["state"], "timed_in": job["timed_in"],
                              "code": _code_version(),
                              "maxrss_mb_start": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    nni_mod = None
    try:
        if job["state"] == "nni_trial":
            import nni

            nni_mod = nni
            record["nni"] = {"trial_id": nni.get_trial_id(), "experiment_id": nni.get_experiment_id(),
                             "parameters": nni.get_next_parameter(),
                             "output_dir": os.environ.get("NNI_OUTPUT_DIR")}
        if job["state"] in ("trained", "nni_trial"):
            record["training"] = _train_first(job)
        record["maxrss_mb_before_table"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        shape = (job["batch"], *job["input"])
        pruner = LayerMergePruner(_state_model(job["model"]), example_inputs=torch.randn(shape),
                                  backend=job["backend"], cache_dir=job["cache_dir"], progress=False,
                                  profiler_settings=_profiler_settings(job))
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lat = pruner.latency_model()
        record["table_seconds"] = time.perf_counter() - t
        record["warnings"] = [f"{w.category.__name__}: {str(w.message)[:400]}" for w in caught]
        worker = pruner.profiler.worker
        record["worker"] = worker.ping() if worker is not None else None
        record["signature"] = pruner.profiler.signature()
        record["entries"] = len(pruner.candidates)
        record["model"] = {"original_ms": lat.original_ms, "rest_ms": lat.rest_ms, "scale": lat.scale,
                           "check_ms": lat.check_ms, "drift": lat.drift,
                           "check": lat.check.to_dict() if lat.check is not None else None,
                           "check_summary": lat.check.summary() if lat.check is not None else None}
        plans = _choose_plans(pruner, lat, job["plans"])
        nets = {"original": pruner.baseline()}
        record["plans"] = []
        for p in plans:
            plan = p["plan"]
            predicted = pruner.predict_latency(plan)
            nets[p["label"]] = pruner.merge(pruner.apply(plan).eval())
            record["plans"].append({"label": p["label"], "seed": p["seed"], "p_merge": p["p_merge"],
                                    "blocks": len(plan.blocks()), "convs_kept": len(plan.kept_convs),
                                    "predicted_ms": predicted, "predicted_speedup": lat.original_ms / predicted,
                                    "plan": plan.to_dict()})
        torch.save(nets, out / "nets.pt")
        record["maxrss_mb_end"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record["seconds"] = time.time() - started
        if nni_mod is not None:
            nni_mod.report_final_result({"default": lat.original_ms, "table_seconds": record["table_seconds"]})
            record["nni"]["reported_final_result"] = True
        (out / "build.json").write_text(json.dumps(record, indent=1, default=str))
        return 0
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
        (out / "build.json").write_text(json.dumps(record, indent=1, default=str))
        traceback.print_exc()
        return 1


def truth_role(job_path: Path) -> int:
    """A truth process: load the saved networks, time them side by side with the original, both ways."""
    from lm_plugin.latency import compare_latency, get_profiler

    job = json.loads(job_path.read_text())
    out = Path(job["dir"])
    nets = torch.load(out / "nets.pt", weights_only=False)
    shape = (job["batch"], *job["input"])
    record: dict[str, Any] = {"pid": os.getpid(), "rounds": job["rounds"]}
    # First with the table's own settings, then the other way round.
    ways = [job["timed_in"], "caller" if job["timed_in"] == "worker" else "worker"]
    for way in ways:
        settings = _profiler_settings({**job, "timed_in": way})
        profiler = get_profiler(job["backend"], batch_size=job["batch"], **settings)
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ms = compare_latency(profiler, nets, shape, rounds=job["rounds"])
        record[way] = {"ms": ms, "seconds": time.perf_counter() - t,
                       "signature": profiler.signature(),
                       "warnings": [f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught]}
        if profiler.worker is not None:
            profiler.worker.close()
    (out / "truth.json").write_text(json.dumps(record, indent=1, default=str))
    return 0


def _run(command: list[str], log: Path, timeout: float) -> tuple[int | None, str]:
    """Run a child process with its output in ``log``; (exit code or None on timeout, tail of its log)."""
    with open(log, "w") as handle:
        try:
            code: int | None = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
                                              cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            code = None
    return code, log.read_text(errors="replace")[-1500:]


def _nni_build(job: dict[str, Any], job_path: Path, timeout: float) -> dict[str, Any]:
    """The build process as a real NNI trial: a one-trial experiment on the local training service."""
    from nni.experiment import ExperimentConfig

    from lm_plugin.nni.experiment import run_experiment

    config = ExperimentConfig("local")
    config.experiment_name = f"lm_plugin-latency-states-{job['name']}"
    config.trial_command = shlex.join([sys.executable, str(Path(__file__).resolve()), "--role", "build",
                                       "--job", str(job_path)])
    config.trial_code_directory = str(ROOT)
    config.trial_concurrency = 1
    config.max_trial_number = 1
    config.max_experiment_duration = f"{int(timeout // 60) + 5}m"
    config.search_space = {"state": {"_type": "choice", "_value": ["trained"]}}
    config.tuner.name = "GridSearch"
    config.training_service.use_active_gpu = False
    config.experiment_working_directory = str(Path(job["dir"]) / "nni")
    t = time.perf_counter()
    try:
        run = run_experiment(config, timeout_s=timeout)
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t}
    info = {"ok": all(s == "SUCCEEDED" for s in run.trials.values()) and bool(run.trials), "experiment_id": run.id,
            "status": run.status, "trials": run.trials, "listening": run.listening, "port": run.port,
            "directory": str(run.directory), "seconds": time.perf_counter() - t}
    if not info["ok"]:
        stderr = list(Path(run.directory).glob("trials/*/trial.stderr"))
        info["error"] = f"trial status {run.trials}" + (
            f"; stderr: {stderr[0].read_text(errors='replace')[-1000:]}" if stderr else "")
    return info


def _abs_rel(a: float, b: float) -> float:
    return abs(a - b) / b


def _evaluate(build: dict[str, Any], truth: dict[str, Any], way: str) -> dict[str, Any]:
    """Per-plan errors against the truth timed ``way`` (``worker`` or ``caller``)."""
    ms = truth[way]["ms"]
    rows = []
    for p in build["plans"]:
        measured, base = ms[p["label"]], ms["original"]
        speedup = base / measured
        rows.append({"label": p["label"], "blocks": p["blocks"], "predicted_ms": p["predicted_ms"],
                     "measured_ms": measured, "measured_original_ms": base,
                     "predicted_speedup": p["predicted_speedup"], "measured_speedup": speedup,
                     "ms_error": p["predicted_ms"] / measured - 1.0,
                     "speedup_error": p["predicted_speedup"] / speedup - 1.0})
    sp = [abs(r["speedup_error"]) for r in rows]
    me = [abs(r["ms_error"]) for r in rows]
    return {"truth_timed_in": way, "truth_original_ms": ms["original"],
            "speedup_error_median": statistics.median(sp), "speedup_error_max": max(sp),
            "ms_error_median": statistics.median(me), "ms_error_max": max(me),
            "goal_met": (statistics.median(sp) <= GOAL["speedup_median"] and max(sp) <= GOAL["speedup_max"]
                         and statistics.median(me) <= GOAL["ms_median"]),
            "plans": rows}


def _run_job(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    folder = Path(job["dir"])
    folder.mkdir(parents=True, exist_ok=True)
    Path(job["cache_dir"]).mkdir(parents=True, exist_ok=True)
    job_path = folder / "job.json"
    job_path.write_text(json.dumps(job, indent=1))
    me = [sys.executable, str(Path(__file__).resolve())]
    result: dict[str, Any] = {k: job[k] for k in ("model", "backend", "timed_in", "state")}
    result["load_before"] = os.getloadavg()
    t = time.perf_counter()
    if job["state"] == "nni_trial":
        result["nni"] = _nni_build(job, job_path, timeout)
        code, tail = (0 if result["nni"]["ok"] else 1), result["nni"].get("error", "")
    else:
        code, tail = _run(me + ["--role", "build", "--job", str(job_path)], folder / "build.log", timeout)
    result["build_wall_s"] = time.perf_counter() - t
    build_file = folder / "build.json"
    build = json.loads(build_file.read_text()) if build_file.is_file() else None
    if build is None or code != 0 or "error" in build:
        why = "timed out" if code is None else f"exit code {code}"
        result["error"] = f"build process failed ({why}): " + (build or {}).get("error", tail[-800:])
        return result
    result["build"] = build
    code, tail = _run(me + ["--role", "truth", "--job", str(job_path)], folder / "truth.log", timeout)
    truth_file = folder / "truth.json"
    if code != 0 or not truth_file.is_file():
        why = "timed out" if code is None else f"exit code {code}"
        result["error"] = f"truth process failed ({why}): {tail[-800:]}"
        return result
    truth = json.loads(truth_file.read_text())
    result["truth"] = truth
    result["load_after"] = os.getloadavg()
    result["vs_truth"] = _evaluate(build, truth, job["timed_in"])  # truth timed the table's way
    other = "caller" if job["timed_in"] == "worker" else "worker"
    result["vs_other_truth"] = _evaluate(build, truth, other)
    return result


def _summary_row(r: dict[str, Any]) -> dict[str, Any]:
    row = {k: r[k] for k in ("model", "backend", "timed_in", "state")}
    if "error" in r:
        return row | {"error": r["error"]}
    b, v, o = r["build"], r["vs_truth"], r["vs_other_truth"]
    check = b["model"]["check"] or {}
    return row | {
        "table_original_ms": b["model"]["original_ms"], "truth_original_ms": v["truth_original_ms"],
        "rest_ms": b["model"]["rest_ms"], "scale": b["model"]["scale"], "plans": len(b["plans"]),
        "speedup_error_median": v["speedup_error_median"], "speedup_error_max": v["speedup_error_max"],
        "ms_error_median": v["ms_error_median"], "ms_error_max": v["ms_error_max"], "goal_met": v["goal_met"],
        "other_truth": {"timed_in": o["truth_timed_in"], "original_ms": o["truth_original_ms"],
                        "speedup_error_median": o["speedup_error_median"], "speedup_error_max": o["speedup_error_max"],
                        "ms_error_median": o["ms_error_median"], "ms_error_max": o["ms_error_max"]},
        "self_check": {"summary": b["model"]["check_summary"], "ms_error_median": check.get("ms_error_median"),
                       "ms_error_max": check.get("ms_error_max"), "speedup_error_max": check.get("speedup_error_max")},
        "table_seconds": b["table_seconds"], "build_warnings": len(b["warnings"]),
        "code_sources_sha1": b["code"]["sources_sha1"]}


def _print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'model':<13}{'backend':<12}{'timed in':<9}{'state':<10}{'orig ms':>8}{'truth':>8}"
            f"{'spd med':>9}{'spd max':>9}{'ms med':>8}{'ms max':>8}{'chk ms med':>11}{'chk ms max':>11}"
            f"{'goal':>6}   other truth: spd med/max, ms med")
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        lead = f"{r['model']:<13}{r['backend']:<12}{r['timed_in']:<9}{r['state']:<10}"
        if "error" in r:
            print(lead + "  FAILED: " + r["error"].replace("\n", " ")[:150])
            continue
        c, o = r["self_check"], r["other_truth"]
        chk = (f"{c['ms_error_median']:>11.1%}{c['ms_error_max']:>11.1%}" if c["ms_error_median"] is not None
               else f"{'-':>11}{'-':>11}")
        print(lead + f"{r['table_original_ms']:>8.2f}{r['truth_original_ms']:>8.2f}"
              f"{r['speedup_error_median']:>9.1%}{r['speedup_error_max']:>9.1%}{r['ms_error_median']:>8.1%}"
              f"{r['ms_error_max']:>8.1%}" + chk + f"{'yes' if r['goal_met'] else 'no':>6}   "
              f"{o['timed_in']}: {o['speedup_error_median']:.1%}/{o['speedup_error_max']:.1%}, "
              f"{o['ms_error_median']:.1%}")


def _code_version() -> dict[str, Any]:
    """Which lm_plugin timed: a hash of its sources (every process records it: a run whose code changed under it
    shows), and the git commit when the script runs from a checkout (LM_STATES_COMMIT names it otherwise)."""
    import hashlib

    import lm_plugin

    package = Path(lm_plugin.__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + path.read_bytes())
    commit = os.environ.get("LM_STATES_COMMIT")
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"package": str(package), "sources_sha1": digest.hexdigest()[:16], "commit": commit}


def _machine() -> str:
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def states_main(args: argparse.Namespace) -> None:
    models = args.models or (["resnet_fm"] if args.quick else list(STATE_MODELS))
    backends = args.backends or (["cpu"] if args.quick else list(BACKENDS))
    states = args.states or list(STATES)
    for name, allowed, given in (("model", STATE_MODELS, models), ("backend", BACKENDS, backends),
                                 ("state", STATES, states)):
        bad = [g for g in given if g not in allowed]
        if bad:
            raise SystemExit(f"unknown {name} {bad}; choose from {list(allowed)}")
    n_plans = args.plans if args.plans is not None else (2 if args.quick else 6)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    out = Path(args.out) if args.out else STATES_OUT
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lm_latency_states-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    meta = {
        "command": shlex.join(["python", "benchmarks/latency_prediction.py", *sys.argv[1:]]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": _machine(), "cpus": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__, "onnxruntime": ort_version, "threads": 1, "code": _code_version(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "LM_PLUGIN_WORKER")},
        "quick": args.quick, "plans": n_plans, "truth_rounds": rounds,
        "inputs": {m: {"input": list(STATE_MODELS[m]["quick_input" if args.quick else "input"]),
                       "batch": STATE_MODELS[m]["quick_batch" if args.quick else "batch"]} for m in models},
        "trained_state": {"images": TRAIN_IMAGES, "steps": 10 if args.quick else TRAIN_STEPS, "batch": TRAIN_BATCH},
        "goal": GOAL,
        "notes": [
            "Shared machine: 2 CPU cores; the other core was (or may have been) busy with other work (tests, "
            "builds) throughout; see load_before/load_after (1/5/15-minute load averages) of each row.",
            "speed-up = original / plan. Predicted: the table's original_ms / predict_latency(plan) (a budget's "
            "meaning). Measured: the truth process's side-by-side timing (compare_latency) of the deployed original "
            "and the plan's deployed network.",
            "truth: a new process that only loads the saved deployed networks and times them, first with the "
            "table's settings (in a fresh measurement worker, or in that process for worker=None), then the other "
            "way ('other truth').",
            "Every table is built with a fresh, empty cache folder, by the process of its state.",
        ],
    }
    jobs = []
    for model in models:
        for backend in backends:
            for state in states:
                ways = ["worker"] + (["caller"] if args.before and model == "resnet_fm" and backend == "cpu" else [])
                for way in ways:
                    name = f"{model}-{backend}-{way}-{state}"
                    jobs.append({"name": name, "model": model, "backend": backend, "state": state, "timed_in": way,
                                 "quick": args.quick, "plans": n_plans, "rounds": rounds,
                                 "input": list(STATE_MODELS[model]["quick_input" if args.quick else "input"]),
                                 "batch": STATE_MODELS[model]["quick_batch" if args.quick else "batch"],
                                 "dir": str(work / name), "cache_dir": str(work / name / "cache")})
    results, rows = [], []
    start = time.time()
    try:
        for i, job in enumerate(jobs, 1):
            if Path(job["dir"]).exists():
                shutil.rmtree(job["dir"])  # a fresh cache: the state's process must build the table
            print(f"[{i}/{len(jobs)}] {job['name']} ...", flush=True)
            t = time.perf_counter()
            result = _run_job(job, args.timeout)
            result["wall_s"] = time.perf_counter() - t
            results.append(result)
            rows.append(_summary_row(result))
            r = rows[-1]
            if "error" in r:
                print(f"    FAILED ({result['wall_s']:.0f} s): {r['error'][:300]}", flush=True)
            else:
                print(f"    {result['wall_s']:.0f} s: table original {r['table_original_ms']:.3f} ms, truth "
                      f"{r['truth_original_ms']:.3f} ms; speed-up error median {r['speedup_error_median']:.1%} max "
                      f"{r['speedup_error_max']:.1%}; ms error median {r['ms_error_median']:.1%} max "
                      f"{r['ms_error_max']:.1%}; self-check: {r['self_check']['summary']}", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            meta["seconds"] = time.time() - start
            out.write_text(json.dumps({**meta, "summary": rows, "runs": results}, indent=1, default=str))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    _print_table(rows)
    print(f"\n{time.time() - start:.0f} s; wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=None,
                    help="plans mode: resnet18 resnet34 mobilenet_v2; states mode: resnet_fm mobilenet_v2")
    ap.add_argument("--plans", type=int, default=None,
                    help="random plans per model, plus the identity plan (default 6; --quick: 2)")
    ap.add_argument("--out", default=None, help="the JSON file to write")
    ap.add_argument("--rounds", type=int, default=None,
                    help="measurement rounds per plan (plans mode, default 3) / side-by-side truth rounds (states "
                         "mode, default 3; --quick: 1)")
    # plans mode
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="plans mode: batch sizes")
    ap.add_argument("--size", type=int, default=64, help="plans mode: input side")
    ap.add_argument("--max-kernel", type=int, default=5, help="plans mode: largest merged kernel")
    ap.add_argument("--cache-dir", default=str(Path(__file__).parent / "results" / "cache"), help="plans mode")
    ap.add_argument("--threads", type=int, default=None, help="plans mode: CPU threads (default: torch default)")
    # states mode
    ap.add_argument("--states", nargs="*", default=None,
                    help=f"process states mode: any of {' '.join(STATES)} (no value: all)")
    ap.add_argument("--backends", nargs="+", default=None, help="states mode: cpu onnxruntime (default: both)")
    ap.add_argument("--quick", action="store_true",
                    help="states mode, tiny: resnet_fm/cpu at batch 8, 2 plans, short timing, 10 training steps")
    ap.add_argument("--no-before", dest="before", action="store_false",
                    help="states mode: skip the worker=None rows of resnet_fm/cpu")
    ap.add_argument("--workdir", default=None,
                    help="states mode: keep tables, saved networks and logs here (default: a temporary folder)")
    ap.add_argument("--timeout", type=float, default=2400.0,
                    help="states mode: seconds a build or truth process (or NNI experiment) may take")
    # internal: the processes of one (model, backend, state)
    ap.add_argument("--role", choices=["build", "truth"], help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "build":
        sys.exit(build_role(Path(args.job)))
    if args.role == "truth":
        sys.exit(truth_role(Path(args.job)))
    if args.states is not None or args.quick or args.backends:
        states_main(args)
    else:
        plans_main(args)


if __name__ == "__main__":
    main()
