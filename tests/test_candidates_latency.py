"""Candidate blocks (the table's entry set) and the end-to-end latency model on top of the profiler."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision
from nets import TinyResNet, Zoo

from lm_plugin import LayerMergePruner, Plan
from lm_plugin.blocks import block_geometry, fold_problem, residual_relation
from lm_plugin.budget import Budget
from lm_plugin.candidates import enumerate_candidates
from lm_plugin.latency import BackendUnavailableError

FAST = {"warmup": 1, "repeats": 3, "max_spread": 1e9}


def brute_force(chain, mode, max_kernel):
    """Every (st, end, kernel, groups) by exhaustive enumeration of blocks and kept subsets."""
    out = {}
    for st_ in range(chain.length):
        for end in range(st_ + 1, chain.length + 1):
            if any(p in chain.breaks for p in range(st_ + 1, end)):
                continue
            if any(residual_relation(st_, end, r) == "crosses" for r in chain.residuals):
                continue
            members = range(st_ + 1, end + 1)
            for n in range(1, len(members) + 1):
                for kept in itertools.combinations(members, n):
                    if any(not chain.conv(j).prunable for j in members if j not in kept):
                        continue
                    if mode == "act_only" and len(kept) != len(members):
                        continue
                    if mode == "layer_only" and len(kept) != 1:
                        continue
                    if any(fold_problem(chain, r, kept) for r in chain.residuals_within(st_, end)):
                        continue
                    geo = block_geometry(chain, st_, end, kept)
                    if end - st_ > 1 and max(geo.kernel_size) > max_kernel:
                        continue
                    out.setdefault((st_, end, *geo.kernel_size, geo.groups), set()).add(kept)
    return out


@pytest.mark.parametrize("model", [TinyResNet, Zoo], ids=["tinyresnet", "zoo"])
@pytest.mark.parametrize("mode", ["layermerge", "act_only", "layer_only"])
def test_candidates_are_exactly_the_valid_blocks(model, mode):
    chain = LayerMergePruner(model(), example_inputs=torch.randn(1, 3, 16, 16), cache_dir=None).chain
    found = {c.key: set(c.subsets) for c in enumerate_candidates(chain, mode, max_kernel=7)}
    assert found == brute_force(chain, mode, 7)


def test_identity_plan_blocks_are_always_candidates():
    chain = LayerMergePruner(torchvision.models.resnet18(), example_inputs=torch.randn(1, 3, 32, 32),
                             cache_dir=None).chain
    keys = {c.key for c in enumerate_candidates(chain, "layermerge", max_kernel=1)}
    for st_, end in Plan.identity(chain).blocks():
        geo = block_geometry(chain, st_, end, range(1, chain.length + 1))
        assert (st_, end, *geo.kernel_size, geo.groups) in keys


def test_latency_model_predicts_end_to_end_and_resumes_from_cache(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    pruner = LayerMergePruner(TinyResNet(), 0.5, example_inputs=x, backend="cpu", profiler_settings=FAST,
                              cache_dir=tmp_path, progress=False)
    model = pruner.latency_model()
    assert set(model.block_ms) == {c.key for c in pruner.candidates}  # joined by key, one per candidate
    assert set(model.skip_ms) == {r.target for r in pruner.chain.residuals if r.projection}
    identity = Plan.identity(pruner.chain)
    assert pruner.predict_latency(identity) == pytest.approx(model.original_ms)
    plan = Plan.sample(pruner.chain, 0, p_merge=1.0, max_kernel=7)
    blocks = sum(model.block(s, e, plan.kept_convs) for s, e in plan.blocks())
    folded = {r.target for s, e in plan.blocks() for r in pruner.chain.residuals_within(s, e)}
    skips = sum(ms for target, ms in model.skip_ms.items() if target not in folded)
    assert pruner.predict_latency(plan) == pytest.approx(model.rest_ms + blocks + skips)
    assert pruner.measure_latency(pruner.merge(pruner.apply(plan))) > 0
    assert pruner.budget_ms() == pytest.approx(0.5 * model.original_ms)

    again = LayerMergePruner(TinyResNet(), 0.5, example_inputs=x, backend="cpu", profiler_settings=FAST,
                             cache_dir=tmp_path, progress=False)
    reloaded = again.latency_model()
    assert reloaded.block_ms == model.block_ms  # everything came from the cache
    assert list(tmp_path.glob("latency-cpu-*.jsonl"))


def test_cuda_backend_is_refused_cleanly_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    pruner = LayerMergePruner(TinyResNet(), example_inputs=torch.randn(1, 3, 16, 16), backend="cuda",
                              cache_dir=None)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        pruner.latency_model()


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "fast", "-3ms", True])
def test_bad_budgets_are_rejected(bad):
    with pytest.raises(ValueError, match="budget"):
        Budget.parse(bad)
    with pytest.raises(ValueError, match="budget"):
        LayerMergePruner(TinyResNet(), bad, example_inputs=torch.randn(1, 3, 16, 16))


def test_budget_units():
    assert Budget.parse(0.5).to_ms(10.0) == 5.0
    assert Budget.parse("12.5ms").to_ms(10.0) == 12.5
    assert Budget.parse(1).unit == "ratio"
