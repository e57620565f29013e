"""The pruner's front door: each part configured one way, search() returns what it found, compress reuses data."""

from __future__ import annotations

import copy

import pytest
import torch

from lm_plugin import (
    ConfigurationError,
    FinetuneSettings,
    LayerMergePruner,
    Plan,
    SearchResult,
    compress,
    data_splits,
    fit,
    workloads,
)
from lm_plugin.latency import get_profiler
from lm_plugin.tables.estimators import ZeroShotImportance

X = torch.randn(16, 1, 8, 8)


@pytest.fixture(scope="module")
def digits_setup():
    data = data_splits("digits", batch_size=64, val_size=256)
    model = fit(workloads.digits_resnet(width=16, blocks=2), data.train, epochs=2, seed=0, progress=False).eval()
    return model, data


def test_a_ready_object_plus_its_settings_is_refused_with_both_named(digits_setup):
    model, data = digits_setup
    profiler = get_profiler("macs")
    with pytest.raises(ConfigurationError, match=r"batch_size.*ignored"):
        LayerMergePruner(model, 0.8, X, backend=profiler, batch_size=8, cache_dir=None)
    estimator = ZeroShotImportance(eval_data=data.val)
    with pytest.raises(ConfigurationError, match=r"train_data, importance_settings"):
        LayerMergePruner(model, 0.8, X, importance=estimator, train_data=data.train,
                         importance_settings={"steps": 3}, cache_dir=None)
    with pytest.raises(ConfigurationError, match="RewriteOptions"):
        LayerMergePruner(model, 0.8, X, rewrite={"insert": "relu"}, cache_dir=None)
    with pytest.raises(ValueError, match="example_inputs"):  # ConfigurationError is a ValueError
        LayerMergePruner(model, 0.8)


def test_search_returns_plan_prediction_and_objective_and_keeps_no_state(digits_setup, tmp_path):
    model, data = digits_setup
    pruner = LayerMergePruner(model, 0.7, X, backend="macs", importance="zero_shot", eval_data=data.val,
                              cache_dir=tmp_path, progress=False)
    before = vars(pruner).keys() - {"_latency", "_importance"}
    found = pruner.search()
    assert isinstance(found, SearchResult) and found.plan.is_valid(pruner.chain)
    assert found.predicted_ms == pytest.approx(pruner.predict_latency(found.plan))
    assert found.predicted_ms <= found.budget_ms + 1e-9 and found.predicted_speedup >= 1 / 0.7 - 1e-6
    assert found.objective == pytest.approx(sum(e.importance for e in found.solution.entries))
    looser = pruner.search(0.95)
    assert looser.objective >= found.objective - 1e-9  # a larger budget never scores lower
    assert vars(pruner).keys() - {"_latency", "_importance"} == before  # nothing new left behind
    trainable = pruner.step()
    assert Plan.of(trainable) == found.plan == Plan.of(pruner.merge(trainable.eval()))


def test_compress_fine_tunes_on_the_pruners_data_and_times_onnx_side_by_side(digits_setup, tmp_path):
    pytest.importorskip("onnxruntime")
    model, data = digits_setup
    original = copy.deepcopy(model.state_dict())
    pruner = LayerMergePruner(model, 0.8, X, backend="macs", importance="zero_shot", eval_data=data.val,
                              train_data=data.train, cache_dir=tmp_path, progress=False)
    assert pruner.train_data is data.train
    epochs: list[int] = []
    result = compress(pruner, test_data=data.test, finetune=FinetuneSettings(epochs=2), rounds=1, progress=False,
                      on_epoch=lambda epoch, _m: epochs.append(epoch))
    assert epochs == [1, 2]  # fine-tuned on the pruner's train_data without being told again
    assert set(result.runtime_ms) == {"onnxruntime"} and result.runtime_speedup("onnxruntime") > 0
    assert "onnxruntime latency (ms)" in result.summary() and result.exact
    assert result.merge_error <= 1e-10
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # the user's model is untouched
    none = compress(pruner, finetune=FinetuneSettings(epochs=0), rounds=1, runtimes=(), progress=False)
    assert none.runtime_ms == {}


def test_auto_backend_follows_the_machine_setting(digits_setup, monkeypatch):
    model, _ = digits_setup
    monkeypatch.setenv("LM_PLUGIN_BACKEND", "macs")
    assert LayerMergePruner(model, 0.8, X, cache_dir=None).profiler.signature()["backend"] == "macs"
    monkeypatch.setenv("LM_PLUGIN_BACKEND", "no-such-backend")
    with pytest.raises(Exception, match="no-such-backend"):
        _ = LayerMergePruner(model, 0.8, X, cache_dir=None).profiler


