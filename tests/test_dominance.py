"""Blocks not faster than the layers they replace: found exactly, never scored, and no plan changes without them."""

from __future__ import annotations

import random

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_plugin import LayerMergePruner
from lm_plugin.solve import Entry, slower_blocks, solve
from lm_plugin.solve.dp import to_bins
from lm_plugin.tables.importance import ImportanceTable


def single(j: int, ms: float) -> Entry:
    return Entry(j, j + 1, (j + 1,), ms, 0.0, ("u", j))


def test_a_block_as_slow_as_its_layers_is_slower_and_a_faster_one_is_not():
    plain = [single(0, 1.0), single(1, 1.0), single(2, 2.0)]
    blocks = [Entry(0, 2, (2,), 2.5, -1.0, "slow"), Entry(0, 2, (1, 2), 1.5, -1.0, "fast"),
              Entry(0, 3, (3,), 4.0, -1.0, "equal"), Entry(1, 3, (3,), -0.5, -1.0, "negative"),
              Entry(0, 1, (), 1.0, -1.0, "same span, one layer")]
    slower = slower_blocks(plain + blocks, {e.key for e in plain})
    assert slower == {"slow", "equal", "same span, one layer"}


def test_latencies_are_compared_as_the_dp_counts_them():
    """Rounded up to bins, two layers of 0.505 ms cost 2 x 51 bins of 0.01 ms and a block of 1.01 ms 101: slower in
    ms, cheaper for the DP, so it stays; in exact ms it is dropped."""
    plain = [single(0, 0.505), single(1, 0.505)]
    block = Entry(0, 2, (2,), 1.01, -0.1, "rounding")
    assert slower_blocks(plain + [block], {e.key for e in plain}) == {"rounding"}
    assert slower_blocks(plain + [block], {e.key for e in plain}, step_ms=0.01) == set()


def test_a_span_without_uncompressed_layers_keeps_its_blocks():
    # position 1 -> 2 has no uncompressed entry (an ignored layer the enumeration did not offer alone, say)
    plain = [single(0, 1.0), single(2, 1.0)]
    blocks = [Entry(0, 2, (2,), 50.0, -1.0, "only way"), Entry(1, 3, (3,), 50.0, -1.0, "also")]
    assert slower_blocks(plain + blocks, {e.key for e in plain}) == set()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_without_the_slower_blocks_every_budget_has_the_same_optimum(seed):
    """With importances <= 0 (compression never gains), dropping the slower blocks changes no optimum."""
    rng = random.Random(seed)
    length = rng.randint(2, 9)
    plain = [single(j, rng.uniform(0.5, 2.0)) for j in range(length)]
    blocks = []
    for i in range(rng.randint(1, 25)):
        a = rng.randrange(length)
        b = rng.randint(a + 1, min(length, a + 4))
        blocks.append(Entry(a, b, (b,), rng.uniform(0.0, 2.0 * (b - a)), -rng.expovariate(1.0), ("b", i)))
    entries = plain + blocks
    slower = slower_blocks(entries, {e.key for e in plain}, step_ms=0.01)
    kept = [e for e in entries if e.key not in slower]
    total = sum(e.latency_ms for e in plain)
    for fraction in (0.3, 0.5, 0.7, 0.9, 1.0):
        try:
            full = solve(entries, length, fraction * total, 0.01)
        except ValueError:
            continue
        assert solve(kept, length, fraction * total, 0.01).objective == pytest.approx(full.objective, abs=1e-9)


@pytest.fixture(scope="module")
def mobilenet():
    """torchvision's MobileNetV2 (random weights): merging a depthwise conv into a pointwise one makes a dense
    conv with more multiply-adds than the two."""
    return torchvision.models.mobilenet_v2(num_classes=10).eval()


def test_the_pruner_never_scores_or_offers_a_block_slower_than_its_layers(mobilenet, tmp_path):
    pruner = LayerMergePruner(mobilenet, 0.7, torch.randn(1, 3, 64, 64), backend="macs", importance="zero_shot",
                              cache_dir=tmp_path, progress=False)
    lat = pruner.latency_model()
    step = pruner.resolution * lat.original_ms  # the DP's bins
    searched = pruner.selectable()
    skipped = [c for c in pruner.candidates if c not in searched]
    assert skipped, "MobileNetV2 has depthwise-pointwise merges that cost more MACs than the two convs"
    single = {c.st: to_bins(lat.cost(c.st, c.end, c.kept), step) for c in pruner.candidates if c.uncompressed}
    for c in skipped:
        assert not c.uncompressed
        assert to_bins(lat.cost(c.st, c.end, c.kept), step) >= sum(single[j] for j in range(c.st, c.end))
    assert not {c.key for c in skipped} & set(pruner.scorer.scored)
    assert {e.key for e in pruner.entries({c.key: -1.0 for c in searched})} == {c.key for c in searched}
    everything = LayerMergePruner(mobilenet, 0.7, torch.randn(1, 3, 64, 64), backend="macs", importance="zero_shot",
                                  cache_dir=tmp_path, progress=False, skip_slower_blocks=False)
    assert everything.selectable() == everything.candidates


def test_with_nonpositive_scores_the_plan_is_the_one_of_every_candidate(mobilenet, tmp_path):
    """The same plan with and without the slower blocks, on scores where compression never gains."""
    kwargs = dict(example_inputs=torch.randn(1, 3, 64, 64), backend="macs", importance="zero_shot",
                  cache_dir=tmp_path, progress=False)
    rng = random.Random(0)
    pruners = [LayerMergePruner(mobilenet, 0.6, **kwargs, skip_slower_blocks=skip) for skip in (True, False)]
    scores = {c.key: 0.0 if c.uncompressed else -rng.expovariate(0.5) for c in pruners[1].candidates}
    for p in pruners:
        p._importance = ImportanceTable({c.key: scores[c.key] for c in p.selectable()},
                                        {c.key: c.kept for c in p.selectable()}, 90.0, {})
    for budget in (0.5, 0.6, 0.8):
        found = [p.search(budget) for p in pruners]
        assert found[0].objective == pytest.approx(found[1].objective)
        assert found[0].plan == found[1].plan
