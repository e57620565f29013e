"""Candidate blocks (the table's entry set) and the end-to-end latency model on top of the profiler."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torchvision
from nets import TinyResNet, Zoo

from lm_plugin import LayerMergePruner, Plan
from lm_plugin.blocks import block_geometry, fold_problem, residual_relation
from lm_plugin.budget import Budget
from lm_plugin.candidates import enumerate_candidates
from lm_plugin.latency import BackendUnavailableError, LatencyDriftWarning, MacsProfiler

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
    expected = brute_force(chain, mode, 7)
    found = {c.key: c.kept for c in enumerate_candidates(chain, mode, max_kernel=7)}
    assert set(found) == set(expected)
    assert all(kept in expected[key] for key, kept in found.items())  # the representative is one of its subsets


def test_identity_plan_blocks_are_always_candidates():
    chain = LayerMergePruner(torchvision.models.resnet18(), example_inputs=torch.randn(1, 3, 32, 32),
                             cache_dir=None).chain
    keys = {c.key for c in enumerate_candidates(chain, "layermerge", max_kernel=1)}
    for st_, end in Plan.identity(chain).blocks():
        geo = block_geometry(chain, st_, end, range(1, chain.length + 1))
        assert (st_, end, *geo.kernel_size, geo.groups) in keys


def test_latency_model_predicts_end_to_end_and_resumes_from_cache(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    net = TinyResNet()
    pruner = LayerMergePruner(net, 0.5, example_inputs=x, backend="cpu", profiler_settings=FAST,
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
    # the fitted part outside the chain plus the fitted scale on what the plan's blocks and skips measured
    assert pruner.predict_latency(plan) == pytest.approx(model.rest_ms + model.scale * (blocks + skips))
    assert model.rest_ms >= 0 and model.scale > 0
    check = model.check  # the self-check: the original and sample plans, deployed and measured in the worker
    assert check is not None and check.plans[0].label == "original" and len(check.plans) >= 2
    assert check.plans[0].measured_ms == model.original_ms
    assert all(p.measured_ms > 0 and p.predicted_ms > 0 for p in check.plans)
    assert {"ms_error_max", "speedup_error_max", "rest_ms", "scale"} <= set(check.to_dict())
    assert pruner.measure_latency(pruner.merge(pruner.apply(plan))) > 0
    assert pruner.budget_ms() == pytest.approx(0.5 * model.original_ms)

    # Another network of the same architecture shares the block entries (they depend on shapes only) ...
    other = LayerMergePruner(TinyResNet(), 0.5, example_inputs=x, backend="cpu", profiler_settings=FAST,
                             cache_dir=tmp_path, progress=False)
    assert other.latency_model().block_ms == model.block_ms
    # ... and the same network finds everything in the cache, its self-check included (the check plans follow the
    # weights: each candidate block keeps its convs of largest Σ|W|)
    again = LayerMergePruner(net, 0.5, example_inputs=x, backend="cpu", profiler_settings=FAST,
                             cache_dir=tmp_path, progress=False)
    reloaded = again.latency_model()
    assert reloaded.block_ms == model.block_ms
    assert reloaded.check.to_dict() == model.check.to_dict()
    assert list(tmp_path.glob("latency-cpu-*.sqlite"))


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


def _timed_parts(module):
    """(conv, activation module, residual add?) of a module a latency table times for a candidate."""
    if hasattr(module, "conv"):  # conv, residual add, activation
        return module.conv, module.act, True
    return module[0], module[1], False


@pytest.mark.parametrize("model, size", [(TinyResNet, 16), (Zoo, 16),
                                         (lambda: torchvision.models.mobilenet_v2(num_classes=10), 32)],
                         ids=["tinyresnet", "zoo", "mobilenet_v2"])
def test_timed_module_is_the_deployed_block(model, size):
    """Each plan block's table entry times the module the deployed network runs for it: the same conv
    (channels, kernel, stride, padding, groups, bias), on an input of the same shape and layout, followed by
    the same residual add and activation."""
    from lm_plugin.activations import kind_of_module
    from lm_plugin.tables.latency import candidate_spec
    from lm_plugin.trace.graph import ADD_FUNCTIONS, ADD_METHODS, activation_kind

    torch.manual_seed(0)
    pruner = LayerMergePruner(model().eval(), example_inputs=torch.randn(1, 3, size, size), cache_dir=None,
                              max_kernel=5)
    by_key = {c.key: c for c in pruner.candidates}
    plans = [Plan.identity(pruner.chain)] + [
        Plan.sample(pruner.chain, seed, p_merge=p, p_drop=0.5, max_kernel=5)
        for seed, p in [(1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0)]
    ]
    for plan in plans:
        deployed = pruner.merge(pruner.apply(plan).eval())
        nodes = {str(n.target): n for n in deployed.graph.nodes if n.op == "call_module"}
        inputs = {}
        for name in nodes:
            deployed.get_submodule(name).register_forward_hook(
                lambda m, args, out, name=name, seen=inputs: seen.__setitem__(name, args[0]))
        with torch.no_grad():
            deployed(torch.randn(1, 3, size, size))
        for st, end in plan.blocks():
            geo = block_geometry(pruner.chain, st, end, plan.kept_convs)
            cand = by_key[(st, end, *geo.kernel_size, geo.groups)]
            spec = candidate_spec(cand)
            conv, act, add = _timed_parts(spec.build())
            name = pruner.chain.conv(min(j for j in plan.kept_convs if st < j <= end)).name
            real = deployed.get_submodule(name)
            fields = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                      "padding_mode")
            assert {f: getattr(conv, f) for f in fields} == {f: getattr(real, f) for f in fields}, (st, end)
            assert (conv.bias is None) == (real.bias is None)
            x = inputs[name]
            timed = spec.inputs[0] if cand.residual_add else spec.inputs  # (input, skip) with a residual add
            assert tuple(timed) == tuple(x.shape) and x.is_contiguous(), (st, end)
            if cand.residual_add:  # the skip is an input of the timed module, shaped like the conv's output
                assert tuple(spec.inputs[1]) == tuple(real(x).shape), (st, end)
            # What the deployed network does with the conv's output: an add (unfolded residual), then the act.
            node = nodes[name]
            after = list(node.users)
            is_add = [(u.op == "call_function" and u.target in ADD_FUNCTIONS)
                      or (u.op == "call_method" and u.target in ADD_METHODS) for u in after]
            assert add == cand.residual_add == (len(after) == 1 and is_add[0]), (st, end)
            if add:
                after = list(after[0].users)
            kinds = {activation_kind(deployed, u) for u in after}
            timed_kind = kind_of_module(act)
            if cand.activation is None:
                assert isinstance(act, torch.nn.Identity) and kinds <= {None}, (st, end)
            else:
                assert kinds == {cand.activation} == {timed_kind}, (st, end)


class _DriftingMacs(MacsProfiler):
    """Analytic numbers (so nothing here depends on timing noise), treated as a timer whose machine can change
    speed: every figure is multiplied by ``speed``."""

    deterministic = False

    def __init__(self, speed: float = 1.0, **kw) -> None:
        super().__init__(**kw)
        self.speed = speed

    def measure(self, module, inputs, *, warn_unstable=True):
        m = super().measure(module, inputs, warn_unstable=warn_unstable)
        return dataclasses.replace(m, median_ms=m.median_ms * self.speed)


def test_a_machine_that_changed_speed_since_the_table_is_reported(tmp_path, recwarn):
    x = torch.randn(1, 3, 16, 16)

    def model(speed):
        return LayerMergePruner(TinyResNet(), 0.5, example_inputs=x, backend=_DriftingMacs(speed), cache_dir=tmp_path,
                                progress=False).latency_model()

    steady = model(1.0)  # builds the table; the network timed again gives the same figure: no warning
    assert steady.check_ms == pytest.approx(steady.original_ms) and steady.drift == pytest.approx(0.0)
    assert not [w for w in recwarn if issubclass(w.category, LatencyDriftWarning)]
    with pytest.warns(LatencyDriftWarning, match=r"\+30%.*delete the cache file"):
        slower = model(1.3)  # the same table from the cache, on a machine now 30 % slower
    assert slower.block_ms == steady.block_ms and slower.drift == pytest.approx(0.3)
    # analytic backends have no drift to check
    macs = LayerMergePruner(TinyResNet(), 0.5, example_inputs=x, backend="macs", cache_dir=None,
                            progress=False).latency_model()
    assert macs.check_ms is None and macs.drift is None


def test_rest_and_scale_fit_through_the_original():
    from lm_plugin.tables.latency import fit_rest_and_scale

    # networks that cost 2 ms outside the chain plus 0.8x their summed blocks: recovered exactly
    summed = [10.0, 7.0, 5.0, 3.0]
    measured = [2 + 0.8 * s for s in summed]
    rest, scale = fit_rest_and_scale(summed, measured)
    assert rest == pytest.approx(2.0) and scale == pytest.approx(0.8)
    # the original is always predicted as measured, and the part outside the chain is never negative
    rest, scale = fit_rest_and_scale([10.0, 5.0], [4.0, 1.0])
    assert rest == 0.0 and rest + scale * 10.0 == pytest.approx(4.0)
    assert fit_rest_and_scale([10.0], [12.0]) == (2.0, 1.0)
