"""Operations are recognised by what they compute (lm_plugin.trace.canonical), and merging stays exact.

Every network here spells a conv, a BatchNorm, a pad or an identity in an unusual way, or sums parallel linear
branches (RepVGG / ACNet style). Each must give a chain with removable activations, and the identity plan and
random plans must merge exactly in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nets import randomize_bn

from lm_plugin import LayerMergePruner, MergeError, Plan
from lm_plugin.merge import merge_error, output_error

X = torch.randn(2, 3, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


class SameConv(nn.Conv2d):
    """TF-style "same" padding computed from the input size: fx cannot trace the control flow."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s in ((iw, self.kernel_size[1], self.stride[1]), (ih, self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if pads[1] > 0:  # data-dependent branch: not symbolically traceable
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FusedBNAct(nn.BatchNorm2d):
    """A norm+activation module that calls F.batch_norm itself (as timm's BatchNormAct2d does)."""

    def __init__(self, c):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class FunctionalConv(nn.Module):
    def __init__(self, cin, cout, k=3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) * 0.2)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, 1, self.weight.shape[-1] // 2)


class Spellings(nn.Module):
    """Conv, BN, pad and identity written every which way."""

    def __init__(self):
        super().__init__()
        self.stem = SameConv(3, 8, 3, stride=2, bias=False)  # 20x20 stride 2: asymmetric "same" pad
        self.bn0 = FusedBNAct(8)
        self.pad = nn.ZeroPad2d(1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=0, bias=False)  # padding given by the ZeroPad2d before it
        self.bn1 = FusedBNAct(8)
        self.c2 = FunctionalConv(8, 8)
        self.gap = nn.Identity()
        self.c3 = SameConv(8, 8, 3, stride=1, bias=True)  # stride 1: symmetric "same" pad
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn0(self.stem(x))
        x = self.bn1(self.c1(self.pad(x)))
        x = torch.relu_(self.c2(x) + 0)
        x = F.hardswish(self.gap(self.c3(x)) * 1)
        return self.head(x.mean((2, 3)))


class TFBlock(nn.Module):
    """TF-ported inverted residual: expand, stride-2 depthwise with asymmetric "same" padding, project."""

    def __init__(self, c=8):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU6())
        self.dw = SameConv(2 * c, 2 * c, 3, stride=2, groups=2 * c, bias=False)
        self.bn = nn.BatchNorm2d(2 * c)
        self.project = nn.Sequential(nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), nn.ReLU())

    def forward(self, x):
        x = self.expand(self.stem(x))
        return self.project(F.relu6(self.bn(self.dw(x)))).mean((2, 3))


def test_asymmetric_padding_merges():
    """An explicit asymmetric zero pad is part of its conv: the block's pad takes it, the merge re-emits it."""
    pruner = _pruner(TFBlock())
    chain = pruner.chain
    dw = next(c for c in chain.convs if c.stride == (2, 2))
    assert dw.pad_extra == (1, 1) and dw.padding == (0, 0) and dw.pad_node is not None
    assert not dw.prunable
    assert len(chain.mergeable_positions) == 3  # the pad no longer cuts the chain
    for plan in [Plan.identity(chain), Plan.merge_all(chain)] + [Plan.sample(chain, s) for s in range(4)]:
        assert merge_error(pruner.apply(plan), pruner.merge, X) <= 1e-10
    merged = pruner.merge(pruner.apply(Plan.merge_all(chain)))
    assert sum(isinstance(m, nn.Conv2d) for m in merged.modules()) == 1


def _bn(c):
    return nn.BatchNorm2d(c)


class RepBlock(nn.Module):
    """RepVGG / MobileOne training-time block: k x k conv+BN, 1x1 conv+BN and a BN identity, summed."""

    def __init__(self, c, stride=1, identity=True):
        super().__init__()
        self.kxk = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, bias=False), _bn(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, stride, 0, bias=False), _bn(c))
        self.id = _bn(c) if identity and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.kxk(x) + self.k1(x)
        if self.id is not None:
            out = out + self.id(x)
        return self.act(out)


