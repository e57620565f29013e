"""PyTorch eager mode on the CPU: the reference protocol of WORKLOAD.md."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigurationError
from ..profiler import Profiler, RunFn, prepared_module
from ..registry import register_backend
from ..system import cpu_name
from .flush import CacheFlush


@register_backend
class EagerCPUProfiler(CacheFlush, Profiler):
    """PyTorch eager inference on the CPU (eval mode, ``torch.inference_mode()``, wall clock).

    Before every timed run (outside the timed interval) the profiler reads and writes a buffer of
    ``flush_bytes`` bytes, which evicts the module's weights and inputs from the cores' private caches. A layer
    inside a network never finds its weights there — the layers run before it have evicted them — so without
    the flush a small module timed alone in a tight loop runs markedly faster than the same module inside the
    network (measured on mobilenet_v2 blocks at 3x64x64, batch 1: 6.1 ms summed in a tight loop against 8.9
    ms for the same 52 modules run back to back), and a latency model built from such timings charges the
    difference to the rest of the network instead of to the blocks. Timing whole networks is unaffected but
    for their first layers.

    Args:
        threads: intra-op threads (``torch.set_num_threads``) while timing; the previous value is restored
            afterwards. None uses the process's current setting, read once when the profiler is created.
        flush_bytes: size of the buffer touched before every timed run. None: twice the largest per-core
            cache (L2 on most CPUs, read from sysfs; 2 MiB if unknown) per thread; 0: no flush (tight-loop,
            warm-cache timings).
        **settings: common settings, see :class:`~lm_plugin.latency.Profiler`.
    """

    name = "cpu"
    isolate = True

    def __init__(self, *, threads: int | None = None, flush_bytes: int | None = None, **settings: Any) -> None:
        super().__init__(**settings)
        if threads is not None and threads < 1:
            raise ConfigurationError(f"threads must be a positive integer or None, got {threads}")
        self._threads = threads if threads is not None else torch.get_num_threads()
        self._init_flush(flush_bytes, self._threads)

    @property
    def device_name(self) -> str:
        return cpu_name()

    @property
    def threads(self) -> int:
        return self._threads

    def _extra_signature(self) -> dict[str, Any]:
        return {"machine": platform.machine(), "mkldnn": torch.backends.mkldnn.is_available(),
                "flush_bytes": self.flush_bytes}

    @contextlib.contextmanager
    def _session(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> Iterator[RunFn]:
        previous = torch.get_num_threads()
        torch.set_num_threads(self._threads)
        try:
            with self._flush_session(), prepared_module(module, self.device, self.dtype) as model, \
                    torch.inference_mode():
                yield lambda: model(*inputs)
        finally:
            torch.set_num_threads(previous)
