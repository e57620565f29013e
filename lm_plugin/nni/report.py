"""Report of a finished NNI experiment of LayerMerge trials: every trial, the Pareto front, the best within a drop.

``experiment_report(EXPERIMENT_DIR_OR_ID, max_drop=1.0)`` (or ``python -m lm_plugin.nni.report EXPERIMENT_DIR_OR_ID
--max-drop 1.0``) reads the experiment's own records, offline — the experiment may be long stopped:

- ``<experiment>/db/nni.sqlite`` (NNI's database): each trial's status events and its reported metrics. A trial's
  parameters are taken from the parameter record its *metrics* name (``MetricData.parameterId``): with concurrent
  trials, NNI 3.0's trial list can pair a trial with the parameters another trial received;
- each trial's folder (the ``logPath`` of its events): ``result.json`` / ``tables.json`` written by
  :mod:`lm_plugin.nni.trial`, and ``trial.stderr`` for the error of a failed trial.

It writes, into ``output`` (default ``<experiment>/lm_plugin_report``):

- ``trials.md`` — a table of every trial (status, budget, accuracy and its change, measured and predicted speed-up,
  latency, MACs, parameters, convs, whether it built the tables) with the front and the pick marked;
- ``pareto.json`` — every trial, the Pareto front of accuracy vs measured speed-up (no other trial is at least as
  accurate *and* at least as fast, and better in one), and the fastest trial whose accuracy is at most
  ``max_drop`` points below the original's (among those faster than the original);
- ``pareto.png`` — accuracy against measured speed-up: all trials, the front, the original, the pick.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..errors import ConfigurationError, LayerMergeError

__all__ = ["ExperimentReport", "ReportError", "TrialSummary", "experiment_dir", "experiment_report", "fastest_within",
           "main", "pareto_front", "plot_front", "read_trials", "render_table"]

_FINAL = ("SUCCEEDED", "FAILED", "USER_CANCELED", "SYS_CANCELED", "EARLY_STOPPED")


class ReportError(LayerMergeError, FileNotFoundError):
    """The experiment's data cannot be found or read (the message says where it looked)."""


@dataclass
class TrialSummary:
    """One trial as the report shows it.

    Attributes:
        trial_id: NNI's trial id.
        sequence: NNI's trial number (order of submission).
        status: NNI's final status (SUCCEEDED, FAILED, ...; RUNNING if the experiment stopped mid-trial).
        parameters: the search-space sample the trial ran with.
        metric: the final result the trial reported (``default`` = accuracy, ``speedup``, ...); {} if none.
        intermediate: the intermediate results (accuracy after each fine-tuning epoch).
        tables: how the trial got its tables (``built``, entries computed), from its ``tables.json``.
        error: the failure message of a failed trial (from its ``trial.stderr``).
        folder: the trial's output folder.
        backend: the latency backend its speed-up was measured with (``cpu``; ``macs`` counts MACs instead).
    """

    trial_id: str
    sequence: int
    status: str
    parameters: dict[str, Any] = field(default_factory=dict)
    metric: dict[str, Any] = field(default_factory=dict)
    intermediate: list[Any] = field(default_factory=list)
    tables: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    folder: str | None = None
    backend: str | None = None

    @property
    def accuracy(self) -> float | None:
        """Test accuracy (%) of the merged network."""
        return _number(self.metric.get("default"))

    @property
    def speedup(self) -> float | None:
        """Measured speed-up over the original (BN folded), side by side."""
        return _number(self.metric.get("speedup"))

    @property
    def drop(self) -> float | None:
        """Accuracy points lost against the original network (positive = worse)."""
        original = _number(self.metric.get("original_accuracy"))
        return None if original is None or self.accuracy is None else original - self.accuracy

    @property
    def complete(self) -> bool:
        """Succeeded with an accuracy and a speed-up."""
        return self.status == "SUCCEEDED" and self.accuracy is not None and self.speedup is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, with accuracy, speed-up and drop."""
        return {**asdict(self), "accuracy": self.accuracy, "speedup": self.speedup, "drop": self.drop}


@dataclass
class ExperimentReport:
    """What :func:`experiment_report` found and wrote.

    Attributes:
        experiment_id: NNI's experiment id.
        directory: the experiment's folder.
        trials: every trial, in submission order.
        front: the Pareto front (accuracy vs speed-up), fastest first.
        best: the fastest trial within ``max_drop`` of the original accuracy and faster than the original (None:
            no trial is).
        max_drop: the allowed accuracy drop, in points.
        files: name → path of what was written (``trials.md``, ``pareto.json``, ``pareto.png``).
    """

    experiment_id: str
    directory: Path
    trials: list[TrialSummary]
    front: list[TrialSummary]
    best: TrialSummary | None
    max_drop: float
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The content of ``pareto.json``."""
        original = [t.metric.get("original_accuracy") for t in self.trials if t.complete]
        return {
            "experiment_id": self.experiment_id,
            "directory": str(self.directory),
            "max_drop": self.max_drop,
            "original_accuracy": original[0] if original else None,
            "trials": [t.to_dict() for t in self.trials],
            "front": [t.trial_id for t in self.front],
            "best_within_drop": None if self.best is None else self.best.trial_id,
            "best": None if self.best is None else self.best.to_dict(),
        }


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# ------------------------------------------------------------------------------------------------ reading
def experiment_dir(experiment: str | Path) -> Path:
    """The folder of an experiment given as its folder or its NNI id.

    An id is looked up in NNI's experiment list (``~/nni-experiments/.experiment``, which records each
    experiment's working directory), then under ``~/nni-experiments/<id>``.

    Raises:
        ReportError: neither names an experiment folder with ``db/nni.sqlite``.
    """
    path = Path(experiment).expanduser()
    candidates = [path]
    home = Path.home() / "nni-experiments"
    if not path.exists() and len(path.parts) == 1:
        listing = home / ".experiment"
        if listing.is_file():
            try:
                entry = json.loads(listing.read_text()).get(str(experiment), {})
            except (json.JSONDecodeError, AttributeError):
                entry = {}
            if entry.get("logDir"):
                candidates.append(Path(entry["logDir"]) / str(experiment))
        candidates.append(home / str(experiment))
    for folder in candidates:
        if (folder / "db" / "nni.sqlite").is_file():
            return folder
    raise ReportError(f"no NNI experiment at {experiment!r}: looked for db/nni.sqlite in "
                      f"{', '.join(str(c) for c in candidates)}. Pass the experiment folder "
                      "(<experimentWorkingDirectory>/<id>) or an id listed by `nnictl experiment list --all`.")


