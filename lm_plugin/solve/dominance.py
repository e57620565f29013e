"""Blocks no plan needs: a compressed block that is not faster than the uncompressed layers it replaces.

The DP's objective is a sum over blocks and the uncompressed layers score 0 (nothing changed), so a block whose
latency is at least that of the fastest run of uncompressed layers over the same span can enter a plan only by
scoring *above* 0: by compressing a trained network into a more accurate one, which is the estimator's noise, not a
property of the block. Dropping such blocks before any importance is computed changes no plan otherwise, and spares
their scores: a merged depthwise-pointwise pair is one dense conv, slower than the two, and on the reference
workload's MobileNetV2 a quarter of the candidate blocks are of that kind (docs/selection.md).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from .dp import Entry, to_bins


def slower_blocks(entries: Sequence[Entry], uncompressed: Collection[tuple], step_ms: float | None = None
                  ) -> set[tuple]:
    """Keys of the entries that are not faster than the uncompressed layers over their span.

    Args:
        entries: the DP's items with their latencies (importance is not read); negative latencies count as 0, as
            in :func:`~lm_plugin.solve.dp.solve`.
        uncompressed: keys of the entries that leave the network unchanged (they score 0 by definition).
        step_ms: the DP's latency resolution: latencies are compared as the DP counts them, rounded up to bins
            (:func:`~lm_plugin.solve.dp.to_bins`), so that no optimum of that DP changes (a block slower in ms can be
            a bin cheaper than its layers, each rounded up). ``None``: exact milliseconds.

    Returns:
        The keys of every other entry ``(st, end]`` whose cost is at least the smallest summed cost of a path of
        ``uncompressed`` entries from ``st`` to ``end`` (none if there is no such path). ``O(P · U)`` for ``P``
        block starts and ``U`` uncompressed entries.
    """
    def cost(e: Entry) -> float:
        return max(e.latency_ms, 0.0) if step_ms is None else float(to_bins(e.latency_ms, step_ms))

    plain = sorted((e for e in entries if e.key in uncompressed), key=lambda e: e.st)
    fastest: dict[int, dict[int, float]] = {}  # start -> end -> cheapest uncompressed path

    def paths(st: int) -> dict[int, float]:
        if st not in fastest:
            best = {st: 0.0}
            for e in plain:  # sorted by start: every path into e.st is final before e is relaxed
                if e.st in best:
                    best[e.end] = min(best.get(e.end, math.inf), best[e.st] + cost(e))
            fastest[st] = best
        return fastest[st]

    return {e.key for e in entries if e.key not in uncompressed and cost(e) >= paths(e.st).get(e.end, math.inf)}
