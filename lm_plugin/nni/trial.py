"""One NNI trial of LayerMerge: ``python -m lm_plugin.nni.trial --model SPEC --data NAME [options]``.

The trial reads its settings from ``nni.get_next_parameter()`` (a search-space sample: ``budget`` and optionally
``mode``, ``max_kernel``, ``importance_steps``, ``finetune_epochs``, ``finetune_lr``, ``distill_alpha``), runs the
compress workflow (search → fine-tune → merge → check → side-by-side latency) on the model and data its command
line names, reports the test accuracy after every fine-tuning epoch with ``nni.report_intermediate_result`` and
then the final result::

    {"default": accuracy, "speedup": ..., "latency_ms": ..., "macs": ..., "params": ..., "budget": ..., ...}

and writes ``plan.json``, the merged model (``model.ts``, ``model.onnx``), the run's report and ``result.json``
into the trial's output folder (``$NNI_OUTPUT_DIR``, i.e. ``<experiment>/environments/<env>/trials/<trial id>``).

The command line takes the options of ``lm-plugin compress`` (``--help`` lists them, ``--config FILE.yaml`` works);
a search-space key overrides the option of the same name. Outside an experiment ``get_next_parameter()`` returns
``{}``, so the command-line budget is used and ``--output`` names the folder: handy for debugging a trial.

**Tables are built once per experiment.** The latency and importance tables depend on the model, data and
estimator, not on the budget. Every trial takes an exclusive ``fcntl`` lock on ``<cache dir>/nni-tables.lock``
before it prepares the model (training it if ``--train`` asks) and builds or loads the tables: the first trial
builds them while concurrent trials wait, then those load the finished tables from the cache. The lock is released
by the kernel when its holder exits, so a crashed trial never leaves the others hanging. ``result.json`` records how
many latency entries and importance entries this trial computed itself (0 and 0: it loaded them).

Exit status: 0 on success; 2 for bad input or an infeasible budget (the message says what to do); 1 for any other
failure. NNI marks a trial with a non-zero status FAILED, and its ``trial.stderr`` holds the message.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nni

from ..budget import Budget
from ..compress import CompressionResult, compress
from ..data import DataUnavailableError
from ..errors import LayerMergeError
from ..pruner import LayerMergePruner, default_cache_dir
from ..report import write_run
from ..runs import (
    FINETUNE,
    LATENCY,
    MODEL,
    SELECT,
    BadInputError,
    Options,
    add_options,
    build_run,
    frontier,
    resolve,
    staged_output,
)
from ..solve import InfeasibleBudgetError
from ..train import evaluate

__all__ = ["PARAMETERS", "TABLE_LOCK", "TableBuild", "TrialError", "TrialRun", "apply_parameters", "build_tables",
           "main", "run_trial", "table_lock", "trial_options"]

#: Search-space keys a trial understands, with the type of the option each one sets (same names as the options).
PARAMETERS: dict[str, type] = {
    "budget": str,
    "mode": str,
    "max_kernel": int,
    "importance_steps": int,
    "finetune_epochs": float,
    "finetune_lr": float,
    "distill_alpha": float,
}

#: Name of the lock file, in the table cache directory, that serialises table building across trials.
TABLE_LOCK = "nni-tables.lock"


class TrialError(BadInputError):
    """A trial cannot run as configured (bad search-space value, no output folder); exit status 2."""


def _say(message: str) -> None:
    print(f"[lm-plugin trial] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ options
def trial_options(argv: Sequence[str] | None = None) -> Options:
    """Parse a trial's command line: the options of ``lm-plugin compress`` (``--config`` YAML included)."""
    parser = argparse.ArgumentParser(
        prog="python -m lm_plugin.nni.trial",
        description="One LayerMerge trial of an NNI experiment: nni.get_next_parameter() (budget, mode, "
                    "max_kernel, importance_steps, finetune_epochs, finetune_lr, distill_alpha) overrides the "
                    "options of the same name; the result goes to NNI and to $NNI_OUTPUT_DIR (or --output).")
    add_options(parser, MODEL + LATENCY + SELECT + FINETUNE + ["output", "overwrite"])
    # Trials write to NNI's log files: progress bars would only fill them with carriage returns.
    return resolve(parser.parse_args(argv), {"progress": False})


