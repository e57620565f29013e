"""Exactness checks of a merge: the deploy form must compute what the trainable form computes."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import MergeError
from ..rewrite.trainable import BlockRecord

__all__ = ["Float64Run", "capture_blocks", "check_block", "check_network", "merge_error", "output_error"]

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
    with in_eval(reference, dtype) as ref, in_eval(other, dtype) as oth, torch.no_grad():
        a, b = ref(*xs), oth(*xs)
    return float((a - b).norm() / a.norm().clamp_min(torch.finfo(dtype).tiny))


@contextlib.contextmanager
def in_eval(model: nn.Module, dtype: torch.dtype, device: torch.device | str = "cpu") -> Iterator[nn.Module]:
    """``model`` in eval mode, in ``dtype`` on ``device``, without touching the caller's module.

    A model that already is in that dtype and on that device is used as it is (its training flags are restored
    afterwards): copying a large network just to run it costs gigabytes (a float64 VGG-16 is 1.1 GB).
    """
    tensors = list(model.parameters()) + list(model.buffers())
    ready = all(t.device == torch.device(device) and (t.dtype == dtype or not t.is_floating_point()) for t in tensors)
    if not ready:
        yield copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        return
    modes = {m: m.training for m in model.modules()}
    try:
        yield model.eval()
    finally:
        for m, mode in modes.items():
            m.training = mode


def merge_error(trainable: nn.Module, merge_fn: Callable[[nn.Module], nn.Module], example_inputs: Inputs,
                samples: int = 2) -> float:
    """Float64 error of the merge algebra: ``merge_fn`` applied to a float64 copy, compared with that copy.

    In float64 rounding is ~1e-15, so anything above ~1e-10 is a real mismatch, not noise. (A merge done
    in float32 differs from its trainable form by ~1e-7 through rounding alone; see :func:`output_error`.)
    """
    reference = copy.deepcopy(trainable).cpu().double().eval()
    return output_error(reference, merge_fn(reference), example_inputs, dtype=torch.float64, samples=samples)


def _relative(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Max-abs relative error: one wrong border pixel is as visible as a wrong channel."""
    if ref.shape != other.shape:
        return float("inf")
    scale = max(float(ref.abs().max()), float(other.abs().max()), 1e-30) if ref.numel() else 1.0
    return float((ref - other).abs().max()) / scale if ref.numel() else 0.0


def traced_inputs(gm: fx.GraphModule, *, dtype: torch.dtype = torch.float64, device: torch.device | None = None,
                  seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One random sample per placeholder of a traced model, shaped like the example it was traced with.

    The shapes come from the shape propagation done at trace time (``node.meta["tensor_meta"]``).
    """
    gen = torch.Generator().manual_seed(seed)
    xs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise MergeError(f"cannot check the merge: input {node.name!r} has no recorded shape. Build the "
                             "trainable form with LayerMergePruner.apply(plan), or merge with check=False.")
        shape = (1, *tuple(meta.shape)[1:])
        x = torch.randn(shape, generator=gen, dtype=dtype) if meta.dtype.is_floating_point else torch.zeros(
            shape, dtype=meta.dtype)
        xs.append(x.to(device) if device is not None else x)
    return tuple(xs)


class Float64Run(fx.Interpreter):
    """Runs a GraphModule in float64 without a float64 copy of the whole network.

    Each module is copied to float64 (eval mode) only while it runs, and parameters read by ``get_attr`` are
    cast when read, so the peak extra memory is one module, not the model: the self-check of a 600 M-parameter
    network stays within a few GB. ``modules`` overrides what a ``call_module`` target runs (already float64,
    used as is); the values of the nodes named in ``keep`` are kept.
    """

    def __init__(self, gm: fx.GraphModule, *, keep: set[str] = frozenset(),  # type: ignore[assignment]
                 modules: Callable[[str], nn.Module | None] | None = None) -> None:
        super().__init__(gm)
        self.keep = keep
        self.override = modules
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.keep and isinstance(out, torch.Tensor):
            self.values[n.name] = out.clone()  # in-place ops (ReLU(inplace=True)) would overwrite it later
        return out

    def call_module(self, target, args, kwargs):
        module = self.override(str(target)) if self.override is not None else None
        if module is not None:
            return module(*args, **kwargs)
        with in_eval(self.fetch_attr(str(target)), torch.float64, _device_of(args)) as module:
            return module(*args, **kwargs)

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return value.to(torch.float64) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _device_of(args: tuple) -> torch.device:
    leaves, _ = tree_flatten(args)
    return next((x.device for x in leaves if isinstance(x, torch.Tensor)), torch.device("cpu"))


def capture_blocks(trainable: fx.GraphModule,
                   blocks: Sequence[BlockRecord]) -> tuple[tuple[torch.Tensor, ...], dict, object]:
    """Random float64 inputs, the trainable form's float64 values at every block's input and output, and its
    float64 output: what the merged blocks and the merged network are checked against."""
    device = next(iter(trainable.parameters())).device
    xs = traced_inputs(trainable, device=device)
    run = Float64Run(trainable, keep={name for rec in blocks for name in (rec.input, rec.output)})
    with torch.no_grad():
        expected = run.run(*xs)
    for rec in blocks:
        if rec.input not in run.values or rec.output not in run.values:
            raise MergeError(f"cannot check block ({rec.st},{rec.end}]: its input or output is not a "
                             "tensor of the trainable form; merge with check=False to skip the check")
    return xs, run.values, expected


def check_block(rec: dict, merged: nn.Module, values: dict[str, torch.Tensor], tolerance: float) -> float:
    """Raise :class:`MergeError` unless the float64 ``merged`` map computes block ``rec`` of the trainable form."""
    with torch.no_grad():
        err = _relative(values[rec.output], merged(values[rec.input]))
    if not err <= tolerance:
        raise MergeError(
            f"merged block ({rec.st},{rec.end}] (convs {rec.kept}) does not compute what its "
            f"trainable form computes: float64 relative error {err:.2e} > {tolerance:.0e}. This is a bug "
            "in lm_plugin's merge for this model; please report it. Keep the activation at one of its "
            "positions to avoid the block, or merge with check=False to get the unchecked network."
        )
    return err


def check_network(deployed: fx.GraphModule, xs: tuple[torch.Tensor, ...], expected: object,
                  merged: Callable[[str], nn.Module | None], tolerance: float) -> float:
    """Raise :class:`MergeError` unless the deploy form, run in float64 with ``merged`` giving the float64
    merged convs by target, reproduces the trainable form's float64 output; return the relative error."""
    with torch.no_grad():
        got = Float64Run(deployed, modules=merged).run(*xs)
    want_leaves, _ = tree_flatten(expected)
    got_leaves, _ = tree_flatten(got)
    if len(want_leaves) != len(got_leaves):
        raise MergeError("the merged network returns a different output structure than its trainable form")
    worst = 0.0
    for a, b in zip(want_leaves, got_leaves):
        if isinstance(a, torch.Tensor):
            worst = max(worst, _relative(a, b) if isinstance(b, torch.Tensor) else float("inf"))
    if not worst <= tolerance:
        raise MergeError(
            f"every merged conv matches its block, but the merged network's output differs from the trainable "
            f"form's: float64 relative error {worst:.2e} > {tolerance:.0e} (the graph was rewired wrongly). This "
            "is a bug in lm_plugin for this model; please report it. merge(..., check=False) returns the "
            "unchecked network."
        )
    return worst
