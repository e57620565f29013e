"""Exception types. Every message says what went wrong *and* what to do about it."""

from __future__ import annotations


class LayerMergeError(Exception):
    """Base class of every error lm_plugin raises on purpose."""


class UntraceableModelError(LayerMergeError):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python)."""


class NoChainError(LayerMergeError):
    """The model has no convolution chain that LayerMerge could compress."""


class InvalidPlanError(LayerMergeError, ValueError):
    """A plan does not fit the chain it is applied to, or violates the merge rules."""


class MergeError(LayerMergeError):
    """A trainable-form model cannot be merged (wrong plan, missing weights)."""


class ConfigurationError(LayerMergeError, ValueError):
    """Settings that contradict each other or cannot work (a part configured twice, a bad value)."""
