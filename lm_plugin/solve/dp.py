"""Stage 4: the dynamic program that picks blocks (and so kept activations A and kept convs C).

Maximise ``Σ I(entry)`` over a decomposition of positions ``0 … L`` into consecutive candidate blocks, subject to
``Σ T(entry) ≤ B``. Latencies are discretised with ``g = ceil(T / step)`` bins; because every latency is rounded
*up*, a plan that fits the binned budget ``floor(B / step)`` also fits ``B`` in exact milliseconds (the reference
floors, which lets the float sum overshoot the budget). The DP is exact for this binned problem:

    M[0, t] = 0,   M[end, t] = max_{entries (st, end]} M[st, t − g] + I        (t = allowed bins, "at most")

One numpy pass per entry over all budgets, so work is entries × bins. Ties are broken deterministically toward
the lower latency, then toward earlier entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..errors import ConfigurationError, LayerMergeError


class InfeasibleBudgetError(LayerMergeError, ValueError):
    """No plan meets the budget; ``min_latency_ms`` says what is achievable."""

    def __init__(self, message: str, min_latency_ms: float) -> None:
        super().__init__(message)
        self.min_latency_ms = min_latency_ms


@dataclass(frozen=True)
class Entry:
    """One DP item: block ``(st, end]`` keeping ``kept``, with its latency cost (ms) and importance."""

    st: int
    end: int
    kept: tuple[int, ...]
    latency_ms: float
    importance: float
    key: tuple = ()


@dataclass(frozen=True)
class Solution:
    """The chosen entries (in chain order), their summed importance and exact summed latency."""

    entries: tuple[Entry, ...]
    objective: float
    latency_ms: float
    bins: int
    step_ms: float


def to_bins(latency_ms: float, step_ms: float) -> int:
    """What an entry costs the DP: its latency in bins of ``step_ms``, rounded up (negative latencies count as 0)."""
    return max(0, math.ceil(max(latency_ms, 0.0) / step_ms - 1e-9))


def min_latency(entries: Sequence[Entry], length: int) -> float:
    """Smallest achievable summed latency (exact ms): a shortest path over positions."""
    best = [math.inf] * (length + 1)
    best[0] = 0.0
    for e in sorted(entries, key=lambda e: e.end):
        cost = best[e.st] + max(e.latency_ms, 0.0)
        if cost < best[e.end]:
            best[e.end] = cost
    return best[length]


def solve(entries: Sequence[Entry], length: int, budget_ms: float, step_ms: float) -> Solution:
    """Optimal decomposition of ``0 … length`` into entries under ``budget_ms``.

    Args:
        entries: candidate blocks with latency and importance. Negative latencies count as 0.
        length: number of convs L.
        budget_ms: what the chosen entries may cost in total.
        step_ms: latency resolution (bin width).

    Raises:
        InfeasibleBudgetError: no decomposition fits; the error names the smallest achievable latency.
        ValueError: non-positive or non-finite ``step_ms`` / ``budget_ms``.
    """
    if not (step_ms > 0 and math.isfinite(step_ms)):
        raise ConfigurationError(f"step_ms must be positive and finite, got {step_ms}")
    if math.isnan(budget_ms):
        raise ConfigurationError("budget is NaN")
    lowest = min_latency(entries, length)
    if math.isinf(lowest):
        raise LayerMergeError("the candidate blocks do not cover the chain; was a candidate list filtered?")
    if budget_ms < 0 or lowest > budget_ms:
        raise InfeasibleBudgetError(
            f"no plan fits a budget of {budget_ms:.4g} ms for the chain's blocks; the smallest achievable is "
            f"{lowest:.4g} ms. Raise the budget, or allow more merging (larger max_kernel, mode='layermerge').",
            lowest,
        )
    n_bins = int(math.floor(budget_ms / step_ms + 1e-9))
    if n_bins > 5_000_000:
        raise ConfigurationError(f"{n_bins} latency bins: use a coarser resolution")
    by_end: dict[int, list[int]] = {}
    cost = np.array([to_bins(e.latency_ms, step_ms) for e in entries], dtype=np.int64)
    for i, e in enumerate(entries):
        by_end.setdefault(e.end, []).append(i)
    neg = -np.inf
    value = np.full((length + 1, n_bins + 1), neg)
    value[0, :] = 0.0
    parent = np.full((length + 1, n_bins + 1), -1, dtype=np.int64)
    used = np.zeros((length + 1, n_bins + 1), dtype=np.int64)  # bins spent by the best solution so far
    for end in range(1, length + 1):
        row, prow, urow = value[end], parent[end], used[end]
        for i in by_end.get(end, ()):
            g = cost[i]
            if g > n_bins:
                continue
            cand = np.full(n_bins + 1, neg)
            cand[g:] = value[entries[i].st, : n_bins + 1 - g] + entries[i].importance
            cand_used = np.zeros(n_bins + 1, dtype=np.int64)
            cand_used[g:] = used[entries[i].st, : n_bins + 1 - g] + g
            # Higher importance wins; on equal importance, fewer bins; then the earlier entry.
            better = (cand > row) | ((cand == row) & (cand_used < urow) & np.isfinite(cand))
            row[better] = cand[better]
            urow[better] = cand_used[better]
            prow[better] = i
    best = value[length, n_bins]
    if not math.isfinite(best):
        # Feasible in ms but not after rounding each latency up: the resolution is too coarse. Report what is
        # achievable at this resolution, so that a caller raising the budget to it succeeds.
        rounded = min_latency([replace(e, latency_ms=float(c) * step_ms) for e, c in zip(entries, cost)], length)
        raise InfeasibleBudgetError(
            f"no plan fits {budget_ms:.4g} ms at a latency resolution of {step_ms:.3g} ms (smallest achievable "
            f"{lowest:.4g} ms exactly, {rounded:.4g} ms at this resolution); use a finer resolution or a budget "
            f"of at least {rounded:.4g} ms", rounded)
    # Among budgets reaching the optimum, the smallest one: prefer lower latency on ties.
    t = int(np.argmax(value[length] >= best - 1e-12 * max(1.0, abs(best))))
    chosen: list[Entry] = []
    pos, bins = length, 0
    while pos > 0:
        i = int(parent[pos, t])
        chosen.append(entries[i])
        t -= int(cost[i])
        bins += int(cost[i])
        pos = entries[i].st
    chosen.reverse()
    return Solution(tuple(chosen), float(sum(e.importance for e in chosen)),
                    float(sum(e.latency_ms for e in chosen)), bins, step_ms)
