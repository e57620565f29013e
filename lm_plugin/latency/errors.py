"""Errors and warnings of the latency subsystem. Every message says what went wrong and what to do."""

from __future__ import annotations

from ..errors import LayerMergeError


class LatencyError(LayerMergeError):
    """Base class of the errors :mod:`lm_plugin.latency` raises on purpose."""


class BackendUnavailableError(LatencyError, RuntimeError):
    """A latency backend was requested that cannot run here (no GPU, package not installed, unknown name)."""


class LatencyCacheWarning(UserWarning):
    """A latency cache file could not be (fully) used and was rebuilt; the message names the cause."""


class UnstableMeasurementWarning(UserWarning):
    """A measurement stayed too noisy after every allowed re-measurement; its numbers are indicative only."""
