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

from .dp import Entry


def slower_blocks(entries: Sequence[Entry], uncompressed: Collection[tuple]) -> set[tuple]:
    """Keys of the entries that are not faster than the uncompressed layers over their span.

    Args:
        entries: the DP's items with their latencies (importance is not read); negative latencies count as 0, as
            in :func:`~lm_plugin.solve.dp.solve`.
        uncompressed: keys of the entries that leave the network unchanged (they score 0 by definition).

    Returns:
        The keys of every other entry ``(st, end]`` whose latency is at least the smallest summed latency of a
        path of ``uncompressed`` entries from ``st`` to ``end`` (none if there is no such path). ``O(P · U)`` for
        ``P`` block starts and ``U`` uncompressed entries.
    """
    plain = sorted((e for e in entries if e.key in uncompressed), key=lambda e: e.st)
    fastest: dict[int, dict[int, float]] = {}  # start -> end -> fastest uncompressed path

    def paths(st: int) -> dict[int, float]:
        if st not in fastest:
            best = {st: 0.0}
            for e in plain:  # sorted by start: every path into e.st is final before e is relaxed
                if e.st in best:
                    cost = best[e.st] + max(e.latency_ms, 0.0)
                    if cost < best.get(e.end, math.inf):
                        best[e.end] = cost
            fastest[st] = best
        return fastest[st]

    return {e.key for e in entries
            if e.key not in uncompressed and max(e.latency_ms, 0.0) >= paths(e.st).get(e.end, math.inf)}
