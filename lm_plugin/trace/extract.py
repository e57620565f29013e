"""Chain extraction: fx graph -> :class:`Chain`, with no per-architecture code.

The rules, in order:

1. *Conv units* are mergeable conv call sites plus the BN that directly follows them (``graph.find_conv_units``).
2. *Residuals* are ``a + b`` nodes where one operand is a conv unit's output (the branch end) and the other is
   either a value that is an ancestor of that branch (identity skip) or a conv unit reading such an ancestor
   (projection skip). Ambiguous adds (e.g. two parallel convs) are not residuals; they become breaks.
3. *Links*: from a main-path unit's output, walk ``[residual add] -> [activation]``; the value reached is the
   unit's position. The position links to the next unit when exactly one main-path conv reads it and every other
   reader is a registered skip. Anything else (pooling, concat, multiply, a value reused elsewhere) is a break.
4. Linked units form segments; segments in topological order form the chain. Residuals whose source is not in
   the same segment as their target are not foldable: both ends become breaks (conservative, always exact).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx
import torch.nn as nn

from ..errors import NoChainError
from .canonical import zero_pad_amounts
from .chain import BranchRef, Chain, ChainConv, ChainPosition, Residual
from .graph import Branch, ConvUnit, activation_kind, add_operands, conv_padding, find_conv_units, module_of, shape_of


def extract_chain(gm: fx.GraphModule, ignored_layers: Iterable[str] = ()) -> Chain:
    """Build the chain IR of a traced, shape-annotated GraphModule (see :func:`lm_plugin.trace.trace`).

    Args:
        gm: output of :func:`lm_plugin.trace.graph.trace`.
        ignored_layers: qualified names of conv modules that must be kept as they are: never pruned and never
            merged with a neighbour.

    Raises:
        NoChainError: the model has no convolution that could be merged or pruned.
    """
    ignored = set(ignored_layers)
    units = find_conv_units(gm)
    by_out = {u.out: u for u in units.values()}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    notes: list[str] = []

    residual_adds = _find_residual_adds(units, by_out, order)
    # A residual that cannot be folded is dropped and the chain is extracted again without it, so that its add
    # becomes an ordinary op (a break) everywhere: no position may keep pointing at an add that is not folded.
    while True:
        chain, rejected = _extract(gm, units, by_out, order, residual_adds, ignored, notes)
        if not rejected:
            break
        for add in rejected:
            del residual_adds[add]
    if not chain.mergeable_positions and not chain.prunable:
        raise NoChainError(
            f"Found {chain.length} convolution(s) but nothing LayerMerge can compress: every boundary between them "
            "is a break (pooling, concatenation, multiplication, or a value used elsewhere) and no conv can become "
            "an identity.\n" + chain.summary()
        )
    return chain


def _unrecognised_convs(gm: fx.GraphModule) -> str:
    """Why the convs the model does have were not taken: what they compute is not a conv of a stored kernel."""
    kinds: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if isinstance(mod, nn.Conv2d) and type(mod) is not nn.Conv2d:
                kinds[type(mod).__name__] = kinds.get(type(mod).__name__, 0) + 1
        elif node.op == "call_function" and getattr(node.target, "__name__", "") in ("conv2d", "convolution"):
            kinds["conv2d on a computed kernel"] = kinds.get("conv2d on a computed kernel", 0) + 1
    if not kinds:
        return " The model has no such conv."
    found = ", ".join(f"{name} x{n}" for name, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return (f" The model's convs ({found}) compute their kernel in forward (e.g. weight standardisation) or are "
            "not a plain conv of their weight on the traced input, so merging them would not be exact. Replace "
            "them by plain convs with the kernel they compute (fold it once, after training) to compress the model.")


def _extract(gm, units, by_out, order, residual_adds, ignored: set[str], notes: list[str]):
    """One extraction with the given residual adds: ``(chain, adds that turned out not to be foldable)``."""
    projections = {info[2].conv for info in residual_adds.values() if info[2] is not None}
    main = {c: u for c, u in units.items() if c not in projections}
    main_by_input: dict[fx.Node, list[ConvUnit]] = {}
    for u in main.values():
        main_by_input.setdefault(u.input, []).append(u)
    skip_readers = _skip_readers(residual_adds)

    # Link walk: unit -> (position value, activation node, residual add taken, successor or break reason).
    walks: dict[fx.Node, _Walk] = {}
    for conv, unit in main.items():
        walks[conv] = _walk(gm, unit, residual_adds, main_by_input, skip_readers)

    succ = {c: w.successor.conv for c, w in walks.items() if w.successor is not None}
    has_pred = set(succ.values())
    starts = sorted((c for c in main if c not in has_pred), key=order.__getitem__)
    ordered: list[fx.Node] = []
    seg_start: set[int] = set()  # positions that start a segment
    for start in starts:
        seg_start.add(len(ordered))
        node: fx.Node | None = start
        while node is not None:
            ordered.append(node)
            node = succ.get(node)
    if not ordered:
        raise NoChainError(
            "No mergeable convolution found. LayerMerge merges 2-D convolutions whose kernel is a stored parameter "
            "(nn.Conv2d or F.conv2d on parameters; zero padding, no dilation, each called once)."
            + _unrecognised_convs(gm)
        )

    index_of = {c: i + 1 for i, c in enumerate(ordered)}
    L = len(ordered)
    segment_of: dict[int, int] = {}  # position -> segment id (a segment start belongs to the segment it opens)
    seg = -1
    for pos in range(L + 1):
        if pos in seg_start:
            seg += 1
        segment_of[pos] = seg

    # Value a skip would read at each position (the segment-start input for segment starts).
    value_at: dict[fx.Node, int] = {}
    for pos in range(L, -1, -1):
        if pos in seg_start:
            value_at[main[ordered[pos]].input] = pos
        elif pos >= 1:
            value_at[walks[ordered[pos - 1]].value] = pos

    breaks: dict[int, str] = {0: "chain input", L: "chain output"}
    for pos in seg_start:
        if pos > 0:
            breaks.setdefault(pos, walks[ordered[pos - 1]].break_reason or "segment boundary")

    residuals: list[Residual] = []
    rejected: list[fx.Node] = []
    nodes_by_name = {n.name: n for n in gm.graph.nodes}
    for add, (branch, skip_operand, proj, source_node) in residual_adds.items():
        b_conv = by_out[branch].conv
        if b_conv not in index_of or walks[b_conv].add is not add:
            continue  # the add is not on a link walk: it stays as an ordinary (unmerged) op
        b = index_of[b_conv]
        a = value_at.get(source_node)
        ignored_proj = proj is not None and str(proj.conv.target) in ignored
        if a is None or a >= b or segment_of[a] != segment_of[b - 1] or ignored_proj:
            breaks.setdefault(b, "residual whose source lies outside the segment")
            if a is not None:
                breaks.setdefault(a, "source of a residual that cannot be folded")
            notes.append(f"residual add {add.name} is kept as an op (its skip does not start in the same segment)")
            rejected.append(add)
            continue
        residuals.append(_make_residual(gm, a, b, add, skip_operand, source_node, proj))
    residuals, crossing = _drop_crossing_residuals(residuals, breaks, notes)
    rejected += [nodes_by_name[r.add_node] for r in crossing]
    if rejected:
        return None, rejected

    # Ignored layers: keep their neighbourhood intact.
    for conv in ordered:
        if str(conv.target) in ignored:
            i = index_of[conv]
            breaks.setdefault(i - 1, f"next conv {conv.target} is in ignored_layers")
            breaks.setdefault(i, f"conv {conv.target} is in ignored_layers")

    convs = tuple(_make_conv(gm, main[c], index_of[c], ignored) for c in ordered)
    positions = [ChainPosition(0, None, None, None, None, True, breaks[0])]
    for i, conv in enumerate(ordered, start=1):
        w = walks[conv]
        positions.append(
            ChainPosition(
                index=i,
                activation=w.act_kind,
                act_node=w.act.name if w.act is not None else None,
                pre_node=(w.add if w.add is not None else main[conv].out).name,
                node=w.value.name,
                is_break=i in breaks,
                break_reason=breaks.get(i),
            )
        )
    return Chain(convs=convs, positions=tuple(positions), residuals=tuple(residuals), notes=tuple(notes)), []


class _Walk:
    __slots__ = ("value", "act", "act_kind", "add", "successor", "break_reason")

    def __init__(self) -> None:
        self.value: fx.Node
        self.act: fx.Node | None = None
        self.act_kind: str | None = None
        self.add: fx.Node | None = None
        self.successor: ConvUnit | None = None
        self.break_reason: str | None = None


def _walk(gm, unit: ConvUnit, residual_adds, main_by_input, skip_readers) -> _Walk:
    w = _Walk()
    cur = unit.out
    users = list(cur.users)
    if len(users) == 1 and users[0] in residual_adds and residual_adds[users[0]][0] is cur:
        w.add = users[0]
        cur = users[0]
        users = list(cur.users)
    if len(users) == 1 and activation_kind(gm, users[0]) is not None and users[0].args[0] is cur:
        w.act, w.act_kind = users[0], activation_kind(gm, users[0])
        cur = users[0]
    w.value = cur
    readers = list(cur.users)
    mains = main_by_input.get(cur, [])
    others = [r for r in readers if not any(r in m.readers for m in mains) and r not in skip_readers.get(cur, ())]
    if len(mains) == 1 and not others:
        w.successor = mains[0]
    elif not readers:
        w.break_reason = "value unused"
    elif others:
        w.break_reason = "next op: " + ", ".join(sorted({_op_name(gm, r) for r in others}))
    else:
        w.break_reason = f"value read by {len(mains)} parallel convs"
    return w


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(module_of(gm, node)).__name__
    if node.op == "output":
        return "output"
    return getattr(node.target, "__name__", str(node.target))


def _find_residual_adds(units, by_out, order):
    """add node -> (branch operand, skip operand, projection unit or None, node the skip reads)."""
    found = {}
    for node in order:
        ops = add_operands(node)
        if ops is None:
            continue
        options = []
        for branch, skip in (ops, ops[::-1]):
            if branch not in by_out or len(branch.users) != 1:
                continue
            b_unit = by_out[branch]
            candidates = []
            if skip in by_out and len(skip.users) == 1 and by_out[skip] is not b_unit and by_out[skip].pad is None:
                candidates.append((by_out[skip], by_out[skip].input))  # projection skip
            candidates.append((None, skip))  # identity skip
            for proj, src in candidates:
                if _is_ancestor(src, b_unit.input, order):
                    options.append((branch, skip, proj, src))
                    break
        # Unambiguous: exactly one reading, or an identity reading beats a projection reading.
        identity = [o for o in options if o[2] is None]
        if len(options) == 1:
            found[node] = options[0]
        elif len(identity) == 1:
            found[node] = identity[0]
    return found


def _is_ancestor(src: fx.Node, node: fx.Node, order) -> bool:
    """Is ``src`` equal to or an ancestor of ``node``?"""
    if src is node:
        return True
    limit = order[src]
    stack, seen = [node], {node}
    while stack:
        n = stack.pop()
        for inp in n.all_input_nodes:
            if inp is src:
                return True
            if inp not in seen and order[inp] > limit:
                seen.add(inp)
                stack.append(inp)
    return False


def _skip_readers(residual_adds) -> dict[fx.Node, set[fx.Node]]:
    """value -> the nodes that read it as a skip (the add itself, or the projection conv)."""
    readers: dict[fx.Node, set[fx.Node]] = {}
    for add, (_, _skip, proj, src) in residual_adds.items():
        readers.setdefault(src, set()).add(proj.conv if proj is not None else add)
    return readers


def _drop_crossing_residuals(residuals: list[Residual], breaks: dict[int, str], notes: list[str]):
    """Residuals must be nested or disjoint; for crossing pairs, make both ends breaks (never folded)."""
    bad: set[int] = set()
    for i, r in enumerate(residuals):
        for j, q in enumerate(residuals):
            crossing = r.source < q.source < r.target < q.target or q.source < r.source < q.target < r.target
            if i < j and crossing:
                bad |= {i, j}
    for i in sorted(bad):
        r = residuals[i]
        breaks.setdefault(r.source, "crossing residuals")
        breaks.setdefault(r.target, "crossing residuals")
        notes.append(f"residual add {r.add_node} crosses another one; it is kept unfolded")
    return [r for i, r in enumerate(residuals) if i not in bad], [r for i, r in enumerate(residuals) if i in bad]


def _make_residual(gm, a: int, b: int, add, skip_operand, source_node, proj: ConvUnit | None) -> Residual:
    skip_index = 0 if add.args[0] is skip_operand else 1
    if proj is None:
        return Residual(a, b, add.name, skip_operand.name, skip_index, source_node.name)
    conv: nn.Conv2d = module_of(gm, proj.conv)  # type: ignore[assignment]
    return Residual(
        a, b, add.name, skip_operand.name, skip_index, source_node.name,
        projection=str(proj.conv.target),
        projection_node=proj.conv.name,
        projection_bn=str(proj.bn.target) if proj.bn is not None else None,
        projection_bn_node=proj.bn.name if proj.bn is not None else None,
        kernel_size=tuple(conv.kernel_size),  # type: ignore[arg-type]
        stride=tuple(conv.stride),  # type: ignore[arg-type]
        padding=conv_padding(conv),  # type: ignore[arg-type]
        groups=conv.groups,
    )


def _make_conv(gm: fx.GraphModule, unit: ConvUnit, index: int, ignored: set[str]) -> ChainConv:
    conv: nn.Conv2d = module_of(gm, unit.conv)  # type: ignore[assignment]
    k = tuple(conv.kernel_size)
    s = tuple(conv.stride)
    p = conv_padding(conv)
    assert p is not None
    extra = (0, 0)
    if unit.pad is not None:  # explicit zero pad (left, right, top, bottom) + the conv's own padding
        left, right, top, bottom = zero_pad_amounts(gm, unit.pad)  # type: ignore[misc]
        p, extra = (p[0] + top, p[1] + left), (bottom - top, right - left)
    size_preserving = extra == (0, 0) and all(2 * pi == ki - 1 for pi, ki in zip(p, k))
    prunable = (
        conv.in_channels == conv.out_channels
        and s == (1, 1)
        and size_preserving
        and str(unit.conv.target) not in ignored
    )
    return ChainConv(
        index=index,
        name=str(unit.conv.target),
        node=unit.conv.name,
        input_node=unit.input.name,
        bn=str(unit.bn.target) if unit.bn is not None else None,
        bn_node=unit.bn.name if unit.bn is not None else None,
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        groups=conv.groups,
        kernel_size=k,  # type: ignore[arg-type]
        stride=s,  # type: ignore[arg-type]
        padding=p,
        input_shape=shape_of(unit.input) or (),
        output_shape=shape_of(unit.out) or (),
        prunable=prunable,
        out_node=unit.out.name,
        pad_extra=extra,
        pad_node=unit.pad.name if unit.pad is not None else None,
        branches=tuple(_make_branch(gm, unit, b) for b in unit.branches),
    )


def _make_branch(gm: fx.GraphModule, unit: ConvUnit, b: Branch) -> BranchRef:
    if b.conv is not None:
        conv: nn.Conv2d = module_of(gm, b.conv)  # type: ignore[assignment]
        return BranchRef(str(b.conv.target), b.conv.name, str(b.bn.target) if b.bn else None,
                         b.bn.name if b.bn else None, b.conv.name, tuple(conv.kernel_size),  # type: ignore[arg-type]
                         conv_padding(conv))  # type: ignore[arg-type]
    if b.bn is not None:
        return BranchRef(None, None, str(b.bn.target), b.bn.name, b.reader.name)
    return BranchRef(None, None, None, None, b.reader.name)
