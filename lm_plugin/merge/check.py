"""Exactness checks of a merge: the deploy form must compute what the trainable form computes."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["merge_error", "output_error"]

Inputs = torch.Tensor | Sequence[torch.Tensor]


def output_error(
    reference: nn.Module, other: nn.Module, example_inputs: Inputs, *, dtype: torch.dtype = torch.float32,
    samples: int = 2,
) -> float:
    """Relative error ``‖ref(x) − other(x)‖ / ‖ref(x)‖`` on random inputs shaped like the example.

    Both models are copied to ``dtype`` on the CPU and run in eval mode; the caller's modules are untouched.

    Args:
        reference: The model taken as correct.
        other: The model compared with it.
        example_inputs: Tensor(s) giving the input shape(s); only their shapes are used.
        dtype: Precision of the comparison.
        samples: Batch size of the random inputs (small: float64 depthwise convs are slow on CPU).
    """
    shapes = [example_inputs.shape] if isinstance(example_inputs, torch.Tensor) else [x.shape for x in example_inputs]
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(samples, *s[1:], generator=gen, dtype=dtype) for s in shapes]
    ref = copy.deepcopy(reference).cpu().to(dtype).eval()
    oth = copy.deepcopy(other).cpu().to(dtype).eval()
    with torch.no_grad():
        a, b = ref(*xs), oth(*xs)
    return float((a - b).norm() / a.norm().clamp_min(torch.finfo(dtype).tiny))


def merge_error(trainable: nn.Module, merge_fn: Callable[[nn.Module], nn.Module], example_inputs: Inputs,
                samples: int = 2) -> float:
    """Float64 error of the merge algebra: ``merge_fn`` applied to a float64 copy, compared with that copy.

    In float64 rounding is ~1e-15, so anything above ~1e-10 is a real mismatch, not noise. (A merge done
    in float32 differs from its trainable form by ~1e-7 through rounding alone; see :func:`output_error`.)
    """
    reference = copy.deepcopy(trainable).cpu().double().eval()
    return output_error(reference, merge_fn(reference), example_inputs, dtype=torch.float64, samples=samples)
