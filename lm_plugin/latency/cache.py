"""The latency cache: measurements by key for one profiler signature, in a :class:`~lm_plugin.store.RecordStore`.

One SQLite file per profiler signature (``latency-<backend>-<hash>.sqlite``, see :func:`latency_cache_path`);
several processes may share it, and :meth:`LatencyTable.build <lm_plugin.latency.LatencyTable.build>` measures
under the store's exclusive lock, so two processes never time at once through one cache. File format, checksums
and recovery rules are the store's (:mod:`lm_plugin.store.records`); every message names the "latency table
cache". Caches of the older JSON Lines format (``*.jsonl``) are not read: tables are measured again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ArgumentTypeError
from ..store import RecordStore, signed_store_path
from .measurement import Measurement


class LatencyCache(RecordStore):
    """Measurements by key for one profiler signature, in memory or in a file shared by processes.

    Keys must include everything *besides the profiler* that changes a measurement (layer geometry, input
    shape, activation ...). See :class:`~lm_plugin.store.RecordStore` for the arguments, claims and locks.

    Example:
        ```python
        cache = LatencyCache("lat/cpu.sqlite", profiler.signature())
        cache.put({"op": "conv", "k": 3}, profiler.measure(nn.Conv2d(8, 8, 3), (1, 8, 32, 32)))
        cache.get({"k": 3, "op": "conv"}).median_ms      # keys compare in canonical form
        ```
    """

    TABLE = "latency table"
    SIGNED_BY = "profiler"

    def _encode_value(self, value: Measurement) -> dict[str, Any]:
        return value.to_dict()

    def _decode_value(self, data: Any) -> Measurement:
        if not isinstance(data, dict):
            raise ArgumentTypeError("a measurement must be a JSON object")
        return Measurement.from_dict(data)


def latency_cache_path(cache_dir: str | os.PathLike[str], backend: str, signature: Mapping[str, Any]) -> Path:
    """``<cache_dir>/latency-<backend>-<hash of signature>.sqlite``: backends and batch sizes never share a file."""
    return signed_store_path(cache_dir, f"latency-{backend}", signature)