class ACBlock(nn.Module):
    """ACNet: 3x3 + 1x3 + 3x1 convs, each with its BN, plus the input itself."""

    def __init__(self, c):
        super().__init__()
        self.sq = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), _bn(c))
        self.hor = nn.Sequential(nn.Conv2d(c, c, (1, 3), 1, (0, 1), bias=False), _bn(c))
        self.ver = nn.Sequential(nn.Conv2d(c, c, (3, 1), 1, (1, 0), bias=False), _bn(c))

    def forward(self, x):
        return F.relu(self.sq(x) + self.hor(x) + self.ver(x) + x)


class RepNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU())
        self.blocks = nn.Sequential(RepBlock(8), RepBlock(8), RepBlock(8, stride=2), ACBlock(8), RepBlock(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _pruner(model: nn.Module) -> LayerMergePruner:
    model = randomize_bn(model).double().eval()
    return LayerMergePruner(model, 0.7, X, cache_dir=None, progress=False)


@pytest.mark.parametrize("factory", [Spellings, RepNet])
def test_recognised_and_exact(factory):
    pruner = _pruner(factory())
    chain = pruner.chain
    assert len(chain.mergeable_positions) >= 3
    identity = pruner.merge(pruner.apply(Plan.identity(chain)))
    assert output_error(pruner.model, identity, X, dtype=torch.float64) <= 1e-10
    for seed in range(6):
        plan = Plan.sample(chain, seed)
        assert merge_error(pruner.apply(plan), pruner.merge, X) <= 1e-10, plan.summary(chain)
    merged_all = pruner.merge(pruner.apply(Plan.merge_all(chain)))
    assert sum(isinstance(m, nn.Conv2d) for m in merged_all.modules()) < chain.length


def test_spellings_become_canonical_modules():
    pruner = _pruner(Spellings())
    chain = pruner.chain
    assert chain.length == 4  # stem, c1, c2 (functional) and c3 (opaque "same" conv)
    assert [c.padding for c in chain.convs[1:]] == [(1, 1), (1, 1), (1, 1)]  # pad folded, "same" probed
    # The traced copy is in eval mode, new modules included (a BN in training mode would use batch statistics).
    assert not any(m.training for m in pruner.graph_module.modules())
    # The fused BN is a real BatchNorm2d again, keeping the user's parameter names: it trains in train mode.
    trainable = pruner.apply(Plan.identity(chain))
    assert type(trainable.get_submodule("bn1")) is nn.BatchNorm2d
    assert "bn1.weight" in dict(trainable.named_parameters())
    before = trainable.bn1.running_mean.clone()
    trainable.train()(X)
    assert not torch.equal(before, trainable.bn1.running_mean)
    notes = " ".join(pruner.graph_module.meta["lm_plugin_trace"])
    assert "opaque" in notes and "functional batch norms" in notes


def test_parallel_branches_fold_into_one_conv():
    pruner = _pruner(RepNet())
    chain = pruner.chain
    assert sum(1 for c in chain.convs if c.branches) == 5
    # Identity plan: each block is one conv; the 1x1, 1x3, 3x1 and BN branches are gone.
    merged = pruner.merge(pruner.apply(Plan.identity(chain)))
    assert sum(isinstance(m, nn.Conv2d) for m in merged.modules()) == chain.length
    assert not any(isinstance(m, nn.BatchNorm2d) for m in merged.modules())
    # Dropping whole RepVGG units leaves identities; the rest stays exact.
    units = {c.index for c in chain.convs if c.branches}
    plans = [p for p in (Plan.sample(chain, seed, p_drop=0.8) for seed in range(20)) if p.dropped_convs & units]
    assert plans
    for plan in plans[:3]:
        assert merge_error(pruner.apply(plan), pruner.merge, X) <= 1e-10


def test_user_model_untouched():
    model = randomize_bn(Spellings()).double().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    pruner = LayerMergePruner(model, 0.7, X, cache_dir=None, progress=False)
    pruner.merge(pruner.apply(Plan.sample(pruner.chain, 0)))
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_wrong_merge_raises(monkeypatch):
    """The merge checks itself: a wrong merged kernel raises MergeError naming the block."""
    import lm_plugin.merge.deploy as deploy

    pruner = _pruner(RepNet())
    trainable = pruner.apply(Plan.identity(pruner.chain))
    real = deploy._chain_unit

    def off_by_a_bit(gm, c):
        lin = real(gm, c)
        return type(lin)(lin.weight * (1 + 1e-3 * (c.index == 3)), lin.bias, lin.stride, lin.groups)

    monkeypatch.setattr(deploy, "_chain_unit", off_by_a_bit)
    with pytest.raises(MergeError, match=r"block \(2,3\]"):
        pruner.merge(trainable)
    unchecked = deploy.merge(trainable, pruner.chain, check=False)  # the escape hatch still returns
    assert isinstance(unchecked, nn.Module)


def test_tracer_name_index_gives_fx_graph():
    """The tracer's parameter/buffer name index (fx scans every parameter per access) records the same graph as
    fx's own tracer, including a tensor reached under two names and a constant that belongs to no module."""
    import copy

    import timm
    import torch.fx as fx

    from lm_plugin.trace.graph import OpaqueFallbackTracer

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = FusedBNAct(4)
            self.b = self.a  # the same module (and tensors) under a second name
            self.conv = FunctionalConv(4, 4)
            self.register_buffer("scale", torch.ones(1, 4, 1, 1))

        def forward(self, x):
            return self.conv(self.b(self.a(x))) * self.scale + torch.zeros(1)

    for model in (Shared().eval(), timm.create_model("mobileone_s0", pretrained=False, num_classes=10).eval()):
        # fresh copies: tracing stores constants on the root it traces
        ours, plain = OpaqueFallbackTracer().trace(copy.deepcopy(model)), fx.Tracer().trace(copy.deepcopy(model))
        assert ours.python_code("self").src == plain.python_code("self").src


@pytest.mark.parametrize("zoo, name", [("torchvision", "densenet121"), ("timm", "regnetx_002"), ("local", "fused")])
def test_fake_shape_pass_matches_real_forward(zoo, name):
    """Shape propagation under fake tensors (batch norm answered from its input's metadata) records what a real
    forward pass records, on module BN (torchvision), functional BN of fused norm-act modules (timm) and a
    channels-last input."""
    import copy

    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    from lm_plugin.trace.graph import OpaqueFallbackTracer, propagate_shapes

    if zoo == "torchvision":
        import torchvision

        model, x = torchvision.models.get_model(name, num_classes=10), torch.randn(2, 3, 64, 64)
    elif zoo == "timm":
        import timm

        model, x = timm.create_model(name, pretrained=False, num_classes=10), torch.randn(2, 3, 64, 64)
    else:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), FusedBNAct(4), nn.BatchNorm2d(4), nn.Flatten(),
                              nn.Linear(4 * 14**2, 2))
        x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    gms = [fx.GraphModule(m, OpaqueFallbackTracer().trace(m)) for m in (copy.deepcopy(model.eval()), model.eval())]
    with torch.no_grad():
        propagate_shapes(gms[0], (x,))
        ShapeProp(gms[1]).propagate(x)
    from torch._subclasses.fake_tensor import FakeTensor

    assert any(n.meta.get("type") is FakeTensor for n in gms[0].graph.nodes)  # the fake pass ran, no fallback
    for fake, real in zip(gms[0].graph.nodes, gms[1].graph.nodes, strict=True):
        kinds = [torch.Tensor if issubclass(n.meta["type"], torch.Tensor) else n.meta["type"] for n in (fake, real)]
        assert kinds[0] == kinds[1], fake.name
        tm_fake, tm_real = fake.meta.get("tensor_meta"), real.meta.get("tensor_meta")
        if hasattr(tm_real, "shape"):
            assert (tm_fake.shape, tm_fake.dtype, tm_fake.stride, tm_fake.memory_format) == (
                tm_real.shape, tm_real.dtype, tm_real.stride, tm_real.memory_format), fake.name


def test_fake_shape_pass_keeps_wrong_input_error():
    """The batch-norm shortcut applies only where batch norm accepts the input: a channel mismatch still fails."""
    from lm_plugin.errors import UntraceableModelError

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5), nn.ReLU())
    with pytest.raises(UntraceableModelError):
        LayerMergePruner(model, example_inputs=torch.randn(1, 3, 8, 8))
