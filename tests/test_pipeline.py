"""lm_plugin.pipeline end to end on scikit-learn digits, with the real torch-pruning, NNI and torch.ao: no mocks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lm_plugin.pipeline import STAGES, PipelineError, StageOutput, list_stages, register_stage, run_pipeline
from lm_plugin.train import fit
from lm_plugin.workloads.data import digits
from lm_plugin.workloads.models import digits_resnet

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(16, 1, 8, 8)
FAST = {"profiler_settings": {"warmup": 1, "repeats": 3, "max_spread": 1e9}, "rounds": 1}
LAYERMERGE = ("layermerge", {"budget": 0.9, "clip_budget": True, "importance_settings": {"steps": 2}, "epochs": 1})
CHANCE = 10.0


@pytest.fixture(scope="module")
def data():
    return digits(64, train=True), digits(450, train=False)


@pytest.fixture(scope="module")
def model(data, one_thread):
    torch.manual_seed(0)
    net = digits_resnet(width=16)
    fit(net, data[0], epochs=3, seed=0, progress=False)
    return net.eval()


def run(model, stages, data, tmp_path, **kwargs):
    return run_pipeline(model, stages, example_inputs=X, train_data=data[0], test_data=data[1],
                        cache_dir=tmp_path, **{**FAST, **kwargs})


def check_records(result, names):
    assert [r.name for r in result.records] == ["original", *names]
    for record in result.records:
        with torch.no_grad():
            out = record.model(X)
        assert out.shape == (16, 10)
        assert record.accuracy is not None and record.accuracy > 2 * CHANCE, record.name
        assert record.latency_ms > 0 and record.original_ms > 0 and record.params > 0 and record.macs > 0
    table = result.table()
    assert all(name in table for name in names) and "speed-up" in table
    json.loads(json.dumps(result.to_dict()))  # JSON-able


def test_layermerge_then_tp_channel_pruning_then_int8(model, data, tmp_path):
    stages = [LAYERMERGE, ("channel_prune_tp", {"macs_ratio": 0.8, "epochs": 3, "max_lr": 0.01}), "quantize_torch"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run(model, stages, data, tmp_path)
    check_records(result, ["layermerge", "channel_prune_tp", "quantize_torch"])
    lm, cp, q = result.records[1:]
    assert lm.notes["exact"] and lm.convs <= result.records[0].convs
    assert cp.macs <= 0.8 * lm.macs  # the MACs target was met
    assert q.precision == "int8" and q.macs == cp.macs  # same multiply-accumulates, in int8
    assert q.size_bytes < cp.size_bytes  # int8 weights
    assert any(type(m).__module__.startswith("torch.ao.nn") for m in q.model.modules())  # real int8 modules
    assert result.final is q.model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched


def test_reverse_order_channel_pruning_then_layermerge(model, data, tmp_path):
    stages = [("channel_prune_tp", {"macs_ratio": 0.7, "ignored_layers": ["2.a.0"]}), LAYERMERGE]
    result = run(model, stages, data, tmp_path)
    check_records(result, ["channel_prune_tp", "layermerge"])
    pruned = result["channel_prune_tp"]
    widths = {n: m.out_channels for n, m in pruned.model.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths["2.a.0"] == 16  # ignored: not pruned
    assert min(widths.values()) < 16 and pruned.macs <= 0.7 * result.records[0].macs
    assert result["layermerge"].notes["exact"]


def test_nni_channel_pruning_with_speedup_respects_exclusions(model, data, tmp_path):
    stages = [("channel_prune_nni", {"sparse_ratio": 0.5, "exclude_op_names": ["3.a.0"]})]
    result = run(model, stages, data, tmp_path)
    check_records(result, ["channel_prune_nni"])
    pruned = result["channel_prune_nni"].model
    widths = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths["3.a.0"] == 16  # excluded
    assert widths["2.a.0"] == 8  # block-internal conv: half its filters gone, physically
    assert result["channel_prune_nni"].params < result.records[0].params


def test_nni_simulated_quantisation(model, data, tmp_path):
    result = run(model, ["quantize_nni"], data, tmp_path)
    check_records(result, ["quantize_nni"])
    record = result["quantize_nni"]
    assert record.precision == "int8 (simulated)" and record.notes["quantized_modules"]
    assert abs(record.accuracy - result.records[0].accuracy) < 10


def test_bad_pipelines_are_refused_before_running(model, data, tmp_path):
    with pytest.raises(PipelineError, match="unknown stage"):
        run(model, ["prune_everything"], data, tmp_path)
    with pytest.raises(PipelineError, match="no setting"):
        run(model, [("channel_prune_tp", {"sparsity": 0.5})], data, tmp_path)
    with pytest.raises(PipelineError, match="put quantisation last"):
        run(model, ["quantize_torch", "layermerge"], data, tmp_path)
    with pytest.raises(PipelineError, match="no module"):
        run(model, [("channel_prune_tp", {"ignored_layers": ["nope"], "epochs": 0})], data, tmp_path)


def test_user_registered_stage_and_output_check(model, data, tmp_path):
    @register_stage("_test_halve_head")
    def halve(net, ctx, *, keep: int = 5):
        head = nn.Sequential(*list(net.children())[:-1], nn.Linear(16, keep))
        return StageOutput(head.eval())

    try:
        assert "_test_halve_head" in list_stages() and STAGES["_test_halve_head"].defaults == {"keep": 5}
        with pytest.raises(PipelineError, match="output shape"):
            run(model, ["_test_halve_head"], data, tmp_path)
    finally:
        del STAGES["_test_halve_head"]


@pytest.mark.parametrize("script", ["torch_pruning_style.py", "pipeline.py"])
def test_examples_run(script, tmp_path):
    args = [sys.executable, str(ROOT / "examples" / script), "--quick"]
    if script == "pipeline.py":
        args += ["--json", str(tmp_path / "result.json")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "LM_PLUGIN_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MACs" in done.stdout
    if script == "pipeline.py":
        saved = json.loads((tmp_path / "result.json").read_text())
        assert len(saved) == 2 and all(len(r["stages"]) == 4 for r in saved.values())
