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

__all__ = ["merge_error", "output_error", "verify_merge"]

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


class _Capture(fx.Interpreter):
    """Runs a GraphModule and keeps copies of the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names and isinstance(out, torch.Tensor):
            self.values[n.name] = out.clone()  # in-place ops (ReLU(inplace=True)) would overwrite it later
        return out


def verify_merge(trainable: fx.GraphModule, deployed: fx.GraphModule, merged: Sequence[tuple[dict, nn.Module]], *,
                 tolerance: float) -> float:
    """Check a float64 deploy form against its trainable form; raise :class:`MergeError` if they differ.

    First block by block: each merged conv is applied to its block's input as the trainable form computes it,
    and compared with the block's output there, so a wrong block is named. Then end to end, which catches a
    wrongly rewired graph. One random sample shaped like the traced example is used.

    Args:
        trainable: the trainable form (any dtype; a float64 copy is made, the caller's module is untouched).
        deployed: the float64 deploy form.
        merged: ``(block record, merged conv)`` pairs, as recorded by ``to_trainable`` and built by ``merge``.
        tolerance: largest accepted relative error (max-abs, relative to the largest value).

    Returns:
        The end-to-end relative error.
    """
    device = next(iter(deployed.parameters())).device
    with in_eval(trainable, torch.float64, device) as reference, torch.no_grad():
        return _verify(reference, deployed, merged, tolerance, traced_inputs(reference, device=device))


def _verify(reference: fx.GraphModule, deployed: fx.GraphModule, merged: Sequence[tuple[dict, nn.Module]],
            tolerance: float, xs: tuple[torch.Tensor, ...]) -> float:
    """Block by block, then end to end (see :func:`verify_merge`); ``reference`` is float64, in eval mode."""
    names = {rec[k] for rec, _ in merged for k in ("input", "output")}
    capture = _Capture(reference, names)
    expected = capture.run(*xs)
    for rec, conv in merged:
        if rec["input"] not in capture.values or rec["output"] not in capture.values:
            raise MergeError(f"cannot check block ({rec['st']},{rec['end']}]: its input or output is not a "
                             "tensor of the trainable form; merge with check=False to skip the check")
        err = _relative(capture.values[rec["output"]], conv(capture.values[rec["input"]]))
        if not err <= tolerance:
            raise MergeError(
                f"merged block ({rec['st']},{rec['end']}] (convs {rec['kept']}) does not compute what its "
                f"trainable form computes: float64 relative error {err:.2e} > {tolerance:.0e}. This is a bug "
                "in lm_plugin's merge for this model; please report it. Keep the activation at one of its "
                "positions to avoid the block, or merge with check=False to get the unchecked network."
            )
    got = deployed(*xs)
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
