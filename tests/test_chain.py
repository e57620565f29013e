"""Chain extraction without per-architecture code, plans, and the errors users see."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torchvision
from nets import DataDependent, NoConv, PlainStack, TinyResNet, Zoo

from lm_plugin import InvalidPlanError, LayerMergePruner, NoChainError, Plan, UntraceableModelError
from lm_plugin.errors import LayerMergeError, MergeError


def chain_of(model, size=32, **kw):
    return LayerMergePruner(model, example_inputs=torch.randn(1, 3, size, size), **kw).chain


def test_resnet18_chain_matches_the_paper():
    chain = chain_of(torchvision.models.resnet18())
    assert chain.length == 17  # stem + 16 block convs; downsample convs are skips, not chain convs
    assert [(r.source, r.target) for r in chain.residuals] == [(1, 3), (3, 5), (5, 7), (7, 9), (9, 11),
                                                               (11, 13), (13, 15), (15, 17)]
    assert [bool(r.projection) for r in chain.residuals] == [False, False, True, False, True, False, True, False]
    assert chain.breaks == {0, 1, 17}  # max-pool after the stem, chain output
    # An activation is a call site: the one `relu` module of a BasicBlock gives two positions.
    assert chain.positions[2].act_node != chain.positions[3].act_node
    assert chain.prunable == frozenset(range(2, 18)) - {6, 10, 14}
    assert chain.conv(2).input_shape == (1, 64, 8, 8)  # true shape after the max-pool


def test_mobilenet_v2_chain():
    chain = chain_of(torchvision.models.mobilenet_v2())
    assert chain.length == 52 and len(chain.residuals) == 10
    linear = [p.index for p in chain.positions if p.activation is None and not p.is_break]
    assert len(linear) == 17  # every bottleneck ends with a linear projection
    dw = [c for c in chain.convs if c.depthwise]
    assert len(dw) == 17
    assert {c.index for c in dw if c.stride == (1, 1)} == chain.prunable


def test_vgg_breaks_at_pools():
    chain = chain_of(torchvision.models.vgg11_bn())
    assert chain.length == 8 and not chain.residuals
    assert chain.segments == ((0, 1), (1, 2), (2, 4), (4, 6), (6, 8))


def test_user_defined_cnn_with_functional_activations():
    chain = chain_of(Zoo())
    kinds = [chain.positions[i].activation for i in range(1, 9)]
    assert kinds == ["relu", "relu", "relu", "gelu", "relu6", "relu6", "relu", None]
    assert 14 in chain.breaks and "MaxPool2d" in chain.positions[14].break_reason
    assert chain.conv(2).kernel_size == (3, 1)


def test_ignored_layers_are_never_merged_or_pruned():
    model = TinyResNet()
    chain = chain_of(model, ignored_layers=[model.r2.a[0]])
    assert {3, 4} <= chain.breaks
    assert 4 not in chain.prunable
    for seed in range(20):
        plan = Plan.sample(chain, seed, p_merge=1.0, p_drop=1.0)
        assert 4 in plan.kept_convs and {3, 4} <= plan.kept_acts


def test_no_conv_model_raises_no_chain_error():
    with pytest.raises(NoChainError, match=r"nn\.Conv2d"):
        LayerMergePruner(NoConv(), example_inputs=torch.randn(2, 8))


def test_untraceable_model_raises_with_advice():
    with pytest.raises(UntraceableModelError, match="leaf"):
        LayerMergePruner(DataDependent(), example_inputs=torch.randn(1, 3, 8, 8))


def test_missing_example_inputs_and_bad_ignored_layer():
    with pytest.raises(LayerMergeError, match="example_inputs"):
        LayerMergePruner(TinyResNet())
    with pytest.raises(LayerMergeError, match="not a submodule"):
        LayerMergePruner(TinyResNet(), example_inputs=torch.randn(1, 3, 8, 8), ignored_layers=[nn.Conv2d(1, 1, 1)])


def test_invalid_plans_are_rejected_with_reasons():
    pruner = LayerMergePruner(TinyResNet(), example_inputs=torch.randn(1, 3, 16, 16))
    chain = pruner.chain
    L, fp = chain.length, chain.fingerprint()
    every = set(range(1, L + 1))
    cases = {
        "cannot become identity": Plan(L, set(range(1, L)), every - {6}, fp),  # strided conv
        "crosses residual": Plan(L, set(range(1, L)) - {1}, every, fp),  # (0, 2] crosses (1, 3]
        "keeps no conv": Plan(L, set(range(1, L)), every - {2}, fp),
        "chain of 3 convs": Plan(3, set(), {1, 2, 3}),
        "made for chain": Plan(L, set(range(1, L)), every, "0123456789abcdef"),
    }
    for message, plan in cases.items():
        with pytest.raises(InvalidPlanError, match=message):
            pruner.apply(plan)
    vgg = LayerMergePruner(torchvision.models.vgg11_bn(), example_inputs=torch.randn(1, 3, 32, 32))
    with pytest.raises(InvalidPlanError, match="breaks"):
        vgg.apply(Plan(8, set(), set(range(1, 9))))


def test_plan_json_round_trip_and_summary(tmp_path):
    chain = chain_of(Zoo())
    plan = Plan.sample(chain, 7)
    assert Plan.from_json(plan.to_json()) == plan
    path = tmp_path / "plan.json"
    plan.to_json(str(path))
    assert Plan.from_json(str(path)) == plan
    assert json.loads(path.read_text())["chain_id"] == chain.fingerprint()
    text = plan.summary(chain)
    assert f"{len(plan.blocks())} blocks" in text and "merged k" in text
    with pytest.raises(InvalidPlanError, match="JSON"):
        Plan.from_json("{not json")
    with pytest.raises(InvalidPlanError, match="format"):
        Plan.from_json('{"kept": []}')


def test_sampled_plans_are_valid_and_diverse():
    chain = chain_of(torchvision.models.resnet18())
    plans = {Plan.sample(chain, s) for s in range(30)}
    assert len(plans) > 20
    assert all(p.is_valid(chain) for p in plans)
    assert any(p.dropped_convs for p in plans) and any(chain.residuals_within(*b) for p in plans
                                                       for b in p.blocks())


def test_merge_rejects_foreign_models():
    pruner = LayerMergePruner(PlainStack(), example_inputs=torch.randn(1, 3, 16, 16))
    with pytest.raises(MergeError, match="apply"):
        pruner.merge(PlainStack())
    other = LayerMergePruner(TinyResNet(), example_inputs=torch.randn(1, 3, 16, 16))
    with pytest.raises(MergeError, match="different chain"):
        pruner.merge(other.apply(Plan.identity(other.chain)))
