"""The DP: equal to brute force, meets budgets in exact ms, clear errors; search() end to end."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from nets import ConvBN, Residual

from lm_plugin import LayerMergePruner, NoChainError
from lm_plugin.candidates import enumerate_candidates
from lm_plugin.solve import Entry, InfeasibleBudgetError, min_latency, solve


def random_net(rng: random.Random) -> nn.Module:
    """A random small CNN: plain convs (1x1 / 3x3), identity and strided projection residuals, pools."""
    layers: list[nn.Module] = [ConvBN(3, 8), nn.ReLU()]
    c = 8
    for _ in range(rng.randint(2, 4)):
        kind = rng.choice(["plain", "plain1", "res", "down", "pool"])
        if kind == "plain":
            layers += [ConvBN(c, c, 3), nn.ReLU()]
        elif kind == "plain1":
            layers += [ConvBN(c, c + 4, 1), nn.ReLU()]
            c += 4
        elif kind == "res":
            layers.append(Residual(c, c))
        elif kind == "down":
            layers.append(Residual(c, c + 4, stride=2))
            c += 4
        else:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers)


def brute_force(entries, length, budget_bins, step):
    """Best objective over every decomposition of 0..L into entries (binned costs)."""
    by_st: dict[int, list[Entry]] = {}
    for e in entries:
        by_st.setdefault(e.st, []).append(e)
    best = -math.inf

    def walk(pos, bins, value):
        nonlocal best
        if bins > budget_bins:
            return
        if pos == length:
            best = max(best, value)
            return
        for e in by_st.get(pos, []):
            walk(e.end, bins + math.ceil(max(e.latency_ms, 0) / step - 1e-9), value + e.importance)

    walk(0, 0, 0.0)
    return best


@pytest.mark.parametrize("mode", ["layermerge", "act_only", "layer_only"])
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10**6), ratio=st.floats(0.3, 1.0))
def test_dp_equals_brute_force_on_random_chains(mode, seed, ratio):
    rng = random.Random(seed)
    try:
        chain = LayerMergePruner(random_net(rng), example_inputs=torch.randn(1, 3, 16, 16), cache_dir=None).chain
    except NoChainError:  # e.g. stem, pool, 1x1: nothing to merge
        assume(False)
    entries = [Entry(c.st, c.end, c.kept, rng.uniform(0.1, 3.0), rng.uniform(-5.0, 0.0), c.key)
               for c in enumerate_candidates(chain, mode, max_kernel=7)]
    full = min_latency([e for e in entries if e.end - e.st == 1], chain.length)  # the identity plan, roughly
    budget = ratio * full * 1.2
    step = 0.05
    lowest = min_latency(entries, chain.length)
    if lowest > budget:
        with pytest.raises(InfeasibleBudgetError) as info:
            solve(entries, chain.length, budget, step)
        assert info.value.min_latency_ms == pytest.approx(lowest)
        return
    expected = brute_force(entries, chain.length, math.floor(budget / step + 1e-9), step)
    if not math.isfinite(expected):
        with pytest.raises(InfeasibleBudgetError, match="resolution"):
            solve(entries, chain.length, budget, step)
        return
    sol = solve(entries, chain.length, budget, step)
    assert sol.objective == pytest.approx(expected, abs=1e-9)
    assert sol.latency_ms <= budget + 1e-12  # exact milliseconds, not just bins
    positions = [0] + [e.end for e in sol.entries]
    assert positions == sorted(set(positions)) and positions[-1] == chain.length
    assert all(a.end == b.st for a, b in zip(sol.entries, sol.entries[1:]))


def test_rounding_up_never_overshoots_the_float_budget():
    # Two blocks of 0.55 ms each under a 1.1 ms budget with 0.1 ms bins: flooring would fit 1.0 ms of bins
    # while the true sum is exactly the budget; three would overshoot.
    entries = [Entry(0, 1, (1,), 0.55, 0.0), Entry(1, 2, (2,), 0.55, 0.0), Entry(0, 2, (1, 2), 0.9, -1.0)]
    sol = solve(entries, 2, 1.1, 0.1)
    assert sol.latency_ms <= 1.1
    sol = solve(entries, 2, 1.05, 0.1)  # the two-block plan needs 1.1 ms: must take the merged block
    assert [e.end for e in sol.entries] == [2] and sol.latency_ms == 0.9


def test_ties_prefer_lower_latency_and_are_deterministic():
    entries = [Entry(0, 1, (1,), 1.0, -1.0), Entry(0, 1, (1,), 0.5, -1.0), Entry(1, 2, (2,), 0.5, 0.0)]
    first = solve(entries, 2, 10.0, 0.01)
    assert first.entries[0].latency_ms == 0.5
    assert solve(entries, 2, 10.0, 0.01) == first


def test_invalid_budgets_and_resolution():
    entries = [Entry(0, 1, (1,), 1.0, 0.0)]
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable is 1"):
        solve(entries, 1, 0.5, 0.01)
    with pytest.raises(ValueError, match="NaN"):
        solve(entries, 1, float("nan"), 0.01)
    with pytest.raises(ValueError, match="step_ms"):
        solve(entries, 1, 1.0, 0.0)


def test_dp_scales_to_a_mobilenet_sized_table():
    rng = random.Random(0)
    L = 52
    entries = [Entry(st_, end, (end,), rng.uniform(0.01, 1.0), rng.uniform(-3, 0))
               for st_ in range(L) for end in range(st_ + 1, min(L, st_ + 8) + 1)]
    assert len(entries) > 380
    sol = solve(entries, L, 10.0, 0.01)  # 1000 bins
    assert sol.latency_ms <= 10.0


def test_a_budget_too_fine_for_the_resolution_is_told_what_works_at_it():
    # exactly 0.08 ms fits 0.09 ms, but each latency rounds up to a 0.05 ms bin: 0.10 ms at this resolution
    entries = [Entry(0, 1, (1,), 0.04, -1.0, (0, 1)), Entry(1, 2, (2,), 0.04, -1.0, (1, 2)),
               Entry(0, 2, (2,), 0.1, -3.0, (0, 2))]
    with pytest.raises(InfeasibleBudgetError, match="resolution") as info:
        solve(entries, 2, 0.09, 0.05)
    assert info.value.min_latency_ms == pytest.approx(0.10)
    assert solve(entries, 2, info.value.min_latency_ms, 0.05).objective == pytest.approx(-2.0)
