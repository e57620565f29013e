"""The chain IR: what the method sees of a network.

Indexing follows the paper. Convolutions along the main path are numbered ``1 … L``. *Position* ``i`` is the
output of conv ``i`` after its BN, residual add and activation; position ``0`` is the input of conv 1. A *block*
``(st, end]`` is the span of convs ``st+1 … end`` with no kept activation inside; it becomes one merged conv.

The IR is plain data (names of fx nodes and modules, shapes, geometry), so it can be printed, hashed and
serialised, and it holds no reference to the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

Pair = tuple[int, int]


@dataclass(frozen=True)
class BranchRef:
    """A parallel linear branch summed into a chain conv (RepVGG-style): conv (+ BN), BN alone, or identity."""

    conv: str | None  # qualified module name of the branch conv
    conv_node: str | None
    bn: str | None
    bn_node: str | None
    reader: str  # fx node that reads the unit's input for this branch (the conv, the BN, or the add)
    kernel_size: Pair = (1, 1)
    padding: Pair = (0, 0)


@dataclass(frozen=True)
class ChainConv:
    """Convolution ``index`` of the chain (1-based) and its BatchNorm."""

    index: int
    name: str  # qualified module name, e.g. "layer1.0.conv1"
    node: str  # fx node name of the call site
    input_node: str  # fx node the conv reads
    bn: str | None  # qualified module name of the BN folded into this conv
    bn_node: str | None
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: Pair
    stride: Pair
    padding: Pair
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    prunable: bool  # can become identity: same channels, stride 1, size-preserving padding
    out_node: str = ""  # fx node whose value leaves the unit (the branch sum, the BN or the conv)
    pad_extra: Pair = (0, 0)  # bottom/right padding beyond ``padding`` (asymmetric "same" padding)
    pad_node: str | None = None  # the explicit zero-pad node of an asymmetric padding (part of the unit)
    branches: tuple[BranchRef, ...] = ()  # parallel branches summed with the main conv (their kernels fit in it)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels


@dataclass(frozen=True)
class ChainPosition:
    """Position ``index``: the value after conv ``index`` (its BN, residual add and activation)."""

    index: int
    activation: str | None  # activation kind at this position; None = originally linear
    act_node: str | None  # fx node of the activation call site
    pre_node: str | None  # value right before the activation (BN output or residual add)
    node: str | None  # value after the activation (what the next conv reads)
    is_break: bool  # no block may span across this position
    break_reason: str | None = None


@dataclass(frozen=True)
class Residual:
    """A residual connection ``x_target = act(branch(x_source) + skip(x_source))``.

    ``skip`` is the identity (``projection is None``) or a conv (usually 1x1, maybe strided) + BN.
    """

    source: int
    target: int
    add_node: str
    skip_operand: str  # the add's operand on the skip side
    skip_index: int  # position of that operand in the add's arguments (0 or 1)
    source_node: str  # the value the skip reads
    projection: str | None = None  # qualified module name of the skip conv
    projection_node: str | None = None
    projection_bn: str | None = None
    projection_bn_node: str | None = None
    kernel_size: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    groups: int = 1


@dataclass(frozen=True)
class Chain:
    """Ordered convolutions, positions ``0 … L``, residual connections and break positions of a model."""

    convs: tuple[ChainConv, ...]
    positions: tuple[ChainPosition, ...]
    residuals: tuple[Residual, ...]
    notes: tuple[str, ...] = field(default=())  # why parts of the model were left out

    @property
    def length(self) -> int:
        """Number of convolutions L."""
        return len(self.convs)

    def conv(self, index: int) -> ChainConv:
        """Conv by its 1-based chain index."""
        return self.convs[index - 1]

    @property
    def breaks(self) -> frozenset[int]:
        return frozenset(p.index for p in self.positions if p.is_break)

    @property
    def mergeable_positions(self) -> tuple[int, ...]:
        """Positions whose activation a plan may remove (not breaks)."""
        return tuple(p.index for p in self.positions if not p.is_break)

    @property
    def prunable(self) -> frozenset[int]:
        return frozenset(c.index for c in self.convs if c.prunable)

    @property
    def segments(self) -> tuple[Pair, ...]:
        """Maximal ``(start, end)`` position spans with no break inside."""
        cuts = sorted(self.breaks)
        return tuple((a, b) for a, b in zip(cuts, cuts[1:]))

    def residuals_within(self, st: int, end: int) -> tuple[Residual, ...]:
        """Residuals wholly covered by block ``(st, end]`` (their skip folds into the merged kernel)."""
        return tuple(r for r in self.residuals if st <= r.source and r.target <= end)

    def residual_at(self, target: int) -> Residual | None:
        for r in self.residuals:
            if r.target == target:
                return r
        return None

    def fingerprint(self) -> str:
        """Stable hash of the structure (geometry, breaks, residuals), used to match plans and caches."""
        payload = {
            "convs": [
                [c.name, c.in_channels, c.out_channels, c.groups, c.kernel_size, c.stride, c.padding,
                 c.input_shape[1:], c.prunable] + ([[b.conv, b.bn] for b in c.branches] if c.branches else [])
                + ([list(c.pad_extra)] if c.pad_extra != (0, 0) else [])
                for c in self.convs
            ],
            "positions": [[p.index, p.activation, p.is_break] for p in self.positions],
            "residuals": [[r.source, r.target, r.projection, r.kernel_size, r.stride] for r in self.residuals],
        }
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A readable table of the chain: one row per conv, with the position that follows it."""
        lines = [f"Chain: {self.length} convs, {len(self.residuals)} residuals, "
                 f"{len(self.mergeable_positions)} removable activations, {len(self.prunable)} prunable convs"]
        head = f"{'#':>3}  {'conv':<28} {'k':>5} {'s':>3} {'cin':>5} {'cout':>5} {'g':>4}  {'prune':<5} after"
        lines += [head, "-" * len(head)]
        res_at = {r.target: r for r in self.residuals}
        for c in self.convs:
            p = self.positions[c.index]
            after = p.activation or "linear"
            if c.index in res_at:
                r = res_at[c.index]
                after = f"+skip[{r.source}{'/proj' if r.projection else ''}] " + after
            if c.branches:
                after = f"(+{len(c.branches)} parallel branches) " + after
            if p.is_break:
                after += f"  | break: {p.break_reason}"
            lines.append(
                f"{c.index:>3}  {c.name[:28]:<28} {c.kernel_size[0]}x{c.kernel_size[1]:<3} {c.stride[0]:>3} "
                f"{c.in_channels:>5} {c.out_channels:>5} {c.groups:>4}  {'yes' if c.prunable else '':<5} {after}"
            )
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
