"""TensorRT through torch-tensorrt (optional: only registered as available when it imports)."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from torch import Tensor, nn

from ..profiler import RunFn
from ..registry import register_backend
from ..system import package_version
from .cuda import CUDAProfiler


@register_backend
class TensorRTProfiler(CUDAProfiler):
    """A TensorRT engine built by ``torch_tensorrt.compile`` (dynamo IR), timed like :class:`CUDAProfiler`.

    The engine is built for the exact input shapes and ``dtype`` being timed. Building takes seconds to
    minutes per module, so prefer a latency cache when timing many modules.

    Args:
        **settings: as for :class:`CUDAProfiler`.
    """

    name = "tensorrt"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        reason = super().unavailable_reason()
        if reason is None and importlib.util.find_spec("torch_tensorrt") is None:
            reason = "torch-tensorrt is not installed; `pip install torch-tensorrt` (the build matching torch)"
        return reason

    def _extra_signature(self) -> dict[str, Any]:
        return {
            **super()._extra_signature(),
            "torch_tensorrt": package_version("torch-tensorrt") or package_version("torch_tensorrt"),
            "tensorrt": package_version("tensorrt"),
        }

    def _compile(self, model: nn.Module, inputs: tuple[Tensor, ...]) -> RunFn:
        torch_tensorrt = importlib.import_module("torch_tensorrt")
        engine = torch_tensorrt.compile(model, ir="dynamo", inputs=list(inputs), enabled_precisions={self.dtype})
        return lambda: engine(*inputs)
