"""PyTorch eager mode on an NVIDIA GPU, timed with CUDA events."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigurationError
from ..profiler import Profiler, RunFn, prepared_module
from ..registry import register_backend


@register_backend
class CUDAProfiler(Profiler):
    """PyTorch eager inference on a CUDA device.

    Each run is bracketed by CUDA events on the current stream, so the numbers are device time between launch
    points rather than host time; the host synchronises once per round.

    Args:
        device: CUDA device (index, ``"cuda:1"`` or :class:`torch.device`); None uses the current device.
        cudnn_benchmark: value of ``torch.backends.cudnn.benchmark`` while timing (restored afterwards); with
            True, cuDNN picks the fastest algorithm during warm-up, as deployed inference usually does.
        channels_last: convert weights and 4-D inputs to the channels-last memory format.
        **settings: common settings, see :class:`~lm_plugin.latency.Profiler`; pass
            ``dtype=torch.float16`` to time in half precision.
    """

    name = "cuda"

    def __init__(
        self,
        *,
        device: int | str | torch.device | None = None,
        cudnn_benchmark: bool = True,
        channels_last: bool = False,
        **settings: Any,
    ) -> None:
        super().__init__(**settings)
        if device is None:
            device = torch.cuda.current_device()
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if dev.type != "cuda":
            raise ConfigurationError(f"device must be a CUDA device, got {dev}; use backend='cpu' for the CPU")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigurationError(f"CUDA device {index} does not exist ({torch.cuda.device_count()} visible)")
        self._device = torch.device("cuda", index)
        self.cudnn_benchmark = cudnn_benchmark
        self._channels_last = channels_last

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if torch.cuda.is_available():
            return None
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (
            f"torch.cuda.is_available() is False (torch {torch.__version__}, {build}). Run on a machine with "
            "an NVIDIA GPU and a CUDA build of torch, or use backend='cpu' (or 'auto', which falls back to it)."
        )

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self._device)

    @property
    def channels_last(self) -> bool:
        return self._channels_last

    def _extra_signature(self) -> dict[str, Any]:
        major, minor = torch.cuda.get_device_capability(self._device)
        return {
            "compute_capability": f"{major}.{minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "cudnn_benchmark": self.cudnn_benchmark,
        }

    def _compile(self, model: nn.Module, inputs: tuple[Tensor, ...]) -> RunFn:
        """The callable timed for ``model``; subclasses override it to compile (e.g. TensorRT)."""
        return lambda: model(*inputs)

    @contextlib.contextmanager
    def _session(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> Iterator[RunFn]:
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        try:
            with (
                torch.cuda.device(self._device),
                prepared_module(module, self._device, self.dtype, channels_last=self._channels_last) as model,
            ):
                run = self._compile(model, inputs)  # outside inference mode: compilers may need autograd state
                with torch.inference_mode():
                    yield run
                    torch.cuda.synchronize(self._device)
        finally:
            torch.backends.cudnn.benchmark = previous

    def _timed_runs(self, run: RunFn, count: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        for start, end in zip(starts, ends):
            start.record()
            run()
            end.record()
        torch.cuda.synchronize(self._device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]
