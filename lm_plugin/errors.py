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


class ArgumentTypeError(LayerMergeError, TypeError):
    """An argument of the wrong type; the message names the type expected."""


class UnknownNameError(ConfigurationError, KeyError):
    """A name (dataset, model, backend, estimator, table entry, stage ...) that is not registered or not present
    (a configuration error, and a ``KeyError`` for code that looks names up)."""

    def __str__(self) -> str:  # KeyError quotes its message; ours is a sentence
        return str(self.args[0]) if self.args else ""


class UnsupportedError(LayerMergeError, NotImplementedError):
    """Something lm_plugin does not do (the message says what to do instead)."""


class LayerMergeRuntimeError(LayerMergeError, RuntimeError):
    """An operation failed at run time for a reason the message explains."""


class MissingDependencyError(LayerMergeError, ImportError):
    """An optional dependency is not installed; the message gives the ``pip install`` line."""


class TrainingDivergedError(LayerMergeError, FloatingPointError):
    """Training produced a non-finite loss (the message suggests a lower learning rate or a data check)."""