def test_an_impossible_budget_is_refused_before_any_importance_entry(digits_setup, tmp_path):
    """Feasibility is known from the latency table alone: search() and compress() refuse before importance."""
    from lm_plugin.solve import InfeasibleBudgetError

    model, data = digits_setup
    pruner = LayerMergePruner(model, 0.01, X, backend="macs", importance="distill", train_data=data.train,
                              eval_data=data.val, cache_dir=tmp_path, progress=False)
    with pytest.raises(InfeasibleBudgetError, match="no importance entry was scored") as info:
        compress(pruner, train_data=data.train, progress=False)
    assert info.value.min_latency_ms > 0.01 * pruner.latency_model().original_ms
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable"):
        pruner.search()
    assert pruner._importance is None and pruner._screen_table is None, "an importance table was built"
    assert not list(tmp_path.glob("importance*")), "importance entries were scored"
    lowest = pruner.check_budget(1.0)
    assert 0 < lowest <= pruner.latency_model().original_ms


def test_auto_fine_tuning_decides_its_length_on_validation_data_and_the_summary_flags_a_large_loss(digits_setup,
                                                                                                  tmp_path):
    import dataclasses

    model, data = digits_setup
    pruner = LayerMergePruner(model, 0.6, X, backend="macs", importance="zero_shot", eval_data=data.val,
                              train_data=data.train, cache_dir=tmp_path, progress=False)
    lines: list[str] = []
    result = compress(pruner, test_data=data.test, rounds=1, runtimes=(), progress=False, log=lines.append,
                      finetune=FinetuneSettings(max_epochs=4))
    tuned = result.finetune
    assert FinetuneSettings().auto and 1 <= tuned["epochs"] <= 4 and len(tuned["history"]) == tuned["epochs"]
    assert tuned["history"][tuned["best_epoch"] - 1] == max(tuned["history"])
    assert tuned["stopped"] in ("plateau", "cap") and tuned["val_original"] > 50
    assert any("epoch 1: validation accuracy" in line for line in lines)
    assert result.estimate["estimator"] == "zero_shot" and result.estimate["actual_s"] >= 0
    # what a user must not miss: a compressed network far below the original says what to try
    worse = dataclasses.replace(result, accuracy={"original": 95.0, "compressed": 63.3})
    assert any("31.70 %p less accurate" in w and "--finetune-epochs" in w and "--distill-alpha" in w
               for w in worse.warnings())
    assert "WARNING: the compressed network is 31.70 %p" in worse.summary()
    with pytest.raises(ConfigurationError, match="auto"):
        FinetuneSettings(epochs="many")


def test_the_time_estimate_scores_real_entries_and_keeps_them(digits_setup, tmp_path):
    model, data = digits_setup
    pruner = LayerMergePruner(model, 0.6, X, backend="macs", importance="distill",
                              importance_settings={"steps": 2}, eval_data=data.val, train_data=data.train,
                              cache_dir=tmp_path, progress=False, screen=None)
    missing = len(pruner.scorer.missing())
    estimate = pruner.estimate_importance()
    assert estimate.entries == missing == estimate.table_entries and estimate.seconds_per_entry > 0
    assert estimate.seconds[0] == pytest.approx(missing * estimate.seconds_per_entry)
    assert len(pruner.scorer.missing()) == missing - 2  # the timed entries are in the cache: nothing wasted
    assert f"{missing} entries" in estimate.summary() and "Estimated" in estimate.summary()


def test_the_tradeoff_curve_is_what_the_dp_guarantees(digits_setup, tmp_path):
    from lm_plugin.compress import tradeoff

    model, data = digits_setup
    pruner = LayerMergePruner(model, 0.6, X, backend="macs", importance="zero_shot", eval_data=data.val,
                              cache_dir=tmp_path, progress=False)
    points = tradeoff(pruner, [1.0, 0.9, 0.7, 0.5, 0.35])
    budgets = [p.budget for p in points]
    assert budgets == sorted(budgets) and budgets[-1] == 1.0
    objectives = [p.objective for p in points]
    assert objectives == sorted(objectives) and max(objectives) <= 0.0  # never falls as the budget grows
    original = points[-1]  # at 1.0: the unchanged network
    assert (original.objective, original.blocks) == (0.0, pruner.chain.length)
    assert original.predicted_ms == pruner.latency_model().original_ms
    assert all(p.predicted_ms <= p.budget * pruner.latency_model().original_ms + 1e-9 for p in points)


def test_plan_tables_list_every_conv_of_every_block(digits_setup):
    import re

    from torch import nn

    deep = nn.Sequential(*[m for _ in range(42) for m in (nn.Conv2d(8, 8, 1), nn.ReLU())], nn.Conv2d(8, 8, 1))
    model, _ = digits_setup
    for net, x in ((model, X), (deep, torch.randn(2, 8, 4, 4))):
        chain = LayerMergePruner(net, 0.6, x, backend="macs", cache_dir=None).chain
        for seed, p_merge in ((0, 1.0), (1, 0.9), (2, 0.5), (3, 0.2)):
            plan = Plan.sample(chain, seed, p_merge=p_merge)
            text = plan.summary(chain).splitlines()
            width = text[1].index("merged k") - 12
            listed: set[int] = set()
            for row in text[3:]:
                for dropped, a, b in re.findall(r"(x?)(\d+)(?:-(\d+))?", row[11:11 + width]):
                    members = range(int(a), int(b or a) + 1)
                    assert all((j in plan.kept_convs) != bool(dropped) for j in members)
                    listed.update(members)
            assert listed == set(range(1, chain.length + 1)), plan.summary(chain)
