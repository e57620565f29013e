"""What a profiler feeds the module: shapes or example tensors, re-batched to the profiler's batch size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ArgumentTypeError, ConfigurationError

Shape = tuple[int, ...]
#: Inputs a profiler accepts: one shape ``(N, C, H, W)``, several shapes, one tensor, or several tensors.
#: The leading dimension of every shape / tensor is the batch dimension.
InputsLike = Sequence[int] | torch.Size | Tensor | Sequence[Sequence[int]] | Sequence[Tensor]

# Random inputs come from a fixed seed so that two measurements of the same module see the same data.
_INPUT_SEED = 0


def _is_shape(obj: object) -> bool:
    return isinstance(obj, (tuple, list, torch.Size)) and all(
        isinstance(d, int) and not isinstance(d, bool) for d in obj
    )


def normalize(inputs: InputsLike) -> tuple[Shape | Tensor, ...]:
    """Split ``inputs`` into one shape or tensor per model input.

    Raises:
        TypeError: if ``inputs`` is neither shapes nor tensors.
        ValueError: if a shape has no batch dimension or a non-positive size.
    """
    if isinstance(inputs, Tensor):
        items: tuple[Shape | Tensor, ...] = (inputs,)
    elif _is_shape(inputs) and len(inputs) > 0:
        items = (tuple(int(d) for d in inputs),)  # type: ignore[union-attr]
    elif isinstance(inputs, (tuple, list)) and inputs and all(
        isinstance(x, Tensor) or _is_shape(x) for x in inputs
    ):
        items = tuple(x if isinstance(x, Tensor) else tuple(int(d) for d in x) for x in inputs)
    else:
        raise ArgumentTypeError(
            "inputs must be a shape such as (1, 3, 224, 224), a tensor, or a tuple of shapes/tensors "
            f"(one per model input); got {type(inputs).__name__}"
        )
    for item in items:
        shape = item.shape if isinstance(item, Tensor) else item
        if len(shape) == 0 or any(d <= 0 for d in shape):
            raise ConfigurationError(
                f"input shape {tuple(shape)} needs a leading batch dimension and positive sizes, "
                "e.g. (1, 3, 32, 32)"
            )
    return items


def effective_shapes(inputs: InputsLike, batch_size: int | None) -> tuple[Shape, ...]:
    """Shapes that will actually be timed: the batch dimension replaced by ``batch_size`` (if given)."""
    shapes = []
    for item in normalize(inputs):
        shape = tuple(item.shape) if isinstance(item, Tensor) else item
        shapes.append(shape if batch_size is None else (batch_size, *shape[1:]))
    return tuple(shapes)


def materialize(
    inputs: InputsLike,
    batch_size: int | None,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> tuple[Tensor, ...]:
    """Tensors to time with, on ``device``.

    Shapes become seeded standard-normal tensors. Example tensors are re-batched by cycling their samples
    (so a batch-1 example can be timed at batch 64). Floating tensors are cast to ``dtype``; integer tensors
    (token ids, indices) keep their type.
    """
    generator = torch.Generator().manual_seed(_INPUT_SEED)
    out = []
    for item, shape in zip(normalize(inputs), effective_shapes(inputs, batch_size)):
        if isinstance(item, Tensor):
            x = item.detach()
            if x.shape[0] != shape[0]:
                x = x.index_select(0, torch.arange(shape[0], device=x.device) % x.shape[0])
            x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        else:
            x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        layout = torch.channels_last if channels_last and x.dim() == 4 else torch.contiguous_format
        out.append(x.contiguous(memory_format=layout))
    return tuple(out)
