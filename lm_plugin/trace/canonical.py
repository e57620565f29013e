"""Canonical form of a traced graph: every operation the chain understands, spelled one way.

Models spell the same computation in many ways: ``nn.Conv2d``, a subclass with "same" padding, ``F.conv2d`` on
a module's parameters; ``nn.BatchNorm2d`` or a fused norm+activation module that traces into ``F.batch_norm``;
padding inside the conv or an explicit ``F.pad``/``nn.ZeroPad2d`` before it; ``nn.Identity`` placeholders
between layers. The passes here rewrite the traced copy (never the user's model) so that what is a conv
becomes a plain ``nn.Conv2d`` call, what is a BatchNorm a plain ``nn.BatchNorm2d`` call, a symmetric zero pad
part of its conv, and identities disappear. Recognition is by what a node computes — the function called on
which kind of value, checked numerically where the code is opaque — never by model or library names.

Anything not recognised is left as it is; the chain then treats it as an ordinary op (a break), which is
always exact.
"""

from __future__ import annotations

import copy
import itertools
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

# torch has no public way to build the shape metadata ShapeProp writes; this helper is what ShapeProp itself uses
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..activations import kind_of_function, kind_of_method
from .fxedit import erase_unused, replace_submodule

CONV_FUNCTIONS = (F.conv2d, torch.conv2d)


class _NotConstant(LookupError):
    """A value is not a constant of the traced graph (caught by the callers)."""
CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONV_DEFAULTS: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
BN_DEFAULTS: dict[str, Any] = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
PAD_MODULES = (nn.ZeroPad2d, nn.ConstantPad2d)


def canonicalize(gm: fx.GraphModule) -> list[str]:
    """Rewrite ``gm`` (shape-annotated, eval mode) in place into canonical form; returns notes on what changed.

    Every node it creates carries the shape of what it computes (copied from the node it replaces, or
    derived), so shape propagation need not run again.
    """
    notes: list[str] = []
    counts = {
        "identity ops removed": _remove_identities(gm),
        "calls found to be identities in eval mode": _remove_probed_identities(gm),
        "rank assertions removed": _remove_true_rank_asserts(gm),
        "convs recognised in opaque modules": _probe_opaque_convs(gm),
        "functional convs": _functional_convs(gm),
        "functional batch norms": _functional_batch_norms(gm),
        "zero pads folded into convs": _fold_pads(gm),
    }
    for what, n in counts.items():
        if n:
            notes.append(f"canonical form: {n} {what}")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return notes


# ------------------------------------------------------------------------------------------------ helpers
def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """The call's arguments by name (positional and keyword), or None if the call does not fit ``names``."""
    return bind_args(node.args, node.kwargs, names, defaults)


def bind_args(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...], defaults: dict[str, Any]
              ) -> dict[str, Any] | None:
    """Positional and keyword arguments by name, or None if they do not fit ``names``."""
    if len(args) > len(names):
        return None
    bound = dict(defaults)
    bound.update(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            return None
        bound[key] = value
    return bound if all(n in bound for n in names) else None


def _attr(gm: fx.GraphModule, value: Any) -> tuple[str, torch.Tensor] | None:
    """``(target, tensor)`` if ``value`` is a get_attr node read by exactly one node, else None."""
    if not (isinstance(value, fx.Node) and value.op == "get_attr" and len(value.users) == 1):
        return None
    target = str(value.target)
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]
    if len(readers) != 1:
        return None  # the same tensor is read elsewhere (shared weights)
    owner, _, leaf = target.rpartition(".")
    try:
        tensor = getattr(gm.get_submodule(owner) if owner else gm, leaf)
    except AttributeError:
        return None
    return (target, tensor) if isinstance(tensor, torch.Tensor) else None


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return (int(v[0]), int(v[1]))
    return None


def _owner(gm: fx.GraphModule, target: str) -> tuple[str, nn.Module]:
    path = target.rpartition(".")[0]
    return path, (gm.get_submodule(path) if path else gm)


