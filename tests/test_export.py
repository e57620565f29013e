"""Taking a compressed model home: save -> load -> Plan.of -> ONNX in the shipped environment."""

from __future__ import annotations

import pytest
import torch
import torchvision

import lm_plugin
from lm_plugin import ConfigurationError, LayerMergePruner, Plan


@pytest.fixture(scope="module")
def merged():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).eval()
    pruner = LayerMergePruner(model, 0.7, torch.randn(2, 3, 32, 32), backend="macs", cache_dir=None, progress=False)
    plan = Plan.sample(pruner.chain, 3, p_merge=0.7, max_kernel=7)
    return pruner.merge(pruner.apply(plan).eval()), plan


def test_save_load_keeps_the_model_and_its_plan(merged, tmp_path):
    deployed, plan = merged
    path = lm_plugin.save(deployed, tmp_path / "merged.pt")
    loaded = lm_plugin.load(path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), deployed(x))
    assert Plan.of(loaded) == plan
    # a plain checkpoint is refused with what to do instead
    torch.save(deployed.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ConfigurationError, match=r"torch\.load"):
        lm_plugin.load(tmp_path / "weights.pt")


def test_onnx_and_torchscript_exports_of_a_loaded_model_run(merged, tmp_path):
    pytest.importorskip("onnxruntime")
    from lm_plugin.export import onnx_error

    loaded = lm_plugin.load(lm_plugin.save(merged[0], tmp_path / "merged.pt"))
    x = torch.randn(4, 3, 32, 32)
    path = lm_plugin.export_onnx(loaded, x, tmp_path / "merged.onnx")
    assert onnx_error(path, loaded, x) < 1e-5
    script = torch.jit.load(str(lm_plugin.export_torchscript(loaded, x, tmp_path / "merged.ts")))
    with torch.no_grad():
        assert torch.allclose(script(x), loaded(x), atol=1e-5)