def _decode(text: str | None) -> Any:
    """NNI stores metrics as JSON of a JSON string (``'"{\\"default\\": 1}"'``); parameters as plain JSON."""
    value: Any = text
    for _ in range(2):
        if not isinstance(value, str):
            break
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            break
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _error_line(folder: Path) -> str | None:
    """The trial's own error line from ``trial.stderr`` (else its last line)."""
    try:
        lines = [line.strip() for line in (folder / "trial.stderr").read_text(errors="replace").splitlines()]
    except OSError:
        return None
    lines = [line for line in lines if line]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or [None])[-1]


def read_trials(directory: str | Path) -> list[TrialSummary]:
    """Every trial of the experiment folder ``directory``, in submission order (see the module docstring)."""
    folder = Path(directory)
    database = folder / "db" / "nni.sqlite"
    try:
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ReportError(f"cannot open NNI's database {database}: {exc}") from exc
    try:
        events = connection.execute(
            "SELECT trialJobId, event, data, logPath, sequenceId FROM TrialJobEvent ORDER BY timestamp").fetchall()
        metrics = connection.execute(
            "SELECT trialJobId, parameterId, type, sequence, data FROM MetricData ORDER BY timestamp").fetchall()
    except sqlite3.Error as exc:
        raise ReportError(f"{database} is not an NNI 3.0 experiment database ({exc})") from exc
    finally:
        connection.close()

    records: dict[int, dict[str, Any]] = {}  # parameter_id -> parameters, whichever trial it is listed under
    trials: dict[str, TrialSummary] = {}
    listed: dict[str, dict[str, Any]] = {}
    for trial_id, event, data, log_path, sequence in events:
        trial = trials.setdefault(trial_id, TrialSummary(trial_id, -1, "WAITING"))
        if sequence is not None and sequence >= 0:
            trial.sequence = int(sequence)
        if log_path:
            trial.folder = str(log_path)
        record = _decode(data)
        if isinstance(record, dict) and "parameter_id" in record:
            records[int(record["parameter_id"])] = record.get("parameters") or {}
            listed.setdefault(trial_id, record.get("parameters") or {})
        if event != "ADD_HYPERPARAMETER" and (event in _FINAL or trial.status not in _FINAL):
            trial.status = event
    received: dict[str, int] = {}
    for trial_id, parameter_id, kind, _sequence, data in metrics:
        trial = trials.setdefault(trial_id, TrialSummary(trial_id, -1, "UNKNOWN"))
        value = _decode(data)
        if parameter_id not in (None, ""):
            received[trial_id] = int(parameter_id)
        if kind == "FINAL":
            trial.metric = value if isinstance(value, dict) else {"default": value}
        elif kind == "PERIODICAL":
            trial.intermediate.append(value)
    for trial in trials.values():
        own = _read_json(Path(trial.folder) / "result.json") if trial.folder else {}
        tables = _read_json(Path(trial.folder) / "tables.json") if trial.folder else {}
        if trial.trial_id in received and received[trial.trial_id] in records:
            trial.parameters = records[received[trial.trial_id]]
        else:
            trial.parameters = own.get("parameters") or tables.get("parameters") or listed.get(trial.trial_id, {})
        trial.tables = tables.get("tables") or own.get("tables") or {}
        trial.backend = own.get("latency_backend")
        if trial.status != "SUCCEEDED" and trial.folder:
            trial.error = _error_line(Path(trial.folder))
    return sorted(trials.values(), key=lambda t: (t.sequence, t.trial_id))


