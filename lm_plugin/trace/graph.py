"""Tracing a model into a torch.fx graph and classifying its nodes.

Everything downstream (chain extraction, rewriting, merging) works on the fx graph made here, so this is the
only place that knows how PyTorch spells "an activation", "a residual add" or "a conv followed by its BN".
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UntraceableModelError

# Activation call sites, by kind. An activation is a *call site* (an fx node), not a module: torchvision's
# ResNet calls one `self.relu` module twice per block.
ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.Hardswish: "hardswish",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
}
ACTIVATION_FUNCTIONS: dict[object, str] = {
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leaky_relu",
    F.hardswish: "hardswish",
    F.silu: "silu",
    F.gelu: "gelu",
}
ACTIVATION_METHODS: dict[str, str] = {"relu": "relu", "relu_": "relu"}

ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")


def trace(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> fx.GraphModule:
    """Symbolically trace a *copy* of ``model`` and annotate every node with its tensor shape.

    The copy is put in eval mode and run once under ``torch.no_grad`` (shape propagation), so neither the
    user's module nor its BatchNorm running statistics are touched.

    Raises:
        UntraceableModelError: fx cannot trace the model.
    """
    inputs = normalize_inputs(example_inputs)
    model = copy.deepcopy(model).eval()
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        try:
            gm = fx.symbolic_trace(model)
        except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
            raise UntraceableModelError(
                f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
                "LayerMerge rewrites the model's fx graph, so the forward pass must be symbolically traceable. "
                "Move data-dependent control flow into a submodule and mark it as a leaf, or trace the model "
                "yourself (torch.fx.Tracer with custom leaf modules) and pass the resulting GraphModule."
            ) from exc
    gm.eval()
    with torch.no_grad():
        try:
            _propagate_shapes(gm, inputs)
        except Exception as exc:
            raise UntraceableModelError(
                f"The traced model failed on the example inputs ({_describe(inputs)}): "
                f"{type(exc).__name__}: {exc}\nCheck that example_inputs have the shape the model expects."
            ) from exc
    return gm


def _propagate_shapes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Annotate nodes with shapes. Fake tensors make this free of compute (float64 depthwise convs are very
    slow on CPU); models that fake tensors cannot run fall back to a real forward pass."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        ShapeProp(gm, fake_mode=mode).propagate(*(mode.from_tensor(t) for t in inputs))
    except Exception:
        ShapeProp(gm).propagate(*inputs)


def normalize_inputs(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Accept a tensor or a sequence of tensors; return a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError(
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
    if node.op == "call_module":
        mod = module_of(gm, node)
        for cls, kind in ACTIVATION_MODULES.items():
            if type(mod) is cls:
                return kind
        return None
    if node.op == "call_function":
        return ACTIVATION_FUNCTIONS.get(node.target)  # type: ignore[call-overload]
    if node.op == "call_method":
        return ACTIVATION_METHODS.get(str(node.target))
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
class ConvUnit:
    """A mergeable convolution call site and the BatchNorm that directly follows it (if any).

    ``out`` is the node whose value leaves the unit (the BN if present, else the conv).
    """

    conv: fx.Node
    bn: fx.Node | None

    @property
    def out(self) -> fx.Node:
        return self.bn if self.bn is not None else self.conv

    @property
    def input(self) -> fx.Node:
        arg = self.conv.args[0]
        assert isinstance(arg, fx.Node)
        return arg


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
        units[node] = ConvUnit(conv=node, bn=bn)
    return units
