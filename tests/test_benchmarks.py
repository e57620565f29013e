"""The quality benchmark's resumable rows: shared by two processes, kept until a run covers them all."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("pareto", ROOT / "benchmarks" / "pareto.py")
pareto = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pareto)

SETTINGS = {"finetune_epochs": 1.0, "importance_steps": 10}


def row(budget: float, method: str, acc: float = 90.0) -> dict:
    return {"model": "m", "budget": budget, "method": method, "accuracy": acc}


def test_two_processes_share_the_rows_and_the_last_full_run_removes_them(tmp_path):
    path = tmp_path / "pareto_m.partial.json"
    first, second = pareto.PartialRows(path, SETTINGS), pareto.PartialRows(path, SETTINGS)  # two processes
    first.add(row(0.5, "layermerge"))
    second.add(row(0.7, "layermerge"))
    first.add(row(0.5, "act_only"))  # written after the other process's row: that row must survive
    assert set(first.finished()) == {(0.5, "layermerge"), (0.7, "layermerge"), (0.5, "act_only")}
    assert not list(tmp_path.glob("*.tmp"))

    first.close()  # holds 0.7, which the first process did not run
    second.close()
    assert path.exists()
    other = pareto.PartialRows(path, {**SETTINGS, "importance_steps": 5})
    assert other.finished() == {}  # other settings never reuse these rows

    final = pareto.PartialRows(path, SETTINGS)  # a run over all budgets keeps the rows and covers them
    for kept in final.finished().values():
        final.add(kept)
    final.close()
    assert not path.exists()


def test_an_unreadable_file_is_ignored_not_trusted(tmp_path):
    path = tmp_path / "pareto_m.partial.json"
    path.write_text(json.dumps({"settings": SETTINGS, "rows": [row(0.5, "layermerge")]})[:-5])
    rows = pareto.PartialRows(path, SETTINGS)
    assert rows.finished() == {}
    rows.add(row(0.6, "layermerge"))
    assert set(rows.finished()) == {(0.6, "layermerge")}
