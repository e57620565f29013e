"""Evicting a core's private caches before each timed run: what the CPU backends share.

A layer inside a network never finds its weights in L1/L2 — the layers run before it have evicted them — so a
module timed alone in a tight loop runs faster than inside the network, and a latency model built from such timings
charges the difference to the rest of the network (eager PyTorch: mobilenet_v2's 52 blocks at 3×64×64, batch 1,
summed to 6.1 ms in tight loops against 8.9 ms back to back; ONNX Runtime: a merged 160→1280 3×3 conv timed 0.21 ms
alone and 0.72 ms inside its network).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from ...errors import ConfigurationError
from ..system import private_cache_bytes

#: Bytes evicted per thread before each timed run when the core's private cache size cannot be read.
FALLBACK_FLUSH_BYTES = 2 * 1024**2


class CacheFlush:
    """Mixin for profilers that evict caches: ``flush_bytes`` of a buffer are read and written before every timed run
    (outside the timed interval). CPU profilers size it with :meth:`_init_flush`: None, twice the largest per-core
    cache (L2 on most CPUs, from sysfs; 2 MiB if unknown) per thread; 0, no flush (tight-loop, warm-cache timings).
    The CUDA profiler sizes it to the card's L2."""

    flush_bytes: int
    _flush_buffer: Tensor | None = None

    def _init_flush(self, flush_bytes: int | None, threads: int) -> None:
        if flush_bytes is not None and flush_bytes < 0:
            raise ConfigurationError(f"flush_bytes must be >= 0 or None, got {flush_bytes}")
        if flush_bytes is None:
            flush_bytes = 2 * (private_cache_bytes() or FALLBACK_FLUSH_BYTES // 2) * threads
        self.flush_bytes = flush_bytes
        self._flush_buffer = None

    @contextlib.contextmanager
    def _flush_session(self, device: torch.device | str = "cpu") -> Iterator[None]:
        """Holds the flush buffer while a session is open. Sessions nest (:meth:`measure_together` opens one per
        module) and share one buffer, freed when the outermost closes: a second buffer would evict no more."""
        owner = self.flush_bytes > 0 and self._flush_buffer is None
        if owner:
            self._flush_buffer = torch.zeros(max(1, self.flush_bytes // 4), dtype=torch.float32, device=device)
        try:
            yield
        finally:
            if owner:
                self._flush_buffer = None

    def _before_timed_run(self) -> None:
        if self._flush_buffer is not None:
            self._flush_buffer.add_(1.0)  # read and write every line: evicts what the last run left cached
