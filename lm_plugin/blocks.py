"""Stage 2: blocks of a chain and the geometry of the conv each block merges into.

A block ``(st, end]`` with kept convs ``C`` merges into one conv whose geometry follows from composing the kept
convs in order (dropped convs are identities and contribute nothing):

* kernel   ``K = 1 + sum_j (k_j - 1) * S_j``   where ``S_j`` is the product of the strides of kept convs before j
* stride   ``S = prod_j s_j``
* padding  ``P = sum_j p_j * S_j``               (all padding of the group moved to its first conv)

A residual wholly inside the block folds into the kernel: its skip (identity or conv) is added at offset
``d = P_branch - p_skip`` inside the branch's kernel, which must fit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

from .trace.chain import Chain, Pair, Residual


@dataclass(frozen=True)
class BlockGeometry:
    """Shape of the conv that block ``(st, end]`` becomes for a given kept-conv subset."""

    st: int
    end: int
    kept: tuple[int, ...]
    kernel_size: Pair
    stride: Pair
    padding: Pair
    in_channels: int
    out_channels: int
    groups: int
    input_shape: tuple[int, ...]
    pad_extra: Pair = (0, 0)  # bottom/right padding beyond ``padding`` (convs with asymmetric padding)

    @property
    def pad_lrtb(self) -> tuple[int, int, int, int]:
        """The block's input zero padding as ``F.pad`` takes it: (left, right, top, bottom)."""
        (ph, pw), (eh, ew) = self.padding, self.pad_extra
        return (pw, pw + ew, ph, ph + eh)


#: (kernel, stride, padding) of a conv, per spatial dimension.
Geometry = tuple[Pair, Pair, Pair]
#: The geometry of the identity: what a block with nothing in it computes.
IDENTITY: Geometry = ((1, 1), (1, 1), (0, 0))


def compose(first: Geometry, then: Geometry) -> Geometry:
    """Geometry of ``then ∘ first`` as one conv: the rule every merge follows (the module docstring's formulas, one
    step at a time): ``K = k1 + (k2 - 1) s1``, ``S = s1 s2``, ``P = p1 + p2 s1``. The candidate enumeration, the
    block geometry and the kernel algebra all compose through this function."""
    (k1, s1, p1), (k2, s2, p2) = first, then
    return ((k1[0] + (k2[0] - 1) * s1[0], k1[1] + (k2[1] - 1) * s1[1]), (s1[0] * s2[0], s1[1] * s2[1]),
            (p1[0] + p2[0] * s1[0], p1[1] + p2[1] * s1[1]))


def _compose(chain: Chain, convs: Iterable[int]) -> Geometry:
    """(kernel, stride, padding) of the valid-conv composition of ``convs`` (1-based chain indices)."""
    geometry = IDENTITY
    for j in convs:
        c = chain.conv(j)
        geometry = compose(geometry, (c.kernel_size, c.stride, c.padding))
    return geometry


def pad_extra(chain: Chain, convs: Iterable[int]) -> Pair:
    """Bottom/right padding beyond the top/left padding of the composition of ``convs`` (asymmetric pads)."""
    e, s = [0, 0], [1, 1]
    for j in convs:
        c = chain.conv(j)
        for d in range(2):
            e[d] += c.pad_extra[d] * s[d]
            s[d] *= c.stride[d]
    return (e[0], e[1])


def join_groups(g: int, h: int) -> int:
    """The groups of a conv merged from convs (or skips) of ``g`` and ``h`` groups: ``gcd(g, h)``.

    Contiguous equal groups of ``g`` and of ``h`` connect inputs to outputs in ``gcd(g, h)`` groups (a depthwise map
    after a 4-group conv keeps the 4 groups; anything with a dense conv is dense); :mod:`lm_plugin.merge.algebra`
    builds exactly that, and the latency table times it.
    """
    return math.gcd(g, h)


def block_geometry(chain: Chain, st: int, end: int, kept: Iterable[int]) -> BlockGeometry:
    """Geometry of block ``(st, end]`` keeping the convs in ``kept`` (indices outside the block are ignored)."""
    kept_in = tuple(sorted(j for j in kept if st < j <= end))
    kernel, stride, padding = _compose(chain, kept_in)
    groups = {chain.conv(j).groups for j in kept_in}
    groups |= {r.groups for r in chain.residuals_within(st, end) if r.projection is not None}
    first, last = chain.conv(st + 1), chain.conv(end)
    return BlockGeometry(
        st=st,
        end=end,
        kept=kept_in,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        in_channels=first.in_channels,
        out_channels=last.out_channels,
        groups=functools.reduce(join_groups, groups),
        input_shape=first.input_shape,
        pad_extra=pad_extra(chain, kept_in),
    )


def skip_offset(chain: Chain, residual: Residual, kept: Iterable[int]) -> tuple[Pair, Pair]:
    """Where a folded residual's skip sits inside its branch kernel.

    Returns ``(offset, branch_kernel)`` per spatial dim. The fold is exact iff
    ``0 <= offset`` and ``offset + skip_kernel <= branch_kernel`` in both dims.
    """
    branch = [j for j in kept if residual.source < j <= residual.target]
    kernel, _, padding = _compose(chain, sorted(branch))
    offset = (padding[0] - residual.padding[0], padding[1] - residual.padding[1])
    return offset, kernel


def fold_problem(chain: Chain, residual: Residual, kept: Iterable[int]) -> str | None:
    """Why ``residual`` cannot be folded with these kept convs, or None if it can."""
    kept = list(kept)
    offset, kernel = skip_offset(chain, residual, kept)
    _, stride, _ = _compose(chain, sorted(j for j in kept if residual.source < j <= residual.target))
    if stride != residual.stride:
        return f"branch stride {stride} != skip stride {residual.stride}"
    for d in range(2):
        if offset[d] < 0 or offset[d] + residual.kernel_size[d] > kernel[d]:
            return (f"the skip kernel {residual.kernel_size} does not fit the branch kernel {kernel} "
                    f"at offset {offset}")
    return None


def end_activation(chain: Chain, st: int, end: int, inserted: str | None) -> str | None:
    """The activation that follows block ``(st, end]`` once merged.

    The position's own activation; or, where a block of several layers ends at an originally linear, non-break
    position, ``inserted`` (the reference implementation's rule for MobileNetV2 bottleneck outputs; None = off).
    """
    position = chain.positions[end]
    if position.activation is None and inserted is not None and end - st >= 2 and not position.is_break:
        return inserted
    return position.activation


def blocks_of(boundaries: Iterable[int], length: int) -> list[Pair]:
    """``(st, end]`` spans between consecutive boundaries (0 and ``length`` are always boundaries)."""
    cuts = sorted(set(boundaries) | {0, length})
    return list(zip(cuts, cuts[1:]))


def residual_relation(st: int, end: int, r: Residual) -> str:
    """How block ``(st, end]`` relates to residual ``r``: 'outside', 'inside', 'covers' or 'crosses'."""
    if end <= r.source or st >= r.target:
        return "outside"
    if st <= r.source and end >= r.target:
        return "covers"
    if st >= r.source and end <= r.target:
        return "inside"
    return "crosses"
