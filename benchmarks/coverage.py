"""Zoo coverage: what LayerMerge accepts, compresses and merges exactly, over torchvision, timm and PyPI models.

Every model runs in its own subprocess with a wall-clock timeout and a memory limit, so one model can never take
the machine down. Per model: the chain statistics of :func:`lm_plugin.inspect.inspect_model`, the float64 merge
error (``merge_error(trainable, pruner.merge, x)``) of the identity plan and of ``--plans`` random plans
(``Plan.sample(chain, seed)``), and the identity plan's merged network against the original model (float64).

Status: ``exact`` (every error <= 1e-10), ``WRONG`` (some error above it: a silent miscompile),
``merge_refused`` (``pruner.merge`` raised ``MergeError``: a failure the library detected), ``refused``
(construction raised a ``LayerMergeError``: untraceable, no chain ...), ``error`` (any other exception),
``timeout`` and ``oom``.

    python benchmarks/coverage.py                          # everything; writes the JSON and docs/coverage.md
    python benchmarks/coverage.py --zoo timm --models 'resnet|regnet' --plans 1
    python benchmarks/coverage.py --docs-only               # regenerate docs/coverage.md from the JSON

Results are merged into ``benchmarks/results/coverage.json`` by model (a filtered run updates its models and
keeps the others; ``--fresh`` starts over), so an interrupted survey can be resumed with ``--resume``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import gc
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "results" / "coverage.json"
DOCS = ROOT / "docs" / "coverage.md"
EXACT = 1e-10
STATUSES = ("exact", "WRONG", "merge_refused", "refused", "error", "timeout", "oom")
OOM_MARKERS = ("can't allocate memory", "Cannot allocate memory", "std::bad_alloc", "MemoryError",
               "out of memory", "not enough memory")


# ---------------------------------------------------------------------------------------------------- worker
def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(m in str(exc) for m in OOM_MARKERS)


def _fmt_exc(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Recorder:
    """The worker's record, rewritten to disk after every stage (a timed-out run still says how far it got)."""

    def __init__(self, path: Path, **fields: Any) -> None:
        self.path, self.data = path, dict(fields)

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.data["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=str))
        tmp.replace(self.path)


def _finite(x: float | None) -> bool:
    return x is not None and not math.isnan(x) and x <= EXACT


def _status(rec: dict[str, Any]) -> tuple[str, str]:
    """Overall status and reason of a finished construction + plan checks."""
    plans = rec.get("plans", [])
    wrong = [p for p in plans if "merge_error" in p and not _finite(p["merge_error"])]
    wrong += [p for p in plans if "original_error" in p and not _finite(p["original_error"])
              and p not in wrong]
    if wrong:
        parts = []
        for p in wrong:
            errs = [f"{k.replace('_error', '')} {p[k]:.2e}" for k in ("merge_error", "original_error", "rewrite_error")
                    if p.get(k) is not None]
            parts.append(f"plan {p['plan']}: " + ", ".join(errs))
        return "WRONG", "; ".join(parts)
    refused = [p for p in plans if "merge_refused" in p]
    if refused:
        return "merge_refused", _grouped((p["plan"], p["merge_refused"]) for p in refused)
    failed = [p for p in plans if "exception" in p]
    if failed:
        return "error", _grouped((p["plan"], f"({p.get('stage', '?')}) {p['exception']}") for p in failed)
    return "exact", ""


def _grouped(items) -> str:
    """``plans identity, random0: <message>; plan random1: <other message>`` (one message per distinct text)."""
    by_text: dict[str, list[str]] = {}
    for label, text in items:
        by_text.setdefault(text, []).append(label)
    return "; ".join(f"plan{'s' if len(labels) > 1 else ''} {', '.join(labels)}: {text}"
                     for text, labels in by_text.items())


def run_worker(key: str, side: int, n_plans: int, record: Path, threads: int) -> None:
    """Build one model, construct the pruner, check the identity plan and ``n_plans`` random plans."""
    import torch

    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings("ignore")
    from lm_plugin import LayerMergePruner, Plan
    from lm_plugin.errors import LayerMergeError, MergeError
    from lm_plugin.inspect import CompressibilityReport
    from lm_plugin.merge import merge_error, output_error
    from lm_plugin.workloads.zoo import zoo_models

    spec = next(m for m in zoo_models(key.split(":", 1)[0]) if m.key == key)
    rec = Recorder(record, key=key, zoo=spec.zoo, name=spec.name, family=spec.family, size=side, stage="build",
                   plans=[])
    rec.update()
    t0 = time.perf_counter()
    try:
        model = spec.build(side)
    except Exception as exc:  # the survey reports whatever happens
        rec.update(status="oom" if _is_oom(exc) else "error", reason=f"building the model: {_fmt_exc(exc)}",
                   traceback=_tail(traceback.format_exc()))
        return
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    rec.update(build_s=time.perf_counter() - t0, params=params, stage="construct")

    t0 = time.perf_counter()
    try:
        pruner = LayerMergePruner(model, 0.7, x, cache_dir=None, progress=False)
    except LayerMergeError as exc:
        report = CompressibilityReport.from_refusal(model, x, exc, time.perf_counter() - t0)
        rec.update(**_report_fields(report), status="refused", reason=_fmt_exc(exc))
        return
    except Exception as exc:
        rec.update(status="oom" if _is_oom(exc) else "error", reason=f"constructing the pruner: {_fmt_exc(exc)}",
                   traceback=_tail(traceback.format_exc()), construct_s=time.perf_counter() - t0)
        return
    report = CompressibilityReport.from_pruner(pruner, time.perf_counter() - t0, model)
    rec.update(**_report_fields(report), stage="plans")

    plans: list[dict[str, Any]] = []
    todo: list[tuple[str, Any]] = [("identity", lambda: Plan.identity(pruner.chain))]
    todo += [(f"random{seed}", lambda seed=seed: Plan.sample(pruner.chain, seed)) for seed in range(n_plans)]
    for label, make in todo:
        entry: dict[str, Any] = {"plan": label}
        plans.append(entry)
        rec.update(stage=f"plan {label}", plans=plans)
        t0 = time.perf_counter()
        stage = "sample"
        try:
            plan = make()
            entry.update(blocks=len(plan.blocks()), removed_acts=len(plan.removed_acts),
                         dropped_convs=len(plan.dropped_convs))
            stage = "apply"
            trainable = pruner.apply(plan)
            captured: dict[str, Any] = {}

            def merge_fn(m, captured=captured):
                captured["merged"] = out = pruner.merge(m)
                return out

            stage = "merge"
            entry["merge_error"] = merge_error(trainable, merge_fn, x)
            if label == "identity":
                stage = "compare with the original"
                # merge_error merged a float64 copy, so the merged network is float64: compare it with a float64
                # copy of the original (output_error copies both, in eval mode).
                entry["original_error"] = output_error(model, captured["merged"], x, dtype=torch.float64)
                if not _finite(entry["original_error"]):  # diagnosis: is the trainable form already different?
                    captured.clear()
                    entry["rewrite_error"] = output_error(model, trainable, x, dtype=torch.float64)
        except MergeError as exc:
            entry["merge_refused"] = _fmt_exc(exc)
        except Exception as exc:
            if _is_oom(exc):
                entry["oom"] = _fmt_exc(exc)
            entry.update(exception=_fmt_exc(exc), stage=stage, traceback=_tail(traceback.format_exc()))
        entry["seconds"] = time.perf_counter() - t0
        entry["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        trainable = captured = None  # type: ignore[assignment]
        gc.collect()
        rec.update(plans=plans)
    status, reason = _status(rec.data)
    if status == "error" and any("oom" in p for p in plans):
        status = "oom"
    rec.update(status=status, reason=reason, stage="done")


def _report_fields(report) -> dict[str, Any]:
    return {"conv_modules": report.conv_modules, "conv_calls": report.conv_calls, "chain_convs": report.chain_convs,
            "removable_acts": report.removable_activations, "prunable": report.prunable_convs,
            "residuals": report.residuals, "candidates": report.candidates, "construct_s": report.seconds,
            "breaks": dict(report.break_categories), "break_summary": report.break_summary(),
            "break_reasons": dict(Counter(r for _, r in report.break_reasons).most_common()),
            "notes": list(report.notes), "refusal_type": report.refusal_type}


# ---------------------------------------------------------------------------------------------------- parent
def _limits(memory_bytes: int) -> None:
    # RLIMIT_DATA bounds the heap and private anonymous mappings, which is where tensors live (it tracks RSS);
    # RLIMIT_AS (virtual size: torch alone maps ~3.5 GB of libraries) is set well above it as a backstop.
    resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    backstop = memory_bytes + 8 * 1024**3
    resource.setrlimit(resource.RLIMIT_AS, (backstop, backstop))
    os.setpgrp()


def run_one(spec, side: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one model in a subprocess and return its record (status filled in whatever happened)."""
    with tempfile.TemporaryDirectory(prefix="lm_coverage_") as tmp:
        record = Path(tmp) / "record.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", spec.key, "--size", str(side),
               "--plans", str(args.plans), "--record", str(record), "--threads", str(args.threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
        memory = int(args.memory_gb * 1024**3)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=lambda: _limits(memory))
        timed_out = False
        try:
            out, err = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)
            out, err = proc.communicate()
        wall = time.perf_counter() - t0
        rec: dict[str, Any] = {"key": spec.key, "zoo": spec.zoo, "name": spec.name, "family": spec.family,
                               "size": side, "plans": []}
        if record.exists():
            try:
                rec.update(json.loads(record.read_text()))
            except json.JSONDecodeError:
                pass
    rec.update(wall_s=wall, returncode=proc.returncode, timeout=args.timeout, memory_gb=args.memory_gb)
    if timed_out:
        rec["status"] = "timeout"
        rec["reason"] = f"no result after {args.timeout:g} s (stage: {rec.get('stage', 'start')})"
    elif not rec.get("status"):  # the worker died without a verdict (killed, crashed)
        text = err or out or ""
        if any(m in text for m in OOM_MARKERS) or proc.returncode == -9:
            rec["status"] = "oom"
            rec["reason"] = (f"killed (exit {proc.returncode}) at stage {rec.get('stage', 'start')} under the "
                             f"{args.memory_gb:g} GB limit")
        else:
            rec["status"] = "error"
            rec["reason"] = f"worker exited with status {proc.returncode} at stage {rec.get('stage', 'start')}"
        rec["stderr"] = _tail(text, 20)
    if rec["status"] == "oom" and "memory limit" not in rec.get("reason", ""):
        rec["reason"] = f"{rec.get('reason', '')} (memory limit {args.memory_gb:g} GB)".strip()
    return rec


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _git() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        # this script's own outputs change while it runs; they do not make the measured code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                f":!{OUT.relative_to(ROOT)}", f":!{DOCS.relative_to(ROOT)}"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + uncommitted changes' if dirty else ''}" if head else "unknown"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "timm", "efficientnet-lite-pytorch", "lm-plugin"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _load(path: Path) -> dict[str, Any]:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    return {"models": {}}


def _save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def _err(p: dict[str, Any], key: str) -> str:
    v = p.get(key)
    return "—" if v is None else f"{v:.1e}"


def _worst(rec: dict[str, Any]) -> float | None:
    errs = [p[k] for p in rec.get("plans", []) for k in ("merge_error", "original_error") if p.get(k) is not None]
    return max(errs, key=lambda e: math.inf if math.isnan(e) else e) if errs else None


def table_rows(models: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in models:
        worst = _worst(r)
        rows.append([r["name"], str(r.get("size", "")), _n(r.get("conv_calls") or r.get("conv_modules")),
                     _n(r.get("chain_convs")), _n(r.get("removable_acts")), _n(r.get("prunable")),
                     _n(r.get("candidates")), _s(r.get("construct_s")), r.get("status", "?"),
                     "—" if worst is None else f"{worst:.0e}"])
    return rows


def _n(v: Any) -> str:
    return "—" if v is None else str(v)


def _s(v: Any) -> str:
    return "—" if v is None else f"{v:.2f}"


HEAD = ["model", "side", "convs", "chain", "removable acts", "prunable", "candidates", "construct s", "status",
        "worst err"]


def print_table(models: list[dict[str, Any]]) -> None:
    rows = table_rows(models)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEAD)]
    print("  ".join(h.ljust(w) for h, w in zip(HEAD, widths)))
    for zoo in ("torchvision", "timm", "pypi"):
        for rec, row in zip(models, rows):
            if rec["zoo"] == zoo:
                print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    bad = [r for r in models if r.get("status") not in ("exact", "refused")]
    if bad:
        print("\nnot exact:")
        for r in bad:
            print(f"  {r['key']}: {r.get('status')}: {_short(r.get('reason', ''), 400)}")


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_docs(data: dict[str, Any], path: Path) -> None:
    """``docs/coverage.md``: a summary and one table per zoo."""
    models = sorted(data["models"].values(), key=lambda r: (("torchvision", "timm", "pypi").index(r["zoo"]),
                                                            r["name"]))
    counts = {s: sum(r.get("status") == s for r in models) for s in STATUSES}
    meta = dict(data.get("meta", {}))
    # The limits most models ran under (a rerun of a few models with more memory does not change them).
    for key, default in (("memory_gb", 6.0), ("timeout", 120.0)):
        seen = Counter(r.get(key, default) for r in models)
        meta[key] = seen.most_common(1)[0][0] if seen else default
    runs = meta.get("runs") or [meta.get("command", "python benchmarks/coverage.py")]
    lines = [
        "# Model zoo coverage",
        "",
        "What LayerMerge accepts and merges exactly across the torchvision classifiers, a selection of timm models "
        "and EfficientNet-Lite0 from PyPI. Produced by `benchmarks/coverage.py` (the CI-sized version is "
        "`tests/test_zoo.py`); the raw results, with every break reason and error message, are in "
        "`benchmarks/results/coverage.json`.",
        "",
        f"**{len(models)} models:** " + ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]) + ".",
        "",
        "* command" + ("s (in this order; a filtered run updates its models)" if len(runs) > 1 else "") + ": "
        + "; ".join(f"`{c}`" for c in runs),
        f"* machine: {meta.get('machine', '?')}; date: {meta.get('date', '?')}; code: {meta.get('git', '?')}",
        "* versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
        f"* settings: input 1×3×side×side (side {meta.get('size', 64)} or the smallest the model accepts), "
        f"num_classes 10, seeded random init with randomised BatchNorm statistics (the PyPI model is pretrained), "
        f"identity plan + {meta.get('plans', 3)} random plans (`Plan.sample(chain, seed)`), float64 errors, "
        f"timeout {meta.get('timeout', 120):g} s and memory limit {meta.get('memory_gb', 6):g} GB per model "
        "(each model runs in its own process).",
        "",
        "Status: **exact** — the identity plan's merged network equals the original and every plan's merged "
        f"network equals its trainable form (float64 relative error ≤ {EXACT:g}); **WRONG** — some error above "
        "that (a silent miscompile); **merge_refused** — `pruner.merge` raised `MergeError` (a failure the "
        "library detected); **refused** — the pruner refused the model at construction (`LayerMergeError`, "
        "with the reason); **error** — any other exception; **timeout**, **oom** — the per-model limits. The "
        "check holds the model, the pruner's copy, the trainable form and float64 copies of the trainable and "
        "merged networks at once, about 7× the float32 weights (plus the merge's own check), so **oom** is "
        "this survey's limit, not what `merge` needs on its own.",
        "",
        "Columns: *convs* — conv call sites in the traced graph (conv modules when tracing failed); *chain* — "
        "convs on the chain; *removable acts* — activations a plan may remove; *prunable* — convs a plan may "
        "drop; *candidates* — candidate blocks of the search; *construct s* — tracing, chain extraction and "
        "candidate enumeration; *worst err* — the largest float64 error over the plans (and the identity plan "
        "against the original); *breaks* — why the chain is cut where it is.",
        "",
    ]
    titles = {"torchvision": "torchvision (`torchvision.models.list_models(module=torchvision.models)`)",
              "timm": "timm (`timm.create_model(name, pretrained=False, num_classes=10)`)",
              "pypi": "PyPI"}
    for zoo in ("torchvision", "timm", "pypi"):
        rows = [r for r in models if r["zoo"] == zoo]
        if not rows:
            continue
        lines += [f"## {titles[zoo]}", "",
                  "| model | side | convs | chain | removable acts | prunable | candidates | construct s | exact | "
                  "breaks |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for r, row in zip(rows, table_rows(rows)):
            status = r.get("status", "?")
            if status == "exact":
                verdict = "yes"
                if r.get("memory_gb") != meta.get("memory_gb") or r.get("timeout") != meta.get("timeout"):
                    verdict += f" (with {r.get('memory_gb'):g} GB, {r.get('timeout'):g} s)"
            elif status == "refused":
                verdict = f"refused: {_md(_short(r.get('reason', ''), 160))}"
            else:
                verdict = f"**{status}**: {_md(_short(r.get('reason', ''), 200))}"
                if status in ("oom", "timeout"):
                    verdict += f" (limits {r.get('memory_gb'):g} GB, {r.get('timeout'):g} s)"
            for e in r.get("earlier", []):
                verdict += f"; earlier {e.get('status')} with {e.get('memory_gb'):g} GB, {e.get('timeout'):g} s"
            breaks = _md(r.get("break_summary", "")) if status != "refused" else ""
            lines.append("| " + " | ".join([f"`{r['name']}`", *row[1:8], verdict, breaks]) + " |")
        lines.append("")
    failures = [r for r in models if r.get("status") not in ("exact", "refused")]
    if failures:
        lines += ["## Failures in detail", ""]
        for r in failures:
            lines += [f"### `{r['key']}` — {r.get('status')}", "", _md(r.get("reason", "")), ""]
            tb = r.get("traceback") or r.get("stderr") or next(
                (p.get("traceback") for p in r.get("plans", []) if p.get("traceback")), None)
            if tb:
                lines += ["```text", tb.strip(), "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", default="all", choices=["torchvision", "timm", "pypi", "all"])
    parser.add_argument("--models", help="only models whose name contains this, or matches it as a regex")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per model (default 120)")
    parser.add_argument("--memory-gb", type=float, default=6.0, help="memory limit per model in GB (default 6)")
    parser.add_argument("--plans", type=int, default=3, help="random plans per model (default 3)")
    parser.add_argument("--size", type=int, default=64, help="input side (default 64; raised where a model "
                        "needs more)")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model (default 1)")
    parser.add_argument("--output", type=Path, default=OUT, help=f"results JSON (default {OUT.relative_to(ROOT)})")
    parser.add_argument("--docs", type=Path, default=DOCS, help=f"markdown page (default {DOCS.relative_to(ROOT)})")
    parser.add_argument("--fresh", action="store_true", help="discard earlier results in the JSON")
    parser.add_argument("--resume", action="store_true", help="skip models the JSON already has")
    parser.add_argument("--docs-only", action="store_true", help="only regenerate the page from the JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        run_worker(args.worker, args.size, args.plans, args.record, args.threads)
        return 0
    data = {"models": {}} if args.fresh else _load(args.output)
    if args.docs_only:
        write_docs(data, args.docs)
        print(f"wrote {args.docs}")
        return 0

    from lm_plugin.workloads.zoo import select, zoo_models

    specs = select(zoo_models(args.zoo), args.models)
    if args.resume:
        specs = [s for s in specs if s.key not in data["models"]]
    if not specs:
        print("no models selected")
        return 1
    command = shlex.join(["python", "benchmarks/coverage.py", *(argv if argv is not None else sys.argv[1:])])
    runs = data.get("meta", {}).get("runs", [])
    data["meta"] = {"command": command, "runs": [*runs, command][-20:], "machine": _machine(),
                    "date": datetime.date.today().isoformat(), "versions": _versions(), "git": _git(),
                    "size": args.size, "plans": args.plans, "timeout": args.timeout, "memory_gb": args.memory_gb,
                    "threads": args.threads, "jobs": args.jobs}
    print(f"{len(specs)} models, timeout {args.timeout:g} s, memory {args.memory_gb:g} GB, jobs {args.jobs}",
          flush=True)
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, s, s.side(args.size), args): s for s in specs}
        for i, fut in enumerate(cf.as_completed(futures), 1):
            rec = fut.result()
            old = data["models"].get(rec["key"])
            if old and (old.get("memory_gb"), old.get("timeout")) != (rec.get("memory_gb"), rec.get("timeout")):
                # A rerun with other limits (say more memory for an oom) keeps what the earlier run found.
                rec["earlier"] = [*old.get("earlier", []), {k: old.get(k) for k in (
                    "status", "reason", "memory_gb", "timeout", "peak_rss_mb", "wall_s")}]
            data["models"][rec["key"]] = rec
            _save(args.output, data)
            print(f"[{i}/{len(specs)}] {rec['key']:<40} {rec.get('status', '?'):<13} {rec.get('wall_s', 0):6.1f} s  "
                  f"{_short(rec.get('reason', ''), 160)}", flush=True)
    data["meta"]["total_s"] = time.perf_counter() - started
    _save(args.output, data)
    write_docs(data, args.docs)
    print()
    print_table([data["models"][s.key] for s in specs])
    print(f"\nwrote {args.output} and {args.docs} ({data['meta']['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
