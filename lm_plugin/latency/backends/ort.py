"""ONNX Runtime on the CPU: the module is exported to ONNX (TorchScript exporter) and run by an
``InferenceSession`` with the CPU execution provider."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import platform
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigurationError
from ..errors import LatencyError
from ..profiler import Profiler, RunFn, prepared_module
from ..registry import register_backend
from ..system import cpu_name, package_version
from .flush import CacheFlush

#: ONNX opset used for export unless the profiler is given another one.
DEFAULT_OPSET = 17
#: Names accepted for ``optimization``, mapped to ``onnxruntime.GraphOptimizationLevel`` members.
OPTIMIZATION_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_PROVIDER = "CPUExecutionProvider"


#: Keywords that select the TorchScript-based ONNX exporter: newer torch defaults to the dynamo exporter
#: (``dynamo=True``), older torch has no such keyword and only the classic one.
CLASSIC_EXPORTER: dict[str, bool] = (
    {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {})


@register_backend
class OnnxRuntimeProfiler(CacheFlush, Profiler):
    """ONNX Runtime inference on the CPU.

    The module is exported in memory with ``torch.onnx.export(..., dynamo=False)`` at the exact shapes being
    timed, then run sequentially (one inter-op thread) with ``threads`` intra-op threads. Only float32 is
    supported.

    Args:
        threads: ``intra_op_num_threads`` of the session. None uses ``torch.get_num_threads()`` (read once at
            creation) so that the CPU backends are comparable by default.
        opset: ONNX opset version for export.
        optimization: graph optimisation level: ``"disable"``, ``"basic"``, ``"extended"`` or ``"all"``.
        flush_bytes: private caches evicted before every timed run, as for the ``cpu`` backend
            (:class:`~lm_plugin.latency.backends.flush.CacheFlush`).
        **settings: common settings, see :class:`~lm_plugin.latency.Profiler`.
    """

    name = "onnxruntime"
    isolate = True

    def __init__(
        self,
        *,
        threads: int | None = None,
        opset: int = DEFAULT_OPSET,
        optimization: str = "all",
        flush_bytes: int | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(**settings)
        if self.dtype != torch.float32:
            raise ConfigurationError(f"the onnxruntime backend times float32 only, got dtype={self.dtype}")
        if threads is not None and threads < 1:
            raise ConfigurationError(f"threads must be a positive integer or None, got {threads}")
        if optimization not in OPTIMIZATION_LEVELS:
            raise ConfigurationError(f"optimization must be one of {list(OPTIMIZATION_LEVELS)}, got {optimization!r}")
        self._threads = threads if threads is not None else torch.get_num_threads()
        self._init_flush(flush_bytes, self._threads)
        self.opset = opset
        self.optimization = optimization

    @classmethod
    def unavailable_reason(cls) -> str | None:
        missing = [name for name in ("onnxruntime", "onnx") if importlib.util.find_spec(name) is None]
        if missing:
            return f"{' and '.join(missing)} not installed; `pip install \"lm-plugin[onnx]\"`"
        return None

    @property
    def device_name(self) -> str:
        return cpu_name()

    @property
    def threads(self) -> int:
        return self._threads

    def _extra_signature(self) -> dict[str, Any]:
        return {
            "machine": platform.machine(),
            "onnxruntime": package_version("onnxruntime"),
            "provider": _PROVIDER,
            "opset": self.opset,
            "optimization": self.optimization,
            "flush_bytes": self.flush_bytes,
        }

    def export(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> bytes:
        """The ONNX model this profiler would time for ``module`` at ``inputs`` (serialised bytes).

        Raises:
            LatencyError: if the module cannot be exported.
        """
        buffer = io.BytesIO()
        names = [f"input_{i}" for i in range(len(inputs))]
        with prepared_module(module, self.device, self.dtype) as model, warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one, which needs extra packages
            # and more time per module; the deprecation notice is noise here.
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                torch.onnx.export(
                    model, inputs, buffer, input_names=names, opset_version=self.opset, **CLASSIC_EXPORTER
                )
            except Exception as exc:  # the exporter raises many unrelated types
                raise LatencyError(
                    f"could not export {type(module).__name__} to ONNX for the onnxruntime backend ({exc}). "
                    "Time it with backend='cpu' instead, or make the module exportable."
                ) from exc
        return buffer.getvalue()

    @contextlib.contextmanager
    def _session(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> Iterator[RunFn]:
        ort = importlib.import_module("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[self.optimization])
        session = ort.InferenceSession(self.export(module, inputs), options, providers=[_PROVIDER])
        # The exporter drops inputs the graph does not use, so feed by the session's own input names.
        given = {f"input_{i}": x.numpy() for i, x in enumerate(inputs)}
        feed = {arg.name: given[arg.name] for arg in session.get_inputs()}
        with self._flush_session():
            yield lambda: session.run(None, feed)
