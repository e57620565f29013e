"""Small hand-written networks that exercise the corner cases of chain extraction and merging."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics so that folding errors cannot hide."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


class ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k=3, s=1, groups=1, bias=False, pad=None):
        pad = tuple((ki - 1) // 2 for ki in k) if isinstance(k, tuple) else (k - 1) // 2 if pad is None else pad
        super().__init__(nn.Conv2d(cin, cout, k, s, pad, groups=groups, bias=bias), nn.BatchNorm2d(cout))


class Residual(nn.Module):
    """Two convs with an identity or a strided 1x1 projection skip, activation after the add."""

    def __init__(self, cin, cout, stride=1, act=None, depthwise=False):
        super().__init__()
        self.a = ConvBN(cin, cout, 3, stride, groups=cin if depthwise and cin == cout else 1)
        self.b = ConvBN(cout, cout, 3, 1, groups=cout if depthwise else 1)
        self.act = act or nn.ReLU()
        self.proj = ConvBN(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        skip = x if self.proj is None else self.proj(x)
        y = self.b(self.act(self.a(x)))
        return self.act(y + skip)


class Zoo(nn.Module):
    """A user-defined CNN with every supported construct.

    functional and module activations of several kinds, a strided conv inside a mergeable run, depthwise and
    grouped convs, non-square kernels, bias without BN, projection and identity residuals, a linear position,
    pooling (a break), and a head.
    """

    def __init__(self, in_ch=3, num_classes=10):
        super().__init__()
        self.stem = ConvBN(in_ch, 16, 3)
        self.c1 = nn.Conv2d(16, 16, (3, 1), padding=(1, 0), bias=True)  # non-square, bias, no BN
        self.c2 = ConvBN(16, 16, (1, 3))
        self.down = ConvBN(16, 24, 3, 2)  # stride inside a mergeable run
        self.dw1 = ConvBN(24, 24, 3, groups=24)
        self.dw2 = ConvBN(24, 24, 5, groups=24)
        self.g = ConvBN(24, 24, 3, groups=4)
        self.lin = ConvBN(24, 24, 1)  # followed by no activation: a linear position
        self.res1 = Residual(24, 24, act=nn.SiLU())
        self.res2 = Residual(24, 32, stride=2, act=nn.Hardswish())
        self.res3 = Residual(32, 32, act=nn.LeakyReLU(0.1), depthwise=True)
        self.pool = nn.MaxPool2d(2)
        self.tail = ConvBN(32, 32, 3)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.relu(self.c1(x))
        x = self.c2(x).relu()
        x = F.gelu(self.down(x))
        x = F.relu6(self.dw1(x))
        x = F.relu6(self.dw2(x))
        x = F.relu(self.g(x))
        x = self.lin(x)
        x = self.res3(self.res2(self.res1(x)))
        x = self.pool(x)
        x = F.relu(self.tail(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PlainStack(nn.Module):
    """conv-bn-relu x 4, max-pool, conv-bn-relu x 3: two break-delimited segments."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(*[nn.Sequential(ConvBN(3 if i == 0 else 8, 8), nn.ReLU()) for i in range(4)])
        self.pool = nn.MaxPool2d(2)
        self.b = nn.Sequential(*[nn.Sequential(ConvBN(8, 8), nn.ReLU()) for _ in range(3)])

    def forward(self, x):
        return self.b(self.pool(self.a(x)))


class TinyResNet(nn.Module):
    """Stem + two identity residual blocks + a projection block: small enough for exhaustive checks."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.r1 = Residual(8, 8)
        self.r2 = Residual(8, 8)
        self.r3 = Residual(8, 12, stride=2)

    def forward(self, x):
        return self.r3(self.r2(self.r1(F.relu(self.stem(x)))))


class NoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return F.relu(self.fc(x))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return self.conv(x)
        return x
