"""Errors and warnings of the latency subsystem. Every message says what went wrong and what to do."""

from __future__ import annotations

from ..errors import LayerMergeError
from ..store.errors import CacheWarning


class LatencyError(LayerMergeError):
    """Base class of the errors :mod:`lm_plugin.latency` raises on purpose."""


class BackendUnavailableError(LatencyError, RuntimeError):
    """A latency backend was requested that cannot run here (no GPU, package not installed, unknown name)."""


#: The store's one cache warning under its former name (the message names the table: "latency table cache …").
LatencyCacheWarning = CacheWarning


class UnstableMeasurementWarning(UserWarning):
    """A measurement stayed too noisy after every allowed re-measurement; its numbers are indicative only."""


class LatencyDriftWarning(UserWarning):
    """The machine times the original network markedly faster or slower now than when its latency table was built.

    Each measurement can be steady and still be taken at another speed than the table's: another tenant of a shared
    host, frequency scaling, a job on the other core. Predicted milliseconds are then off by about the drift;
    plans compared against each other, and speed-ups measured side by side, are much less affected.
    """


class LatencyModelWarning(UserWarning):
    """The latency model's self-check predicted deployed networks less well than its tolerance."""


class UnsendableModuleError(LatencyError):
    """A module cannot be sent to the measurement worker (it does not pickle, or a fresh process cannot import its
    classes). Profilers then time it in the calling process with a :class:`WorkerFallbackWarning`."""


class WorkerFallbackWarning(UserWarning):
    """A module was timed in the calling process because the measurement worker could not receive it: that number
    depends on what the calling process did before."""
