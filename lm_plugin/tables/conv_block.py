"""What the latency table times for a candidate block: the module a merged LayerMerge block becomes.

The measurement harness (:mod:`lm_plugin.latency`) times any module; this module says which one stands for a merged
block (its geometry from :mod:`lm_plugin.blocks`, its activation from :mod:`lm_plugin.activations`) and which key
describes it in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import activations
from ..blocks import BlockGeometry
from ..latency.inputs import Shape


def conv_block_module(geometry: BlockGeometry, activation: str | None) -> nn.Module:
    """The deployed form of a merged block: one ``nn.Conv2d`` (with bias, BN folded in) and its activation.

    Args:
        geometry: kernel, stride, padding, channels and groups of the merged conv.
        activation: activation after the conv, a name in :data:`lm_plugin.activations.ACTIVATIONS`, or None for a
            linear block.

    Returns:
        ``nn.Sequential(conv, activation)`` (activation ``nn.Identity`` when None), randomly initialised;
        ``nn.Sequential(zero pad, conv, activation)`` when the padding is asymmetric.
    """
    asymmetric = geometry.pad_extra != (0, 0)
    conv = nn.Conv2d(
        geometry.in_channels,
        geometry.out_channels,
        kernel_size=geometry.kernel_size,
        stride=geometry.stride,
        padding=(0, 0) if asymmetric else geometry.padding,
        groups=geometry.groups,
        bias=True,
    )
    if asymmetric:  # the deploy form pads explicitly, then runs the conv unpadded
        return nn.Sequential(nn.ZeroPad2d(geometry.pad_lrtb), conv, activations.make(activation))
    return nn.Sequential(conv, activations.make(activation))


def conv_block_key(geometry: BlockGeometry, activation: str | None) -> dict[str, Any]:
    """Everything about a merged block that changes its latency, except the batch size.

    Position and kept-conv subset are left out on purpose: blocks that merge into the same conv at the same
    input shape share one measurement.
    """
    return {
        "op": "conv2d",
        "in_channels": geometry.in_channels,
        "out_channels": geometry.out_channels,
        "kernel_size": list(geometry.kernel_size),
        "stride": list(geometry.stride),
        "padding": list(geometry.padding) if geometry.pad_extra == (0, 0) else list(geometry.pad_lrtb),
        "groups": geometry.groups,
        "bias": True,
        "activation": activation,
        "input_shape": list(geometry.input_shape[1:]),  # per sample: the profiler owns the batch size
    }


@dataclass(frozen=True)
class ConvBlockSpec:
    """:class:`~lm_plugin.latency.TimingSpec` of a merged block, timed at the block's true input shape.

    Example:
        ```python
        specs = {(g.st, g.end, g.kept): ConvBlockSpec(g, "relu") for g in candidate_geometries}
        table = LatencyTable.build(specs, get_profiler("cpu", batch_size=64), cache="resnet_cpu.sqlite")
        table.ms((0, 2, (1, 2)))
        ```

    Args:
        geometry: the merged conv's geometry; ``geometry.input_shape`` is the traced ``(N, C, H, W)``, whose
            ``N`` the profiler's batch size replaces.
        activation: the block's activation name, or None.
    """

    geometry: BlockGeometry
    activation: str | None

    def __post_init__(self) -> None:
        activations.make(self.activation)  # fail at construction, not halfway through a table build

    @property
    def inputs(self) -> Shape:
        return tuple(self.geometry.input_shape)

    def build(self) -> nn.Module:
        return conv_block_module(self.geometry, self.activation)

    def cache_key(self) -> dict[str, Any]:
        return conv_block_key(self.geometry, self.activation)
