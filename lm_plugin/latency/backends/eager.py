"""PyTorch eager mode on the CPU: the reference protocol of WORKLOAD.md."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..profiler import Profiler, RunFn, prepared_module
from ..registry import register_backend
from ..system import cpu_name


@register_backend
class EagerCPUProfiler(Profiler):
    """PyTorch eager inference on the CPU (eval mode, ``torch.inference_mode()``, wall clock).

    Args:
        threads: intra-op threads (``torch.set_num_threads``) while timing; the previous value is restored
            afterwards. None uses the process's current setting, read once when the profiler is created.
        **settings: common settings, see :class:`~lm_plugin.latency.Profiler`.
    """

    name = "cpu"

    def __init__(self, *, threads: int | None = None, **settings: Any) -> None:
        super().__init__(**settings)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {threads}")
        self._threads = threads if threads is not None else torch.get_num_threads()

    @property
    def device_name(self) -> str:
        return cpu_name()

    @property
    def threads(self) -> int:
        return self._threads

    def _extra_signature(self) -> dict[str, Any]:
        return {"machine": platform.machine(), "mkldnn": torch.backends.mkldnn.is_available()}

    @contextlib.contextmanager
    def _session(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> Iterator[RunFn]:
        previous = torch.get_num_threads()
        torch.set_num_threads(self._threads)
        try:
            with prepared_module(module, self.device, self.dtype) as model, torch.inference_mode():
                yield lambda: model(*inputs)
        finally:
            torch.set_num_threads(previous)
