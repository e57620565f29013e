"""``inspect_model`` and ``lm-plugin inspect``: what a model offers LayerMerge, and why the rest is out of reach.

The expected numbers are never hard-coded: every count is checked against a pruner built directly, so the tests
keep holding while the chain extraction improves.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from lm_plugin import LayerMergePruner
from lm_plugin.cli import main
from lm_plugin.inspect import CHAIN_ENDS, CompressibilityReport, break_category, inspect_model

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------- models for the tests
class LinearOnly(nn.Module):
    """No convolution at all: LayerMerge has nothing to work on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


class DataDependent(nn.Module):
    """Convolutions behind Python control flow on a tensor value: torch.fx cannot trace the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:
            x = torch.relu(x)
        return self.b(x)


def linear_only() -> nn.Module:
    """Factory for the CLI test (``test_inspect:linear_only``)."""
    return LinearOnly()


def _same_as_pruner(report: CompressibilityReport, model: nn.Module, x: torch.Tensor) -> LayerMergePruner:
    """The report's counts are those of the chain a directly built pruner sees."""
    pruner = LayerMergePruner(model, 0.7, x, cache_dir=None, progress=False)
    chain = pruner.chain
    assert not report.refused and report.refusal is None
    assert report.chain_convs == chain.length
    assert report.removable_activations == len(chain.mergeable_positions)
    assert report.prunable_convs == len(chain.prunable)
    assert report.residuals == len(chain.residuals)
    assert report.candidates == len(pruner.candidates)
    assert report.notes == tuple(chain.notes)
    assert report.conv_modules == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert report.conv_calls is not None and report.chain_convs <= report.conv_calls
    # Raw reasons are every break position; the categories count all of them except the two chain ends.
    assert [i for i, _ in report.break_reasons] == sorted(chain.breaks)
    ends = sum(1 for i, r in report.break_reasons if r in CHAIN_ENDS and i in (0, chain.length))
    assert sum(n for _, n in report.break_categories) == len(report.break_reasons) - ends
    assert report.compressible == bool(chain.mergeable_positions or chain.prunable)
    assert report.seconds > 0
    return pruner


# ------------------------------------------------------------------------------------------- the function
def test_torchvision_resnet_report_matches_the_pruner():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    report = inspect_model(model, x)
    pruner = _same_as_pruner(report, model, x)
    assert report.model == "ResNet" and report.input_shapes == ((1, 3, 32, 32),)
    assert report.chain_summary == pruner.chain.summary()
    assert not any(c.startswith("other") for c, _ in report.break_categories), report.break_categories
    text = report.summary()
    for line in ("chain convs", "removable activations", "prunable convs", "candidate blocks", "breaks"):
        assert line in text
    assert pruner.chain.summary() not in text and pruner.chain.summary() in report.summary(chain=True)
    assert str(report) == text
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.chain_convs = 0  # type: ignore[misc]


def test_timm_se_model_names_its_squeeze_excite_breaks():
    timm = pytest.importorskip("timm")
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    report = inspect_model(model, x)
    _same_as_pruner(report, model, x)
    categories = dict(report.break_categories)
    # An SE block reads the value twice (global pool and the multiply): no block can span it.
    assert categories.get("SE multiply", 0) >= 1, report.break_categories
    assert not any(c.startswith("other") for c in categories), report.break_categories
    assert "SE multiply ×" in report.break_summary()
    data = report.to_dict()
    json.dumps(data)  # JSON-ready
    assert data["break_categories"] == categories and data["compressible"] == report.compressible


@pytest.mark.parametrize("model", [LinearOnly(), DataDependent()], ids=["no-conv", "untraceable"])
def test_refused_model_gives_a_report_with_the_reason(model):
    report = inspect_model(model, torch.randn(1, 3, 8, 8))
    assert report.refused and not report.compressible
    assert report.refusal and report.refusal_type and report.refusal_type.endswith("Error")
    assert report.chain_convs == 0 and report.break_categories == ()
    assert report.conv_modules == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    text = report.summary()
    assert "REFUSED" in text and report.refusal.splitlines()[0] in text
    json.dumps(report.to_dict())


def test_errors_that_are_not_refusals_are_raised():
    with pytest.raises(TypeError):
        inspect_model(torchvision.models.resnet18(), "not a tensor")  # type: ignore[arg-type]


