"""Stage 2b: the candidate blocks of a chain — the entries of the latency and importance tables.

A candidate is a block ``(st, end]`` and the conv it merges into (kernel size, groups). Several kept-conv subsets
can give the same merged conv; the table holds one entry per merged conv, represented by the subset that keeps
the most weight (largest ``Σ‖W‖₁`` of the kept convs, like the reference).

Three modes share this machinery:

* ``layermerge`` — every valid block and every valid kept subset (the joint search of the paper);
* ``act_only``   — every conv kept: only activations are removed (depth compression, Kim et al. 2023);
* ``layer_only`` — exactly one conv kept per block: layers are pruned with their activation, nothing merges.

Enumeration is a dynamic program that never lists kept subsets (there are ``2^#prunable`` of them per block,
and 1×1 prunable convs never grow the kernel, so ``max_kernel`` does not bound them). For each block start
``st`` the convs ``st+1, st+2, …`` are read once, left to right, up to the first break. After conv ``j`` the DP
holds one *state* per merged geometry that the kept convs among ``st+1 … j`` can compose into:

    (kernel h/w, stride h/w, padding h/w, groups, any conv kept)

with ``groups`` the groups the kept convs and folded projections merge into (:func:`~lm_plugin.blocks.join_groups`,
None if there are none yet), the rule of :func:`~lm_plugin.blocks.block_geometry`. Each state holds its best kept subset
(largest score, ties as below). Conv ``j`` is composed onto every state (``K += (k−1)·S``, ``P += p·S``,
``S *= s``) or, if it is prunable, also dropped. A residual whose source is ``≥ st`` is a nested sub-problem: at
its source the states are pushed and the branch starts from the empty state; at its target only the branch
states whose skip folds (branch stride = skip stride, skip kernel inside the branch kernel at offset
``branch padding − skip padding``, as :func:`~lm_plugin.blocks.fold_problem`) survive, their summed map (the
branch's kernel; groups joined with the projection's) is composed onto every pushed state, and the best subsets
add. A block that ends strictly inside an open residual crosses it and is no candidate. States whose kernel
exceeds ``max_kernel`` are dropped (kernels only grow); single-conv blocks are emitted before that.

Complexity: O(L² · σ) state updates per break-free segment of L convs (L starts, each walking at most L convs),
plus O(σ²) per residual target for the composition, where σ is the number of distinct states — bounded by
``max_kernel²`` (kernel) × the few groups values × 2, since stride is fixed at each position and padding follows
the kernel. Each update copies a kept tuple (O(L)). ``act_only`` has one state per position; ``layer_only``
at most one per kept conv.

Ties. Scores are added exactly (as rationals, no float rounding); among the subsets of largest score the
lexicographically largest kept tuple wins, which is ``max(subsets, key=lambda k: (Σ‖W‖₁(k), k))`` — the rule of
the exhaustive enumeration this replaces — except that sums are no longer rounded (two subsets whose float sums
differ only by rounding are compared by their exact sums). Exact ties are resolved by keeping, per state, both the
best subset under plain tuple order and the best under the order where a tuple's end sorts after every index
(what a prefix is worth once further convs are appended), which makes the DP's choice that of the full max.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from numbers import Rational

from .blocks import BlockGeometry, compose, end_activation, join_groups, pad_extra, residual_relation
from .errors import ConfigurationError
from .trace.chain import Chain, ChainConv, Residual

MODES = ("layermerge", "act_only", "layer_only")
DEFAULT_MAX_KERNEL = 7


@dataclass(frozen=True)
class Candidate:
    """One table entry: block ``(st, end]`` merged into a conv of ``geometry``'s shape.

    Attributes:
        kept: the representative kept-conv subset (sorted conv indices): of all the subsets that yield this merged
            conv, the one keeping the largest score (``Σ‖W‖₁`` when enumerated with the network's weights).
            ``geometry`` is ``block_geometry(chain, st, end, kept)``.
        activation: what follows the merged conv (the activation kept at ``end``, or None if linear).
        residual_add: an unfolded residual add follows the merged conv (it stays in the deployed network).
    """

    st: int
    end: int
    geometry: BlockGeometry
    kept: tuple[int, ...] = field(compare=False)
    activation: str | None = None
    residual_add: bool = False

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """``(st, end, kernel_h, kernel_w, groups)``: identifies the entry in every table."""
        k = self.geometry.kernel_size
        return (self.st, self.end, k[0], k[1], self.geometry.groups)

    @property
    def uncompressed(self) -> bool:
        """One conv kept as it is, its activation kept: the network unchanged (such an entry scores 0)."""
        return self.end - self.st == 1 and self.kept == (self.end,)


def block_is_valid(chain: Chain, st: int, end: int) -> bool:
    """No break strictly inside and no residual crossed."""
    if any(p in chain.breaks for p in range(st + 1, end)):
        return False
    return all(residual_relation(st, end, r) != "crosses" for r in chain.residuals)


def enumerate_candidates(chain: Chain, mode: str = "layermerge", *, max_kernel: int | None = DEFAULT_MAX_KERNEL,
                         inserted_act: str | None = None,
                         weights: Mapping[int, float] | None = None) -> list[Candidate]:
    """All candidate entries of ``chain`` for ``mode``, ordered by ``(st, end, kernel, groups)``.

    Args:
        chain: the chain.
        mode: ``"layermerge"``, ``"act_only"`` or ``"layer_only"``.
        max_kernel: largest merged kernel (either dim) considered; None for no limit. Single-conv blocks are
            always included, so the uncompressed network is always representable.
        inserted_act: activation that the trainable form inserts where a multi-layer block ends at an
            originally linear position (see ``RewriteOptions``), or None if it inserts none.
        weights: score of each conv, by chain index (``1 … L``, every conv): ``Σ|W|`` of its weight for the
            reference's choice of representative. Any finite real numbers (floats, ints, 0-d tensors). None
            scores every conv 1: the representative is then the subset keeping the most convs.

    Raises:
        ValueError: unknown mode; ``weights`` missing a conv or not finite; residuals that cross (the chain's
            residuals must be nested or disjoint, as :func:`~lm_plugin.trace.extract_chain` makes them).
    """
    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
    scores = _exact_scores(chain, weights)
    opening: dict[int, list[Residual]] = {}  # source -> residuals starting there, outermost first
    for r in sorted(chain.residuals, key=lambda r: (r.source, -r.target)):
        opening.setdefault(r.source, []).append(r)
    breaks = chain.breaks
    out: list[Candidate] = []
    for st in range(chain.length):
        out.extend(_from_start(chain, st, mode, max_kernel, inserted_act, scores, opening, breaks))
    return out


# A DP state: (kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w, groups | None, any kept).
_State = tuple[int, int, int, int, int, int, "int | None", bool]
# A partial solution: (exact score, kept conv indices).
_Sol = tuple[int, tuple[int, ...]]
_EMPTY: _State = (1, 1, 1, 1, 0, 0, None, False)
_NOTHING: _Sol = (0, ())
_AFTER_ALL = (math.inf,)  # sorts after every conv index


def _from_start(chain: Chain, st: int, mode: str, max_kernel: int | None, inserted_act: str | None,
                scores: dict[int, int], opening: dict[int, list[Residual]], breaks: frozenset[int]) -> list[Candidate]:
    """The candidates of every block ``(st, end]``, walking ``end`` to the right from ``st + 1``."""
    # A residual around st (source < st < target) is crossed by every block that ends past its target.
    limit = min((r.target for r in chain.residuals if r.source < st < r.target), default=chain.length)
    # Per state: [best under "prefix" order, best under tuple order] (see the module docstring, Ties).
    states: dict[_State, list[_Sol]] = {_EMPTY: [_NOTHING, _NOTHING]}
    frames: list[tuple[Residual, dict[_State, list[_Sol]]]] = []  # open residuals and the states at their source
    out: list[Candidate] = []
    for end in range(st + 1, limit + 1):
        for r in opening.get(end - 1, ()):
            frames.append((r, states))
            states = {_EMPTY: [_NOTHING, _NOTHING]}
        states = _step(states, chain.conv(end), end, scores[end], mode)
        while frames and frames[-1][0].target == end:
            r, pushed = frames.pop()
            states = _close(pushed, states, r, mode)
        if any(r.target <= end for r, _ in frames):
            raise ConfigurationError(f"residuals of the chain cross at position {end}; they must be nested or disjoint")
        if all(r.source == st for r, _ in frames):  # otherwise (st, end] crosses an open residual
            out.extend(_emit(chain, st, end, states, max_kernel, inserted_act))
        if end in breaks:
            break  # longer blocks contain the break
        if max_kernel is not None:
            states = {s: v for s, v in states.items() if max(s[0], s[1]) <= max_kernel}
        if not states:
            break
    return out


def _emit(chain: Chain, st: int, end: int, states: dict[_State, list[_Sol]], max_kernel: int | None,
          inserted_act: str | None) -> list[Candidate]:
    """One candidate per merged (kernel, groups) of block ``(st, end]``, with its best kept subset."""
    single = end - st == 1
    best: dict[tuple, _Sol] = {}
    states_of: dict[tuple, _State] = {}
    for s, (_, sol) in states.items():
        if not s[7]:
            continue  # nothing kept
        if max_kernel is not None and not single and max(s[0], s[1]) > max_kernel:
            continue
        key = ((s[0], s[1]), s[6])
        if key not in best or sol > best[key]:
            best[key], states_of[key] = sol, s
    if not best:
        return []
    act = end_activation(chain, st, end, inserted_act)
    res = chain.residual_at(end)
    unfolded_add = res is not None and res.source < st
    first, last = chain.conv(st + 1), chain.conv(end)
    out = []
    for key in sorted(best):
        s = states_of[key]
        # = block_geometry(chain, st, end, kept), without recomposing the block
        geo = BlockGeometry(st, end, best[key][1], (s[0], s[1]), (s[2], s[3]), (s[4], s[5]), first.in_channels,
                            last.out_channels, s[6], first.input_shape, pad_extra(chain, best[key][1]))
        out.append(Candidate(st, end, geo, geo.kept, act, unfolded_add))
    return out


def _step(states: dict[_State, list[_Sol]], conv: ChainConv, j: int, w: int,
          mode: str) -> dict[_State, list[_Sol]]:
    """Conv ``j`` kept (composed onto each state) or, if prunable, dropped."""
    new: dict[_State, list[_Sol]] = {}
    layer: _State = (*conv.kernel_size, *conv.stride, *conv.padding, conv.groups, True)
    droppable = conv.prunable and mode != "act_only"
    for s, (a, b) in states.items():
        if droppable:
            _offer(new, s, a, b)
        if mode == "layer_only" and s[7]:
            continue  # one conv per block
        # Appending j ranks prefixes in the "prefix" order under both orders: take the prefix-order best.
        kept = (a[0] + w, a[1] + (j,))
        _offer(new, _compose(s, layer), kept, kept)
    return new


def _close(pushed: dict[_State, list[_Sol]], branch: dict[_State, list[_Sol]], r: Residual,
           mode: str) -> dict[_State, list[_Sol]]:
    """Residual ``r`` ends: fold its skip into the branch states where it fits, compose onto the pushed states."""
    summed: dict[_State, list[_Sol]] = {}
    for s, (a, b) in branch.items():
        if (s[2], s[3]) != tuple(r.stride):
            continue
        off = (s[4] - r.padding[0], s[5] - r.padding[1])
        if off[0] < 0 or off[1] < 0 or off[0] + r.kernel_size[0] > s[0] or off[1] + r.kernel_size[1] > s[1]:
            continue
        if r.projection is not None:
            s = (*s[:6], _join(s[6], r.groups), s[7])
        _offer(summed, s, a, b)
    new: dict[_State, list[_Sol]] = {}
    for s, (ba, bb) in summed.items():
        for p, (pa, pb) in pushed.items():
            if mode == "layer_only" and p[7] and s[7]:
                continue
            a = (pa[0] + ba[0], pa[1] + ba[1])
            # A non-empty branch follows the prefix, so the prefix ranks in the "prefix" order.
            b = (pa[0] + bb[0], pa[1] + bb[1]) if s[7] else pb
            _offer(new, _compose(p, s), a, b)
    return new


def _compose(x: _State, y: _State) -> _State:
    """``y`` applied after ``x`` (:func:`lm_plugin.blocks.compose`), groups joined."""
    (kh, kw), (sh, sw), (ph, pw) = compose(((x[0], x[1]), (x[2], x[3]), (x[4], x[5])),
                                           ((y[0], y[1]), (y[2], y[3]), (y[4], y[5])))
    return (kh, kw, sh, sw, ph, pw, _join(x[6], y[6]), x[7] or y[7])


def _join(g: int | None, h: int | None) -> int | None:
    """Groups of a union (:func:`~lm_plugin.blocks.join_groups`); None = none yet."""
    if g is None:
        return h
    if h is None:
        return g
    return join_groups(g, h)


def _offer(states: dict[_State, list[_Sol]], s: _State, a: _Sol, b: _Sol) -> None:
    """Offer a solution to state ``s``: ``a`` competes under the "prefix" order, ``b`` under tuple order."""
    cur = states.get(s)
    if cur is None:
        states[s] = [a, b]
        return
    ca = cur[0]
    if a[0] > ca[0] or (a[0] == ca[0] and a[1] + _AFTER_ALL > ca[1] + _AFTER_ALL):
        cur[0] = a
    if b > cur[1]:
        cur[1] = b


def _exact_scores(chain: Chain, weights: Mapping[int, float] | None) -> dict[int, int]:
    """Per-conv scores as integers on one common scale (exact sums and comparisons)."""
    indices = range(1, chain.length + 1)
    if weights is None:
        return dict.fromkeys(indices, 1)
    missing = [j for j in indices if j not in weights]
    if missing:
        raise ConfigurationError(f"weights has no score for convs {missing[:10]}{' …' if len(missing) > 10 else ''}")
    exact: dict[int, Fraction] = {}
    for j in indices:
        v = weights[j]
        try:
            exact[j] = Fraction(v) if isinstance(v, (float, Rational)) else Fraction(float(v))  # type: ignore[arg-type]
        except (ValueError, OverflowError, TypeError) as e:
            raise ConfigurationError(f"the weight of conv {j} must be a finite number, got {v!r}") from e
    scale = math.lcm(*(f.denominator for f in exact.values())) if exact else 1
    return {j: int(f * scale) for j, f in exact.items()}
