"""Parts of a traced network: which nodes a rewrite left untouched, and a piece of the graph as its own module.

An importance entry changes one block of the network. Everything the block does not reach computes what it
computed in the original, so its values can be taken from the original once per table (:func:`unchanged_nodes`
finds them), and only the rest — the block and what follows — needs running (:func:`extract`).

In extracted graphs, in-place operations (``ReLU(inplace=True)``, ``x += y``, ``relu_``) that could write into an
input or an output run out of place, so that a captured value is the value the node produced (a later in-place
activation would otherwise overwrite it) and an input fed to the piece is never modified (it may be a cached
tensor).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx

from ..errors import ConfigurationError, UnknownNameError
from .fxedit import set_submodule

_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv}


def _structure(arg: Any) -> Any:
    """Arguments with nodes replaced by their names, comparable with ``==``."""
    return fx.node.map_arg(arg, lambda n: ("node", n.name))


def unchanged_nodes(original: fx.GraphModule, derived: fx.GraphModule) -> set[str]:
    """Names of the nodes of ``derived`` that compute what the same-named node of ``original`` computes.

    A node is unchanged when it has a counterpart of the same name, operation and target, reading unchanged
    nodes in the same argument structure, and — for a module call or an attribute — the very same object (a
    module that was copied, e.g. to change its padding, counts as changed). ``derived`` must share the modules it
    did not change with ``original`` (:func:`~lm_plugin.rewrite.to_trainable` with ``share_weights=True``).
    """
    reference = {n.name: n for n in original.graph.nodes}
    same: set[str] = set()
    for node in derived.graph.nodes:
        twin = reference.get(node.name)
        if twin is None or node.op == "output" or twin.op != node.op or twin.target != node.target:
            continue
        if node.op == "call_module" and derived.get_submodule(node.target) is not original.get_submodule(
                twin.target):
            continue
        if node.op == "get_attr" and operator.attrgetter(node.target)(derived) is not \
                operator.attrgetter(twin.target)(original):
            continue
        if any(n.name not in same for n in node.all_input_nodes):
            continue
        try:
            equal = _structure(node.args) == _structure(twin.args) and \
                _structure(node.kwargs) == _structure(twin.kwargs)
        except RuntimeError:  # a tensor constant among the arguments: no cheap comparison, assume changed
            equal = False
        if equal:
            same.add(node.name)
    return same


def frontier(derived: fx.GraphModule, unchanged: set[str]) -> list[str]:
    """The unchanged nodes that a changed node (or the output) reads: the inputs of the changed part."""
    names = []
    for node in derived.graph.nodes:
        if node.name in unchanged and any(u.name not in unchanged for u in node.users):
            names.append(node.name)
    return names


def extract(gm: fx.GraphModule, inputs: Sequence[str], outputs: Sequence[str] | None = None) -> fx.GraphModule:
    """The part of ``gm`` that computes ``outputs`` (node names; ``None`` = the graph's own output) from the
    nodes named in ``inputs``.

    The result's arguments are the inputs it needs, in the order of ``inputs`` (their names are in
    ``result.meta["inputs"]``; an input the outputs do not need is left out; the names of the nodes it
    computes are in ``result.meta["nodes"]``). It shares
    ``gm``'s modules (copies only those it makes out of place) and returns a tuple with one tensor per name in
    ``outputs``, or what ``gm`` returns. A network input the outputs need but ``inputs`` lacks raises
    :class:`~lm_plugin.errors.ConfigurationError`; an unknown node name :class:`~lm_plugin.errors.UnknownNameError`.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    needed = _needed(gm, nodes, inputs, outputs)
    graph = fx.Graph()
    used = [name for name in inputs if name in needed]
    env: dict[str, fx.Node] = {name: graph.placeholder(f"in_{i}") for i, name in enumerate(used)}
    for node in gm.graph.nodes:
        if node.name in env or node.name not in needed:
            continue
        if node.op == "placeholder":
            raise ConfigurationError(f"the outputs need the network input {node.name!r}; pass it in inputs")
        if node.op == "output" and outputs is not None:
            continue
        env[node.name] = graph.node_copy(node, lambda n: env[n.name])
    if outputs is not None:
        graph.output(tuple(env[o] for o in outputs))
    piece = fx.GraphModule(gm, graph)
    piece.meta["inputs"] = used
    piece.meta["nodes"] = _computed(nodes, needed, inputs)
    _functionalize(piece)
    return piece


