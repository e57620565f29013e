"""The torch-pruning face of LayerMergePruner: ignored_layers in the deploy form, cost_report. Real libraries."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from lm_plugin import LayerMergePruner
from lm_plugin.plan import Plan

X = torch.randn(1, 3, 32, 32)


def _pruner(model: nn.Module, **kwargs) -> LayerMergePruner:
    return LayerMergePruner(model, example_inputs=X, backend="cpu", cache_dir=None, progress=False,
                            importance="zero_shot", **kwargs)


def _deploy_merging_into(pruner: LayerMergePruner, name: str) -> nn.Module:
    """Deploy form of a plan that removes the activation in front of conv ``name`` (and every other removable
    activation of its residual block), so that ``name`` would be merged into the conv before it."""
    chain = pruner.chain
    index = next(c.index for c in chain.convs if c.name == name)
    identity = Plan.identity(chain)
    removed = {index - 1} - chain.breaks
    return pruner.merge(pruner.apply(Plan(chain.length, identity.kept_acts - removed, identity.kept_convs,
                                          chain.fingerprint())))


def test_ignored_conv_survives_unmerged_in_deploy_form_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    conv, bn = model.layer1[0].conv2, model.layer1[0].bn2

    merged = dict(_deploy_merging_into(_pruner(model), "layer1.0.conv2").named_modules())
    # control: without ignoring, it is merged into conv1
    assert "layer1.0.conv2" not in merged and merged["layer1.0.conv1"].kernel_size == (5, 5)

    pruner = _pruner(model, ignored_layers=[conv])
    deployed = _deploy_merging_into(pruner, "layer1.0.conv2")
    modules = dict(deployed.named_modules())
    kept = modules["layer1.0.conv2"]
    assert isinstance(kept, nn.Conv2d) and kept.kernel_size == (3, 3) and kept.stride == (1, 1)
    # it is the user's conv with its BatchNorm folded in, nothing else merged into it
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(kept.weight, conv.weight * scale[:, None, None, None])
    # and the deploy form still computes the original function
    torch.testing.assert_close(deployed(X), model(X), rtol=1e-4, atol=1e-4)


def test_ignored_layers_by_name_equals_by_module():
    model = torchvision.models.resnet18(num_classes=10).eval()
    by_module = _pruner(model, ignored_layers=[model.layer2[1].conv1])
    by_name = _pruner(model, ignored_layers=["layer2.1.conv1"])
    assert by_module.chain.fingerprint() == by_name.chain.fingerprint()
    assert "layer2.1.conv1" in dict(_deploy_merging_into(by_name, "layer2.1.conv1").named_modules())


def test_cost_report_is_torch_pruning_count(capsys):
    model = torchvision.models.resnet18(num_classes=10).eval()
    pruner = _pruner(model)
    deployed = pruner.merge(pruner.apply(Plan.sample(pruner.chain, 0, p_merge=1.0, max_kernel=7)))
    report = pruner.cost_report(deployed)
    line = capsys.readouterr().out
    macs0, params0 = tp.utils.count_ops_and_params(model, X)
    macs1, params1 = tp.utils.count_ops_and_params(deployed, X)
    assert (report["original"].macs, report["original"].params) == (int(macs0), int(params0))
    assert (report["compressed"].macs, report["compressed"].params) == (int(macs1), int(params1))
    assert report["compressed"].convs < report["original"].convs
    assert line.startswith("MACs: ") and "#Params: " in line and "convs: " in line
    pruner.cost_report(deployed, show=False)
    assert capsys.readouterr().out == ""


def _digits_cnn() -> tuple[nn.Module, torch.Tensor]:
    from lm_plugin.data.datasets import digits
    from lm_plugin.train import fit
    from lm_plugin.workloads.models import digits_resnet

    torch.manual_seed(0)
    model = digits_resnet(width=16)
    fit(model, digits(64, train=True), epochs=2, seed=0, progress=False)
    return model, torch.randn(1, 1, 8, 8)


FACES = {  # model, example input, max_kernel (mobilenet_v2's 900 candidates at 7 cost minutes of scoring)
    "resnet18": lambda: (torchvision.models.resnet18(num_classes=10), X, 7),
    "mobilenet_v2": lambda: (torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25), X, 3),
    "digits_cnn": lambda: (*_digits_cnn(), 7),
}


@pytest.mark.parametrize("arch", sorted(FACES))
def test_step_compresses_in_torch_pruning_habits(arch, one_thread):
    """tp's life cycle: construct with example_inputs / ignored_layers, step(), count before and after."""
    model, x, max_kernel = FACES[arch]()
    model.eval()
    before = copy.deepcopy(model.state_dict())
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    g = torch.Generator().manual_seed(0)
    calib = DataLoader(TensorDataset(torch.randn(16, *x.shape[1:], generator=g),
                                     torch.randint(0, 10, (16,), generator=g)), batch_size=16)
    # analytic costs (MACs) so that the chosen plan, and what is asserted about it, cannot move with timing noise
    pruner = LayerMergePruner(model, budget=0.8, example_inputs=x, ignored_layers=[stem], backend="macs",
                              max_kernel=max_kernel, cache_dir=None, progress=False, importance="zero_shot",
                              eval_data=calib)
    trainable = pruner.step()
    plan = Plan.of(trainable)
    assert plan is not None and pruner.predict_latency(plan) <= pruner.budget_ms() + 1e-9
    assert pruner.predict_latency(plan) == pytest.approx(tp.utils.count_ops_and_params(
        pruner.merge(pruner.apply(plan).eval()), x)[0] / 1e6, rel=1e-6)  # macs backend: prediction = count
    stem_index = next(c.index for c in pruner.chain.convs if c.name == _name(model, stem))
    assert stem_index in plan.kept_convs and {stem_index - 1, stem_index} - {0, pruner.chain.length} <= plan.kept_acts
    deployed = pruner.merge(trainable.eval())
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), trainable(x), rtol=1e-4, atol=1e-4)
    report = pruner.cost_report(deployed, show=False)
    assert report["compressed"].macs < report["original"].macs
    assert report["compressed"].convs < report["original"].convs
    for key, value in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(value, before[key]), key


def _name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
