"""Tracing a model into a torch.fx graph and classifying its nodes.

Everything downstream (chain extraction, rewriting, merging) works on the fx graph made here, so this is the
only place that knows how PyTorch spells "an activation", "a residual add" or "a conv followed by its BN".
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from .. import activations
from ..errors import ArgumentTypeError, UntraceableModelError
from .canonical import BN_ARGS, BN_DEFAULTS, bind_args, zero_pad_amounts

ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")


class OpaqueFallbackTracer(fx.Tracer):
    """``torch.fx`` tracing that keeps a submodule opaque (one ``call_module`` node) when its forward cannot be
    traced symbolically (e.g. control flow on input sizes), instead of failing on the whole model.

    The opaque call is then an ordinary op of the graph (a break for LayerMerge) unless canonicalisation
    recognises what it computes (:mod:`lm_plugin.trace.canonical`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.opaque: list[str] = []
        self._tensor_names: tuple[dict[int, str], dict[int, str]] | None = None

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        # fx finds a parameter's name by scanning all of the root's parameters on every access: quadratic in
        # model size (seconds on models whose norm layers trace into F.batch_norm on their own attributes).
        # Same result through a name index built once; anything the index misses takes fx's own path.
        if not isinstance(attr_val, torch.Tensor) or self.param_shapes_constant:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        params, buffers = self._index()
        name = params.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = buffers.get(id(attr_val))
        if name is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=None)
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> Any:
        # The same scan happens for every tensor passed to a traced function (a norm's running statistics).
        if isinstance(a, torch.Tensor) and not isinstance(a, fx.Proxy):
            params, buffers = self._index()
            name = (params if isinstance(a, nn.Parameter) else buffers).get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def _index(self) -> tuple[dict[int, str], dict[int, str]]:
        """id -> first name (fx's scan order) of the root's parameters and buffers, built once per trace."""
        if self._tensor_names is None:
            params = {id(p): n for n, p in reversed(list(self.root.named_parameters()))}
            buffers = {id(b): n for n, b in reversed(list(self.root.named_buffers()))}
            self._tensor_names = params, buffers
        return self._tensor_names

    def call_module(self, m: nn.Module, forward, args, kwargs):
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        last = self.graph._root.prev  # the newest node before the submodule's own nodes
        stack = copy.copy(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # Roll back the nodes the failed forward created (newest first) and fx's module stack, then call
            # the module as a leaf.
            while self.graph._root.prev is not last:
                self.graph.erase_node(self.graph._root.prev)
            self.module_stack = stack
            self.opaque.append(path)
            return self.create_proxy("call_module", path, args, kwargs)


def trace(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> fx.GraphModule:
    """Symbolically trace a *copy* of ``model`` into canonical form and annotate every node with its shape.

    The copy is put in eval mode and run once under ``torch.no_grad`` (shape propagation), so neither the
    user's module nor its BatchNorm running statistics are touched. Submodules whose forward fx cannot trace
    stay opaque calls (:class:`OpaqueFallbackTracer`); the graph is then put in canonical form
    (:func:`lm_plugin.trace.canonical.canonicalize`). What was done is listed in ``gm.meta["lm_plugin_trace"]``.

    Raises:
        UntraceableModelError: fx cannot trace the model.
    """
    from .canonical import canonicalize

    inputs = normalize_inputs(example_inputs)
    model = copy.deepcopy(model).eval()
    notes: list[str] = []
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        tracer = OpaqueFallbackTracer()
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
            raise UntraceableModelError(
                f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
                "LayerMerge rewrites the model's fx graph, so the forward pass must be symbolically traceable. "
                "Move data-dependent control flow into a submodule and mark it as a leaf, or trace the model "
                "yourself (torch.fx.Tracer with custom leaf modules) and pass the resulting GraphModule."
            ) from exc
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        if tracer.opaque:
            notes.append(f"kept opaque (forward not traceable): {', '.join(sorted(set(tracer.opaque)))}")
    gm.eval()
    with torch.no_grad():
        try:
            propagate_shapes(gm, inputs)
            changes = canonicalize(gm)
            gm.eval()
            if any("type" not in n.meta for n in gm.graph.nodes):  # ShapeProp records every node's type
                propagate_shapes(gm, inputs)  # a rewrite left a node without its shape (a safety net)
            notes += changes
        except Exception as exc:
            raise UntraceableModelError(
                f"The traced model failed on the example inputs ({_describe(inputs)}): "
                f"{type(exc).__name__}: {exc}\nCheck that example_inputs have the shape the model expects."
            ) from exc
    gm.meta["lm_plugin_trace"] = notes
    return gm


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Annotate nodes with shapes. Fake tensors make this free of compute (float64 depthwise convs are very
    slow on CPU); models that fake tensors cannot run fall back to a real forward pass."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        _FakeShapeProp(gm, mode).propagate(*(mode.from_tensor(t) for t in inputs))
    except Exception:
        ShapeProp(gm).propagate(*inputs)


class _FakeShapeProp(ShapeProp):
    """ShapeProp under a fake mode that runs the real module (its tensors are faked as they are used) instead of
    deep-copying it into fake tensors first: that copy was most of the cost of tracing a large model."""

    def __init__(self, gm: fx.GraphModule, mode: Any) -> None:
        super().__init__(gm)  # no fake_mode: no copy
        self.fake_mode = mode

    # Fake tensors run batch norm through its decomposition, ~10 ms a call: on BN-heavy models (DenseNet-201,
    # EfficientNet-B7) most of the construction time. Batch norm's output has its input's metadata, so a
    # plain one (not a subclass with its own forward, no hooks) is answered with an empty tensor like its input.
    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        mod = self.fetch_attr(target)
        plain = type(mod).forward is nn.modules.batchnorm._BatchNorm.forward and not (
            mod._forward_hooks or mod._forward_pre_hooks)  # hooks may change what the call returns
        if plain and args and _bn_input_fits(args[0], mod.num_features):
            return torch.empty_like(args[0])
        return super().call_module(target, args, kwargs)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target is nn.functional.batch_norm:  # fused norm-act modules trace into it
            bound = bind_args(args, kwargs, BN_ARGS, BN_DEFAULTS)
            mean = bound["running_mean"] if bound else None
            if isinstance(mean, torch.Tensor) and _bn_input_fits(bound["input"], mean.numel()):
                return torch.empty_like(bound["input"])
        return super().call_function(target, args, kwargs)


def _bn_input_fits(x: Any, channels: int) -> bool:
    """The shortcut applies only where batch norm would accept the input; otherwise the real call raises."""
    return isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == channels


def normalize_inputs(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Accept a tensor or a sequence of tensors; return a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise ArgumentTypeError(
        "example_inputs must be a tensor or a tuple of tensors, e.g. torch.randn(1, 3, 224, 224); "
        f"got {type(example_inputs).__name__}"
    )


def _describe(inputs: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in inputs)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """Tensor shape recorded by shape propagation, or None for non-tensor values."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def activation_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The activation kind of ``node`` ("relu", "silu", ...) or None if it is not a supported activation."""
    # An activation is a *call site* (an fx node), not a module: torchvision's ResNet calls one `self.relu`
    # module twice per block.
    if node.op == "call_module":
        return activations.kind_of_module(module_of(gm, node))  # type: ignore[arg-type]
    if node.op == "call_function":
        return activations.kind_of_function(node.target)
    if node.op == "call_method":
        return activations.kind_of_method(str(node.target))
    return None


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of a plain ``a + b`` node (no ``alpha``, no scalars), else None."""
    is_add = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ADD_METHODS
    )
    if not is_add or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    if shape_of(a) is None or shape_of(a) != shape_of(b):
        return None
    return a, b


@dataclass(frozen=True)
class Branch:
    """One term of a sum of parallel linear branches that read the same input (RepVGG, MobileOne, ACNet):
    a conv (+ BN), a BN alone, or the input itself (``conv`` and ``bn`` both None)."""

    conv: fx.Node | None
    bn: fx.Node | None
    reader: fx.Node  # the node of this branch that reads the unit's input


@dataclass(frozen=True)
class ConvUnit:
    """A mergeable convolution call site and the BatchNorm that directly follows it (if any).

    A unit may also be a *sum of parallel linear branches* reading one input: ``conv``/``bn`` are then its
    main branch (the one with the full kernel), ``branches`` the other terms and ``total`` the add that sums
    them; the unit computes one conv whose kernel is the sum of the branch kernels, each at its offset.
    ``out`` is the node whose value leaves the unit (the sum, else the BN if present, else the conv).
    """

    conv: fx.Node
    bn: fx.Node | None
    branches: tuple[Branch, ...] = ()
    total: fx.Node | None = None
    pad: fx.Node | None = None  # an asymmetric zero pad read only by the conv: part of the unit

    @property
    def out(self) -> fx.Node:
        if self.total is not None:
            return self.total
        return self.bn if self.bn is not None else self.conv

    @property
    def input(self) -> fx.Node:
        arg = (self.pad if self.pad is not None else self.conv).args[0]
        assert isinstance(arg, fx.Node)
        return arg

    @property
    def readers(self) -> set[fx.Node]:
        """The nodes of the unit that read its input."""
        return {self.pad if self.pad is not None else self.conv} | {b.reader for b in self.branches}


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Numeric symmetric padding of a conv, or None if it cannot be expressed that way."""
    pad = conv.padding
    if pad == "valid":
        return (0, 0)
    if pad == "same":
        kh, kw = conv.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            return None  # PyTorch pads asymmetrically for even kernels
        return ((kh - 1) // 2, (kw - 1) // 2)
    return (int(pad[0]), int(pad[1]))  # type: ignore[index]


def is_mergeable_conv(conv: nn.Module) -> bool:
    """Can this module be composed with neighbours by kernel algebra?

    2-D, zero padding (other padding modes cannot be moved to the front of a group), no dilation.
    """
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and tuple(conv.dilation) == (1, 1)
        and conv_padding(conv) is not None
    )


def is_foldable_bn(bn: nn.Module) -> bool:
    """A BatchNorm2d that is an affine map in eval mode (has running statistics)."""
    return type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.running_mean is not None


def find_conv_units(gm: fx.GraphModule) -> dict[fx.Node, ConvUnit]:
    """Every mergeable conv call site, keyed by its conv node.

    A conv module called more than once (shared weights) is left out: rewriting it for one call site would
    change the others.
    """
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    units: dict[fx.Node, ConvUnit] = {}
    for node in gm.graph.nodes:
        mod = module_of(gm, node)
        if mod is None or not is_mergeable_conv(mod) or calls[str(node.target)] != 1:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        bn = None
        users = list(node.users)
        if len(users) == 1:
            user_mod = module_of(gm, users[0])
            if user_mod is not None and is_foldable_bn(user_mod) and calls[str(users[0].target)] == 1:
                bn = users[0]
        arg = node.args[0]
        pad = arg if (isinstance(arg, fx.Node) and len(arg.users) == 1 and zero_pad_amounts(gm, arg) is not None
                      and isinstance(arg.args[0], fx.Node)) else None
        units[node] = ConvUnit(conv=node, bn=bn, pad=pad)
    return _branch_sums(gm, units, calls)


def _sum_tree(node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """``(leaves, adds)`` of the tree of plain adds rooted at ``node`` (inner adds read by nothing else)."""
    ops = add_operands(node)
    if ops is None:
        return None
    leaves, adds = [], [node]
    for op in ops:
        inner = _sum_tree(op) if len(op.users) == 1 else None
        if inner is None:
            leaves.append(op)
        else:
            leaves += inner[0]
            adds += inner[1]
    return leaves, adds


def _branch_sums(gm: fx.GraphModule, units: dict[fx.Node, ConvUnit], calls: dict[str, int]
                 ) -> dict[fx.Node, ConvUnit]:
    """Merge sums of parallel linear branches into single units.

    A sum qualifies when all its terms read the same input ``x`` and each is a conv unit, a foldable BN or
    ``x`` itself; at least two terms are not ``x`` (one conv plus ``x`` is an ordinary residual); all convs
    have one stride; one conv (the main branch) covers every other kernel at its padding offset.
    """
    by_out = {u.out: u for u in units.values()}
    absorbed: set[fx.Node] = set()
    for node in reversed(list(gm.graph.nodes)):  # outermost sums first
        tree = _sum_tree(node) if node not in absorbed else None
        if tree is None:
            continue
        terms, adds = tree
        if len(set(terms)) != len(terms):
            continue
        inputs, branches, convs = set(), [], []
        for t in terms:
            unit = by_out.get(t)
            if unit is not None and unit.total is None and unit.pad is None and len(t.users) == 1:
                inputs.add(unit.input)
                convs.append(unit)
                branches.append(Branch(unit.conv, unit.bn, unit.conv))
            elif (t.op == "call_module" and is_foldable_bn(module_of(gm, t)) and calls[str(t.target)] == 1
                  and len(t.users) == 1 and len(t.args) == 1 and isinstance(t.args[0], fx.Node)):
                inputs.add(t.args[0])
                branches.append(Branch(None, t, t))
            else:
                inputs.add(t)
                branches.append(Branch(None, None, next(a for a in adds if t in a.args)))
        if len(inputs) != 1 or not convs or sum(1 for b in branches if b.conv or b.bn) < 2:
            continue
        main = _main_branch(gm, [u.conv for u in convs], needs_centre=len(convs) < len(branches))
        if main is None:
            continue
        main_unit = next(u for u in convs if u.conv is main)
        for u in convs:
            del units[u.conv]
        units[main] = ConvUnit(conv=main, bn=main_unit.bn, branches=tuple(b for b in branches if b.conv is not main),
                               total=node)
        absorbed |= set(adds)
        by_out = {u.out: u for u in units.values()}
    return units


def _main_branch(gm: fx.GraphModule, convs: list[fx.Node], *, needs_centre: bool) -> fx.Node | None:
    """The conv whose kernel, at its padding, covers every other branch's kernel at theirs (and, with
    ``needs_centre``, the 1x1 tap an identity or BN branch adds); None if the branches do not line up."""
    mods: list[nn.Conv2d] = [module_of(gm, c) for c in convs]  # type: ignore[misc]
    if len({tuple(m.stride) for m in mods}) != 1:
        return None
    pads = [conv_padding(m) for m in mods]
    for c, m, p in zip(convs, mods, pads):
        assert p is not None
        k = m.kernel_size
        covers = all(0 <= p[d] - q[d] and p[d] - q[d] + o.kernel_size[d] <= k[d]  # type: ignore[operator]
                     for o, q in zip(mods, pads) for d in range(2))
        if covers and (not needs_centre or all(p[d] + 1 <= k[d] for d in range(2))):
            return c
    return None
