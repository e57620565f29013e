"""Canonical JSON: one spelling per value, so that record keys compare and checksum the same across runs and
processes (the record store keys every row by it)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ArgumentTypeError

#: Hex digits of SHA-256 kept as a checksum: enough to catch corruption, short enough to keep rows readable.
CHECKSUM_HEX_DIGITS = 16


def to_jsonable(obj: Any) -> Any:
    """Plain JSON data for ``obj``.

    Accepts dicts with string keys, lists, tuples and ``torch.Size`` (all become lists), dataclass instances
    (their fields, as a dict), ``torch.dtype`` (its name, e.g. ``"float32"``), strings, booleans, None,
    integers and finite floats.

    Raises:
        TypeError: for anything else, naming the offending value.
    """
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, numbers.Integral):  # numpy integers and the like
        return int(obj)
    if isinstance(obj, numbers.Real):
        if not math.isfinite(obj):
            raise ArgumentTypeError(f"cannot use the non-finite number {obj} in a record key or value")
        return float(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ArgumentTypeError(f"record dicts need string keys (JSON objects), got {key!r}")
            out[key] = to_jsonable(value)
        return out
    if isinstance(obj, (list, tuple, torch.Size)):
        return [to_jsonable(x) for x in obj]
    raise ArgumentTypeError(
        f"cannot use a {type(obj).__name__} in a record key or value: use dicts, lists, tuples, dataclasses, strings, "
        "numbers, booleans or None"
    )


def canonical_json(obj: Any) -> str:
    """Compact JSON of ``to_jsonable(obj)`` with sorted keys: equal values give equal strings."""
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def checksum(text: str) -> str:
    """Truncated SHA-256 of ``text`` (hex)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:CHECKSUM_HEX_DIGITS]
