"""Merging is exact: merged == trainable form, for every supported architecture and random valid plans."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from nets import PlainStack, TinyResNet, Zoo, randomize_bn

from lm_plugin import LayerMergePruner, Plan
from lm_plugin.blocks import block_geometry

ARCHS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), 32),
    # float64 depthwise convs are ~100x slower than float32 on CPU: the float64 checks use a narrow
    # MobileNetV2 (same structure); the float32 checks below use the full-width one.
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25), 32),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=10), 32),
    "zoo": (Zoo, 32),
}
_PRUNERS: dict[str, LayerMergePruner] = {}


def pruner_for(name: str) -> tuple[LayerMergePruner, torch.Tensor]:
    """One float64 pruner per architecture, shared by the examples hypothesis draws."""
    factory, size = ARCHS[name]
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if name not in _PRUNERS:
        model = randomize_bn(factory()).double().eval()
        _PRUNERS[name] = LayerMergePruner(model, example_inputs=x)
    return _PRUNERS[name], x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def count_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def check_structure(pruner: LayerMergePruner, plan: Plan, merged: nn.Module) -> None:
    """One conv per block with the block's geometry; convs outside the chain survive unless folded."""
    chain = pruner.chain
    folded_proj = sum(1 for st_, end in plan.blocks() for r in chain.residuals_within(st_, end) if r.projection)
    outside = count_convs(pruner.model) - chain.length
    assert count_convs(merged) == len(plan.blocks()) + outside - folded_proj
    assert not any(isinstance(m, nn.BatchNorm2d) for m in merged.modules())
    for st_, end in plan.blocks():
        geo = block_geometry(chain, st_, end, plan.kept_convs)
        conv = merged.get_submodule(chain.conv(geo.kept[0]).name)
        assert isinstance(conv, nn.Conv2d)
        assert tuple(conv.kernel_size) == geo.kernel_size
        assert tuple(conv.stride) == geo.stride
        assert tuple(conv.padding) == geo.padding
        assert conv.groups == geo.groups


@pytest.mark.parametrize("arch", list(ARCHS))
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), p_merge=st.sampled_from([0.3, 0.6, 0.9]),
       p_drop=st.sampled_from([0.0, 0.5, 1.0]))
@example(seed=823, p_merge=0.6, p_drop=0.5)  # Zoo: a 4-group conv whose block folds x + x merged into a dense conv
def test_random_plans_merge_exactly_float64(arch, seed, p_merge, p_drop):
    pruner, x = pruner_for(arch)
    plan = Plan.sample(pruner.chain, seed, p_merge=p_merge, p_drop=p_drop)
    trainable = pruner.apply(plan).eval()
    merged = pruner.merge(trainable)
    with torch.no_grad():
        assert rel_err(trainable(x), merged(x)) <= 1e-10
    check_structure(pruner, plan, merged)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "zoo"])
def test_random_plans_merge_float32(arch):
    factory, size = ARCHS[arch]
    if arch == "mobilenet_v2":
        factory = lambda: torchvision.models.mobilenet_v2(num_classes=10)  # noqa: E731
    model = randomize_bn(factory()).eval()
    x = torch.randn(2, 3, size, size)
    pruner = LayerMergePruner(model, example_inputs=x)
    for seed in range(3):
        trainable = pruner.apply(Plan.sample(pruner.chain, seed)).eval()
        merged = pruner.merge(trainable)
        assert next(merged.parameters()).dtype == torch.float32
        with torch.no_grad():
            assert rel_err(trainable(x), merged(x)) <= 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
def test_identity_plan_equals_original_with_bn_folded(arch):
    pruner, x = pruner_for(arch)
    plan = Plan.identity(pruner.chain)
    merged = pruner.merge(pruner.apply(plan))
    with torch.no_grad():
        assert rel_err(pruner.model(x), merged(x)) <= 1e-10
    assert count_convs(merged) == count_convs(pruner.model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in merged.modules())


def test_merge_all_of_plain_stack_gives_one_conv_per_segment():
    model = randomize_bn(PlainStack()).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    pruner = LayerMergePruner(model, example_inputs=x)
    assert pruner.chain.segments == ((0, 4), (4, 7))
    plan = Plan.merge_all(pruner.chain)
    merged = pruner.merge(pruner.apply(plan))
    kernels = sorted(m.kernel_size for m in merged.modules() if isinstance(m, nn.Conv2d))
    assert kernels == [(7, 7), (9, 9)]  # 1 + 3*2 and 1 + 4*2
    with torch.no_grad():
        assert rel_err(model(x).sum().reshape(1), merged(x).sum().reshape(1)) > 0  # activations really removed
        assert rel_err(pruner.apply(plan).eval()(x), merged(x)) <= 1e-10


