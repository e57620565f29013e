"""Stage 2b: the candidate blocks of a chain — the entries of the latency and importance tables.

A candidate is a block ``(st, end]`` and the conv it merges into (kernel size, groups). Several kept-conv subsets
can give the same merged conv; the table holds one entry per merged conv, and the importance stage chooses which
subset represents it (the one that keeps the most weight, like the reference).

Three modes share this machinery:

* ``layermerge`` — every valid block and every valid kept subset (the joint search of the paper);
* ``act_only``   — every conv kept: only activations are removed (depth compression, Kim et al. 2023);
* ``layer_only`` — exactly one conv kept per block: layers are pruned with their activation, nothing merges.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .blocks import BlockGeometry, block_geometry, end_activation, fold_problem, residual_relation
from .trace.chain import Chain

MODES = ("layermerge", "act_only", "layer_only")
DEFAULT_MAX_KERNEL = 7


@dataclass(frozen=True)
class Candidate:
    """One table entry: block ``(st, end]`` merged into a conv of ``geometry``'s shape.

    Attributes:
        subsets: every kept-conv subset (sorted conv indices) that yields this merged conv.
        activation: what follows the merged conv (the activation kept at ``end``, or None if linear).
        residual_add: an unfolded residual add follows the merged conv (it stays in the deployed network).
    """

    st: int
    end: int
    geometry: BlockGeometry
    subsets: tuple[tuple[int, ...], ...] = field(compare=False)
    activation: str | None = None
    residual_add: bool = False

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """``(st, end, kernel_h, kernel_w, groups)``: identifies the entry in every table."""
        k = self.geometry.kernel_size
        return (self.st, self.end, k[0], k[1], self.geometry.groups)


def block_is_valid(chain: Chain, st: int, end: int) -> bool:
    """No break strictly inside and no residual crossed."""
    if any(p in chain.breaks for p in range(st + 1, end)):
        return False
    return all(residual_relation(st, end, r) != "crosses" for r in chain.residuals)


def enumerate_candidates(chain: Chain, mode: str = "layermerge", *, max_kernel: int | None = DEFAULT_MAX_KERNEL,
                         inserted_act: str | None = None) -> list[Candidate]:
    """All candidate entries of ``chain`` for ``mode``, ordered by ``(st, end, kernel, groups)``.

    Args:
        chain: the chain.
        mode: ``"layermerge"``, ``"act_only"`` or ``"layer_only"``.
        max_kernel: largest merged kernel (either dim) considered; None for no limit. Single-conv blocks are
            always included, so the uncompressed network is always representable.
        inserted_act: activation that the trainable form inserts where a multi-layer block ends at an
            originally linear position (see ``RewriteOptions``), or None if it inserts none.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out: list[Candidate] = []
    for st in range(chain.length):
        for end in range(st + 1, chain.length + 1):
            if not block_is_valid(chain, st, end):
                if any(p in chain.breaks for p in range(st + 1, end)):
                    break  # longer blocks contain the same break
                continue
            by_geometry: dict[tuple, list[tuple[int, ...]]] = {}
            for kept in _subsets(chain, st, end, mode, max_kernel):
                geo = block_geometry(chain, st, end, kept)
                by_geometry.setdefault((geo.kernel_size, geo.groups), []).append(kept)
            act = end_activation(chain, st, end, inserted_act)
            res = chain.residual_at(end)
            unfolded_add = res is not None and res.source < st
            for (_, _), subsets in sorted(by_geometry.items()):
                geo = block_geometry(chain, st, end, subsets[0])
                out.append(Candidate(st, end, geo, tuple(subsets), act, unfolded_add))
    return out


def _subsets(chain: Chain, st: int, end: int, mode: str, max_kernel: int | None) -> Iterator[tuple[int, ...]]:
    """Valid kept subsets of block ``(st, end]``: ≥ 1 conv, unprunable convs kept, folded skips fit."""
    members = list(range(st + 1, end + 1))
    single = end - st == 1
    if mode == "act_only":
        choices = [tuple(members)]
    elif mode == "layer_only":
        required = [j for j in members if not chain.conv(j).prunable]
        if len(required) > 1:
            return
        choices = [tuple(required)] if required else [(j,) for j in members]
    else:
        choices = list(_grow(chain, members, 0, [], (1, 1), (1, 1), max_kernel if not single else None))
    folded = chain.residuals_within(st, end)
    for kept in choices:
        if not kept:
            continue
        geo_k = block_geometry(chain, st, end, kept).kernel_size
        if max_kernel is not None and not single and max(geo_k) > max_kernel:
            continue
        if all(fold_problem(chain, r, kept) is None for r in folded):
            yield kept


def _grow(chain: Chain, members: list[int], i: int, kept: list[int], k: tuple[int, int], s: tuple[int, int],
          max_kernel: int | None) -> Iterator[tuple[int, ...]]:
    """Depth-first over keep/drop decisions, pruning branches whose kernel already exceeds ``max_kernel``
    (kernels only grow as convs are added)."""
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