def needed_nodes(gm: fx.GraphModule, inputs: Sequence[str], outputs: Sequence[str] | None = None) -> list[str]:
    """The names of the nodes :func:`extract` would compute (its ``meta["nodes"]``), without building the piece."""
    nodes = {n.name: n for n in gm.graph.nodes}
    return _computed(nodes, _needed(gm, nodes, inputs, outputs), inputs)


def _computed(nodes: dict[str, fx.Node], needed: set[str], inputs: Sequence[str]) -> list[str]:
    stop = set(inputs)
    return [n for n in nodes if n in needed and n not in stop and nodes[n].op != "output"]


def _needed(gm: fx.GraphModule, nodes: dict[str, fx.Node], inputs: Sequence[str], outputs: Sequence[str] | None
            ) -> set[str]:
    """Names of the nodes on a path from ``inputs`` (included) to ``outputs`` (the graph's output if None)."""
    missing = [name for name in [*inputs, *(outputs or ())] if name not in nodes]
    if missing:
        raise UnknownNameError(f"no node named {missing} in the graph")
    stop = set(inputs)
    targets = [nodes[o] for o in outputs] if outputs is not None else \
        [n for n in gm.graph.nodes if n.op == "output"]
    needed: set[str] = set()
    todo = list(targets)
    while todo:
        node = todo.pop()
        if node.name in needed:
            continue
        needed.add(node.name)
        if node.name not in stop:
            todo.extend(node.all_input_nodes)
    return needed


def _functionalize(gm: fx.GraphModule) -> None:
    """Make the in-place operations of ``gm`` that could overwrite one of its inputs or outputs run out of place
    (see the module docstring).

    Only those: an in-place activation after a conv or a BN writes into a tensor nobody else holds, and keeping
    it in place spares allocating a fresh activation (costly on CPU for large ones). A value may alias an input or
    an output when it is one, or comes from one through a function or method call (a view, say) or an in-place
    module; module calls otherwise return fresh tensors.
    """
    graph = gm.graph
    (out,) = [n for n in graph.nodes if n.op == "output"]
    protected = {n for n in graph.nodes if n.op == "placeholder"} | set(out.all_input_nodes)
    aliases = set(protected)
    for node in graph.nodes:
        if node.op in ("call_function", "call_method") or (
                node.op == "call_module" and getattr(gm.get_submodule(node.target), "inplace", False) is True):
            if any(n in aliases for n in node.all_input_nodes):
                aliases.add(node)
    changed = False
    for node in graph.nodes:
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node) or first not in aliases:
            continue
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if getattr(module, "inplace", False) is True:
                fresh = copy.copy(module)  # a shallow copy: the same weights, its own flag
                fresh.inplace = False
                set_submodule(gm, node.target, fresh)
        elif node.op == "call_function":
            if node.target in _OUT_OF_PLACE:
                node.target, changed = _OUT_OF_PLACE[node.target], True
            elif getattr(node.target, "__name__", "").endswith("_") and not node.target.__name__.startswith("_"):
                plain = _plain_function(node.target)
                if plain is not None:
                    node.target, changed = plain, True
        elif node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_") and \
                hasattr(torch.Tensor, node.target[:-1]):
            node.target, changed = node.target[:-1], True
        if node.kwargs.get("inplace") is True:
            node.kwargs, changed = {**node.kwargs, "inplace": False}, True
    if changed:  # the code calls modules by attribute, so a swapped module needs no new code; a new target does
        gm.recompile()


def _plain_function(fn: Any) -> Any:
    """``torch.relu_`` -> ``torch.relu``, ``F.relu_`` -> ``F.relu`` (None if there is no such twin)."""
    name = fn.__name__[:-1]
    for namespace in (torch, torch.nn.functional):
        if getattr(namespace, fn.__name__, None) is fn and hasattr(namespace, name):
            return getattr(namespace, name)
    return None


def trained_modules(gm: fx.GraphModule, nodes: Iterable[str], *, buffers: bool = False) -> list[str]:
    """Targets of the module calls among ``nodes`` that have parameters (what fitting that part trains) — or
    buffers too, with ``buffers`` (what running that part in train mode changes: BatchNorm statistics)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    out: list[str] = []
    for name in nodes:
        node = by_name[name]
        if node.op != "call_module" or node.target in out:
            continue
        module = gm.get_submodule(node.target)
        if any(True for _ in module.parameters()) or (buffers and any(True for _ in module.buffers())):
            out.append(node.target)
    return out