def _place(gm: fx.GraphModule, new: nn.Module, attrs: list[tuple[str, torch.Tensor] | None], kind: type,
           stem: str) -> str:
    """Register ``new`` (which holds the tensors ``attrs``) in ``gm`` and return its path.

    It takes the place of the module that owns those tensors when that module is of ``kind`` or a bare
    container made by fx, and owns nothing else: parameter names then stay those of the user's model.
    Otherwise it is added next to the owner, which gives the tensors up.
    """
    new.train(gm.training)  # a fresh module is in training mode; the traced copy is in eval mode
    used = [a for a in attrs if a is not None]
    owner_path, owner = _owner(gm, used[0][0])
    mine = {a[0].rpartition(".")[2] for a in used if _owner(gm, a[0])[0] == owner_path} | {"num_batches_tracked"}
    owned = set(owner._parameters) | set(owner._buffers)
    if owner_path and (isinstance(owner, kind) or type(owner) is nn.Module) and owned <= mine:
        replace_submodule(gm, owner_path, new)
        return owner_path
    path = _new_path(gm, owner_path, stem)
    for target, _ in used:
        delattr(_owner(gm, target)[1], target.rpartition(".")[2])
    gm.add_submodule(path, new)
    return path


def _place_after(gm: fx.GraphModule, node: fx.Node, new: nn.Module, kind: type, stem: str,
                 attrs: list[tuple[str, torch.Tensor] | None], x: fx.Node) -> str:
    """Replace the functional call ``node`` by a call of module ``new`` on ``x``; ``new`` holds the tensors
    ``attrs`` that ``node`` read (see :func:`_place`). Returns the module's path."""
    path = _place(gm, new, attrs, kind, stem)
    getattrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
    with gm.graph.inserting_before(node):
        new_node = gm.graph.call_module(path, (x,))
    new_node.meta = dict(node.meta)
    node.replace_all_uses_with(new_node)
    gm.graph.erase_node(node)
    for a in getattrs:  # fx refuses a graph that reads attributes that have moved
        if not a.users:
            gm.graph.erase_node(a)
    return path


def _new_path(gm: fx.GraphModule, owner_path: str, stem: str) -> str:
    names = {n for n, _ in gm.named_modules()}
    base = f"{owner_path}.{stem}" if owner_path else stem
    path, i = base, 1
    while path in names:
        path, i = f"{base}_{i}", i + 1
    return path


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


# --------------------------------------------------------------------------------------------- the passes
def _remove_identities(gm: fx.GraphModule) -> int:
    """``nn.Identity``, zero-probability dropout and ``x + 0`` / ``x * 1`` pass their input through: remove them."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and not node.kwargs and len(node.args) == 2:
            # x + 0, 0 + x, x * 1, 1 * x (e.g. a missing branch written as the constant 0)
            neutral = {operator.add: 0, operator.iadd: 0, torch.add: 0, operator.mul: 1, operator.imul: 1}
            value = neutral.get(node.target)  # type: ignore[call-overload]
            a, b = node.args
            keep = a if isinstance(a, fx.Node) and b == value and not isinstance(b, bool) else (
                b if isinstance(b, fx.Node) and a == value and not isinstance(a, bool) else None)
            if value is not None and keep is not None and _shape(keep) is not None and _shape(keep) == _shape(node):
                node.replace_all_uses_with(keep)
                gm.graph.erase_node(node)
                n += 1
            continue
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        mod = gm.get_submodule(str(node.target))
        is_identity = type(mod) is nn.Identity or (
            type(mod) in (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.Dropout3d) and mod.p == 0)
        if is_identity:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            n += 1
    return n


def _remove_probed_identities(gm: fx.GraphModule) -> int:
    """A function or method call on one tensor whose other arguments are constants, returning a tensor of the
    same shape, is removed if it returns its input unchanged on random data (twice, to catch randomness):
    e.g. stochastic depth or dropout traced in eval mode (``training=False`` is baked into the traced call).
    Modules are not probed: a dropout module in eval mode is an identity too, but it still regularises
    fine-tuning of the trainable form."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or len(node.all_input_nodes) != 1:
            continue
        x = node.all_input_nodes[0]
        shape, meta = _shape(x), x.meta.get("tensor_meta")
        out_meta = node.meta.get("tensor_meta")
        if (shape is None or _shape(node) != shape or meta is None or not meta.dtype.is_floating_point
                or getattr(out_meta, "stride", None) != meta.stride):
            continue  # a layout change (e.g. .contiguous() after a transpose) is not an identity for later views
        if _known(node):
            continue
        if _returns_input(node, x, shape, meta.dtype):
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
            n += 1
    return n