def test_fully_pruned_branch_computes_x_plus_x():
    model = randomize_bn(TinyResNet()).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    pruner = LayerMergePruner(model, example_inputs=x)
    chain = pruner.chain
    r = chain.residuals[0]
    assert (r.source, r.target, r.projection) == (1, 3, None)
    # Block (0, 3] keeps the stem and drops both branch convs: relu(2 * stem(x)).
    plan = Plan(chain.length, {3, 4, 5, 6}, set(range(1, 8)) - {2, 3}, chain.fingerprint())
    trainable = pruner.apply(plan).eval()
    merged = pruner.merge(trainable)
    stem = model.stem
    with torch.no_grad():
        expected_block = torch.relu(2 * stem(x))
        assert rel_err(trainable(x), merged(x)) <= 1e-10
    first = merged.get_submodule("stem.0")
    assert first.kernel_size == (3, 3)
    with torch.no_grad():
        assert rel_err(expected_block, torch.relu(first(x))) <= 1e-10


def test_depthwise_group_stays_depthwise_and_grouped_mix_keeps_the_common_groups():
    pruner, x = pruner_for("zoo")
    chain = pruner.chain
    dw = [c.index for c in chain.convs if c.depthwise and c.stride == (1, 1)][:2]
    assert dw == [5, 6]
    bounds = set(range(1, chain.length)) - {5}  # merge dw1 and dw2 only
    plan = Plan(chain.length, bounds, set(range(1, chain.length + 1)), chain.fingerprint())
    merged = pruner.merge(pruner.apply(plan))
    conv = merged.get_submodule(chain.conv(5).name)
    assert conv.groups == 24 and conv.kernel_size == (7, 7)
    bounds = set(range(1, chain.length)) - {6}  # depthwise 5x5 then grouped(4) 3x3: 4 groups, not dense
    plan = Plan(chain.length, bounds, set(range(1, chain.length + 1)), chain.fingerprint())
    merged = pruner.merge(pruner.apply(plan))
    assert merged.get_submodule(chain.conv(6).name).groups == 4
    assert block_geometry(chain, 5, 7, plan.kept_convs).groups == 4  # what the latency table times
    with torch.no_grad():
        assert rel_err(pruner.apply(plan).eval()(x), merged(x)) <= 1e-10


def test_stride_inside_a_group_and_projection_fold():
    pruner, x = pruner_for("zoo")
    chain = pruner.chain
    # (2, 5]: 1x3 conv, strided 3x3, depthwise 3x3 -> kernel 1 + ... per dim, stride 2.
    plan = Plan(chain.length, set(range(1, chain.length)) - {3, 4}, set(range(1, chain.length + 1)),
                chain.fingerprint())
    geo = block_geometry(chain, 2, 5, plan.kept_convs)
    assert geo.stride == (2, 2)
    assert geo.kernel_size == (1 + 0 + 2 + 2 * 2, 1 + 2 + 2 + 2 * 2)
    merged = pruner.merge(pruner.apply(plan))
    with torch.no_grad():
        assert rel_err(pruner.apply(plan).eval()(x), merged(x)) <= 1e-10
    # Fold the strided projection residual (10, 12] into block (10, 12].
    r = next(r for r in chain.residuals if r.projection)
    assert (r.source, r.target, r.stride) == (10, 12, (2, 2))
    plan = Plan(chain.length, set(range(1, chain.length)) - {11}, set(range(1, chain.length + 1)),
                chain.fingerprint())
    assert chain.residuals_within(10, 12) == (r,)
    n_before = count_convs(pruner.merge(pruner.apply(Plan.identity(chain))))
    merged = pruner.merge(pruner.apply(plan))
    assert count_convs(merged) == n_before - 2  # two convs + the projection became one
    with torch.no_grad():
        assert rel_err(pruner.apply(plan).eval()(x), merged(x)) <= 1e-10


