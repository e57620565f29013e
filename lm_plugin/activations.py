"""The activation registry: the one place that knows how PyTorch spells each activation LayerMerge may remove.

An activation is recognised by what a graph node computes — a module of one of these classes, one of these
functions, or one of these tensor methods (in-place spellings included) — and is known by its kind name in
chains, plans and latency tables. ``make(kind)`` builds a fresh module of that kind (for the activation the
trainable form inserts at linear block ends, and for timing candidate blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigurationError


@dataclass(frozen=True)
class ActivationKind:
    """How one activation kind is spelled in a traced graph, and how to make one."""

    name: str
    modules: tuple[type[nn.Module], ...]
    functions: tuple[Callable, ...]
    methods: tuple[str, ...]
    factory: Callable[[], nn.Module]


def _kinds() -> dict[str, ActivationKind]:
    table = [
        # In place where torch allows it, as torchvision's ResNet / MobileNetV2 use them.
        ActivationKind("relu", (nn.ReLU,), (F.relu, F.relu_, torch.relu, torch.relu_), ("relu", "relu_"),
                       lambda: nn.ReLU(inplace=True)),
        ActivationKind("relu6", (nn.ReLU6,), (F.relu6,), (), lambda: nn.ReLU6(inplace=True)),
        ActivationKind("leaky_relu", (nn.LeakyReLU,), (F.leaky_relu, F.leaky_relu_), (),
                       lambda: nn.LeakyReLU(inplace=True)),
        ActivationKind("hardswish", (nn.Hardswish,), (F.hardswish,), (), lambda: nn.Hardswish(inplace=True)),
        ActivationKind("silu", (nn.SiLU,), (F.silu,), (), lambda: nn.SiLU(inplace=True)),
        ActivationKind("gelu", (nn.GELU,), (F.gelu,), (), nn.GELU),
        ActivationKind("mish", (nn.Mish,), (F.mish,), (), lambda: nn.Mish(inplace=True)),
        ActivationKind("elu", (nn.ELU,), (F.elu, F.elu_), (), lambda: nn.ELU(inplace=True)),
        ActivationKind("prelu", (nn.PReLU,), (), (), nn.PReLU),
    ]
    return {k.name: k for k in table}


ACTIVATIONS: dict[str, ActivationKind] = _kinds()
_BY_MODULE = {cls: k.name for k in ACTIVATIONS.values() for cls in k.modules}
_BY_FUNCTION = {fn: k.name for k in ACTIVATIONS.values() for fn in k.functions}
_BY_METHOD = {m: k.name for k in ACTIVATIONS.values() for m in k.methods}


def kind_of_module(module: nn.Module) -> str | None:
    """Kind of an activation module (exact class: a subclass may compute something else), or None."""
    return _BY_MODULE.get(type(module))


def kind_of_function(fn: object) -> str | None:
    """Kind of an activation function such as ``F.relu`` or ``torch.relu_``, or None."""
    try:
        return _BY_FUNCTION.get(fn)  # type: ignore[call-overload]
    except TypeError:  # unhashable targets
        return None


def kind_of_method(name: str) -> str | None:
    """Kind of a tensor method such as ``x.relu_()``, or None."""
    return _BY_METHOD.get(name)


def make(kind: str | None) -> nn.Module:
    """A fresh activation module of ``kind`` (``nn.Identity`` for None).

    Raises:
        ValueError: for an unknown kind.
    """
    if kind is None:
        return nn.Identity()
    if kind not in ACTIVATIONS:
        raise ConfigurationError(f"unknown activation {kind!r}; use one of {sorted(ACTIVATIONS)} or None")
    return ACTIVATIONS[kind].factory()
