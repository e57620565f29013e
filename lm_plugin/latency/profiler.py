"""The profiler base class: one backend's way of running a module, plus the shared timing protocol.

A backend subclass supplies only *how to run* a module once (:meth:`Profiler._session`) and, if the wall clock
is the wrong clock, *how to time* runs (:meth:`Profiler._timed_runs`). Everything else is shared here:
input preparation, warm-up, repeated timing, robust statistics, and re-measuring when a round is too noisy.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigurationError
from .errors import BackendUnavailableError, UnsendableModuleError, UnstableMeasurementWarning, WorkerFallbackWarning
from .inputs import InputsLike, effective_shapes, materialize
from .measurement import Measurement, RunStats, summarize
from .worker import MeasurementWorker, default_worker, worker_disabled

#: Untimed runs before timing starts (caches, allocator, lazy initialisation, cuDNN autotuning).
DEFAULT_WARMUP = 10
#: Timed runs per round; the median of a round is the reported latency.
DEFAULT_REPEATS = 30
#: Largest acceptable ``IQR / median`` of a round; above it the round is considered unusable.
DEFAULT_MAX_SPREAD = 0.25
#: Extra rounds timed when a round is too noisy, before giving up with a warning.
DEFAULT_RETRIES = 2

RunFn = Callable[[], object]
#: ``worker=AUTO_WORKER``: the process-wide measurement worker for backends that need one (:attr:`Profiler.isolate`).
AUTO_WORKER = "auto"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the spelling used in signatures and measurements)."""
    return str(dtype).removeprefix("torch.")