def test_merged_model_traces_and_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    pruner = LayerMergePruner(model, example_inputs=x)
    merged = pruner.merge(pruner.apply(Plan.sample(pruner.chain, 3)))
    traced = torch.jit.trace(merged, x)
    with torch.no_grad():
        assert torch.allclose(traced(x), merged(x), atol=1e-5)
    path = tmp_path / "merged.onnx"
    torch.onnx.export(merged, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy()})
    assert rel_err(merged(x).detach(), torch.from_numpy(y)) <= 1e-4


def test_users_model_is_never_mutated():
    model = TinyResNet().train()
    before = copy.deepcopy(model.state_dict())
    pruner = LayerMergePruner(model, example_inputs=torch.randn(2, 3, 16, 16))
    trainable = pruner.apply(Plan.sample(pruner.chain, 0, p_drop=1.0))
    pruner.merge(trainable)
    assert model.training
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert all(m.padding == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))


def test_trainable_form_trains_and_merge_uses_finetuned_weights():
    model = TinyResNet()
    x = torch.randn(4, 3, 16, 16)
    pruner = LayerMergePruner(model, example_inputs=x)
    trainable = pruner.apply(Plan.sample(pruner.chain, 5)).train()
    opt = torch.optim.SGD(trainable.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss = trainable(x).square().mean()
        loss.backward()
        assert all(p.grad is not None for p in trainable.parameters())
        opt.step()
    trainable.eval()
    merged = pruner.merge(trainable)
    with torch.no_grad():
        assert rel_err(trainable(x), merged(x)) <= 1e-4
        assert rel_err(pruner.merge(pruner.apply(Plan.sample(pruner.chain, 5)))(x), merged(x)) > 1e-3


@pytest.mark.parametrize("rule, expect_act", [("reference", True), ("none", False)])
def test_linear_boundary_activation_rule(rule, expect_act):
    from lm_plugin import RewriteOptions

    model = randomize_bn(torchvision.models.mobilenet_v2(num_classes=10)).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    pruner = LayerMergePruner(model, example_inputs=x, rewrite=RewriteOptions(linear_boundary_act=rule))
    chain = pruner.chain
    linear = [p.index for p in chain.positions if p.activation is None and not p.is_break]
    target = linear[1]
    bounds = set(range(1, chain.length)) - {target - 1, target - 2}  # a 3-layer block ending at a linear pos.
    plan = Plan(chain.length, bounds, set(range(1, chain.length + 1)), chain.fingerprint())
    trainable = pruner.apply(plan).eval()
    inserted = [n for n, _ in trainable.named_children() if n.startswith("lm_inserted_act")]
    assert bool(inserted) == expect_act
    if expect_act:
        assert isinstance(getattr(trainable, inserted[0]), nn.ReLU6)  # MobileNetV2's own activation
    with torch.no_grad():
        assert rel_err(trainable(x), pruner.merge(trainable)(x)) <= 1e-10


def test_merges_that_would_not_fit_are_refused_before_allocating(monkeypatch):
    """A block whose merged kernel is over ``max_bytes``, or a plan whose merge needs more memory than the machine
    has available, raises MergeError naming the blocks to keep an activation in; nothing is lost (the trainable
    form is untouched and merges once memory allows)."""
    import lm_plugin.merge.deploy as deploy
    from lm_plugin.errors import MergeError
    from lm_plugin.merge import merge

    model = randomize_bn(PlainStack()).eval()
    x = torch.randn(1, 3, 16, 16)
    pruner = LayerMergePruner(model, example_inputs=x)
    trainable = pruner.apply(Plan.merge_all(pruner.chain))
    before = copy.deepcopy(trainable.state_dict())
    with pytest.raises(MergeError, match=r"would merge into a 9x9 conv .*keep an activation inside it"):
        merge(trainable, pruner.chain, max_bytes=1024)
    monkeypatch.setattr(deploy, "_available_bytes", lambda: 4096)
    with pytest.raises(MergeError, match=r"needs about .* GiB .* is available.*\(4,7\]"):
        pruner.merge(trainable)
    assert all(torch.equal(before[k], v) for k, v in trainable.state_dict().items())
    monkeypatch.setattr(deploy, "_available_bytes", lambda: None)  # unknown (not Linux): no preflight
    merged = pruner.merge(trainable)
    with torch.no_grad():
        assert rel_err(trainable.eval()(x), merged(x)) <= 1e-5
    monkeypatch.undo()  # the real reader: MemAvailable on Linux
    free = deploy._available_bytes()
    assert free is None or free > 0
