"""Stage 5: apply a plan to a copy of the traced model -> the *trainable form*.

The trainable form is the network LayerMerge fine-tunes. It has exactly the structure the merged network will
have, still expressed with the original layers (so fine-tuning updates familiar weights and BN statistics):

* activations the plan removes are deleted (their call sites, not their modules);
* dropped convs and their BN become identities;
* each block's zero padding is moved to its input (one ``F.pad``) and its convs run unpadded, so that the block
  computes bit for bit what its merged conv computes, borders included (a block that is one conv the plan leaves
  alone stays as it is);
* a skip folded into a block reads the (larger) padded tensor, so it is cropped to line up with the branch
  (``crop_to``); the merged kernel then holds the skip at that offset;
* optionally, an activation is inserted where a multi-layer block ends at an originally linear position
  (the reference implementation's rule for MobileNetV2 bottleneck outputs).

What each block became is recorded in ``gm.meta["lm_plugin"]`` for the merge stage.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import activations
from ..blocks import block_geometry, end_activation, skip_offset
from ..errors import ConfigurationError
from ..plan import Plan
from ..trace.chain import Chain, ChainConv
from ..trace.fxedit import erase_unused, set_submodule

META_KEY = "lm_plugin"


@dataclass(frozen=True)
class BlockRecord:
    """What one block of a plan became in the trainable form: the hand-off to merge (which replaces ``input`` →
    ``output`` with one conv) and to the importance estimators (which read the network at ``position``).

    Attributes:
        st: The block is ``(st, end]`` of the chain.
        end: See ``st``.
        kept: The convs it keeps (chain indices), in order.
        input: Name of the node holding the block's input.
        output: Name of the node whose value the merged conv computes.
        position: Name of the node the rest of the network reads at position ``end`` (after the activation).
        position_reference: The name of that same value in the original graph.
    """

    st: int
    end: int
    kept: tuple[int, ...]
    input: str
    output: str
    position: str
    position_reference: str

@dataclass(frozen=True)
class RewriteOptions:
    """How the trainable form is built.

    Attributes:
        linear_boundary_act: ``"reference"`` inserts an activation where a block spanning several layers ends at
            an originally linear position (what the LayerMerge reference does for MobileNetV2); ``"none"`` never
            inserts one.
        inserted_act: activation kind to insert; ``None`` = the chain's most common activation.
    """

    linear_boundary_act: str = "reference"
    inserted_act: str | None = None

    def inserted_kind(self, chain: Chain) -> str | None:
        """The activation kind the rule inserts for ``chain`` (None when the rule is off)."""
        if self.linear_boundary_act == "none":
            return None
        if self.inserted_act is not None:
            return self.inserted_act
        kinds = Counter(p.activation for p in chain.positions if p.activation is not None)
        return kinds.most_common(1)[0][0] if kinds else None

    def __post_init__(self) -> None:
        if self.linear_boundary_act not in ("reference", "none"):
            raise ConfigurationError("linear_boundary_act must be 'reference' or 'none'")
        if self.inserted_act is not None and self.inserted_act not in activations.ACTIVATIONS:
            raise ConfigurationError(f"inserted_act must be one of {sorted(activations.ACTIVATIONS)}")


def crop_to(x: torch.Tensor, ref: torch.Tensor, top: int, left: int, sh: int, sw: int, kh: int, kw: int):
    """Crop ``x`` from ``(top, left)`` to the input extent a (kh, kw, stride sh/sw) valid conv needs to produce
    ``ref``'s spatial size. Lines a folded skip up with its branch in the trainable form."""
    h = (ref.shape[-2] - 1) * sh + kh
    w = (ref.shape[-1] - 1) * sw + kw
    return x[..., top:top + h, left:left + w]


