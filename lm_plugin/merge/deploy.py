"""Stage 6: trainable form -> deploy form. Each block becomes one real ``nn.Conv2d``; every BN is folded.

The block's map is built by walking its kept convs in order and composing them (``LinearConv.then``). A
residual inside the block opens a sub-composition at its source; at its target the branch and the skip
(identity or projection) are summed at the skip's offset and the result is composed onto what came before.
The merged conv replaces the block's output node and reads the block's (unpadded) input; whatever the block
used to compute becomes dead code and is removed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..blocks import block_geometry, skip_offset
from ..errors import MergeError
from ..plan import Plan
from ..rewrite.trainable import META_KEY, BlockRecord, to_trainable
from ..trace.chain import Chain, ChainConv
from ..trace.fxedit import replace_submodule
from ..trace.graph import is_foldable_bn
from .algebra import LinearConv
from .check import capture_blocks, check_block, check_network

MAX_MERGED_BYTES = 2 * 1024**3  # float64 bytes of one merged kernel we agree to build


CHECK_TOLERANCE = 1e-6  # float64 relative error above which a merge is wrong (exact merges give ~1e-14)
CHECK_META_KEY = "lm_plugin_merge_check"  # deploy form's meta: the self-check's float64 end-to-end error


def merge(trainable: fx.GraphModule, chain: Chain, *, max_bytes: int = MAX_MERGED_BYTES, check: bool = True,
          tolerance: float = CHECK_TOLERANCE) -> fx.GraphModule:
    """Deploy form of a trainable-form model made by :func:`lm_plugin.rewrite.to_trainable`.

    The trainable model is not modified. The result is an eval-mode ``GraphModule`` with one conv per block.
    The trainable form may have been channel-pruned in place after ``to_trainable`` (e.g. by torch-pruning):
    channel counts are read from the modules present, so the merged convs have the pruned widths.

    Args:
        trainable: the trainable form (``LayerMergePruner.apply(plan)``), possibly fine-tuned or channel-pruned.
        chain: the chain it was made from.
        max_bytes: largest float64 merged kernel (bytes) to build; larger blocks raise :class:`MergeError`.
        check: verify the result in float64 before returning it: every merged conv against its block on a
            random sample shaped like the traced example, then the whole network
            (:mod:`lm_plugin.merge.check`). Costs two float64 forward passes of one sample, run module by module
            so that no float64 copy of the network is made; the end-to-end error is left in
            ``deployed.meta["lm_plugin_merge_check"]``.
        tolerance: largest float64 relative error the check accepts.

    Raises:
        MergeError: not a trainable form of this chain, a block would merge into an absurdly large kernel, the
            merge would need more memory than is available (Linux), or (``check=True``) the merged network does
            not compute what the trainable form computes.
    """
    info, plan = _trainable_plan(trainable, chain)
    sizes: dict[tuple[int, int], int] = {}  # float64 bytes of each block's merged kernel
    for st, end in plan.blocks():
        # The chain's channel counts are those of the original network: an upper bound for a pruned one.
        geo = block_geometry(chain, st, end, plan.kept_convs)
        size = geo.out_channels * geo.in_channels // geo.groups * geo.kernel_size[0] * geo.kernel_size[1] * 8
        if size > max_bytes:
            raise MergeError(
                f"block ({st},{end}] would merge into a {geo.kernel_size[0]}x{geo.kernel_size[1]} conv of "
                f"{size / 1024**3:.1f} GiB; keep an activation inside it (a position in {st + 1}..{end - 1}) "
                "or raise max_bytes"
            )
        sizes[st, end] = size
    ref = next(iter(trainable.parameters()))
    dtype = ref.dtype
    _check_memory(trainable, chain, info["blocks"], sizes, dtype, check)
    # The merge arithmetic is float64 whatever the model's dtype. The check runs the trainable and the deploy
    # form in float64 module by module (check.Float64Run), so it never holds a float64 copy of the network.
    if check:
        xs, values, expected = capture_blocks(trainable, info["blocks"])
    gm = copy.deepcopy(trainable).eval()
    merged: list[tuple[dict, tuple[int, int, int, int] | None]] = []
    with torch.no_grad():
        for rec in info["blocks"]:
            lin, padding, pad = _merged_map(gm, chain, plan, rec)
            if check:
                check_block(rec, _padded(lin.to_conv2d(padding, dtype=torch.float64, device=ref.device), pad),
                            values, tolerance)
            # Replaced at once, so the block's old conv is freed before the next block is built.
            replace_submodule(gm, chain.conv(rec.kept[0]).name, lin.to_conv2d(padding, dtype=dtype,
                                                                                  device=ref.device))
            merged.append((rec, pad))

    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    replaced: dict[str, fx.Node] = {}  # a block's output may be the next block's input
    by_target: dict[str, dict] = {}
    for rec, pad in merged:
        target = chain.conv(rec.kept[0]).name
        by_target[target] = rec
        out_node = nodes[rec.output]
        block_in = replaced.get(rec.input, nodes[rec.input])
        with graph.inserting_before(out_node):
            if pad is not None:
                block_in = graph.call_function(F.pad, (block_in, pad))
            new = graph.call_module(target, (block_in,))
        out_node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        replaced[rec.output] = new
    graph.eliminate_dead_code()
    folded = _fold_remaining_bns(gm)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.meta[META_KEY] = {**info, "form": "deploy"}
    gm.eval()
    if check:
        def exact(target: str) -> nn.Module | None:
            """The float64 map of a module the merge computed (rounded to the model's dtype in ``gm``)."""
            if target in by_target:
                lin, padding, _ = _merged_map(trainable, chain, plan, by_target[target])
                return lin.to_conv2d(padding, dtype=torch.float64, device=ref.device)
            if target in folded:
                return _folded_conv(trainable.get_submodule(target), trainable.get_submodule(folded[target]),
                                    torch.float64)
            return None

        gm.meta[CHECK_META_KEY] = check_network(gm, xs, expected, exact, tolerance)
    return gm


def deploy_plan(gm: fx.GraphModule, chain: Chain, plan: Plan) -> fx.GraphModule:
    """The network ``plan`` deploys to: rewritten (default rewrite options) and merged, every BN folded. With the
    identity plan, the uncompressed network as a deployment runs it — what latency tables call "the original"."""
    return merge(to_trainable(gm, chain, plan), chain)


def _check_memory(trainable: fx.GraphModule, chain: Chain, blocks: Sequence[BlockRecord],
                  sizes: dict[tuple[int, int], int], dtype: torch.dtype, check: bool) -> None:
    """Refuse, before allocating anything, a merge that would not fit in the memory available now.

    The merge holds a copy of the trainable form, every merged kernel in the model's dtype (each block's first
    conv is freed when its merged conv replaces it, the others at the end) and, per block, its float64 map and
    (``check``) the float64 conv it is checked with. Being killed by the kernel's OOM killer would lose the
    user's session; a MergeError loses nothing.
    """
    free = _available_bytes()
    if free is None:  # not Linux: nothing to compare with
        return
    element = torch.empty((), dtype=dtype).element_size()
    model = sum(t.numel() * t.element_size() for t in (*trainable.parameters(), *trainable.buffers()))
    freed = sum(trainable.get_submodule(chain.conv(rec.kept[0]).name).weight.numel() * element for rec in blocks)
    built = [sizes[rec.st, rec.end] for rec in blocks]  # blocks left as they are build nothing
    merged = sum(built) * element // 8
    work = max(built, default=0) * (2 if check else 1)
    need = model + merged - freed + work
    if need > free:
        worst = sorted(((rec.st, rec.end) for rec in blocks), key=lambda b: -sizes[b])[:3]
        raise MergeError(
            f"merging this plan needs about {need / 1024**3:.1f} GiB (a copy of the trainable form "
            f"{model / 1024**3:.1f} GiB, merged kernels {merged / 1024**3:.1f} GiB, float64 work "
            f"{work / 1024**3:.1f} GiB) but {free / 1024**3:.1f} GiB is available. Free memory, or keep an "
            "activation inside the largest blocks: "
            + ", ".join(f"({st},{end}] {sizes[st, end] * element // 8 / 1024**3:.2f} GiB" for st, end in worst)
        )


def _available_bytes() -> int | None:
    """Memory the kernel can hand out now without swapping (Linux ``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_error(deployed: fx.GraphModule) -> float:
    """The self-check's float64 end-to-end relative error of a deploy form made by :func:`merge` with ``check``.

    Raises:
        MergeError: ``deployed`` was merged with ``check=False`` (or not by :func:`merge`).
    """
    if CHECK_META_KEY not in getattr(deployed, "meta", {}):
        raise MergeError("this network carries no merge check: merge it with check=True (the default)")
    return float(deployed.meta[CHECK_META_KEY])


def _merged_map(gm: fx.GraphModule, chain: Chain, plan: Plan, rec: dict
                ) -> tuple[LinearConv, tuple[int, int], tuple[int, int, int, int] | None]:
    """Block ``rec``'s map, the padding of its merged conv, and the explicit pad before it (asymmetric only)."""
    st, end = rec.st, rec.end
    lin = _block_map(gm, chain, plan, st, end)
    geo = block_geometry(chain, st, end, plan.kept_convs)
    if lin.kernel_size != geo.kernel_size or lin.stride != geo.stride:
        raise MergeError(f"internal: block ({st},{end}] merged to {lin.kernel_size}/{lin.stride}, "
                         f"expected {geo.kernel_size}/{geo.stride}")
    if geo.pad_extra != (0, 0):  # explicit F.pad, then an unpadded conv
        return lin, (0, 0), geo.pad_lrtb
    return lin, geo.padding, None


def _padded(conv: nn.Conv2d, pad: tuple[int, int, int, int] | None) -> nn.Module:
    """The block's merged map as one module: the conv, after the explicit zero pad of an asymmetric padding."""
    return conv if pad is None else nn.Sequential(nn.ZeroPad2d(pad), conv)


def _trainable_plan(trainable: fx.GraphModule, chain: Chain) -> tuple[dict, Plan]:
    """The trainable form's record and plan, checked against ``chain``."""
    info = trainable.meta.get(META_KEY) if isinstance(trainable, fx.GraphModule) else None
    if not info or info.get("form") != "trainable":
        raise MergeError(
            "merge() expects the trainable form returned by LayerMergePruner.apply(plan) (a GraphModule carrying "
            "its plan). To merge a fine-tuned checkpoint, rebuild it with pruner.apply(plan), "
            "load_state_dict(checkpoint), then merge."
        )
    if info["chain_id"] != chain.fingerprint():
        raise MergeError("this trainable model was made from a different chain (model or ignored_layers differ)")
    return info, Plan.from_dict(info["plan"])


def internal_layers(trainable: fx.GraphModule, chain: Chain) -> list[nn.Module]:
    """Convs of ``trainable`` whose output channels exist only inside a merged block.

    A block merges into one conv whose shape depends only on the block's input and output widths (and its
    kernel), so channels *inside* a block vanish at merge time. Pruning them keeps the merge exact but does not
    shrink the deploy network; it only lowers the merged kernel's rank. Pass these layers as ``ignored_layers``
    to a channel pruner (torch-pruning skips a group as soon as one of its producers is ignored, so only convs
    whose *whole* coupled channel set is internal are returned; block boundaries stay prunable).

    Inside a block, channel spaces are tracked by position: a dropped conv passes its input's channels on, an
    identity skip ties its source and target, a projection skip writes into its target's channels. A space not
    tied to the block's input or output position is internal.
    """
    info, plan = _trainable_plan(trainable, chain)
    layers: list[nn.Module] = []
    for rec in info["blocks"]:
        st, end = rec.st, rec.end
        space = {p: p for p in range(st, end + 1)}  # position -> a position with the same channels
        for j in range(st + 1, end + 1):
            if j not in plan.kept_convs:
                _join(space, j, j - 1)
        folded = chain.residuals_within(st, end)
        for r in folded:
            if r.projection is None:
                _join(space, r.target, r.source)
        boundary = {_root(space, st), _root(space, end)}
        layers += [trainable.get_submodule(chain.conv(j).name) for j in rec.kept
                   if _root(space, j) not in boundary]
        layers += [trainable.get_submodule(r.projection) for r in folded
                   if r.projection is not None and _root(space, r.target) not in boundary]
    return layers


def _root(space: dict[int, int], p: int) -> int:
    while space[p] != p:
        p = space[p]
    return p


def _join(space: dict[int, int], a: int, b: int) -> None:
    space[_root(space, a)] = _root(space, b)


def _unit(gm: fx.GraphModule, conv_name: str, bn_name: str | None) -> LinearConv:
    conv = gm.get_submodule(conv_name)
    bn = gm.get_submodule(bn_name) if bn_name else None
    return LinearConv.from_conv(conv, bn)  # type: ignore[arg-type]


def _chain_unit(gm: fx.GraphModule, c: ChainConv) -> LinearConv:
    """The affine map of chain conv ``c``: its conv + BN, plus its parallel branches at their offsets."""
    lin = _unit(gm, c.name, c.bn)
    for b in c.branches:
        if b.conv is not None:
            term = _unit(gm, b.conv, b.bn)
            offset = (c.padding[0] - b.padding[0], c.padding[1] - b.padding[1])
        else:
            term = LinearConv.identity(lin.in_channels, lin.groups, device=_device(gm))
            if b.bn is not None:
                term = term.scaled(gm.get_submodule(b.bn))  # type: ignore[arg-type]
            offset = c.padding
        lin = lin.plus(term, offset)
    return lin


def _block_map(gm: fx.GraphModule, chain: Chain, plan: Plan, st: int, end: int) -> LinearConv:
    """The affine map block ``(st, end]`` computes, as one valid conv."""
    folded = chain.residuals_within(st, end)
    opens: dict[int, list] = {}
    for r in sorted(folded, key=lambda r: -r.target):  # outer residuals open first
        opens.setdefault(r.source, []).append(r)
    stack: list[tuple[LinearConv | None, object]] = []
    current: LinearConv | None = None

    def push(pos: int) -> None:
        nonlocal current
        for r in opens.get(pos, []):
            stack.append((current, r))
            current = None

    # Channel counts come from the modules present, never from the chain: the trainable form may have been
    # channel-pruned (e.g. by torch-pruning) after apply(). Dropped convs are identities, so the width of the
    # value at a position is that of the last kept conv before it in the block, or the block's input width.
    width = _block_in_channels(gm, chain, plan, st, end)
    push(st)
    for j in range(st + 1, end + 1):
        c = chain.conv(j)
        if j in plan.kept_convs:
            step = _chain_unit(gm, c)
            current = step if current is None else current.then(step)
            width = step.out_channels
        while stack and stack[-1][1].target == j:  # type: ignore[attr-defined]
            before, r = stack.pop()
            channels = current.out_channels if current is not None else width
            branch = current or LinearConv.identity(channels, channels, device=_device(gm))
            if r.projection is None:  # type: ignore[attr-defined]
                skip = LinearConv.identity(channels, branch.groups, device=_device(gm))
            else:
                skip = _unit(gm, r.projection, r.projection_bn)  # type: ignore[attr-defined]
            offset, _ = skip_offset(chain, r, plan.kept_convs)  # type: ignore[arg-type]
            summed = branch.plus(skip, offset)
            current = summed if before is None else before.then(summed)
        if j < end:
            push(j)
    if current is None:
        raise MergeError(f"block ({st},{end}] keeps no conv")
    return current


def _block_in_channels(gm: fx.GraphModule, chain: Chain, plan: Plan, st: int, end: int) -> int:
    """Input channels of block ``(st, end]`` as the modules present say (its first kept conv or a folded
    projection; every other map inside the block preserves the channel count it reads)."""
    for j in range(st + 1, end + 1):
        if j in plan.kept_convs:
            conv = gm.get_submodule(chain.conv(j).name)
            return int(conv.in_channels)  # type: ignore[arg-type]
    for r in chain.residuals_within(st, end):
        if r.projection is not None:
            return int(gm.get_submodule(r.projection).in_channels)  # type: ignore[arg-type]
    raise MergeError(f"block ({st},{end}] keeps no conv")


def _device(gm: fx.GraphModule) -> torch.device:
    return next(iter(gm.parameters())).device


def _folded_conv(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype) -> nn.Conv2d:
    """``conv`` followed by the eval-mode ``bn``, as one conv in ``dtype``."""
    lin = LinearConv.from_conv(conv, bn)  # type: ignore[arg-type]
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
                       conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,  # type: ignore[arg-type]
                       device=conv.weight.device, dtype=dtype)
    with torch.no_grad():
        folded.weight.copy_(lin.weight)
        folded.bias.copy_(lin.bias)
    return folded.eval()


def _fold_remaining_bns(gm: fx.GraphModule) -> dict[str, str]:
    """Fold every remaining conv -> BN pair (skips that were not folded, convs outside the chain).

    Returns:
        ``{conv target: BN target}`` of the folds made.
    """
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    folds: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(str(node.target))) is not nn.Conv2d:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or calls[str(node.target)] != 1:
            continue
        bn_node = users[0]
        bn = gm.get_submodule(str(bn_node.target))
        if not is_foldable_bn(bn) or calls[str(bn_node.target)] != 1:
            continue
        conv: nn.Conv2d = gm.get_submodule(str(node.target))  # type: ignore[assignment]
        replace_submodule(gm, str(node.target), _folded_conv(conv, bn, conv.weight.dtype))
        folds[str(node.target)] = str(bn_node.target)
        bn_node.replace_all_uses_with(node)
        gm.graph.erase_node(bn_node)
    return folds