def _number(name: str, value: Any, kind: type) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TrialError(f"search-space parameter {name!r} = {value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise TrialError(f"search-space parameter {name!r} = {value!r} is not a number") from None
    if kind is int:
        # quniform/randint samples arrive as floats such as 5.0
        if not number.is_integer():
            raise TrialError(f"search-space parameter {name!r} must be a whole number, got {value!r}: use "
                             "choice, randint or quniform with q=1")
        return int(number)
    return number


def _budget_text(value: Any) -> str:
    if isinstance(value, bool):
        raise TrialError(f"search-space parameter 'budget' = {value!r} is not a budget")
    if isinstance(value, (int, float)):
        # quniform gives 0.6000000000000001 for 0.6: the budget is a fraction, six decimals are plenty
        return f"{round(float(value), 6):g}"
    return str(value)


def apply_parameters(opts: Options, parameters: Mapping[str, Any] | None) -> Options:
    """``opts`` with the search-space sample's values in place of the options of the same name.

    Raises:
        TrialError: an unknown key (the message lists the known ones) or a value of the wrong kind.
    """
    if not parameters:
        return opts
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise TrialError(f"unknown search-space parameter(s) {unknown}; a LayerMerge trial understands "
                         f"{', '.join(PARAMETERS)}")
    values: dict[str, Any] = {}
    for name, value in parameters.items():
        if name == "budget":
            values[name] = _budget_text(value)
        elif PARAMETERS[name] is str:
            values[name] = str(value)
        else:
            values[name] = _number(name, value, PARAMETERS[name])
    return dataclasses.replace(opts, **values)


# ------------------------------------------------------------------------------------------------- tables
@contextlib.contextmanager
def table_lock(cache_dir: str | os.PathLike[str]) -> Iterator[float]:
    """Hold the exclusive table-building lock of ``cache_dir``; yields the seconds spent waiting for it.

    ``fcntl.flock`` on ``<cache_dir>/nni-tables.lock``: one holder at a time across processes; the kernel releases
    it when the holder exits, however it exits.
    """
    path = Path(cache_dir) / TABLE_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield time.perf_counter() - start
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@dataclass
class TableBuild:
    """How a trial got its latency and importance tables.

    Attributes:
        latency_measured: latency entries this trial timed (0: every entry came from the cache).
        importance_evaluated: importance entries this trial scored (0: every entry came from the cache).
        waited_s: seconds spent waiting for the table lock (another trial was building or loading).
        seconds: seconds spent holding the lock (model preparation and both tables).
    """

    latency_measured: int
    importance_evaluated: int
    waited_s: float = 0.0
    seconds: float = 0.0

    @property
    def built(self) -> bool:
        """True if this trial computed any table entry itself (False: it loaded finished tables)."""
        return self.latency_measured > 0 or self.importance_evaluated > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, with ``built``."""
        return {**dataclasses.asdict(self), "built": self.built}


def build_tables(pruner: LayerMergePruner) -> TableBuild:
    """Build (or load from the pruner's cache) both tables and count the entries computed here.

    Latency entries are counted at the profiler: every ``measure`` call while the latency table is built,
    less the drift re-check of the whole network that follows a build or a load (``LatencyModel.check_ms``).
    Importance entries are :attr:`ImportanceTable.evaluated`.
    """
    profiler = pruner.profiler
    timed = profiler.measure
    calls = 0

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return timed(*args, **kwargs)

    profiler.measure = counting  # type: ignore[method-assign]  # on this instance only, removed below
    try:
        latency = pruner.latency_model()
    finally:
        del profiler.measure
    measured = calls - (latency.check_ms is not None)
    # a screened pruner needs the screen's complete table; its search scores the rest
    importance = pruner.search_tables()
    return TableBuild(latency_measured=measured, importance_evaluated=importance.evaluated)


# -------------------------------------------------------------------------------------------------- trial
@dataclass
class TrialRun:
    """What :func:`run_trial` produced: the final metric NNI received and everything written to ``result.json``."""

    metric: dict[str, Any]
    record: dict[str, Any]
    result: CompressionResult = field(repr=False)


def _final_metric(result: CompressionResult, tables: TableBuild) -> dict[str, Any]:
    summary = result.to_dict()
    original_ms = summary["predicted_ms"]["original"]
    compressed = result.cost["compressed"]
    return {
        "default": result.accuracy["compressed"],
        "speedup": result.speedup,
        "latency_ms": result.measured_ms["compressed"],
        "macs": compressed.macs,
        "params": compressed.params,
        # the budget as a fraction of the original latency, also when it was given in ms
        "budget": round(summary["budget_ms"] / original_ms, 6),
        "original_accuracy": result.accuracy["original"],
        "original_latency_ms": result.measured_ms["original"],
        "predicted_ms": summary["predicted_ms"]["compressed"],
        # far from the measured speed-up: the latency table does not describe this machine's timing now
        "predicted_speedup": original_ms / summary["predicted_ms"]["compressed"],
        "convs": compressed.convs,
        "tables_built": int(tables.built),
    }


def run_trial(opts: Options, output: str | os.PathLike[str], *, parameters: Mapping[str, Any] | None = None,
              trial_id: str | None = None, command: str = "") -> TrialRun:
    """Run one trial with ``opts`` and write its files into the existing folder ``output``.

    Args:
        opts: the trial's options, search-space values already applied (:func:`apply_parameters`).
        output: folder for plan.json, the merged model, the run's report and result.json.
        parameters: the search-space sample, recorded in result.json.
        trial_id: NNI's trial id, recorded in result.json.
        command: the command line, recorded in the run's report.

    Returns:
        The final metric (also sent with ``nni.report_final_result``) and the result record.

    Raises:
        InfeasibleBudgetError: no plan meets the budget.
        BadInputError: bad options (model spec, data name, budget).
    """
    folder = Path(output)
    cache_dir = Path(opts.cache_dir).expanduser() if opts.cache_dir else default_cache_dir()
    opts = dataclasses.replace(opts, cache_dir=str(cache_dir))
    try:
        Budget.parse(opts.budget)  # a bad budget fails now, not after waiting for the lock
    except (TypeError, ValueError) as exc:
        raise TrialError(f"bad budget {opts.budget!r}: {exc}") from None
    start = time.perf_counter()
    _say(f"budget {opts.budget}; waiting for the table lock in {cache_dir}")
    with table_lock(cache_dir) as waited:
        held = time.perf_counter()
        run = build_run(opts)
        pruner, splits = run.pruner, run.data
        assert splits is not None
        tables = build_tables(pruner)
        tables.waited_s, tables.seconds = waited, time.perf_counter() - held
    # Written before the search, so a trial that fails later (an infeasible budget) still says what it built.
    (folder / "tables.json").write_text(json.dumps({"trial_id": trial_id, "parameters": dict(parameters or {}),
                                                    "tables": tables.to_dict()}, indent=1))
    _say(f"tables {'built' if tables.built else 'loaded'} (latency entries timed here: {tables.latency_measured}, "
         f"importance entries scored here: {tables.importance_evaluated}; waited {waited:.1f} s for the lock)")

    intermediate: list[dict[str, float]] = []

    def on_epoch(epoch: int, trainable: Any) -> None:
        accuracy = evaluate(trainable, splits.test)
        intermediate.append({"epoch": epoch, "accuracy": accuracy})
        nni.report_intermediate_result({"default": accuracy, "epoch": epoch})

    result = compress(pruner, train_data=splits.train, test_data=splits.test, finetune=run.finetune, rounds=opts.rounds,
                      progress=opts.progress, log=_say, on_epoch=on_epoch)
    metric = _final_metric(result, tables)
    context = {"command": command, "model": opts.model,
               "data": opts.data, "options": {k: v for k, v in vars(opts).items() if k != "progress"},
               "nni": {"trial_id": trial_id, "parameters": dict(parameters or {})}}
    write_run(folder, result, pruner, frontier=frontier(opts, pruner, result.seconds), context=context)
    record = {"trial_id": trial_id, "experiment_id": nni.get_experiment_id(), "parameters": dict(parameters or {}),
              "latency_backend": pruner.profiler.signature()["backend"], "metric": metric,
              "intermediate": intermediate, "tables": tables.to_dict(),
              "plan_summary": result.plan.summary(pruner.chain), "seconds": time.perf_counter() - start}
    (folder / "result.json").write_text(json.dumps(record, indent=1, default=str))
    nni.report_final_result(metric)
    return TrialRun(metric, record, result)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one trial; returns the exit status (0 ok, 2 bad input or infeasible budget, 1 any other failure)."""
    command = shlex.join(["python", "-m", "lm_plugin.nni.trial", *(sys.argv[1:] if argv is None else argv)])
    try:
        opts = trial_options(argv)
        parameters = nni.get_next_parameter() or {}
        opts = apply_parameters(opts, parameters)
        inside = os.environ.get("NNI_OUTPUT_DIR")
        if inside:
            run_trial(opts, inside, parameters=parameters, trial_id=nni.get_trial_id(), command=command)
        else:
            if not opts.output:
                raise TrialError("outside an NNI experiment the trial needs --output FOLDER for its files")
            with staged_output(opts.output, opts.overwrite) as folder:
                run_trial(opts, folder, parameters=parameters, command=command)
            _say(f"files: {opts.output}")
        return 0
    except KeyboardInterrupt:
        _say("interrupted; the table cache keeps what was computed")
        return 130
    except Exception as exc:  # an NNI trial must end with a message and a status, never hang
        bad_input = isinstance(exc, (BadInputError, InfeasibleBudgetError, DataUnavailableError))
        if not isinstance(exc, LayerMergeError) and not bad_input:
            traceback.print_exc()  # not one of ours: the traceback is what tells what went wrong
        _say(f"error: {exc}" if isinstance(exc, LayerMergeError) else f"error: {type(exc).__name__}: {exc}")
        return 2 if bad_input else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
