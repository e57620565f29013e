"""PyTorch eager mode on an NVIDIA GPU, timed with CUDA events (optionally replayed from a CUDA graph)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigurationError
from ..errors import LatencyError
from ..profiler import Profiler, RunFn, prepared_module
from ..registry import register_backend
from .flush import CacheFlush

#: Bytes written before each timed run when the card's L2 size cannot be read (what Triton's ``do_bench`` uses).
FALLBACK_FLUSH_BYTES = 256 * 1024**2
#: Runs of the module on a side stream before a CUDA graph captures it (the count of the PyTorch docs' example).
GRAPH_WARMUP = 3


def l2_flush_bytes(l2_cache_size: int | None) -> int:
    """Size of the buffer that evicts a card's L2 cache: twice the L2 (writes are not guaranteed to replace every
    line once, and part of the L2 may be reserved for persisting accesses), or :data:`FALLBACK_FLUSH_BYTES` when the
    size is unknown (None or 0, as some drivers and older torch releases report)."""
    if l2_cache_size is not None and l2_cache_size > 0:
        return 2 * int(l2_cache_size)
    return FALLBACK_FLUSH_BYTES


@register_backend
class CUDAProfiler(CacheFlush, Profiler):
    """PyTorch eager inference on a CUDA device.

    Each run is bracketed by CUDA events on the current stream, so the numbers are device time between launch
    points rather than host time; the host reads the events once per round (with ``flush_l2`` it also waits for
    each flush, outside the bracketed interval, see :meth:`_before_timed_run`).

    Before every timed run, outside the bracketed interval, the profiler writes a buffer twice the size of the
    card's L2 cache (``buffer.zero_()``, as Triton's ``do_bench`` does) and waits for it. A module timed alone in a
    tight loop otherwise finds its weights and input still in L2 from the previous run — at batch 1 a whole block
    fits in an H100's 50 MiB — while inside a network the layers run before it have replaced them; a latency table
    of warm-L2 entries under-credits every block a plan removes, as the CPU backend's private-cache flush explains
    (:class:`~lm_plugin.latency.EagerCPUProfiler`). The flush errs the other way for the input, which the previous
    layer has just written and may still be in L2; weights, the larger part for most convs at small batch, are
    cold in both.

    Args:
        device: CUDA device (index, ``"cuda:1"`` or :class:`torch.device`); None uses the current device.
        cudnn_benchmark: value of ``torch.backends.cudnn.benchmark`` while timing (restored afterwards); with
            True, cuDNN picks the fastest algorithm during warm-up, as deployed inference usually does.
        channels_last: convert weights and 4-D inputs to the channels-last memory format.
        flush_l2: evict the L2 cache before every timed run (see above); False times warm-L2, tight-loop runs.
        cuda_graphs: capture one run in a CUDA graph (``torch.cuda.CUDAGraph``) and time its replays. Small
            modules at small batch are launch-bound in eager PyTorch (the host takes longer to launch the kernels
            than the GPU to run them), so eager timings measure the Python and launch overhead; a graph replays
            every kernel with one launch, as deployments that use graphs (TensorRT, ``torch.compile`` with
            ``mode="reduce-overhead"``) do. Off by default: it times a different deployment than eager PyTorch,
            and modules that synchronise with the host (``.item()``, data-dependent shapes) cannot be captured.
        **settings: common settings, see :class:`~lm_plugin.latency.Profiler`; pass
            ``dtype=torch.float16`` to time in half precision.

    Raises:
        LatencyError: (when timing, with ``cuda_graphs=True``) the module could not be captured in a CUDA graph;
            the message names the module's error.
    """

    name = "cuda"

    def __init__(
        self,
        *,
        device: int | str | torch.device | None = None,
        cudnn_benchmark: bool = True,
        channels_last: bool = False,
        flush_l2: bool = True,
        cuda_graphs: bool = False,
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
        self.flush_l2 = bool(flush_l2)
        self.cuda_graphs = bool(cuda_graphs)
        l2 = getattr(torch.cuda.get_device_properties(self._device), "L2_cache_size", None)
        #: Bytes written before every timed run (0 with ``flush_l2=False``).
        self.flush_bytes = l2_flush_bytes(l2) if self.flush_l2 else 0

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
            "flush_l2": self.flush_l2,
            "cuda_graphs": self.cuda_graphs,
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
                self._l2_flush(),
            ):
                run = self._compile(model, inputs)  # outside inference mode: compilers may need autograd state
                with torch.inference_mode():
                    if self.cuda_graphs:
                        run = self._graphed(run, type(module).__name__)
                    yield run
                    torch.cuda.synchronize(self._device)
        finally:
            torch.backends.cudnn.benchmark = previous

    def _l2_flush(self) -> contextlib.AbstractContextManager[None]:
        """The flush buffer on the card, held while a session is open (shared by nested sessions)."""
        return self._flush_session(self._device)

    def _graphed(self, run: RunFn, what: str) -> RunFn:
        """``run`` captured in a CUDA graph; the returned callable replays it on the current stream.

        As the PyTorch docs require, the module first runs a few times on a side stream, so that lazy
        initialisation, cuDNN autotuning (``cudnn_benchmark``) and allocator growth happen before capture: none of
        them may happen inside it.

        Raises:
            LatencyError: capture failed (the module synchronises with the host, uses an operation CUDA graphs do
                not support, or the compiled engine manages its own streams).
        """
        try:
            side = torch.cuda.Stream(self._device)
            side.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP):
                    run()
            torch.cuda.current_stream(self._device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
        except Exception as exc:  # capture errors surface as RuntimeError, AcceleratorError or a compiler's own
            raise LatencyError(
                f"could not capture {what} in a CUDA graph on {self._device} ({type(exc).__name__}: {exc}). "
                "Modules that synchronise with the host (.item(), data-dependent shapes, CPU tensors) or engines "
                "that manage their own streams cannot be captured; time it with cuda_graphs=False."
            ) from exc
        return graph.replay

    def _before_timed_run(self) -> None:
        """Evicts the L2 cache, then waits for the write to finish, outside the timed interval.

        The wait keeps the protocol of unflushed timing for launch-bound modules (small blocks at batch 1, where
        the GPU waits for the host): without it the host would queue the run's first kernels while the GPU is
        still writing the buffer (tens of microseconds), and the events would miss that part of the launch cost,
        which the same module inside a network pays. For GPU-bound modules it adds at most one launch latency.
        """
        if self._flush_buffer is not None:
            self._flush_buffer.zero_()
            torch.cuda.current_stream(self._device).synchronize()

    def _timed_runs(self, run: RunFn, count: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        for start, end in zip(starts, ends):
            self._before_timed_run()
            start.record()
            run()
            end.record()
        torch.cuda.synchronize(self._device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]