def _known(node: fx.Node) -> bool:
    """Calls whose meaning is already known (activations, arithmetic, asserts): never probed as identities."""
    if node.op == "call_method":
        return kind_of_method(str(node.target)) is not None
    return node.target in (torch._assert, getattr, *_ARITHMETIC) or kind_of_function(node.target) is not None


_ARITHMETIC = (operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.truediv, torch.add,
               torch.mul, operator.getitem)


def _returns_input(node: fx.Node, x: fx.Node, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        value = torch.randn(shape, generator=gen, dtype=dtype)
        probe = value.clone()
        args = fx.node.map_arg(node.args, lambda a, p=probe: p if a is x else a)
        kwargs = fx.node.map_arg(node.kwargs, lambda a, p=probe: p if a is x else a)
        try:
            with torch.no_grad():
                out = node.target(*args, **kwargs) if node.op == "call_function" else getattr(
                    args[0], str(node.target))(*args[1:], **kwargs)
        except Exception:
            return False
        if not (isinstance(out, torch.Tensor) and out.shape == value.shape and torch.equal(out, value)
                and torch.equal(probe, value)):
            return False
    return True


_COMPARE = {operator.eq: operator.eq, operator.ne: operator.ne, operator.ge: operator.ge, operator.gt: operator.gt,
            operator.le: operator.le, operator.lt: operator.lt}


def _static_value(node: Any) -> Any:
    """The value of a constant, or of ``t.ndim`` / ``t.dim()`` from the traced shapes; raises LookupError."""
    if not isinstance(node, fx.Node):
        return node
    is_ndim = node.op == "call_function" and node.target is getattr and node.args[1:] == ("ndim",)
    is_dim = node.op == "call_method" and node.target == "dim" and len(node.args) == 1
    if (is_ndim or is_dim) and (shape := _shape(node.args[0])) is not None:
        return len(shape)
    raise _NotConstant(node.name)


_PURE = (getattr, operator.getitem, operator.floordiv, operator.add, operator.sub, operator.mul, operator.neg)


def _constant(gm: fx.GraphModule, value: Any) -> Any:
    """Evaluate ``value`` if it is a constant or a pure expression of parameter shapes; raises LookupError."""
    if isinstance(value, (tuple, list)):
        return type(value)(_constant(gm, v) for v in value)
    if not isinstance(value, fx.Node):
        return value
    if value.op == "get_attr":
        owner, _, leaf = str(value.target).rpartition(".")
        tensor = getattr(gm.get_submodule(owner) if owner else gm, leaf)
        return _ShapeOnly(tuple(tensor.shape))
    if value.op == "call_function" and value.target in _PURE and not value.kwargs:
        args = [_constant(gm, a) for a in value.args]
        if value.target is getattr and isinstance(args[0], _ShapeOnly):
            if args[1] != "shape":
                raise _NotConstant(value.name)
            return args[0].shape
        if any(isinstance(a, _ShapeOnly) for a in args):
            raise _NotConstant(value.name)
        return value.target(*args)
    raise _NotConstant(value.name)


class _ShapeOnly:
    """A parameter seen by :func:`_constant`: only its shape may be read."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def _remove_true_rank_asserts(gm: fx.GraphModule) -> int:
    """``torch._assert(x.ndim == 4, ...)`` that the traced shapes show to hold: the reads of ``x.ndim`` would
    otherwise count as readers of the conv output and hide the BN or activation that follows."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch._assert or not node.args:
            continue
        cond = node.args[0]
        if not (isinstance(cond, fx.Node) and cond.op == "call_function" and cond.target in _COMPARE):
            continue
        try:
            holds = _COMPARE[cond.target](*(_static_value(a) for a in cond.args))
        except (LookupError, TypeError):
            continue
        if holds is True:
            gm.graph.erase_node(node)
            n += 1
    return n


def _make_conv(weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups) -> nn.Conv2d:
    out_ch, in_per_group, kh, kw = weight.shape
    conv = nn.Conv2d(in_per_group * groups, out_ch, (kh, kw), stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=bias is not None, device="meta")
    conv.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
    if bias is not None:
        conv.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
    return conv


def _functional_convs(gm: fx.GraphModule) -> int:
    """``F.conv2d(x, self.weight, self.bias, ...)`` with constant geometry -> an ``nn.Conv2d`` call."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in CONV_FUNCTIONS:
            continue
        args = _bind(node, CONV_ARGS, CONV_DEFAULTS)
        if args is None or not isinstance(args["input"], fx.Node):
            continue
        try:  # geometry computed from parameter shapes (e.g. padding = weight.shape[-1] // 2) is a constant
            geometry = {key: _constant(gm, args[key]) for key in ("stride", "padding", "dilation", "groups")}
        except LookupError:
            continue
        if any(isinstance(args[key], fx.Node) for key in geometry):
            computed = [args[key] for key in geometry if isinstance(args[key], fx.Node)]
            args.update(geometry)
            node.args, node.kwargs = tuple(args[k] for k in CONV_ARGS), {}
            for c in computed:
                erase_unused(gm.graph, c)
        w = _attr(gm, args["weight"])
        b = _attr(gm, args["bias"]) if args["bias"] is not None else None
        stride, dilation, groups = _pair(args["stride"]), _pair(args["dilation"]), args["groups"]
        padding = args["padding"] if args["padding"] in ("same", "valid") else _pair(args["padding"])
        if (w is None or w[1].dim() != 4 or (args["bias"] is not None and b is None) or stride is None
                or dilation is None or padding is None or not isinstance(groups, int)):
            continue
        conv = _make_conv(w[1], b[1] if b else None, stride, padding, dilation, groups)
        _place_after(gm, node, conv, nn.Conv2d, "lm_conv", [w, b], args["input"])
        n += 1
    return n


def _functional_batch_norms(gm: fx.GraphModule) -> int:
    """``F.batch_norm`` on a module's running statistics, in inference mode -> an ``nn.BatchNorm2d`` call.

    Fused norm + activation modules trace into this. As a real module the BN trains normally again when the
    trainable form is fine-tuned (the traced call had ``training=False`` baked in).
    """
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.batch_norm:
            continue
        args = _bind(node, BN_ARGS, BN_DEFAULTS)
        if args is None or args["training"] is not False or not isinstance(args["input"], fx.Node):
            continue
        shape = _shape(args["input"])
        mean, var = _attr(gm, args["running_mean"]), _attr(gm, args["running_var"])
        weight = _attr(gm, args["weight"]) if args["weight"] is not None else None
        bias = _attr(gm, args["bias"]) if args["bias"] is not None else None
        affine = weight is not None and bias is not None
        if (shape is None or len(shape) != 4 or mean is None or var is None or not isinstance(args["eps"], float)
                or (args["weight"] is not None) != affine or (args["bias"] is not None) != affine):
            continue
        owner = _owner(gm, mean[0])[1]
        momentum = owner.momentum if isinstance(owner, nn.modules.batchnorm._NormBase) else args["momentum"]
        bn = nn.BatchNorm2d(shape[1], eps=args["eps"], momentum=momentum, affine=affine, device="meta")
        if affine:
            bn.weight, bn.bias = weight[1], bias[1]  # type: ignore[index]
        bn.running_mean, bn.running_var = mean[1], var[1]
        tracked = getattr(owner, "num_batches_tracked", None)
        bn.num_batches_tracked = tracked if isinstance(tracked, torch.Tensor) else torch.tensor(0)
        _place_after(gm, node, bn, nn.modules.batchnorm._NormBase, "lm_bn", [mean, var, weight, bias],
                     args["input"])
        n += 1
    return n


def zero_pad_amounts(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int, int, int] | None:
    """``(left, right, top, bottom)`` if ``node`` zero-pads the last two dims of a 4-D tensor, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if type(mod) not in PAD_MODULES or (isinstance(mod, nn.ConstantPad2d) and mod.value != 0):
            return None
        pad = tuple(mod.padding)
    elif node.op == "call_function" and node.target is F.pad:
        args = _bind(node, ("input", "pad", "mode", "value"), {"mode": "constant", "value": None})
        if args is None or args["mode"] != "constant" or args["value"] not in (None, 0, 0.0):
            return None
        pad = args["pad"]
    else:
        return None
    if not (isinstance(pad, (tuple, list)) and len(pad) == 4 and all(isinstance(p, int) and p >= 0 for p in pad)):
        return None
    return tuple(pad)  # type: ignore[return-value]


def _fold_pads(gm: fx.GraphModule) -> int:
    """A symmetric zero pad whose only reader is an ``nn.Conv2d`` with numeric zero padding joins its padding."""
    n = 0
    for node in list(gm.graph.nodes):
        pad = zero_pad_amounts(gm, node)
        if pad is None or len(node.users) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        left, right, top, bottom = pad
        conv_node = next(iter(node.users))
        if conv_node.op != "call_module" or conv_node.args != (node,) or conv_node.kwargs:
            continue
        conv = gm.get_submodule(str(conv_node.target))
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        if left != right or top != bottom or sum(1 for n_ in gm.graph.nodes if n_.target == conv_node.target) != 1:
            continue  # asymmetric padding stays an explicit op (a break): a conv has one padding per dim
        conv.padding = (conv.padding[0] + top, conv.padding[1] + left)
        conv_node.replace_input_with(node, node.args[0])
        gm.graph.erase_node(node)
        n += 1
    return n


def _probe_opaque_convs(gm: fx.GraphModule) -> int:
    """A call of a conv *subclass* that the tracer kept opaque (its forward could not be traced) is replaced by
    the zero pad + plain conv it computes, if a numerical probe on the recorded input shape shows that it is one.
    (e.g. "same"-padding convs that compute their padding from the input size.)"""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        mod = gm.get_submodule(str(node.target))
        if not isinstance(mod, nn.Conv2d) or type(mod) is nn.Conv2d:
            continue
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if in_shape is None or out_shape is None or len(in_shape) != 4 or tuple(mod.dilation) != (1, 1):
            continue
        pads = _probe_padding(mod, in_shape, out_shape)
        if pads is None:
            continue
        left, right, top, bottom = pads
        symmetric = left == right and top == bottom
        conv = _make_conv(mod.weight, mod.bias, tuple(mod.stride), (top, left) if symmetric else (0, 0),
                          (1, 1), mod.groups)
        path = str(node.target)
        conv.train(gm.training)
        replace_submodule(gm, path, conv)
        if not symmetric:
            with gm.graph.inserting_before(node):
                padded = gm.graph.call_function(F.pad, (node.args[0], (left, right, top, bottom)))
            meta = node.args[0].meta["tensor_meta"]
            padded.meta["tensor_meta"] = _extract_tensor_metadata(torch.empty(
                (*in_shape[:2], in_shape[2] + top + bottom, in_shape[3] + left + right), dtype=meta.dtype,
                device="meta"))
            padded.meta["type"] = torch.Tensor
            node.args = (padded,)
        n += 1
    return n


def _probe_padding(mod: nn.Conv2d, in_shape, out_shape) -> tuple[int, int, int, int] | None:
    """The zero padding with which ``mod`` equals a plain conv on inputs of ``in_shape``, or None."""
    (kh, kw), (sh, sw) = mod.kernel_size, mod.stride
    total = [(out_shape[2] - 1) * sh + kh - in_shape[2], (out_shape[3] - 1) * sw + kw - in_shape[3]]
    if min(total) < 0 or max(total) > 8:
        return None
    probe = copy.deepcopy(mod).to(torch.float64).eval()
    x = torch.randn((1, *in_shape[1:]), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        try:
            want = probe(x)
        except Exception:
            return None
        w, b = probe.weight, probe.bias
        for top, left in itertools.product(range(total[0] + 1), range(total[1] + 1)):
            pads = (left, total[1] - left, top, total[0] - top)
            got = F.conv2d(F.pad(x, pads), w, b, probe.stride, 0, 1, probe.groups)
            if got.shape == want.shape and torch.allclose(got, want, rtol=1e-10, atol=1e-12):
                return pads
    return None
