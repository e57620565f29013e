"""Kernel algebra: composition, sums and BN folding equal running the layers (float64, random shapes)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_plugin.merge.algebra import LinearConv


def run(lin: LinearConv, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, lin.weight, lin.bias, lin.stride, groups=lin.groups)


@settings(max_examples=40, deadline=None)
@given(
    c=st.sampled_from([4, 8]),
    g1=st.sampled_from([1, 2, 4]),
    g2=st.sampled_from([1, 2, 4]),
    k1=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    k2=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    s1=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    s2=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    seed=st.integers(0, 1000),
)
def test_composition_equals_sequential_convs(c, g1, g2, k1, k2, s1, s2, seed):
    torch.manual_seed(seed)
    a = nn.Conv2d(c, 2 * c, k1, s1, groups=g1).double()
    b = nn.Conv2d(2 * c, c, k2, s2, groups=g2).double()
    bn = nn.BatchNorm2d(2 * c, eps=1e-3).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, c, 17, 15, dtype=torch.float64)
    merged = LinearConv.from_conv(a, bn).then(LinearConv.from_conv(b))
    with torch.no_grad():
        ref = b(bn(a(x)))
    assert merged.kernel_size == (k1[0] + (k2[0] - 1) * s1[0], k1[1] + (k2[1] - 1) * s1[1])
    assert merged.stride == (s1[0] * s2[0], s1[1] * s2[1])
    assert merged.groups == (1 if 1 in (g1, g2) else math.gcd(g1, g2))  # grouped as the two groupings connect
    assert torch.allclose(run(merged, x), ref, atol=1e-12)


def test_a_grouped_conv_then_a_depthwise_one_or_a_folded_identity_skip_stays_grouped():
    """4 groups, then a depthwise map (or x + x, a residual whose branch was dropped): still 4 groups, as the
    latency table assumed (a random Zoo plan merged them into a dense kernel: exact, but slower than timed)."""
    g = nn.Conv2d(24, 24, 3, groups=4).double()
    dw = nn.Conv2d(24, 24, 3, groups=24).double()
    x = torch.randn(1, 24, 9, 9, dtype=torch.float64)
    merged = LinearConv.from_conv(g).then(LinearConv.from_conv(dw))
    assert merged.groups == 4 and merged.weight.shape == (24, 6, 5, 5)
    assert torch.allclose(run(merged, x), dw(g(x)), atol=1e-12)
    twice = LinearConv.identity(24, 24).plus(LinearConv.identity(24, 24), (0, 0))  # x + x
    doubled = LinearConv.from_conv(g).then(twice)
    assert doubled.groups == 4 and torch.allclose(run(doubled, x), 2 * g(x), atol=1e-12)
    grouped_plus_depthwise = LinearConv.from_conv(g).plus(LinearConv.from_conv(dw), (0, 0))
    assert grouped_plus_depthwise.groups == 4
    assert torch.allclose(run(grouped_plus_depthwise, x), g(x) + dw(x), atol=1e-12)
    dense = LinearConv.from_conv(nn.Conv2d(24, 24, 3).double()).dense()
    assert dense.regrouped(4) is dense  # weights across groups: nothing to regroup


def test_depthwise_chain_stays_depthwise():
    a, b = (nn.Conv2d(6, 6, 3, groups=6).double() for _ in range(2))
    merged = LinearConv.from_conv(a).then(LinearConv.from_conv(b))
    assert merged.groups == 6 and merged.weight.shape == (6, 1, 5, 5)
    x = torch.randn(1, 6, 9, 9, dtype=torch.float64)
    assert torch.allclose(run(merged, x), b(a(x)), atol=1e-12)


def test_sum_with_offset_and_identity():
    conv = nn.Conv2d(4, 4, 3).double()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    lin = LinearConv.from_conv(conv).plus(LinearConv.identity(4), (1, 1))
    assert torch.allclose(run(lin, x), conv(x) + x[:, :, 1:-1, 1:-1], atol=1e-12)
    doubled = LinearConv.identity(4, 4).plus(LinearConv.identity(4, 2), (0, 0))
    assert doubled.groups == 2 and torch.allclose(run(doubled, x), 2 * x)  # 4 groups + 2 groups: 2 groups


def test_to_conv2d_keeps_float64_precision():
    lin = LinearConv.identity(3)
    lin = LinearConv(lin.weight + 1e-12, lin.bias, lin.stride, lin.groups)
    conv = lin.to_conv2d((0, 0), dtype=torch.float64, device=torch.device("cpu"))
    assert conv.weight.dtype == torch.float64 and torch.equal(conv.weight, lin.weight)


def test_grouped_next_to_dense_composes_without_expanding(monkeypatch):
    """A grouped conv before or after a dense one composes group by group into a dense kernel: no block-diagonal
    expansion of the grouped kernel (for RegNet-Y-128GF's 7392-channel grouped 3x3 that expansion alone was 3.9 GB
    in float64, more than the merged result), and the same map as running both."""
    torch.manual_seed(0)

    def expand(self):
        raise AssertionError("a grouped kernel next to a dense one was expanded")

    monkeypatch.setattr(LinearConv, "dense", expand)
    x = torch.randn(2, 12, 13, 11, dtype=torch.float64)
    for g1, g2 in [(1, 3), (3, 1), (1, 12), (12, 1)]:
        a = nn.Conv2d(12, 24, 3, 2, groups=g1).double()
        b = nn.Conv2d(24, 12, (1, 3), 1, groups=g2).double()
        merged = LinearConv.from_conv(a).then(LinearConv.from_conv(b))
        assert merged.groups == 1
        with torch.no_grad():
            ref = b(a(x))
        assert (run(merged, x) - ref).abs().max() <= 1e-12 * ref.abs().max()