def test_ignored_layers_and_max_kernel_reach_the_pruner():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    free, pinned = inspect_model(model, x), inspect_model(model, x, ignored_layers=["layer1.0.conv1"])
    assert pinned.prunable_convs < free.prunable_convs or pinned.removable_activations < free.removable_activations
    assert any(c == "ignored layer" for c, _ in pinned.break_categories)
    assert inspect_model(model, x, max_kernel=3).candidates <= free.candidates


@pytest.mark.parametrize("reason, category", [
    ("next op: AdaptiveAvgPool2d, mul", "SE multiply"),
    ("next op: mean, mul", "SE multiply"),
    ("next op: mul", "multiply (gating)"),
    ("next op: Sigmoid", "SE gate (sigmoid)"),
    ("next op: Hardsigmoid", "SE gate (sigmoid)"),
    ("next op: cat", "concat"),
    ("next op: MaxPool2d, cat", "concat"),
    ("next op: MaxPool2d", "pooling"),
    ("next op: adaptive_avg_pool2d", "pooling"),
    ("next op: add", "unfolded residual add"),
    ("next op: stochastic_depth", "stochastic depth / dropout"),
    ("next op: permute", "reshape / permute / split"),
    ("next op: LayerNorm2d", "normalisation (not foldable)"),
    ("next op: pad", "explicit padding"),
    ("next op: Upsample", "upsample / resize"),
    ("next op: GELU", "activation kept as an op"),
    ("next op: output", "head / output"),
    ("value read by 2 parallel convs", "parallel branches"),
    ("residual whose source lies outside the segment", "unfoldable residual"),
    ("crossing residuals", "unfoldable residual"),
    ("conv layer1.0.conv1 is in ignored_layers", "ignored layer"),
    ("chain output", "chain end"),
    ("next op: frobnicate", "other op: frobnicate"),
    ("something new", "other: something new"),
])
def test_break_categories(reason, category):
    assert break_category(reason) == category


# ------------------------------------------------------------------------------------------------- the CLI
def test_cli_inspect_torchvision_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["inspect", "torchvision:resnet18:num_classes=10", "--input-shape", "3,32,32", "--batch", "2",
                 "--json", str(out), "--chain"])
    assert code == 0
    text = capsys.readouterr().out
    assert "chain convs" in text and "layer1.0.conv1" in text  # --chain appends the per-conv table
    data = json.loads(out.read_text())
    assert data["input_shapes"] == [[2, 3, 32, 32]] and not data["refused"]
    assert data["context"]["model"] == "torchvision:resnet18:num_classes=10"
    direct = inspect_model(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32))
    assert data["chain_convs"] == direct.chain_convs and data["candidates"] == direct.candidates


def test_cli_inspect_timm_spec(capsys):
    pytest.importorskip("timm")
    assert main(["inspect", "timm:resnet10t:num_classes=10", "--input-shape", "3,32,32"]) == 0
    assert "removable activations" in capsys.readouterr().out


def test_cli_inspect_refused_model_reports_and_exits_zero(tmp_path, capsys):
    out = tmp_path / "refused.json"
    assert main(["inspect", "test_inspect:linear_only", "--input-shape", "3,8,8", "--json", str(out)]) == 0
    assert "REFUSED" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["refused"] and data["refusal"]


@pytest.mark.parametrize("args, message", [
    (["torchvision:resnet18"], "--input-shape"),
    (["--input-shape", "3,32,32"], "no model given"),
    (["timm:no_such_model_xyz", "--input-shape", "3,32,32"], "timm has no model"),
    (["torchvision:resnet18", "--input-shape", "3,32,32", "--batch", "0"], "bad --batch"),
])
def test_cli_inspect_bad_input(args, message, capsys):
    assert main(["inspect", *args]) == 2
    assert message in capsys.readouterr().err


def test_timm_spec_without_timm_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    assert main(["inspect", "timm:resnet18", "--input-shape", "3,32,32"]) == 2
    assert "pip install timm" in capsys.readouterr().err


def test_python_dash_m_inspect():
    done = subprocess.run([sys.executable, "-m", "lm_plugin", "inspect", "torchvision:squeezenet1_1:num_classes=10",
                           "--input-shape", "3,32,32"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "SqueezeNet at 1×3×32×32" in done.stdout
