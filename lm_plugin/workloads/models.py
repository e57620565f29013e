"""Models of the reference workload, a model registry, and a cached "train once" helper.

``resnet_fm`` and ``mbv2_fm`` are the two networks every published number of the project is measured
on (see ``WORKLOAD.md``); ``small_cnn`` is a tiny network for tests on scikit-learn's digits.
The models are built from torchvision's own modules (``BasicBlock``, ``mobilenet_v2``), so that what
works on them works on the torchvision architectures too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models.resnet import BasicBlock

from ..data import datasets as data
from ..errors import ConfigurationError
from ..registry import Registry
from ..store.paths import checkpoint_dir
from ..train import evaluate, fit

__all__ = [
    "MODELS",
    "ModelSpec",
    "create_model",
    "default_cache_dir",
    "digits_resnet",
    "list_models",
    "mbv2_fm",
    "register_model",
    "resnet_fm",
    "small_cnn",
    "trained",
]


class ResNetFM(nn.Module):
    """Small CIFAR-style ResNet: stem, three stages of two ``BasicBlock`` s, average pool, linear.

    Attribute names follow torchvision's ResNet (``conv1``, ``bn1``, ``relu``, ``layer1`` …, ``fc``)
    so that tools written against torchvision find the same structure here.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        stages = []
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != width:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
                )
            stages.append(nn.Sequential(BasicBlock(inplanes, width, stride, downsample), BasicBlock(width, width)))
            inplanes = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_fm(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """The reference ResNet for Fashion-MNIST (≈ 0.27 M parameters).

    Stem conv3×3 (``in_chans`` → 16, stride 1) + BN + ReLU; three stages of two torchvision
    ``BasicBlock`` s with widths 16, 32, 64 (the first block of stages 2 and 3 has stride 2 and a
    1×1 conv + BN projection); global average pool; linear 64 → ``num_classes``.
    """
    return ResNetFM(num_classes=num_classes, in_chans=in_chans)


def mbv2_fm(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """The reference MobileNetV2 for Fashion-MNIST.

    ``torchvision.models.mobilenet_v2(num_classes, width_mult=0.5)`` with the stride-2 stem conv
    replaced by conv3×3(``in_chans`` → 16, stride 1, padding 1, no bias), so that 28×28 inputs keep
    enough resolution.
    """
    model = mobilenet_v2(num_classes=num_classes, width_mult=0.5)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_chans, stem.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers, a max-pool, global average pool and a linear classifier."""

    def __init__(self, in_ch: int = 1, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 32)):
        super().__init__()
        c1, c2, c3 = widths
        self.conv1 = nn.Conv2d(in_ch, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def small_cnn(in_ch: int = 1, num_classes: int = 10) -> nn.Module:
    """A tiny CNN (≈ 14 k parameters) for tests on 8×8 digits; trains to > 90 % in seconds on a CPU."""
    return SmallCNN(in_ch=in_ch, num_classes=num_classes)


class _DigitsBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + identity, then ReLU (a BasicBlock without stride or projection)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b, self.relu = _conv_bn(c, c), _conv_bn(c, c), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.b(self.relu(self.a(x))) + x)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


def digits_resnet(width: int = 32, blocks: int = 3, in_chans: int = 1, num_classes: int = 10) -> nn.Sequential:
    """A small residual CNN for 8×8 digits: stem conv, ``blocks`` identity residual blocks, pool, linear.

    Module names are positional (``"0.0"`` is the stem conv, ``"2.a.0"`` the first block's first conv), which is
    what the examples' NNI ``config_list`` s refer to.
    """
    layers: list[nn.Module] = [_conv_bn(in_chans, width), nn.ReLU()]
    layers += [_DigitsBlock(width) for _ in range(blocks)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its factory, the dataset it is trained on, and an input example shape."""

    factory: Callable[..., nn.Module]
    dataset: str
    input_shape: tuple[int, ...]


#: Workload models by name (``lm_plugin:NAME`` in the CLI); add yours with :func:`register_model`.
MODELS: Registry[ModelSpec] = Registry("workload model")


def register_model(name: str, factory: Callable[..., nn.Module], dataset: str, input_shape: tuple[int, ...]) -> None:
    """Add a model to :data:`MODELS` (``dataset`` is ``"fashion_mnist"`` or ``"digits"``)."""
    if dataset not in ("fashion_mnist", "digits"):
        raise ConfigurationError(f"dataset must be 'fashion_mnist' or 'digits', got {dataset!r}")
    MODELS.register(name, ModelSpec(factory, dataset, tuple(input_shape)))


register_model("resnet_fm", resnet_fm, "fashion_mnist", (1, 28, 28))
register_model("mbv2_fm", mbv2_fm, "fashion_mnist", (1, 28, 28))
register_model("small_cnn", small_cnn, "digits", (1, 8, 8))
register_model("digits_resnet", digits_resnet, "digits", (1, 8, 8))


def list_models() -> list[str]:
    """Names of the registered models."""
    return MODELS.names()


def _spec(name: str) -> ModelSpec:
    return MODELS[name]


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build a freshly initialised registered model, e.g. ``create_model("resnet_fm")``."""
    return _spec(name).factory(**kwargs)


def default_cache_dir() -> Path:
    """Checkpoint directory: ``<cache root>/checkpoints`` (``$LM_PLUGIN_CACHE/checkpoints`` or
    ``~/.cache/lm_plugin/checkpoints``; :mod:`lm_plugin.store.paths`)."""
    return checkpoint_dir()


def _loaders(dataset: str, data_root: str | os.PathLike[str] | None, seed: int):
    if dataset == "fashion_mnist":
        return (
            data.fashion_mnist(data_root, train=True, batch_size=128, seed=seed),
            data.fashion_mnist(data_root, train=False, batch_size=512),
        )
    return data.digits(batch_size=64, train=True, seed=seed), data.digits(batch_size=512, train=False)


def trained(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    epochs: float | None = None,
    seed: int = 0,
    data_root: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Return registered model ``name`` trained with the workload recipe, training it only once.

    The first call trains with :func:`lm_plugin.train.fit` (SGD Nesterov 0.9, weight decay 5e-4,
    OneCycle max lr 0.1; Fashion-MNIST: batch 128, 3 epochs — the workload recipe; digits: batch 64,
    30 epochs) and saves the checkpoint with its test accuracy; later calls with the same
    arguments load it.

    Args:
        name: A key of :data:`MODELS`.
        cache_dir: Checkpoint directory; defaults to :func:`default_cache_dir`.
        epochs: Training length; defaults to the recipe's (3 for Fashion-MNIST, 30 for digits).
        seed: Seed of initialisation and shuffling.
        data_root: Data directory passed to the loaders.
        progress: Show progress bars while training.

    Returns:
        The trained model in eval mode, with its test accuracy (%) in ``model.test_accuracy``.
    """
    spec = _spec(name)
    n_epochs = epochs if epochs is not None else (3.0 if spec.dataset == "fashion_mnist" else 30.0)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = directory / f"{name}_e{n_epochs:g}_s{seed}.pt"
    torch.manual_seed(seed)
    model = spec.factory()
    if path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        accuracy = float(ckpt["test_accuracy"])
    else:
        train_loader, test_loader = _loaders(spec.dataset, data_root, seed)
        fit(model, train_loader, epochs=n_epochs, max_lr=0.1, progress=progress, seed=seed)
        accuracy = evaluate(model, test_loader)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.part")
        torch.save({"state_dict": model.state_dict(), "test_accuracy": accuracy}, tmp)
        tmp.replace(path)  # atomic, so a concurrent caller never loads half a file
    model.eval()
    model.test_accuracy = accuracy  # type: ignore[assignment]
    return model
