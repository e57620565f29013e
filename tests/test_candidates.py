"""Candidate enumeration (a DP over merged geometries) against the exhaustive enumeration it replaced."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from fractions import Fraction
from typing import NamedTuple

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm_plugin import LayerMergePruner
from lm_plugin.blocks import BlockGeometry, block_geometry, end_activation, fold_problem
from lm_plugin.candidates import block_is_valid, enumerate_candidates
from lm_plugin.trace.chain import Chain, ChainConv, ChainPosition, Residual
from lm_plugin.workloads.models import MODELS, create_model

MODES = ("layermerge", "act_only", "layer_only")


# ----------------------------------------------------------------------------------------------------- oracle
# The exhaustive enumeration as it was before the DP (every kept subset, grouped by merged geometry), and the
# representative the importance stage chose from it: the subset of largest Σ‖W‖₁, ties to the largest tuple.
# The sums here are exact (Fractions), as the DP's are.

class OracleCandidate(NamedTuple):
    st: int
    end: int
    geometry: BlockGeometry  # of the first subset found, as before
    subsets: tuple[tuple[int, ...], ...]
    activation: str | None
    residual_add: bool

    @property
    def key(self):
        k = self.geometry.kernel_size
        return (self.st, self.end, k[0], k[1], self.geometry.groups)


def oracle_candidates(chain, mode="layermerge", *, max_kernel=7, inserted_act=None):
    out = []
    for st_ in range(chain.length):
        for end in range(st_ + 1, chain.length + 1):
            if not block_is_valid(chain, st_, end):
                if any(p in chain.breaks for p in range(st_ + 1, end)):
                    break
                continue
            by_geometry: dict[tuple, list[tuple[int, ...]]] = {}
            for kept in _subsets(chain, st_, end, mode, max_kernel):
                geo = block_geometry(chain, st_, end, kept)
                by_geometry.setdefault((geo.kernel_size, geo.groups), []).append(kept)
            act = end_activation(chain, st_, end, inserted_act)
            res = chain.residual_at(end)
            unfolded_add = res is not None and res.source < st_
            for (_, _), subsets in sorted(by_geometry.items()):
                geo = block_geometry(chain, st_, end, subsets[0])
                out.append(OracleCandidate(st_, end, geo, tuple(subsets), act, unfolded_add))
    return out


def _subsets(chain, st_, end, mode, max_kernel) -> Iterator[tuple[int, ...]]:
    members = list(range(st_ + 1, end + 1))
    single = end - st_ == 1
    if mode == "act_only":
        choices = [tuple(members)]
    elif mode == "layer_only":
        required = [j for j in members if not chain.conv(j).prunable]
        if len(required) > 1:
            return
        choices = [tuple(required)] if required else [(j,) for j in members]
    else:
        choices = list(_grow(chain, members, 0, [], (1, 1), (1, 1), max_kernel if not single else None))
    folded = chain.residuals_within(st_, end)
    for kept in choices:
        if not kept:
            continue
        geo_k = block_geometry(chain, st_, end, kept).kernel_size
        if max_kernel is not None and not single and max(geo_k) > max_kernel:
            continue
        if all(fold_problem(chain, r, kept) is None for r in folded):
            yield kept


def _grow(chain, members, i, kept, k, s, max_kernel):
    if max_kernel is not None and max(k) > max_kernel:
        return
    if i == len(members):
        yield tuple(kept)
        return
    c = chain.conv(members[i])
    nk = (k[0] + (c.kernel_size[0] - 1) * s[0], k[1] + (c.kernel_size[1] - 1) * s[1])
    ns = (s[0] * c.stride[0], s[1] * c.stride[1])
    yield from _grow(chain, members, i + 1, kept + [members[i]], nk, ns, max_kernel)
    if c.prunable:
        yield from _grow(chain, members, i + 1, kept, k, s, max_kernel)


def oracle_representative(subsets, weights):
    """max(subsets, key=(Σ weight, kept)) with exact sums; weights None = every conv weighs 1."""
    def score(kept):
        return sum(Fraction(1) if weights is None else Fraction(weights[j]) for j in kept)
    return max(subsets, key=lambda kept: (score(kept), kept))


def assert_same_as_oracle(chain, mode, max_kernel, inserted_act, weights):
    found = enumerate_candidates(chain, mode, max_kernel=max_kernel, inserted_act=inserted_act, weights=weights)
    expected = oracle_candidates(chain, mode, max_kernel=max_kernel, inserted_act=inserted_act)
    assert [c.key for c in found] == [c.key for c in expected]  # same entries, same order
    for c, o in zip(found, expected):
        assert c.geometry == block_geometry(chain, c.st, c.end, c.kept), c.key
        assert c.kept == oracle_representative(o.subsets, weights), c.key
        # same geometry as before but for the subset it names (which is now the representative)
        assert dataclasses.replace(c.geometry, kept=()) == dataclasses.replace(o.geometry, kept=()), c.key
        assert (c.activation, c.residual_add) == (o.activation, o.residual_add), c.key
    return found


# ------------------------------------------------------------------------------------------- random chains

@st.composite
def chains(draw) -> tuple[Chain, dict[int, float]]:
    """A random chain: square and non-square kernels, strides, groups, unprunable convs, breaks, nested or
    disjoint residuals with identity and projection skips (strided, grouped, padded), and per-conv weights with
    many ties."""
    length = draw(st.integers(1, 8))
    convs, c = [], 8
    for i in range(1, length + 1):
        kernel = draw(st.sampled_from([(1, 1), (3, 3), (5, 5), (1, 3), (3, 1), (2, 2)]))
        stride = draw(st.sampled_from([(1, 1)] * 4 + [(2, 2), (2, 1)]))
        padding = ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
        if draw(st.integers(0, 5)) == 0:
            padding = (draw(st.integers(0, kernel[0])), draw(st.integers(0, kernel[1])))
        cout = draw(st.sampled_from([c, c, c, 16 if c == 8 else 8]))
        groups = draw(st.sampled_from([1, 1, 2, 4, min(c, cout)]))
        size_preserving = all(2 * p == k - 1 for p, k in zip(padding, kernel))
        prunable = cout == c and stride == (1, 1) and size_preserving and draw(st.integers(0, 5)) > 0
        convs.append(ChainConv(i, f"c{i}", f"n{i}", f"in{i}", None, None, c, cout, groups, kernel, stride, padding,
                               (1, c, 16, 16), (1, cout, 16, 16), prunable))
        c = cout
    breaks = {0, length} | {p for p in range(1, length) if draw(st.integers(0, 6)) == 0}
    positions = tuple(ChainPosition(p, draw(st.sampled_from([None, "relu", "relu", "silu"])), None, None, None,
                                    p in breaks) for p in range(length + 1))
    residuals: list[Residual] = []
    for _ in range(draw(st.integers(0, 4))):
        a = draw(st.integers(0, length - 1))
        b = draw(st.integers(a + 1, length))
        if any((a, b) == (r.source, r.target) or r.source < a < r.target < b or a < r.source < b < r.target
               for r in residuals):
            continue  # residuals are nested or disjoint
        branch_stride = (1, 1)
        for j in range(a + 1, b + 1):
            s = convs[j - 1].stride
            branch_stride = (branch_stride[0] * s[0], branch_stride[1] * s[1])
        if draw(st.booleans()):
            residuals.append(Residual(a, b, f"add{b}", "x", 1, f"src{a}"))
        else:
            k = draw(st.sampled_from([(1, 1), (1, 1), (3, 3), (1, 3)]))
            s = branch_stride if draw(st.integers(0, 3)) else draw(st.sampled_from([(1, 1), (2, 2)]))
            p = ((k[0] - 1) // 2, (k[1] - 1) // 2) if draw(st.booleans()) else (0, 0)
            residuals.append(Residual(a, b, f"add{b}", "x", 1, f"src{a}", projection=f"proj{b}", kernel_size=k,
                                      stride=s, padding=p, groups=draw(st.sampled_from([1, 1, 2, 4]))))
    weights = {j: draw(st.sampled_from([0.0, 0.0, 1.0, 2.0, 3.0])) if draw(st.integers(0, 3)) else
               draw(st.floats(0, 10)) for j in range(1, length + 1)}
    return Chain(tuple(convs), positions, tuple(residuals)), weights


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chain_weights=chains(), mode=st.sampled_from(MODES), max_kernel=st.sampled_from([None, 3, 5, 7]),
       inserted_act=st.sampled_from([None, "relu"]), unit=st.booleans())
def test_random_chains_match_the_exhaustive_enumeration(chain_weights, mode, max_kernel, inserted_act, unit):
    chain, weights = chain_weights
    assert_same_as_oracle(chain, mode, max_kernel, inserted_act, None if unit else weights)


def test_ties_go_to_the_largest_kept_tuple():
    """Equal sums everywhere: the exhaustive rule's tie-break (largest tuple) must survive the DP, including
    prefixes of each other ((1, 2) vs (1, 2, 3) with a zero-weight conv 3) and branches that fold."""
    def conv(i, k=1):
        return ChainConv(i, f"c{i}", f"n{i}", f"in{i}", None, None, 8, 8, 1, (k, k), (1, 1),
                         ((k - 1) // 2, (k - 1) // 2), (1, 8, 8, 8), (1, 8, 8, 8), True)
    positions = tuple(ChainPosition(p, "relu", None, None, None, p in (0, 5)) for p in range(6))
    for convs, residuals in itertools.product(
            [(conv(1), conv(2, 3), conv(3), conv(4, 3), conv(5)), (conv(1), conv(2), conv(3, 3), conv(4), conv(5))],
            [(), (Residual(1, 4, "add", "x", 1, "s"),), (Residual(2, 4, "add", "x", 1, "s"),),
             (Residual(0, 2, "a", "x", 1, "s"), Residual(2, 5, "b", "x", 1, "s"))]):
        chain = Chain(convs, positions, residuals)
        for weights in [dict.fromkeys(range(1, 6), 0.0), dict.fromkeys(range(1, 6), 1.0),
                        {1: 1.0, 2: 2.0, 3: 0.0, 4: 2.0, 5: 0.0}, {1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0, 5: 1.0}]:
            for mode in MODES:
                for max_kernel in (None, 3, 5):
                    assert_same_as_oracle(chain, mode, max_kernel, None, weights)


def test_weights_are_checked():
    chain = _tiny_chain()
    with pytest.raises(ValueError, match="no score for convs"):
        enumerate_candidates(chain, weights={1: 1.0})
    with pytest.raises(ValueError, match="finite"):
        enumerate_candidates(chain, weights={1: 1.0, 2: float("nan")})
    tensors = {j: torch.tensor(float(j)) for j in (1, 2)}  # 0-d tensors are accepted
    assert enumerate_candidates(chain, weights=tensors) == enumerate_candidates(chain, weights={1: 1.0, 2: 2.0})


def _tiny_chain():
    convs = tuple(ChainConv(i, f"c{i}", f"n{i}", f"in{i}", None, None, 8, 8, 1, (3, 3), (1, 1), (1, 1),
                            (1, 8, 8, 8), (1, 8, 8, 8), True) for i in (1, 2))
    positions = tuple(ChainPosition(p, "relu", None, None, None, p in (0, 2)) for p in range(3))
    return Chain(convs, positions, ())


# ---------------------------------------------------------------------------------------------- real models

def _pruner(model, x):
    torch.manual_seed(0)
    return LayerMergePruner(model, 0.7, x, cache_dir=None, progress=False)


def _conv_weights(pruner):
    gm, chain = pruner.graph_module, pruner.chain
    return {j: float(gm.get_submodule(chain.conv(j).name).weight.detach().abs().sum())
            for j in range(1, chain.length + 1)}


REAL = {
    "resnet18": (lambda: torchvision.models.resnet18(), (1, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), (1, 3, 64, 64)),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(), (1, 3, 64, 64)),
    **{name: (lambda name=name: create_model(name), (1, *spec.input_shape)) for name, spec in MODELS.items()},
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_models_match_the_exhaustive_enumeration(name):
    factory, shape = REAL[name]
    pruner = _pruner(factory(), torch.randn(*shape))
    chain, weights = pruner.chain, _conv_weights(pruner)
    inserted = pruner.rewrite.inserted_kind(chain)
    for mode in MODES:
        found = assert_same_as_oracle(chain, mode, 7, inserted, weights)
        if mode == pruner.mode:
            assert found == pruner.candidates
            assert [c.kept for c in found] == [c.kept for c in pruner.candidates]
    if name in ("resnet18", "mobilenet_v2", "vgg11_bn"):  # some representatives drop convs
        assert any(c.kept != tuple(range(c.st + 1, c.end + 1)) for c in pruner.candidates)


@pytest.mark.parametrize("name", ["regnet_x_400mf", "regnet_y_400mf", "resnet152", "resnext50_32x4d"])
def test_large_models_finish(name):
    """Exponentially many kept subsets (regnet: a 67-conv segment of 1×1 prunable convs): the DP never lists
    them."""
    pruner = _pruner(getattr(torchvision.models, name)(), torch.randn(1, 3, 64, 64))
    chain, cands = pruner.chain, pruner.candidates
    assert cands
    keys = [c.key for c in cands]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for c in cands:
        assert c.geometry == block_geometry(chain, c.st, c.end, c.kept)
        assert c.kept and all(c.st < j <= c.end for j in c.kept)
        assert all(j in c.kept for j in range(c.st + 1, c.end + 1) if not chain.conv(j).prunable)
        assert all(fold_problem(chain, r, c.kept) is None for r in chain.residuals_within(c.st, c.end))
        assert block_is_valid(chain, c.st, c.end)
        assert c.end - c.st == 1 or max(c.geometry.kernel_size) <= 7
    singles = {(c.st, c.end) for c in cands if c.end - c.st == 1}
    assert singles == {(j - 1, j) for j in range(1, chain.length + 1)}  # the original network is representable
