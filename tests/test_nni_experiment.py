"""NNI experiments of LayerMerge trials: the trial entry, tables built once, the example config, the Pareto report.

The main test runs a real local NNI 3.0 experiment (web server on loopback, 4 trials, 2 at a time, digits on the
CPU) through examples/nni_experiment/run.py's functions. No mocks.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest
import torch

pytest.importorskip("nni")
from lm_plugin.data.datasets import digits
from lm_plugin.nni.experiment import load_config
from lm_plugin.nni.report import ReportError, TrialSummary, experiment_report, fastest_within, pareto_front
from lm_plugin.nni.trial import TrialError, apply_parameters, build_tables, main, trial_options
from lm_plugin.pruner import LayerMergePruner
from lm_plugin.runs import load_model

ROOT = Path(__file__).resolve().parents[1]
TINY = "lm_plugin:digits_resnet:width=8,blocks=1"


def example_runner():
    """examples/nni_experiment/run.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("nni_experiment_run", ROOT / "examples/nni_experiment/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- trial options
def test_search_space_values_override_options():
    opts = trial_options(["--model", TINY, "--data", "digits", "--budget", "0.5", "--max-kernel", "5"])
    assert opts.progress is False  # trials write to NNI's log files
    tuned = apply_parameters(opts, {"budget": 0.6000000000000001, "max_kernel": 3.0, "finetune_lr": 0.01,
                                    "mode": "act_only"})
    assert (tuned.budget, tuned.max_kernel, tuned.finetune_lr, tuned.mode) == ("0.6", 3, 0.01, "act_only")
    assert apply_parameters(opts, {}) is opts  # outside NNI: the command line's budget
    assert apply_parameters(opts, {"budget": "12ms"}).budget == "12ms"


@pytest.mark.parametrize("parameters, words", [({"sparsity": 0.5}, "unknown search-space parameter"),
                                               ({"max_kernel": 4.5}, "whole number"),
                                               ({"finetune_epochs": "many"}, "not a number")])
def test_bad_search_space_values_are_refused(parameters, words):
    opts = trial_options(["--model", TINY, "--data", "digits"])
    with pytest.raises(TrialError, match=words):
        apply_parameters(opts, parameters)


def test_config_yml_is_valid_and_its_trial_command_parses():
    config = load_config(ROOT / "examples/nni_experiment/config.yml")
    config.validate()  # NNI's own schema check (what nnictl create runs)
    assert config.training_service.platform == "local" and config.training_service.use_active_gpu is False
    assert config.search_space["budget"]["_type"] == "quniform"
    words = shlex.split(config.trial_command)
    assert words[1:3] == ["-m", "lm_plugin.nni.trial"]
    opts = trial_options(words[3:])
    assert (opts.model, opts.data, opts.train) == ("lm_plugin:resnet_fm", "fashion_mnist", True)


# ------------------------------------------------------------------------------------------------ the tables
def test_build_tables_counts_what_it_computed(tmp_path):
    data = digits(256, train=False)

    def pruner() -> LayerMergePruner:
        torch.manual_seed(0)  # the same weights: the importance table is keyed by them
        return LayerMergePruner(load_model(TINY), 0.5, torch.randn(8, 1, 8, 8), backend="macs", cache_dir=tmp_path,
                                importance="zero_shot", eval_data=data, progress=False)

    first = build_tables(pruner())
    assert first.built and first.latency_measured > 0 and first.importance_evaluated > 0
    again = build_tables(pruner())  # a second trial: everything from the cache
    assert not again.built and (again.latency_measured, again.importance_evaluated) == (0, 0)


def test_standalone_trial_uses_the_command_line_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NNI_OUTPUT_DIR", raising=False)
    common = ["--model", TINY, "--data", "digits", "--backend", "macs", "--importance", "zero_shot",
              "--val-size", "128", "--finetune-epochs", "0.2", "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--budget", "0.8", "--output", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    record = json.loads((out / "result.json").read_text())
    assert record["parameters"] == {} and record["tables"]["built"]
    assert abs(record["metric"]["budget"] - 0.8) < 1e-6 and record["metric"]["speedup"] > 1
    assert len(record["intermediate"]) == 1  # one (partial) fine-tuning epoch
    assert {"plan.json", "model.ts", "model.onnx", "report.md"} <= {p.name for p in out.iterdir()}

    capsys.readouterr()
    assert main([*common, "--budget", "0.01", "--output", str(tmp_path / "bad")]) == 2
    assert "no plan meets the budget" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # staged: a failed trial leaves no folder that looks finished
    assert main([*common, "--budget", "0.8"]) == 2
    assert "--output" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the report
def _summary(trial_id: str, accuracy: float, speedup: float) -> TrialSummary:
    return TrialSummary(trial_id, 0, "SUCCEEDED", metric={"default": accuracy, "speedup": speedup,
                                                          "original_accuracy": 95.0})


def test_pareto_front_keeps_exactly_the_undominated_trials():
    trials = [_summary("a", 94.0, 1.2), _summary("b", 90.0, 1.8), _summary("c", 89.0, 1.5),
              _summary("d", 94.0, 1.1), _summary("e", 80.0, 2.5), TrialSummary("f", 0, "FAILED")]
    assert [t.trial_id for t in pareto_front(trials)] == ["e", "b", "a"]
    assert fastest_within(trials, 1.0).trial_id == "a" and fastest_within(trials, 5.0).trial_id == "b"
    slower = [_summary("s", 95.0, 0.9)]  # as accurate as the original but slower: not a pick
    assert pareto_front(slower) == slower and fastest_within(slower, 1.0) is None


def test_report_of_a_missing_experiment_says_where_it_looked(tmp_path):
    with pytest.raises(ReportError, match=r"db/nni\.sqlite"):
        experiment_report(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------- a real experiment
@pytest.mark.slow
def test_lm_plugin_nni_report_is_the_report_command(tmp_path, capsys):
    from lm_plugin.cli import build_parser, main

    assert "nni-report" in build_parser().format_help()
    assert main(["nni-report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_real_nni_experiment_builds_tables_once_and_reports_the_front(tmp_path):
    """4 trials, 2 at a time; budget 0.01 is infeasible: that trial fails with a clear error, the rest go on."""
    runner = example_runner()
    config = runner.quick_config(tmp_path, budgets=(0.01, 0.6, 0.75, 0.9))
    finished, report = runner.run(config, tmp_path / "report", max_drop=100.0, timeout_s=900)

    assert finished.status == "DONE" and len(finished.trials) == 4
    assert finished.listening in (None, ["127.0.0.1"])  # the web server stayed on loopback
    by_budget = {float(t.parameters["budget"]): t for t in report.trials}
    assert set(by_budget) == {0.01, 0.6, 0.75, 0.9}  # each trial ran the budget NNI recorded for it

    failed = by_budget.pop(0.01)
    assert failed.status == "FAILED" and "no plan meets the budget" in failed.error and not failed.metric
    for budget, trial in by_budget.items():
        assert trial.status == "SUCCEEDED", trial.error
        m = trial.metric
        assert 0 <= m["default"] <= 100 and m["speedup"] > 1 and m["latency_ms"] > 0
        assert m["macs"] > 0 and m["params"] > 0 and abs(m["budget"] - budget) < 1e-6
        # macs backend: the analytic "latency" is exact, so prediction and measurement agree
        assert m["predicted_speedup"] == pytest.approx(m["speedup"], rel=1e-6)
        assert len(trial.intermediate) == 2  # one per fine-tuning epoch
        assert {"plan.json", "model.ts", "result.json"} <= {p.name for p in Path(trial.folder).iterdir()}

    # Tables built once: exactly one trial (whichever got the lock first) computed entries, the others loaded all.
    builds = [t.tables for t in report.trials]
    assert all(builds) and sum(b["built"] for b in builds) == 1
    builder = next(b for b in builds if b["built"])
    assert builder["latency_measured"] > 0 and builder["importance_evaluated"] > 0
    assert all(b["latency_measured"] == b["importance_evaluated"] == 0 for b in builds if not b["built"])

    saved = json.loads((tmp_path / "report" / "pareto.json").read_text())
    assert {t["trial_id"] for t in saved["trials"]} == set(finished.trials)
    assert saved["front"] and set(saved["front"]) <= {t.trial_id for t in by_budget.values()}
    assert saved["best"]["speedup"] == max(t.speedup for t in by_budget.values())  # max_drop 100: the fastest
    table = (tmp_path / "report" / "trials.md").read_text()
    assert all(trial_id in table for trial_id in finished.trials) and "FAILED" in table
    assert (tmp_path / "report" / "pareto.png").stat().st_size > 0
