"""Small graph-editing steps shared by canonicalisation, the trainable-form rewrite and the merge."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path``. The old module's children move to ``new``: other call sites may still use them
    (a fused norm's activation, a conv's own padding module)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, leaf, None)
    if isinstance(old, nn.Module):
        for name, child in old.named_children():
            new.add_module(name, child)
    setattr(parent, leaf, new)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``root`` (replacing what is there, children included)."""
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` if nothing reads it, then, recursively, the inputs only it read. Nodes with side effects
    (``torch._assert``), placeholders and the output stay."""
    if node.users or node.op in ("placeholder", "output") or node.is_impure():
        return
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for inp in inputs:
        erase_unused(graph, inp)
