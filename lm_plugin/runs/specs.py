"""Turning option strings into objects: model and data specs, input shapes, normalisation.

Errors say what to do. Nothing here loads data: the library's :mod:`lm_plugin.data` does, given what these parse.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LayerMergeError
from ..registry import close_names
from ..workloads.models import create_model, list_models

__all__ = ["BadInputError", "DataSpec", "import_object", "load_model", "parse_data_spec", "parse_kwargs",
           "parse_normalize", "parse_shape"]

MODEL_SPEC_HELP = (
    "a model spec is one of: torchvision:NAME[:key=value,...] (e.g. torchvision:resnet18:num_classes=10), "
    "timm:NAME[:key=value,...] (randomly initialised unless pretrained=True, e.g. timm:resnet18d:num_classes=10), "
    "lm_plugin:NAME (a registered workload model, e.g. lm_plugin:resnet_fm), package.module:factory[:key=value,...], "
    "or a path to a .pt file saved with torch.save(model)"
)

DATA_SPEC_HELP = (
    "a data spec is one of: a registered dataset name ({names}), imagefolder:DIR (DIR/train/<class>/<image>, "
    "DIR/val/<class>/<image>, optional DIR/test/<class>/<image>), or package.module:factory[:key=value,...] (a "
    "function returning a lm_plugin.data.DataSplits, a dict {{'train', 'val'[, 'test']}} or a tuple (train, val[, "
    "test]) of DataLoaders)"
)


class BadInputError(LayerMergeError):
    """Bad input to a run (an option, a spec, a file); the message says what to do. The CLI exits with status 2."""


def parse_kwargs(text: str) -> dict[str, object]:
    """``"num_classes=10,width_mult=0.5"`` → ``{"num_classes": 10, "width_mult": 0.5}`` (Python literals)."""
    out: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise BadInputError(f"bad argument {item!r} in a spec: write key=value pairs separated by commas, e.g. "
                           "torchvision:resnet18:num_classes=10")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()  # a bare word is a string, e.g. weights=DEFAULT
    return out


def parse_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"3,224,224"`` or ``"3x224x224"`` (or a list from YAML) → ``(3, 224, 224)``: one input without the batch.

    Raises:
        BadInputError: an empty part ("3,x,9"), a non-integer, zero or a negative dimension.
    """
    parts: Sequence[Any] = text if isinstance(text, (list, tuple)) else re.split(r"[,x×]", str(text).strip())
    shape: tuple[int, ...] = ()
    if all((isinstance(p, int) and not isinstance(p, bool)) or (isinstance(p, str) and p.strip().isdecimal())
           for p in parts):
        shape = tuple(int(p) for p in parts)
    if not shape or any(d < 1 for d in shape):
        raise BadInputError(f"bad input shape {text!r}: give the shape of one input without the batch dimension, "
                       "as positive integers separated by commas, e.g. --input-shape 3,224,224")
    return shape


