"""Effective filter analysis and hierarchical pruning, on real data (scikit-learn digits)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import mobilenet_v2, resnet18

from lm_plugin.data.datasets import digits_tensors
from lm_plugin.efa import (
    EffectiveFilterImportance,
    HierarchicalPruner,
    RedundancyBoundError,
    effective_rank,
    estimate_redundancy,
    pivoted_importance,
    singular_values,
)
from lm_plugin.efa.cost import CostModel
from lm_plugin.efa.groups import describe_groups
from lm_plugin.train import evaluate, fit
from lm_plugin.workloads import digits, resnet_fm, small_cnn

X8 = torch.randn(1, 1, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    """A small CNN trained on digits in the test (≈ 98 % test accuracy)."""
    torch.manual_seed(0)
    model = small_cnn()
    fit(model, digits(64), epochs=12, progress=False, seed=0)
    assert evaluate(model, digits(512, train=False)) > 93.0
    return model.eval()


def calib(seed: int = 0, batch_size: int = 16) -> DataLoader:
    return digits(batch_size, train=True, seed=seed)


def _channels_of(model: nn.Module, report) -> dict[str, int]:
    modules = dict(model.named_modules())
    return {g.name: modules[g.producers[0]].out_channels for g in report.groups}


# --------------------------------------------------------------------------- spectra and ranks


def test_rank_rules_on_known_spectra():
    sigma = torch.tensor([10.0, 1.0, 0.1, 0.0])
    # energy: 100 / 101.01 = 0.990 -> one direction keeps 99.0 % of the energy
    assert effective_rank(sigma, 0.01) == 1
    assert effective_rank(sigma, 0.001) == 2
    assert effective_rank(sigma, 0.05, "relative") == 2
    assert effective_rank(sigma, 0.005, "relative") == 3
    assert effective_rank(torch.zeros(3), 0.01) == 1
    with pytest.raises(ValueError):
        effective_rank(sigma, 1.5)
    with pytest.raises(ValueError):
        effective_rank(sigma, 0.1, "nuclear")


def test_pivoted_importance_ranks_duplicates_and_dead_channels_last():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 40, generator=g)
    rows = torch.cat([rows, rows[1:2] * 2.0, torch.zeros(1, 40)])  # channel 5 = 2 x channel 1, channel 6 dead
    gram = rows.double() @ rows.double().T
    scores = pivoted_importance(gram)
    assert sorted(torch.argsort(scores)[:2].tolist()) == [1, 6] or sorted(torch.argsort(scores)[:2].tolist()) == [5, 6]
    assert singular_values(gram)[-2:].max() < 1e-6 * singular_values(gram)[0]


# --------------------------------------------------------------------------- the estimate


def test_estimate_is_stable_across_calibration_seeds(cnn):
    reports = [estimate_redundancy(cnn, X8, calib(seed), measure=False) for seed in (0, 1, 2)]
    names = [g.name for g in reports[0]]
    assert names == ["conv3", "conv2", "conv1"]
    for name in names:
        ranks = [r[name].rank for r in reports]
        assert max(ranks) - min(ranks) <= 2, (name, ranks)
        channels = reports[0][name].channels
        assert 1 <= min(ranks) < channels  # a trained layer is neither rank 1 nor fully effective at 1 %
    reductions = [r.max_macs_reduction for r in reports]
    assert max(reductions) - min(reductions) < 0.05


def _widen_with_duplicates(model: nn.Module, dup: int, seed: int = 0) -> tuple[nn.Module, list[tuple[int, int]]]:
    """Copy ``dup`` filters of conv2 (and their BN entries); split conv3's weights on each copied channel
    between the original and the copy in random proportions, so the network computes the same function."""
    g = torch.Generator().manual_seed(seed)
    wide = copy.deepcopy(model)
    n = wide.conv2.out_channels
    src = torch.randperm(n, generator=g)[:dup]
    idx = torch.cat([torch.arange(n), src])
    conv2 = nn.Conv2d(wide.conv2.in_channels, n + dup, 3, padding=1, bias=False)
    conv2.weight.data = wide.conv2.weight.data[idx].clone()
    bn2 = nn.BatchNorm2d(n + dup)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn2, attr).data = getattr(wide.bn2, attr).data[idx].clone()
    conv3 = nn.Conv2d(n + dup, wide.conv3.out_channels, 3, padding=1, bias=False)
    w = wide.conv3.weight.data
    split = (torch.rand(dup, generator=g) * 0.8 + 0.1).view(1, -1, 1, 1)
    new = w[:, idx].clone()
    new[:, src] = w[:, src] * split
    new[:, n:] = w[:, src] * (1 - split)
    conv3.weight.data = new
    wide.conv2, wide.bn2, wide.conv3 = conv2, bn2, conv3
    return wide.eval(), [(int(s), n + i) for i, s in enumerate(src)]


@pytest.mark.parametrize("dup", [8, 16])
def test_duplicated_filters_are_detected_as_redundant(cnn, dup):
    wide, pairs = _widen_with_duplicates(cnn, dup)
    x = next(iter(digits(64, train=False)))[0]
    torch.testing.assert_close(wide(x), cnn(x), atol=1e-4, rtol=1e-4)  # same function, more filters

    # Relative rule at 1 %: the trained conv2 is (almost) full rank, so the widened layer's bound is the
    # duplicated fraction.
    base = estimate_redundancy(cnn, X8, calib(), rank_rule="relative", measure=False)["conv2"]
    widened = estimate_redundancy(wide, X8, calib(), rank_rule="relative", measure=False)["conv2"]
    assert widened.channels == 32 + dup
    assert abs(widened.rank - base.rank) <= 1
    assert widened.max_ratio == pytest.approx(dup / (32 + dup) + base.redundant / (32 + dup), abs=1.5 / (32 + dup))

    # Default energy rule: the duplicates add exactly their number of redundant channels.
    base_e = estimate_redundancy(cnn, X8, calib(), measure=False)["conv2"]
    wide_e = estimate_redundancy(wide, X8, calib(), measure=False)["conv2"]
    assert abs((wide_e.redundant - base_e.redundant) - dup) <= 1

    # Filter-wise: the first `dup` channels to go are one copy of each duplicated pair.
    first = set(wide_e.prune_order()[:dup])
    assert all((a in first) != (b in first) for a, b in pairs)


def test_dead_channels_are_detected(cnn):
    dead = copy.deepcopy(cnn)
    with torch.no_grad():  # BN gamma = beta = 0 -> channels 0..3 of conv1's group output nothing
        dead.bn1.weight[:4] = 0.0
        dead.bn1.bias[:4] = 0.0
    base = estimate_redundancy(cnn, X8, calib(), rank_rule="relative", measure=False)["conv1"]
    report = estimate_redundancy(dead, X8, calib(), rank_rule="relative", measure=False)["conv1"]
    assert report.rank <= base.rank - 4 + 1
    assert set(report.prune_order()[:4]) == {0, 1, 2, 3}


def test_report_table_totals_and_serialisation(cnn):
    report = estimate_redundancy(cnn, X8, calib())
    text = str(report)
    for name in ("conv1", "conv2", "conv3", "max safe reduction"):
        assert name in text
    assert 0.0 < report.max_macs_reduction < 1.0 and 0.0 < report.max_params_reduction < 1.0
    # measured totals agree with the analytic cost model, which is conservative (never over-promises)
    predicted = report._cost.predict(report.kept_at_bound(), "macs")
    assert report.bound_macs <= predicted <= report.bound_macs * 1.05
    data = json.loads(json.dumps(report.to_dict()))
    assert data["groups"][0]["name"] == "conv3" and len(data["groups"][0]["singular_values"]) == 32
    looser = report.with_tolerance(0.05)
    assert all(a.rank <= b.rank for a, b in zip(looser, report))
    assert looser.max_macs_reduction >= report.max_macs_reduction


def test_report_plot(cnn, tmp_path):
    pytest.importorskip("matplotlib")
    report = estimate_redundancy(cnn, X8, calib(), measure=False)
    ax = report.plot(tmp_path / "spectra.png")
    assert (tmp_path / "spectra.png").stat().st_size > 1000
    assert len(ax.get_lines()) == 2 * len(report)


def test_residual_stages_are_analysed_as_one_group():
    model = resnet_fm().eval()
    x = torch.randn(1, 1, 28, 28)
    DG = tp.DependencyGraph().build_dependency(model, x)
    specs = {s.name: s for s in describe_groups(DG)}
    stage3 = next(s for s in specs.values() if "layer3.0.conv2" in s.producers)
    assert set(stage3.producers) == {"layer3.0.conv2", "layer3.1.conv2", "layer3.0.downsample.0"}
    assert set(stage3.consumers) == {"layer3.1.conv1", "fc"}
    assert "fc" not in specs  # the classifier's output is never a prunable group
    cost = CostModel(model, x, list(specs.values()))
    kept = {name: s.channels // 2 for name, s in specs.items()}
    from lm_plugin.efa import prune_copy

    pruned = prune_copy(model, x, {n: list(range(s.channels - kept[n])) for n, s in specs.items()})
    measured = tp.utils.count_ops_and_params(pruned, x)[0]
    assert measured <= cost.predict(kept, "macs") <= measured * 1.02


def test_bad_inputs_raise_clear_errors(cnn):
    with pytest.raises(ValueError, match="tol"):
        estimate_redundancy(cnn, X8, calib(), tol=0.0)
    with pytest.raises(ValueError, match="rank_rule"):
        estimate_redundancy(cnn, X8, calib(), rank_rule="nuclear")
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="no batches"):
        estimate_redundancy(cnn, X8, empty)
    with pytest.raises(ValueError, match="nothing to analyse"):
        estimate_redundancy(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), X8, calib())
    with pytest.raises(ValueError, match="data"):
        HierarchicalPruner(copy.deepcopy(cnn), X8, reduction=0.2)
    with pytest.raises(ValueError, match="reduction"):
        HierarchicalPruner(copy.deepcopy(cnn), X8, calib(), reduction=1.2)
    with pytest.raises(TypeError, match="pruning_ratio"):
        HierarchicalPruner(copy.deepcopy(cnn), X8, calib(), reduction=0.2, pruning_ratio=0.5)
    with pytest.raises(ValueError, match="calibration data"):
        EffectiveFilterImportance()


# --------------------------------------------------------------------------- hierarchical pruning


def test_no_group_is_pruned_beyond_its_bound(cnn):
    report = estimate_redundancy(cnn, X8, calib())
    assert report.max_macs_reduction > 0.3
    # ask for nearly all the estimated redundancy: stage 1 must saturate bounds, never pass them
    target = report.max_macs_reduction * 0.95
    model = copy.deepcopy(cnn)
    pruner = HierarchicalPruner(model, X8, calib(), reduction=target, report=report, ignored_layers=[model.fc])
    pruner.step()
    kept = _channels_of(model, report)
    for g in report:
        assert kept[g.name] >= g.rank, (g.name, kept[g.name], g.rank)
        assert kept[g.name] == pruner.allocation.kept[g.name]
    macs = tp.utils.count_ops_and_params(model, X8)[0]
    assert macs <= (1 - target) * report.base_macs
    assert model(X8).shape == (1, 10)
    with pytest.raises(RedundancyBoundError, match="exceeds the estimated redundancy"):
        HierarchicalPruner(
            copy.deepcopy(cnn),
            X8,
            calib(),
            reduction=min(0.99, report.max_macs_reduction + 0.05),
            report=report,
        )


def test_stage1_spends_the_budget_where_the_spectrum_is_redundant(cnn):
    report = estimate_redundancy(cnn, X8, calib())
    pruner = HierarchicalPruner(copy.deepcopy(cnn), X8, calib(), reduction=0.3, report=report)
    ratios = pruner.allocation.ratios
    assert pruner.allocation.predicted_cost <= 0.7 * report.base_macs
    for g in report:
        assert 0.0 <= ratios[g.name] <= g.max_ratio + 1e-9
    # a group keeps fewer channels at a smaller share of lost gradient energy only if it is more redundant
    most, least = max(report, key=lambda g: g.max_ratio), min(report, key=lambda g: g.max_ratio)
    assert ratios[most.name] >= ratios[least.name]


def test_hierarchical_pruning_keeps_accuracy_after_fine_tuning(cnn):
    model = copy.deepcopy(cnn)
    HierarchicalPruner(model, X8, calib(), reduction=0.3, ignored_layers=[model.fc]).step()
    fit(model, digits(64), epochs=2, max_lr=0.02, progress=False, seed=0)
    assert evaluate(model, digits(512, train=False)) > evaluate(cnn, digits(512, train=False)) - 3.0


def test_params_and_latency_targets(cnn):
    report = estimate_redundancy(cnn, X8, calib())
    p = HierarchicalPruner(copy.deepcopy(cnn), X8, calib(), reduction=0.2, metric="params", report=report)
    assert p.allocation.metric == "params" and p.allocation.predicted_cost <= 0.8 * report.base_params

    # a custom measured cost: the number of conv filters left
    def filters(m: nn.Module) -> float:
        return float(sum(c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)))

    model = copy.deepcopy(cnn)
    p = HierarchicalPruner(model, X8, calib(), reduction=0.25, metric=filters, report=report)
    p.step()
    assert filters(model) <= 0.75 * 80
    # latency is measured on pruned copies; no target (reduction=None), so timing noise cannot flake the test
    p = HierarchicalPruner(
        copy.deepcopy(cnn), torch.randn(8, 1, 8, 8), calib(), reduction=None, metric="latency", report=report
    )
    assert p.allocation.metric == "latency" and p.allocation.base_cost > 0 and p.allocation.predicted_cost > 0


def test_importance_plugs_into_torch_pruning_and_reanalyses_after_pruning(cnn):
    model = copy.deepcopy(cnn)
    imp = EffectiveFilterImportance(calib())
    pruner = tp.pruner.MetaPruner(model, X8, imp, pruning_ratio=0.25, iterative_steps=2, ignored_layers=[model.fc])
    pruner.step()
    first = model.conv2.out_channels
    pruner.step()  # channel counts changed: the importance must re-analyse the pruned network
    assert first == 28 and model.conv2.out_channels == 24
    assert model(X8).shape == (1, 10)

    # From a report alone (no data), a second step on the changed network asks for data.
    model = copy.deepcopy(cnn)
    report = estimate_redundancy(model, X8, calib(), measure=False)
    imp = EffectiveFilterImportance.from_report(report)
    pruner = tp.pruner.MetaPruner(model, X8, imp, pruning_ratio=0.25, iterative_steps=2, ignored_layers=[model.fc])
    pruner.step()
    with pytest.raises(RuntimeError, match="calibration data"):
        pruner.step()


def test_producer_side_analysis_runs(cnn):
    report = estimate_redundancy(cnn, X8, calib(), side="producer", measure=False)
    assert report.side == "producer" and report["conv2"].analysed == ["conv2"]
    assert all(1 <= g.rank <= g.channels for g in report)


# --------------------------------------------------------------------------- torchvision models


def _digits_rgb32(n: int = 64, batch_size: int = 16) -> DataLoader:
    """Real images for ImageNet-style models: digits upsampled to 32x32, grey -> 3 channels."""
    ds = digits_tensors()
    x = F.interpolate(ds.tensors[0][:n], size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return DataLoader(TensorDataset(x, ds.tensors[1][:n]), batch_size=batch_size)


@pytest.mark.filterwarnings("ignore:too few calibration batches")  # 4 batches, 1280-channel head group
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_pruner_runs_on_torchvision_models(arch):
    torch.manual_seed(0)
    model = resnet18(num_classes=10) if arch == "resnet18" else mobilenet_v2(num_classes=10)
    head = model.fc if arch == "resnet18" else model.classifier[1]
    x = torch.randn(1, 3, 32, 32)
    pruner = HierarchicalPruner(model, x, _digits_rgb32(), reduction=0.2, ignored_layers=[head])
    base = pruner.allocation.base_cost
    pruner.step()
    assert model(x).shape == (1, 10)
    assert tp.utils.count_ops_and_params(model, x)[0] <= 0.8 * base
    modules = dict(model.named_modules())
    for g in pruner.report:
        assert modules[g.producers[0]].out_channels >= g.rank


def test_reduction_none_prunes_every_group_to_its_bound(cnn):
    report = estimate_redundancy(cnn, X8, calib())
    model = copy.deepcopy(cnn)
    pruner = HierarchicalPruner(model, X8, calib(), reduction=None, report=report, ignored_layers=[model.fc])
    pruner.step()
    assert _channels_of(model, report) == report.kept_at_bound()
    assert tp.utils.count_ops_and_params(model, X8)[0] == report.bound_macs
