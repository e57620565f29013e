"""Quantising stages (final: nothing may follow them): ``quantize_nni`` (simulated int8) and ``quantize_torch``
(PyTorch int8 kernels for CPU)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..contract import PipelineContext, PipelineError, StageOutput
from ..registry import register_stage

__all__ = ["quantize_nni_stage", "quantize_torch_stage"]


@register_stage("quantize_nni", final=True)
def quantize_nni_stage(model: nn.Module, ctx: PipelineContext, *, calibration_batches: int = 8,
                       op_types: Sequence[str] = ("Conv2d", "Linear"),
                       target_names: Sequence[str] = ("_input_", "weight", "_output_"), quant_dtype: str = "int8",
                       quant_scheme: str = "affine") -> StageOutput:
    """NNI ``PtqQuantizer``: *simulated* int8 (fake quantisation around float kernels).

    Reports the accuracy int8 would have; the model still computes in float32 (plus the quantise/dequantise
    ops), so it is slower than its input. For real int8 speed use ``quantize_torch``.
    """
    import nni
    import torch.nn.functional as F
    from nni.compression import TorchEvaluator
    from nni.compression.quantization import PtqQuantizer

    model = copy.deepcopy(model).eval()

    def calibrate(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            for x in ctx.calibration_batches(calibration_batches):
                m(x)
        return 0.0

    def training_func(m: nn.Module, optimizer: Any, training_step: Any, lr_scheduler: Any = None,
                      max_steps: int | None = None, max_epochs: int | None = None) -> None:
        calibrate(m)  # PTQ: observers record ranges on forward passes; nothing is trained

    def training_step(batch: Any, m: nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.0)
    evaluator = TorchEvaluator(training_func, optimizer, training_step, dummy_input=ctx.one[0],
                               evaluating_func=calibrate)
    config = [{"op_types": list(op_types), "target_names": list(target_names), "quant_dtype": quant_dtype,
               "quant_scheme": quant_scheme, "granularity": "default"}]
    quantizer = PtqQuantizer(model, config, evaluator)
    model, calibration = quantizer.compress(max_steps=calibration_batches, max_epochs=None)
    return StageOutput(model, "int8 (simulated)", {"quantized_modules": sorted(calibration)})


@register_stage("quantize_torch", final=True)
def quantize_torch_stage(model: nn.Module, ctx: PipelineContext, *, engine: str = "x86",
                         calibration_batches: int = 8) -> StageOutput:
    """PyTorch int8 post-training static quantisation for CPU (FX graph mode), calibrated on training batches.

    ``engine`` is the quantised backend and qconfig (``"x86"``, ``"fbgemm"``, ``"qnnpack"`` ...); it is made
    ``torch.backends.quantized.engine`` for the whole process, since the model must run with the engine it
    was packed for.
    """
    # torch.ao.quantization's FX path still works on torch 2.14 (checked: int8 conv/linear kernels, ~2x faster
    # on CPU here) but warns that it is deprecated in favour of torchao's pt2e flow; the warnings are silenced
    # here and the path may need replacing when torch drops it.
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if engine not in torch.backends.quantized.supported_engines:
        raise PipelineError(f"quantised engine {engine!r} is not available here; available: "
                            f"{torch.backends.quantized.supported_engines}")
    torch.backends.quantized.engine = engine
    model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*reduce_range.*")
        prepared = prepare_fx(model, get_default_qconfig_mapping(engine), ctx.one)
        with torch.no_grad():
            for x in ctx.calibration_batches(calibration_batches):
                prepared(x)
        quantized = convert_fx(prepared)
    return StageOutput(quantized, "int8", {"engine": engine})