class Profiler(abc.ABC):
    """Times modules on one backend with fixed settings.

    A profiler is cheap to create and holds no model. Its :meth:`signature` lists everything about it that
    changes a measurement; two profilers with equal signatures produce comparable numbers, which is what a
    latency cache checks before reusing entries.

    Subclasses set :attr:`name`, implement :attr:`device_name` and :meth:`_session`, and register themselves
    with :func:`lm_plugin.latency.register_backend`.

    Args:
        batch_size: batch dimension to time at; replaces the leading dimension of every input. None times the
            inputs at the batch size they are given with.
        warmup: untimed runs before timing.
        repeats: timed runs per round.
        max_spread: largest acceptable ``IQR / median`` of a round.
        retries: extra rounds to time when a round exceeds ``max_spread``; the least noisy round is reported.
        dtype: floating type of weights and inputs.
        worker: where modules are timed. ``"auto"`` (default): in the process-wide
            :class:`~lm_plugin.latency.MeasurementWorker` for backends whose timings depend on the state of the
            process (:attr:`isolate`: the CPU backends), in this process otherwise; a
            :class:`~lm_plugin.latency.MeasurementWorker` (or :class:`~lm_plugin.latency.RemoteWorker`): in that
            one; None: in this process, whatever it did before (not recommended for tables on the CPU).

    Raises:
        BackendUnavailableError: if this backend cannot run on this machine (the message says why).
        ValueError: if a setting is out of range.
    """

    #: Registered backend name, e.g. ``"cpu"``.
    name: ClassVar[str] = ""
    #: True for analytic backends whose numbers never change between measurements (no drift to check).
    deterministic: ClassVar[bool] = False
    #: True for backends whose timings depend on the allocator state of the process that runs them (the CPU ones):
    #: ``worker="auto"`` times them in a measurement worker.
    isolate: ClassVar[bool] = False

    def __init__(
        self,
        *,
        batch_size: int | None = None,
        warmup: int = DEFAULT_WARMUP,
        repeats: int = DEFAULT_REPEATS,
        max_spread: float = DEFAULT_MAX_SPREAD,
        retries: int = DEFAULT_RETRIES,
        dtype: torch.dtype = torch.float32,
        worker: MeasurementWorker | str | None = AUTO_WORKER,
    ) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"latency backend {self.name!r} cannot run here: {reason}")
        if batch_size is not None and batch_size < 1:
            raise ConfigurationError(f"batch_size must be a positive integer or None, got {batch_size}")
        if warmup < 0 or repeats < 1 or retries < 0:
            raise ConfigurationError(
                f"need warmup >= 0, repeats >= 1 and retries >= 0; got {warmup}, {repeats}, {retries}"
            )
        if not max_spread > 0:
            raise ConfigurationError(f"max_spread must be positive, got {max_spread}")
        if not dtype.is_floating_point:
            raise ConfigurationError(f"dtype must be a floating type such as torch.float32, got {dtype}")
        self.batch_size = batch_size
        self.warmup = warmup
        self.repeats = repeats
        self.max_spread = max_spread
        self.retries = retries
        self.dtype = dtype
        self.worker = _resolve_worker(worker, type(self).isolate)

    # ------------------------------------------------------------------------------------ backend facts
    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here (with what to do about it), or None if it can."""
        return None

    @classmethod
    def is_available(cls) -> bool:
        """True if the backend can run on this machine."""
        return cls.unavailable_reason() is None

    @property
    @abc.abstractmethod
    def device_name(self) -> str:
        """Processor or GPU model the backend runs on."""

    @property
    def threads(self) -> int | None:
        """Intra-op thread count used while timing, or None where it does not apply."""
        return None

    @property
    def device(self) -> torch.device:
        """Device the inputs are placed on."""
        return torch.device("cpu")

    @property
    def channels_last(self) -> bool:
        """Whether 4-D inputs and weights use the channels-last memory format."""
        return False

    def signature(self) -> dict[str, Any]:
        """Everything about this profiler that changes a measurement, as a JSON-able dict.

        Warm-up, repeat and retry counts are left out: they change how reliable a number is, not what it
        estimates.
        """
        return {
            "backend": self.name,
            "device_name": self.device_name,
            "threads": self.threads,
            "dtype": dtype_name(self.dtype),
            "batch_size": self.batch_size,
            "channels_last": self.channels_last,
            "torch": torch.__version__,
            # Where it was timed changes the number (allocator state): tables timed in the caller's process are
            # not reused by a worker-timed profiler, nor the other way round.
            "timed_in": self.worker.describe() if self.worker is not None else {"process": "caller"},
            **self._extra_signature(),
        }

    def _extra_signature(self) -> dict[str, Any]:
        """Backend-specific signature fields (library versions, backend options)."""
        return {}

    # ------------------------------------------------------------------------------------------ timing
    def measure(self, module: nn.Module, inputs: InputsLike, *, warn_unstable: bool = True) -> Measurement:
        """Time one forward pass of ``module``.

        The module is run in eval mode without autograd; its own training flags are restored afterwards,
        and it is copied rather than modified when the backend needs another device or dtype.

        Args:
            module: the module to time.
            inputs: an input shape such as ``(1, 3, 32, 32)``, an example tensor, or a tuple of either (one
                per forward argument). The leading dimension is the batch dimension and is replaced by the
                profiler's ``batch_size`` when that is set.
            warn_unstable: emit :class:`UnstableMeasurementWarning` when no round met ``max_spread``. Callers
                that report unstable results themselves (e.g. :class:`LatencyTable`) pass False.

        Returns:
            Statistics of the least noisy round; ``stable`` is False if even that round was too noisy.

        Raises:
            LatencyError: the module could not be timed (in the worker: with the worker's message).
        """
        if self.worker is not None:
            effective_shapes(inputs, self.batch_size)  # bad inputs are refused here, not in the worker
            try:
                result = self.worker.measure(self, module, inputs)
            except UnsendableModuleError as exc:
                _fell_back(exc)
                result = self._measure_here(module, inputs)
        else:
            result = self._measure_here(module, inputs)
        if not result.stable and warn_unstable:
            warnings.warn(unstable_message(result, self.max_spread), UnstableMeasurementWarning, stacklevel=2)
        return result

    def _measure_here(self, module: nn.Module, inputs: InputsLike) -> Measurement:
        tensors = materialize(
            inputs, self.batch_size, dtype=self.dtype, device=self.device, channels_last=self.channels_last
        )
        best: RunStats | None = None
        attempts = 0
        with self._session(module, tensors) as run:
            for _ in range(self.warmup):
                run()
            while attempts <= self.retries:
                attempts += 1
                stats = summarize(self._timed_runs(run, self.repeats))
                if best is None or stats.spread < best.spread:
                    best = stats
                if best.spread <= self.max_spread:
                    break
        assert best is not None
        return self._measurement(best, attempts, tensors)

    def measure_together(self, modules: Mapping[str, nn.Module], inputs: InputsLike, *,
                         chunk: int = 5) -> dict[str, Measurement]:
        """Time several modules in short alternating chunks (A×chunk, B×chunk, A×chunk, ...), ``repeats`` runs each.

        Back-to-back :meth:`measure` calls are seconds apart, and a shared machine can change speed in between;
        alternating short chunks makes every module see the same machine state, so their *ratios* hold even
        while the absolute figures drift. Each chunk starts with one untimed run, so that every timed run follows
        a run of the same module, as in a deployment that runs one network (alternating *single* runs would time
        each network right after the other one has filled the shared cache: measured that way, a compressed
        resnet_fm came out 10–30 % less faster). No retries: call it again (as :func:`compare_latency` does) for
        more rounds. Deterministic (analytic) backends just measure each module.
        """
        if chunk < 1:
            raise ConfigurationError(f"chunk must be >= 1, got {chunk}")
        if self.deterministic:
            return {name: self.measure(module, inputs, warn_unstable=False) for name, module in modules.items()}
        if self.worker is not None:
            try:
                return self.worker.measure_together(self, modules, inputs, chunk)
            except UnsendableModuleError as exc:
                _fell_back(exc)
        return self._together_here(modules, inputs, chunk)

    def _together_here(self, modules: Mapping[str, nn.Module], inputs: InputsLike,
                       chunk: int) -> dict[str, Measurement]:
        tensors = materialize(
            inputs, self.batch_size, dtype=self.dtype, device=self.device, channels_last=self.channels_last
        )
        samples: dict[str, list[float]] = {name: [] for name in modules}
        with contextlib.ExitStack() as stack:
            runs = {name: stack.enter_context(self._session(module, tensors)) for name, module in modules.items()}
            for run in runs.values():
                for _ in range(self.warmup):
                    run()
            for start in range(0, self.repeats, chunk):
                for name, run in runs.items():
                    run()  # untimed: the module's own previous run, not another module's, sets the caches
                    samples[name] += self._timed_runs(run, min(chunk, self.repeats - start))
        return {name: self._measurement(summarize(values), 1, tensors) for name, values in samples.items()}

    def _measurement(self, stats: RunStats, attempts: int, tensors: tuple[Tensor, ...]) -> Measurement:
        shapes = effective_shapes(tensors, None)
        return Measurement(
            median_ms=stats.median,
            q1_ms=stats.q1,
            q3_ms=stats.q3,
            min_ms=stats.minimum,
            iqr_ms=stats.iqr,
            spread=stats.spread,
            runs=stats.count,
            attempts=attempts,
            stable=stats.spread <= self.max_spread,
            backend=self.name,
            device_name=self.device_name,
            threads=self.threads,
            batch_size=shapes[0][0],
            dtype=dtype_name(self.dtype),
            input_shapes=shapes,
        )

    @abc.abstractmethod
    def _session(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> contextlib.AbstractContextManager[RunFn]:
        """Context in which the returned callable runs ``module`` once on ``inputs``.

        Setup (device copies, exports, thread settings) happens on entry and is undone on exit; warm-up and
        timing happen inside.
        """

    def _before_timed_run(self) -> None:
        """Called before every timed run, outside the timed interval (default: nothing). The CPU backend
        evicts its core's private caches here, see :class:`~lm_plugin.latency.EagerCPUProfiler`."""
        return

    def _timed_runs(self, run: RunFn, count: int) -> list[float]:
        """Latency of ``count`` calls of ``run`` in milliseconds (wall clock; synchronous backends)."""
        samples = []
        for _ in range(count):
            self._before_timed_run()
            start = time.perf_counter()
            run()
            samples.append((time.perf_counter() - start) * 1e3)
        return samples

    def __repr__(self) -> str:
        settings = ", ".join(
            f"{k}={v!r}" for k, v in {
                "batch_size": self.batch_size, "warmup": self.warmup, "repeats": self.repeats,
                "max_spread": self.max_spread, "retries": self.retries, "dtype": dtype_name(self.dtype),
            }.items()
        )
        return f"{type(self).__name__}({settings})"


def _fell_back(exc: UnsendableModuleError) -> None:
    warnings.warn(f"timed in this process, not in the measurement worker: {exc}. The number depends on what this "
                  "process did before (loaded data, trained).", WorkerFallbackWarning, stacklevel=3)


def _resolve_worker(worker: MeasurementWorker | str | None, isolate: bool) -> MeasurementWorker | None:
    if worker is None or isinstance(worker, MeasurementWorker):
        return worker
    if worker != AUTO_WORKER:
        raise ConfigurationError(f"worker must be 'auto', None or a MeasurementWorker, got {worker!r}")
    return default_worker() if isolate and not worker_disabled() else None


def unstable_message(result: Measurement, max_spread: float) -> str:
    """Warning text for a measurement that stayed too noisy."""
    return (
        f"latency measurement on {result.backend} stayed noisy: IQR/median {result.spread:.2f} > "
        f"max_spread {max_spread:.2f} after {result.attempts} round(s) of {result.runs} runs "
        f"(median {result.median_ms:.3f} ms, indicative only). Other processes are probably competing for "
        "the device: close them, raise `repeats`, or raise `max_spread` if this noise level is acceptable."
    )


def _on_target(module: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
            return False
        if t.is_floating_point() and t.dtype != dtype:
            return False
    return True


@contextlib.contextmanager
def prepared_module(
    module: nn.Module, device: torch.device, dtype: torch.dtype, *, channels_last: bool = False
) -> Iterator[nn.Module]:
    """``module`` in eval mode on ``device`` / ``dtype``, without side effects on the caller's module.

    A module already in place is used directly and its training flags are restored on exit; otherwise a copy
    is converted (so a CPU profile of a GPU model, or an fp16 profile, never changes the caller's weights).
    """
    if _on_target(module, device, dtype) and not channels_last:
        flags = {m: m.training for m in module.modules()}
        module.eval()
        try:
            yield module
        finally:
            for m, training in flags.items():
                m.train(training)
        return
    target = copy.deepcopy(module).to(device=device, dtype=dtype).eval()
    if channels_last:
        target = target.to(memory_format=torch.channels_last)
    yield target