# ----------------------------------------------------------------------------------------------- analysis
def pareto_front(trials: Sequence[TrialSummary]) -> list[TrialSummary]:
    """Complete trials that no other trial beats on both accuracy and measured speed-up; fastest first."""
    done = [t for t in trials if t.complete]

    def dominated(t: TrialSummary) -> bool:
        return any(o.accuracy >= t.accuracy and o.speedup >= t.speedup and  # type: ignore[operator]
                   (o.accuracy > t.accuracy or o.speedup > t.speedup) for o in done)  # type: ignore[operator]

    return sorted((t for t in done if not dominated(t)), key=lambda t: -t.speedup)  # type: ignore[operator]


def fastest_within(trials: Sequence[TrialSummary], max_drop: float) -> TrialSummary | None:
    """The fastest complete trial at most ``max_drop`` accuracy points below the original and faster than it
    (measured speed-up above 1); None if there is none."""
    within = [t for t in trials if t.complete and t.drop is not None and t.drop <= max_drop
              and t.speedup > 1.0]  # type: ignore[operator]
    return max(within, key=lambda t: (t.speedup, t.accuracy), default=None)


def _cell(value: Any, fmt: str) -> str:
    number = _number(value)
    return "–" if number is None else format(number, fmt)


def render_table(report: ExperimentReport) -> str:
    """``trials.md``: every trial, the front (★) and the pick (←) marked."""
    front = {t.trial_id for t in report.front}
    best = report.best.trial_id if report.best else None
    rows = ["| # | trial | status | budget | accuracy (%) | Δ (%p) | speed-up | predicted | latency (ms) | MMACs "
            "| params (k) | convs | tables | front |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for t in report.trials:
        m = t.metric
        budget = m.get("budget", t.parameters.get("budget"))
        tables = "built" if t.tables.get("built") else ("loaded" if t.tables else "–")
        mark = ("★" if t.trial_id in front else "") + (" ← pick" if t.trial_id == best else "")
        rows.append(f"| {t.sequence} | {t.trial_id} | {t.status} | {_cell(budget, '.3g')} | "
                    f"{_cell(t.accuracy, '.2f')} | {_cell(None if t.drop is None else -t.drop, '+.2f')} | "
                    f"{_cell(t.speedup, '.2f')} | {_cell(m.get('predicted_speedup'), '.2f')} | "
                    f"{_cell(m.get('latency_ms'), '.3f')} | "
                    f"{_cell(None if m.get('macs') is None else m['macs'] / 1e6, '.2f')} | "
                    f"{_cell(None if m.get('params') is None else m['params'] / 1e3, '.1f')} | "
                    f"{_cell(m.get('convs'), '.0f')} | {tables} | {mark} |")
    lines = [f"# NNI experiment {report.experiment_id}", "", f"Folder: `{report.directory}`", "", *rows, ""]
    failed = [t for t in report.trials if t.status != "SUCCEEDED"]
    for t in failed:
        lines.append(f"- trial {t.trial_id} {t.status}: {t.error or 'no message'}")
    if failed:
        lines.append("")
    if report.best is None:
        lines.append(f"No trial is faster than the original within {report.max_drop:g} %p of its accuracy.")
    else:
        b = report.best
        lines.append(f"Fastest within {report.max_drop:g} %p: trial {b.trial_id} (budget "
                     f"{_cell(b.metric.get('budget'), '.3g')}), {b.speedup:.2f}x measured speed-up at "
                     f"{b.accuracy:.2f} % ({-b.drop:+.2f} %p).")  # type: ignore[operator]
    return "\n".join(lines) + "\n"


def plot_front(report: ExperimentReport, path: str | Path) -> Path:
    """``pareto.png``: accuracy against measured speed-up of every complete trial, the front and the pick."""
    done = [t for t in report.trials if t.complete]
    fig = Figure(figsize=(5.6, 4.0))
    ax = fig.subplots()
    ax.scatter([t.speedup for t in done], [t.accuracy for t in done], s=22, color="#9aa7b8", label="trials",
               zorder=2)
    if report.front:
        ax.plot([t.speedup for t in report.front], [t.accuracy for t in report.front], "-o", color="#2f6db5",
                ms=5, label="Pareto front", zorder=3)
    originals = [_number(t.metric.get("original_accuracy")) for t in done]
    originals = [o for o in originals if o is not None]
    if originals:
        ax.scatter([1.0], [originals[0]], marker="s", color="black", s=30, label="original", zorder=4)
    if report.best is not None:
        ax.scatter([report.best.speedup], [report.best.accuracy], marker="*", s=160, color="#c0392b",
                   label=f"fastest within {report.max_drop:g} %p", zorder=5)
    for t in done:
        budget = _number(t.metric.get("budget"))
        if budget is not None:
            ax.annotate(f"{budget:.2f}", (t.speedup, t.accuracy), textcoords="offset points", xytext=(4, 3),
                        fontsize=7, color="#555555")
    backends = sorted({t.backend for t in done if t.backend})
    ax.set_xlabel(f"measured speed-up (×{', ' + ' / '.join(backends) + ' backend' if backends else ''})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"NNI experiment {report.experiment_id}: {len(done)} of {len(report.trials)} trials complete "
                 "(labels: budget)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=150)
    return out


def experiment_report(experiment: str | Path, max_drop: float = 1.0, output: str | Path | None = None
                      ) -> ExperimentReport:
    """Read a finished experiment and write ``trials.md``, ``pareto.json`` and ``pareto.png``.

    Args:
        experiment: the experiment's folder or its NNI id.
        max_drop: accuracy points the pick may lose against the original network.
        output: folder for the files (default ``<experiment>/lm_plugin_report``).

    Raises:
        ReportError: the experiment or its database cannot be found or read.
        ValueError: ``max_drop`` is negative or not a number.
    """
    if not max_drop >= 0:
        raise ConfigurationError(f"max_drop must be a number of accuracy points >= 0, got {max_drop!r}")
    directory = experiment_dir(experiment)
    trials = read_trials(directory)
    report = ExperimentReport(directory.name, directory, trials, pareto_front(trials), fastest_within(trials, max_drop),
                              max_drop)
    out = Path(output) if output is not None else directory / "lm_plugin_report"
    out.mkdir(parents=True, exist_ok=True)
    report.files = {"trials.md": out / "trials.md", "pareto.json": out / "pareto.json",
                    "pareto.png": out / "pareto.png"}
    report.files["trials.md"].write_text(render_table(report))
    report.files["pareto.json"].write_text(json.dumps(report.to_dict(), indent=1, default=str))
    plot_front(report, report.files["pareto.png"])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lm_plugin.nni.report EXPERIMENT_DIR_OR_ID [--max-drop 1.0] [--output DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m lm_plugin.nni.report",
                                     description="Report a finished NNI experiment of LayerMerge trials.")
    parser.add_argument("experiment", metavar="EXPERIMENT_DIR_OR_ID")
    parser.add_argument("--max-drop", type=float, default=1.0,
                        help="accuracy points the pick may lose against the original (default 1.0)")
    parser.add_argument("--output", help="folder for trials.md, pareto.json, pareto.png "
                                         "(default <experiment>/lm_plugin_report)")
    args = parser.parse_args(argv)
    try:
        report = experiment_report(args.experiment, args.max_drop, args.output)
    except (ReportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render_table(report))
    print(f"report: {report.files['trials.md'].parent}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
