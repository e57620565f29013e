"""Kernel algebra: convolutions as linear maps that compose, add and fold BatchNorm exactly.

All maps here are *valid* convolutions (no padding): the trainable form moves every padding of a merge group to
its input, so inside a group a conv reads only real values and the composition of two convs is again a conv:

    (W2, b2, s2) ∘ (W1, b1, s1)  =  (W2 ⊛ W1, (Σ_taps W2)·b1 + b2, s1·s2),   kernel k1 + (k2 − 1)·s1

where ``W2 ⊛ W1`` is a full convolution of the kernels with in/out roles swapped (computed here as one
channel matmul per tap of ``W2``). Grouped convs with equal groups compose group-wise and stay grouped (depthwise stays
depthwise); a grouped conv next to a dense one composes group by group into a dense kernel; two different groupings
are expanded to dense block-diagonal kernels first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..blocks import compose, join_groups
from ..errors import ConfigurationError

Pair = tuple[int, int]
DTYPE = torch.float64  # merge arithmetic is done in float64, then cast to the model's dtype


@dataclass(frozen=True)
class LinearConv:
    """An affine valid convolution: ``y = conv2d(x, weight, bias, stride, groups=groups)``."""

    weight: torch.Tensor  # [out, in / groups, kh, kw]
    bias: torch.Tensor  # [out]
    stride: Pair
    groups: int

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> Pair:
        return (self.weight.shape[2], self.weight.shape[3])

    # ------------------------------------------------------------------------------------------ constructors
    @staticmethod
    def from_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> LinearConv:
        """The conv's affine map with ``bn`` (eval mode, its own eps) folded in; padding is not part of it."""
        w = conv.weight.detach().to(DTYPE)
        b = conv.bias.detach().to(DTYPE) if conv.bias is not None else torch.zeros(w.shape[0], dtype=DTYPE,
                                                                                   device=w.device)
        lin = LinearConv(w, b, (int(conv.stride[0]), int(conv.stride[1])), int(conv.groups))
        return lin.scaled(bn) if bn is not None else lin

    def scaled(self, bn: nn.BatchNorm2d) -> LinearConv:
        """This map followed by ``bn`` (eval mode, its own eps)."""
        assert bn.running_var is not None and bn.running_mean is not None
        scale = 1.0 / torch.sqrt(bn.running_var.detach().to(DTYPE) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().to(DTYPE)
        shift = -bn.running_mean.detach().to(DTYPE) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach().to(DTYPE)
        return LinearConv(self.weight * scale.reshape(-1, 1, 1, 1), self.bias * scale + shift, self.stride,
                          self.groups)

    @staticmethod
    def identity(channels: int, groups: int = 1, *, device: torch.device | str = "cpu") -> LinearConv:
        """The identity map as a 1x1 conv with ``groups`` groups (any divisor of ``channels``)."""
        per = channels // groups
        w = torch.zeros(channels, per, 1, 1, dtype=DTYPE, device=device)
        w[torch.arange(channels), torch.arange(channels) % per, 0, 0] = 1.0
        return LinearConv(w, torch.zeros(channels, dtype=DTYPE, device=device), (1, 1), groups)

    # -------------------------------------------------------------------------------------------- algebra
    def dense(self) -> LinearConv:
        """The same map with ``groups=1`` (block-diagonal kernel)."""
        if self.groups == 1:
            return self
        out, per_in, kh, kw = self.weight.shape
        per_out = out // self.groups
        w = self.weight.new_zeros(out, per_in * self.groups, kh, kw)
        for g in range(self.groups):
            w[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] = self.weight[g * per_out:(g + 1) * per_out]
        return LinearConv(w, self.bias, self.stride, 1)

    def regrouped(self, groups: int) -> LinearConv:
        """This dense map as a conv of ``groups`` groups, if its kernel is block-diagonal in them (else itself)."""
        if self.groups != 1 or groups == 1:
            return self
        out, cin, kh, kw = self.weight.shape
        per_out, per_in = out // groups, cin // groups
        blocks = self.weight.reshape(groups, per_out, groups, per_in, kh, kw)
        diagonal = torch.stack([blocks[g, :, g] for g in range(groups)])  # [groups, per_out, per_in, kh, kw]
        across = ~torch.eye(groups, dtype=torch.bool, device=self.weight.device)  # (output group, input group) pairs
        if bool(blocks.abs().sum(dim=(1, 3, 4, 5))[across].any()):  # a weight across groups: it stays dense
            return self
        return LinearConv(diagonal.reshape(out, per_in, kh, kw).clone(), self.bias, self.stride, groups)

    def then(self, nxt: LinearConv) -> LinearConv:
        """``nxt ∘ self``: apply ``self`` first, then ``nxt``."""
        if nxt.in_channels != self.out_channels:
            raise ConfigurationError(f"cannot compose: {self.out_channels} channels into {nxt.in_channels}")
        g1, g2 = self.groups, nxt.groups
        if g1 != g2 and 1 not in (g1, g2):  # two different groupings: rare, expand both
            # grouped again as join_groups says (the geometry the latency table timed): a dense kernel would compute
            # the same but run slower
            return self.dense().then(nxt.dense()).regrouped(join_groups(g1, g2))
        # Batched over g groups of the intermediate channels. Equal groups: the result stays grouped. A grouped
        # conv next to a dense one: the result is dense, built group by group, never expanding the grouped
        # kernel to a dense one (a 7392-channel grouped 3x3 expands to 3.9 GB in float64, more than the result).
        g = max(g1, g2)
        w1, w2 = self.weight, nxt.weight
        c2, c1 = w2.shape[0], w1.shape[0]
        c1g, cin1 = c1 // g, w1.shape[1]  # intermediate channels per group; input channels each row of W1 reads
        (k1h, k1w), (k2h, k2w), (s1h, s1w) = self.kernel_size, nxt.kernel_size, self.stride
        (kh, kw), _, _ = compose((self.kernel_size, self.stride, (0, 0)), (nxt.kernel_size, nxt.stride, (0, 0)))
        w1g = w1.reshape(g, c1g, cin1 * k1h * k1w)  # W1's rows in g chunks of the intermediate channels
        if g2 == g:  # W2 grouped like the intermediate channels (or both dense): rows per group c2 / g
            w2g = w2.reshape(g, c2 // g, c1g, k2h, k2w)
        else:  # dense W2 after a grouped W1: every output row reads every group's columns
            w2g = w2.reshape(c2, g, c1g, k2h, k2w).transpose(0, 1)
        # One batched matmul per tap of the second kernel: tap (vh, vw) shifts the first kernel by (vh, vw)*s1.
        # (BLAS matmuls; conv_transpose2d has no fast float64 path on CPU.)
        w = w1.new_zeros(g, w2g.shape[1], cin1, kh, kw)
        for vh in range(k2h):
            for vw in range(k2w):
                prod = torch.bmm(w2g[:, :, :, vh, vw], w1g).reshape(g, -1, cin1, k1h, k1w)
                w[:, :, :, vh * s1h:vh * s1h + k1h, vw * s1w:vw * s1w + k1w] += prod
        # Every output of a valid conv reads real intermediate values, so b1 enters through every tap.
        b1 = torch.bmm(w2g.sum(dim=(3, 4)), self.bias.reshape(g, c1g, 1))  # [g, rows, 1]
        if g2 == g:  # stays grouped if W1 was (equal groups); dense if W1 was dense (its rows read every input)
            w, b, groups = w.reshape(c2, cin1, kh, kw), b1.reshape(c2), g1
        else:  # columns of group i come from W1's group i: lay the groups side by side along the input
            w, b, groups = w.transpose(0, 1).reshape(c2, g * cin1, kh, kw), b1.sum(dim=0).reshape(c2), 1
        stride = (self.stride[0] * nxt.stride[0], self.stride[1] * nxt.stride[1])
        return LinearConv(w, b + nxt.bias, stride, groups)

    def plus(self, other: LinearConv, offset: Pair) -> LinearConv:
        """``self + other`` where ``other``'s (smaller) kernel sits at ``offset`` inside ``self``'s kernel."""
        if (other.in_channels, other.out_channels, other.stride) != (self.in_channels, self.out_channels,
                                                                    self.stride):
            raise ConfigurationError("cannot add convs of different channels or strides")
        if self.groups != other.groups:  # block-diagonal in gcd groups (see then)
            return self.dense().plus(other.dense(), offset).regrouped(join_groups(self.groups, other.groups))
        a, b = self, other
        (kh, kw), (oh, ow) = b.kernel_size, offset
        if oh < 0 or ow < 0 or oh + kh > a.kernel_size[0] or ow + kw > a.kernel_size[1]:
            raise ConfigurationError(f"kernel {b.kernel_size} at offset {offset} does not fit in {a.kernel_size}")
        w = a.weight.clone()
        w[:, :, oh:oh + kh, ow:ow + kw] += b.weight
        return LinearConv(w, a.bias + b.bias, a.stride, a.groups)

    def to_conv2d(self, padding: Pair, *, dtype: torch.dtype, device: torch.device) -> nn.Conv2d:
        """A real ``nn.Conv2d`` computing this map on an input zero-padded by ``padding``."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=padding, groups=self.groups, bias=True, device=device, dtype=dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            conv.bias.copy_(self.bias)
        return conv
