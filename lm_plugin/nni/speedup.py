"""NNI's ``ModelSpeedup`` with a tracer that works on current torch.

NNI 3.0 traces with its own ``concrete_trace``, which fails on torch ≥ 2.1 (``AttributeError: 'NoneType'
object has no attribute 'startswith'``; NNI issue #5768, unfixed). ``ModelSpeedup`` accepts a ready
``torch.fx.GraphModule`` instead, and a plain ``torch.fx.symbolic_trace`` of the unwrapped model is all it
needs for ordinary CNNs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from nni.compression.speedup import ModelSpeedup

from ..errors import ConfigurationError, LayerMergeRuntimeError


@contextmanager
def _nni_log_level(level: int) -> Iterator[None]:
    # ModelSpeedup logs every replaced module at INFO through NNI's module loggers.
    logger = logging.getLogger("nni")
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def speedup(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor | None]], dummy_input: Any, *,
            graph_module: fx.GraphModule | None = None, verbose: bool = False, **speedup_kwargs: Any) -> nn.Module:
    """Physically remove what an NNI pruner masked (``ModelSpeedup``), traced with ``torch.fx``.

    Like ``ModelSpeedup``, it replaces the pruned modules of ``model`` in place and returns it.

    Args:
        model: the pruned model, *unwrapped* (call ``pruner.unwrap_model()`` after ``compress()``).
        masks: the masks ``pruner.compress()`` returned (``{module_name: {target_name: mask}}``).
        dummy_input: an input batch (a tensor or a tuple of tensors).
        graph_module: a trace of ``model`` if ``torch.fx.symbolic_trace`` cannot trace it (custom leaf
            modules or ``concrete_args``); default: ``torch.fx.symbolic_trace(model)``.
        verbose: keep NNI's per-module INFO log (off by default).
        **speedup_kwargs: further ``ModelSpeedup`` arguments (``batch_size``, ``customized_replacers`` ...).

    Returns:
        ``model``, with smaller modules.

    Raises:
        ValueError: ``model`` is still wrapped by an NNI compressor.
        RuntimeError: ``torch.fx`` cannot trace the model (pass ``graph_module``).

    Example:
        >>> _, masks = L1NormPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]).compress()
        >>> pruner.unwrap_model()
        >>> model = speedup(model, masks, torch.randn(1, 3, 32, 32))
    """
    wrapped = [name for name, m in model.named_modules() if hasattr(m, "_nni_wrapper")]
    if wrapped:
        raise ConfigurationError(f"the model is still wrapped by an NNI compressor ({wrapped[:3]} ...): call "
                         "pruner.unwrap_model() before speedup()")
    if graph_module is None:
        try:
            graph_module = fx.symbolic_trace(model)
        except Exception as exc:  # fx raises many types
            raise LayerMergeRuntimeError(
                f"torch.fx.symbolic_trace failed on {type(model).__name__} ({type(exc).__name__}: {exc}); trace "
                "it yourself (e.g. a torch.fx.Tracer with custom leaf modules) and pass graph_module=...") from exc
    if not verbose:
        speedup_kwargs.setdefault("logger", logging.getLogger("lm_plugin.nni.speedup"))
    masks = {name: dict(targets) for name, targets in masks.items()}
    with _nni_log_level(logging.INFO if verbose else logging.WARNING):
        return ModelSpeedup(model, dummy_input, masks, graph_module=graph_module, **speedup_kwargs).speedup_model()