def to_trainable(gm: fx.GraphModule, chain: Chain, plan: Plan, options: RewriteOptions | None = None, *,
                 share_weights: bool = False) -> fx.GraphModule:
    """Apply ``plan`` to a copy of ``gm`` (the traced original); ``gm`` itself is not modified.

    Args:
        share_weights: ``False`` (default): a deep copy, independent of ``gm``. ``True``: a new graph whose
            modules are ``gm``'s own except those the rewrite changes (copied first) — far cheaper for a large
            network, but training the result in place would train ``gm``; for reading, or for replacing the
            modules one trains (what the ``local`` importance estimator does).
    """
    options = options or RewriteOptions()
    plan.validate(chain)
    if share_weights:
        out = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
        out.meta = copy.deepcopy(gm.meta)
    else:
        out = copy.deepcopy(gm)
    graph = out.graph
    nodes = {n.name: n for n in graph.nodes}

    def own(name: str) -> torch.nn.Module:
        """The module at ``name``, copied first if it is shared with ``gm`` (it is about to change)."""
        module = out.get_submodule(name)
        if share_weights and module is gm.get_submodule(name):
            module = copy.deepcopy(module)
            set_submodule(out, name, module)
        return module
    alias: dict[str, fx.Node] = {}  # name of a removed node -> node that now carries its value
    inserted_kind = options.inserted_kind(chain)
    records: list[BlockRecord] = []
    dead: list[fx.Node] = []

    def resolve(name: str) -> fx.Node:
        node = nodes[name]
        while node.name in alias:
            node = alias[node.name]
        return node

    for st, end in plan.blocks():
        kept = [j for j in range(st + 1, end + 1) if j in plan.kept_convs]
        geo = block_geometry(chain, st, end, plan.kept_convs)
        # 1. Remove the activations inside the block.
        for i in range(st + 1, end):
            act = chain.positions[i].act_node
            if act is not None:
                node = nodes[act]
                alias[act] = node.args[0]  # type: ignore[assignment]
                node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
                graph.erase_node(node)
        # 2. Dropped convs (and their BN) become identities.
        for j in range(st + 1, end + 1):
            if j in plan.kept_convs:
                continue
            c = chain.conv(j)
            conv_node = nodes[c.node]
            unit_out = nodes[c.out_node]
            source = conv_node.args[0]
            alias[unit_out.name] = source  # type: ignore[assignment]
            unit_out.replace_all_uses_with(source)  # type: ignore[arg-type]
            dead.append(unit_out)  # the unit's nodes (BN, parallel branches) die with it
        # A block of one kept conv with no skip folded into it computes what the original computes: it is left as
        # it is (its layer shared with ``gm`` under ``share_weights``), so that what a plan leaves alone stays so.
        folded = chain.residuals_within(st, end)
        untouched = end == st + 1 and kept == [end] and not folded
        # 3. Move the block's padding to its input: every node of the block that reads the input reads it padded.
        #    A conv's own explicit (asymmetric) zero pad goes into the block's pad.
        for j in [] if untouched else kept:
            if chain.conv(j).pad_node is not None:
                pad = nodes[chain.conv(j).pad_node]  # type: ignore[index]
                pad.replace_all_uses_with(pad.args[0])  # type: ignore[arg-type]
                graph.erase_node(pad)
        block_in = resolve(chain.conv(st + 1).input_node)
        members = {nodes[chain.conv(j).node] for j in kept}
        members |= {nodes[b.reader] for j in kept for b in chain.conv(j).branches}
        members |= {nodes[r.add_node] for r in folded}
        members |= {nodes[r.projection_node] for r in folded if r.projection_node}
        for j in [] if untouched else kept:
            own(chain.conv(j).name).padding = (0, 0)
        if not untouched and (geo.padding != (0, 0) or geo.pad_extra != (0, 0)):
            with graph.inserting_after(block_in):
                padded = graph.call_function(F.pad, (block_in, geo.pad_lrtb))
            for user in list(block_in.users):
                if user in members:
                    user.replace_input_with(block_in, padded)
        # 3b. Parallel branches read the (wider) input of their unit's main conv, cropped to their own kernel at
        #     its offset inside the main kernel; identity and BN branches read the 1x1 tap at the centre.
        for j in [] if untouched else kept:
            _crop_branches(out, chain.conv(j), nodes, own)
        # 4. Folded residuals: the skip reads a tensor with a wider border than the branch output; crop it so that
        #    it lines up with the branch (the merged kernel holds the skip at the same offset).
        for r in folded:
            add = nodes[r.add_node]
            branch = add.args[1 - r.skip_index]
            (dh, dw), _ = skip_offset(chain, r, plan.kept_convs)
            if r.projection is None:
                with graph.inserting_before(add):
                    crop = graph.call_function(crop_to, (add.args[r.skip_index], branch, dh, dw, 1, 1, 1, 1))
                new_args = list(add.args)
                new_args[r.skip_index] = crop
                add.args = tuple(new_args)
            else:
                proj = nodes[r.projection_node]  # type: ignore[index]
                own(r.projection).padding = (0, 0)  # type: ignore[arg-type]
                with graph.inserting_before(add):
                    crop = graph.call_function(crop_to, (proj.args[0], branch, dh, dw, *r.stride, *r.kernel_size))
                proj.args = (crop,)
                add.prepend(proj)  # the crop needs the branch, so the skip now runs after it
                if r.projection_bn_node:
                    add.prepend(nodes[r.projection_bn_node])
        # 5. The block's output: the value its merged conv will replace. An unfolded residual ending here is not
        #    part of the block: its add stays after the merged conv.
        end_pos = chain.positions[end]
        res_end = chain.residual_at(end)
        position_value = resolve(end_pos.pre_node)  # type: ignore[arg-type]
        if res_end is not None and res_end not in folded:
            block_out = nodes[res_end.add_node].args[1 - res_end.skip_index]
        else:
            block_out = position_value
        assert isinstance(block_out, fx.Node)
        act_kind = end_activation(chain, st, end, inserted_kind)
        if act_kind != end_pos.activation:
            assert act_kind is not None
            inserted = f"lm_inserted_act_{end}"
            out.add_submodule(inserted, activations.make(act_kind))
            with graph.inserting_after(position_value):
                act_node = graph.call_module(inserted, (position_value,))
            position_value.replace_all_uses_with(act_node, delete_user_cb=lambda u, a=act_node: u is not a)
            alias[position_value.name] = act_node
        # What the rest of the network reads at position ``end``: here, and the same value in the original
        # (what the ``local`` importance estimator fits the block to).
        position = resolve(end_pos.node or end_pos.pre_node)  # type: ignore[arg-type]
        records.append(BlockRecord(st, end, tuple(kept), block_in.name, block_out.name, position.name,
                                   end_pos.node or end_pos.pre_node))

    for node in dead:
        erase_unused(graph, node)
    graph.lint()
    out.recompile()
    out.delete_all_unused_submodules()
    out.meta[META_KEY] = {
        "form": "trainable",
        "plan": plan.to_dict(),
        "chain_id": chain.fingerprint(),
        "options": asdict(options),
        "blocks": tuple(records),
    }
    return out


def _crop_branches(gm: fx.GraphModule, conv: ChainConv, nodes: dict[str, fx.Node],
                   own: Callable[[str], torch.nn.Module]) -> None:
    """Wire the parallel branches of a kept unit for relocated padding (see ``to_trainable`` step 3b)."""
    if not conv.branches:
        return
    main = nodes[conv.node]
    x = main.args[0]
    (ph, pw), (sh, sw) = conv.padding, conv.stride
    anchor = main
    for b in conv.branches:
        if b.conv is not None:
            own(b.conv).padding = (0, 0)
            (kh, kw), (oh, ow) = b.kernel_size, (ph - b.padding[0], pw - b.padding[1])
        else:
            (kh, kw), (oh, ow) = (1, 1), (ph, pw)
        with gm.graph.inserting_after(anchor):
            crop = gm.graph.call_function(crop_to, (x, main, oh, ow, sh, sw, kh, kw))
        reader = nodes[b.reader]
        reader.replace_input_with(x, crop)  # type: ignore[arg-type]
        anchor = crop
        # The crop needs the main conv's output, so the branch's own nodes now run after it.
        for name in (b.conv_node, b.bn_node):
            if name is not None:
                anchor.append(nodes[name])
                anchor = nodes[name]
