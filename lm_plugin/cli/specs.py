"""Turning command-line strings into objects: model specs and input shapes, with errors that say what to do."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import torch
from torch import nn

from ..errors import LayerMergeError

__all__ = ["CLIError", "load_model", "parse_kwargs", "parse_shape"]

MODEL_SPEC_HELP = (
    "a model spec is one of: torchvision:NAME[:key=value,...] (e.g. torchvision:resnet18:num_classes=10), "
    "timm:NAME[:key=value,...] (randomly initialised unless pretrained=True, e.g. timm:resnet18d:num_classes=10), "
    "lm_plugin:NAME (a registered workload model, e.g. lm_plugin:resnet_fm), package.module:factory[:key=value,...], "
    "or a path to a .pt file saved with torch.save(model)"
)


class CLIError(LayerMergeError):
    """Bad command-line input; the message says what to do. The CLI exits with status 2."""


def parse_kwargs(text: str) -> dict[str, object]:
    """``"num_classes=10,width_mult=0.5"`` → ``{"num_classes": 10, "width_mult": 0.5}`` (Python literals)."""
    out: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise CLIError(f"bad model argument {item!r}: write key=value pairs separated by commas")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()  # a bare word is a string, e.g. weights=DEFAULT
    return out


def parse_shape(text: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """``"3,224,224"`` (or a list from YAML) → ``(3, 224, 224)``: the shape of one input, without the batch."""
    try:
        parts = text if isinstance(text, (list, tuple)) else [p for p in str(text).replace("x", ",").split(",") if p]
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise CLIError(f"bad input shape {text!r}: give the shape of one input without the batch dimension, "
                       "as positive integers separated by commas, e.g. --input-shape 3,224,224")
    return shape


def load_model(spec: str, checkpoint: str | None = None) -> nn.Module:
    """Build the model a spec names (see :data:`MODEL_SPEC_HELP`), optionally loading a state dict.

    Raises:
        CLIError: unknown spec, unimportable factory, unreadable file or mismatching checkpoint.
    """
    model = _build(spec)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise CLIError(f"checkpoint {checkpoint!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            raise CLIError(f"checkpoint {checkpoint!r} does not fit model {spec!r}: {exc}") from None
    return model.eval()


def _build(spec: str) -> nn.Module:
    if spec.endswith((".pt", ".pth")):
        path = Path(spec)
        if not path.is_file():
            raise CLIError(f"model file {spec!r} does not exist; {MODEL_SPEC_HELP}")
        # A whole pickled module needs weights_only=False: only load files you trust.
        model = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(model, nn.Module):
            raise CLIError(f"{spec!r} holds a {type(model).__name__}, not a model; for a state dict pass the "
                           "architecture as --model and the file as --checkpoint")
        return model
    source, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise CLIError(f"bad model spec {spec!r}; {MODEL_SPEC_HELP}")
    name, _, args = rest.partition(":")
    kwargs = parse_kwargs(args)
    if source == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise CLIError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
        return torchvision.models.get_model(name, **kwargs)
    if source == "timm":
        return _timm_model(name, kwargs)
    if source == "lm_plugin":
        from ..workloads.models import create_model, list_models

        if name not in list_models():
            raise CLIError(f"no registered model {name!r}; registered: {', '.join(list_models())}")
        return create_model(name, **kwargs)
    try:
        factory = getattr(importlib.import_module(source), name)
    except (ImportError, AttributeError) as exc:
        raise CLIError(f"cannot import {name!r} from {source!r} ({exc}); {MODEL_SPEC_HELP}") from None
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise CLIError(f"{source}:{name} returned a {type(model).__name__}, not an nn.Module")
    return model


def _timm_model(name: str, kwargs: dict[str, object]) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with errors that say what to do."""
    try:
        import timm
    except ImportError:
        raise CLIError(f"model spec timm:{name} needs the timm package, which is not installed: pip install timm"
                       ) from None
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:6]}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise CLIError(f"timm has no model {name!r} (see timm.list_models()){hint}")
    options: dict[str, object] = {"pretrained": False, **kwargs}
    try:
        return timm.create_model(name, **options)
    except TypeError as exc:
        raise CLIError(f"timm:{name} does not take these arguments {kwargs}: {exc}") from None