def parse_normalize(value: str | Sequence[Any] | dict[str, Any]) -> tuple[list[float], list[float]] | str:
    """Per-channel ``(mean, std)`` from ``"0.5,0.5,0.5:0.25,0.25,0.25"``, or from YAML: ``{mean: [...], std:
    [...]}`` or ``[[means], [stds]]``. One value each stands for every channel.

    Raises:
        BadInputError: anything else, or a std that is not positive.
    """
    if isinstance(value, str) and value.strip().lower() in ("data", "none"):
        return value.strip().lower()  # computed from the training images / pixels left in [0, 1]
    how = ("give --normalize MEAN,...:STD,... (one value per channel, or one for all), e.g. "
           "--normalize 0.485,0.456,0.406:0.229,0.224,0.225; in YAML also normalize: {mean: [...], std: [...]}")
    if isinstance(value, dict) and set(value) == {"mean", "std"}:
        pair: Sequence[Any] = [value["mean"], value["std"]]
    elif isinstance(value, str) and value.count(":") == 1:
        pair = [part.split(",") for part in value.split(":")]
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        pair = value
    else:
        raise BadInputError(f"bad normalisation {value!r}: {how}")
    try:
        mean, std = ([float(v) for v in ([part] if isinstance(part, (int, float)) else part)] for part in pair)
    except (TypeError, ValueError):
        raise BadInputError(f"bad normalisation {value!r}: {how}") from None
    if not mean or (len(mean) != len(std) and 1 not in (len(mean), len(std))) or min(std, default=0) <= 0:
        raise BadInputError(f"bad normalisation {value!r} (as many means as stds, every std positive): {how}")
    return mean, std


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: ``kind`` is ``"name"``, ``"imagefolder"`` or ``"factory"``."""

    kind: str
    target: str  # the dataset name, the folder, or "package.module:function"
    kwargs: dict[str, object] = field(default_factory=dict)


def parse_data_spec(text: str, names: Sequence[str]) -> DataSpec:
    """``digits`` / ``imagefolder:DIR`` / ``package.module:factory[:k=v,...]`` → :class:`DataSpec`.

    Raises:
        BadInputError: an unknown name or a malformed spec; the message lists the forms and the known names.
    """
    text = str(text).strip()
    help_text = DATA_SPEC_HELP.format(names=", ".join(names))
    source, sep, rest = text.partition(":")
    if not sep:
        if text not in names:
            raise BadInputError(f"unknown dataset {text!r}; {help_text}")
        return DataSpec("name", text)
    if source == "imagefolder":
        if not rest:
            raise BadInputError(f"imagefolder: needs a folder, e.g. --data imagefolder:path/to/images; {help_text}")
        return DataSpec("imagefolder", rest)
    function, _, args = rest.partition(":")
    if not source or not function.isidentifier():
        raise BadInputError(f"bad data spec {text!r}; {help_text}")
    return DataSpec("factory", f"{source}:{function}", parse_kwargs(args))


def import_object(module: str, name: str, what: str) -> Callable[..., Any]:
    """``getattr(import_module(module), name)``, also finding modules in the current directory (as ``python -m``).

    Raises:
        BadInputError: the module or the attribute cannot be imported, or it is not callable.
    """
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # the console script's sys.path lacks the directory users run it from
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise BadInputError(f"cannot import {name!r} from {module!r} ({exc}); {what}") from None
    if not callable(obj):
        raise BadInputError(f"{module}:{name} is a {type(obj).__name__}, not a function; {what}")
    return obj


def load_model(spec: str, checkpoint: str | None = None) -> nn.Module:
    """Build the model a spec names (see :data:`MODEL_SPEC_HELP`), optionally loading a state dict.

    Raises:
        BadInputError: unknown spec, unimportable factory, unreadable file or mismatching checkpoint.
    """
    model = _build(spec)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise BadInputError(f"checkpoint {checkpoint!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            raise BadInputError(f"checkpoint {checkpoint!r} does not fit model {spec!r}: {exc}") from None
    return model.eval()


def _build(spec: str) -> nn.Module:
    if spec.endswith((".pt", ".pth")):
        path = Path(spec)
        if not path.is_file():
            raise BadInputError(f"model file {spec!r} does not exist; {MODEL_SPEC_HELP}")
        # A whole pickled module needs weights_only=False: only load files you trust.
        model = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(model, nn.Module):
            raise BadInputError(f"{spec!r} holds a {type(model).__name__}, not a model; for a state dict pass the "
                           "architecture as --model and the file as --checkpoint")
        return model
    source, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise BadInputError(f"bad model spec {spec!r}; {MODEL_SPEC_HELP}")
    name, _, args = rest.partition(":")
    kwargs = parse_kwargs(args)
    if source == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if name not in names:
            raise BadInputError(f"torchvision has no model {name!r}{_similar(name, names)} (all: "
                           "torchvision.models.list_models())")
        return torchvision.models.get_model(name, **kwargs)
    if source == "timm":
        return _timm_model(name, kwargs)
    if source == "lm_plugin":
        if name not in list_models():
            raise BadInputError(f"no registered model {name!r}{_similar(name, list_models())}; registered: "
                           f"{', '.join(list_models())}")
        return create_model(name, **kwargs)
    factory = import_object(source, name, MODEL_SPEC_HELP)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise BadInputError(f"{source}:{name} does not take the arguments {kwargs}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise BadInputError(f"{source}:{name} returned a {type(model).__name__}, not an nn.Module")
    return model


def _similar(name: str, names: Sequence[str]) -> str:
    """``; did you mean a, b?`` (:func:`lm_plugin.registry.close_names`)."""
    close = close_names(name, list(names))
    return f"; did you mean {', '.join(close)}?" if close else ""


def _timm_model(name: str, kwargs: dict[str, object]) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with errors that say what to do."""
    try:
        import timm
    except ImportError:
        raise BadInputError(f"model spec timm:{name} needs the timm package, which is not installed: "
                       "pip install 'lm-plugin[timm]' (or pip install timm)") from None
    if not timm.is_model(name):
        raise BadInputError(f"timm has no model {name!r}{_similar(name, timm.list_models())} (all: timm.list_models())")
    options: dict[str, object] = {"pretrained": False, **kwargs}
    try:
        return timm.create_model(name, **options)
    except TypeError as exc:
        raise BadInputError(f"timm:{name} does not take these arguments {kwargs}: {exc}") from None
