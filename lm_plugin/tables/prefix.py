"""Values of the original network's nodes on a fixed set of batches, computed once and kept within a memory cap.

An importance entry changes one block; what the block and the rest of the network read from before it is the
same for every entry that starts there. :class:`PrefixCache` runs the original up to the requested nodes (only
the part needed for them, :func:`~lm_plugin.trace.subgraph.extract`) and keeps the values, least recently used
first out when the cap is reached. Entries are scored in chain order, so consecutive entries mostly ask for the
same few nodes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.fx as fx

from ..trace.subgraph import extract


class PrefixCache:
    """Node values of ``original`` (eval mode, no gradient) on ``batches``.

    Args:
        original: the traced original network (not modified; it should be in eval mode).
        batches: the network inputs of each batch, as a tuple (one tensor per network input), on the device to
            run on.
        capacity_bytes: most bytes of node values kept; a request larger than that is still answered (and kept
            until the next request).
    """

    def __init__(self, original: fx.GraphModule, batches: Sequence[tuple[torch.Tensor, ...]],
                 capacity_bytes: int = 2 << 30) -> None:
        self.original = original
        self.batches = list(batches)
        self.capacity_bytes = capacity_bytes
        self.inputs = [n.name for n in original.graph.nodes if n.op == "placeholder"]
        self._values: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self.computed = 0  # node values computed (cache misses), for tests and benchmarks

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._values.values() for t in ts)

    def values(self, names: Sequence[str]) -> list[tuple[torch.Tensor, ...]]:
        """Per batch, the values of the nodes ``names`` (in that order)."""
        missing = [n for n in dict.fromkeys(names) if n not in self._values]
        if missing:
            piece = extract(self.original, self.inputs, missing)
            feed = piece.meta["inputs"]
            columns: list[list[torch.Tensor]] = [[] for _ in missing]
            with torch.no_grad():
                for batch in self.batches:
                    by_name = dict(zip(self.inputs, batch))
                    for column, value in zip(columns, piece(*(by_name[n] for n in feed))):
                        column.append(value.detach())
            self._values.update(zip(missing, columns))
            self.computed += len(missing)
        for n in names:
            self._values.move_to_end(n)
        self._evict(keep=set(names))
        return [tuple(self._values[n][b] for n in names) for b in range(len(self.batches))]

    def _evict(self, keep: set[str]) -> None:
        size = self.nbytes
        for name in list(self._values):
            if size <= self.capacity_bytes:
                break
            if name in keep:
                continue
            size -= sum(t.numel() * t.element_size() for t in self._values.pop(name))
