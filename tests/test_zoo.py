"""The model zoo, CI-sized: every torchvision classifier, the timm selection and EfficientNet-Lite0 from PyPI.

The same models as ``benchmarks/coverage.py`` (:mod:`lm_plugin.workloads.zoo`), but in-process, at the smallest
input each model accepts (32x32 unless it needs more), in float64, with the identity plan and one random plan.

Each model must either

* be refused at construction with a ``LayerMergeError`` whose message is not empty, or
* merge with float64 error <= 1e-10 for every plan tried (``merge_error``), the identity plan's merged network
  matching the original model (<= 1e-10).

A wrong merge, a ``MergeError`` from ``merge`` or any other exception fails the test. Nothing is skipped or
expected to fail.

Size tiers (parameter counts with ``num_classes=10``; see :data:`LARGE` and :data:`GIANT`):

* up to ~25 M parameters: the full check, always run;
* :data:`LARGE` (~25-100 M): the full check too, marked ``slow`` (still run in CI; ``-m "not slow"`` leaves them out
  locally);
* :data:`GIANT` (over ~100 M): marked ``slow`` and checked more cheaply, because the float64 merge check needs about
  45 bytes per parameter (the trainable form, its float64 copy and the merge's own float64 copies), 6-30 GB for
  these models. The cheaper check builds the real model and its pruner (trace, chain, candidates: what would fail
  first on a new architecture), checks that a random plan is valid and that the trainable form of the identity
  plan computes what the model computes (in float32, so 1e-5), and runs the full float64 merge check on a *twin*:
  the same architecture with the part that holds the parameters made narrow (VGG: its 4096-wide classifier;
  ViT: the hidden width; RegNet/ResNet/ConvNeXt/EfficientNet: the same stages and blocks at a small width) — see
  :func:`_twin`. ``benchmarks/coverage.py --memory-gb 24`` runs the full check on the real giants.
"""

from __future__ import annotations

import gc
import traceback

import pytest
import torch
from torch import nn

from lm_plugin import LayerMergePruner, Plan
from lm_plugin.errors import LayerMergeError, MergeError
from lm_plugin.merge import merge_error, output_error
from lm_plugin.workloads.zoo import ZooModel, randomize_norms, zoo_models

pytestmark = pytest.mark.zoo  # not in the default run (pyproject addopts) until it is timed for CI

SIDE = 32
EXACT = 1e-10

#: ~25-100 M parameters (num_classes=10): full check, marked slow.
LARGE = {
    "torchvision:alexnet", "torchvision:convnext_base", "torchvision:convnext_small", "torchvision:convnext_tiny",
    "torchvision:densenet161", "torchvision:efficientnet_b5", "torchvision:efficientnet_b6",
    "torchvision:efficientnet_b7", "torchvision:efficientnet_v2_m", "torchvision:maxvit_t",
    "torchvision:regnet_x_16gf", "torchvision:regnet_x_8gf", "torchvision:regnet_y_16gf",
    "torchvision:regnet_y_8gf", "torchvision:resnet101", "torchvision:resnet152", "torchvision:resnext101_32x8d",
    "torchvision:resnext101_64x4d", "torchvision:swin_b", "torchvision:swin_s", "torchvision:swin_t",
    "torchvision:swin_v2_b", "torchvision:swin_v2_s", "torchvision:swin_v2_t", "torchvision:vit_b_16",
    "torchvision:vit_b_32", "torchvision:wide_resnet50_2",
}

#: Over ~100 M parameters: construction on the real model, the float64 merge check on a narrow twin.
GIANT = {
    "torchvision:convnext_large", "torchvision:efficientnet_v2_l", "torchvision:regnet_x_32gf",
    "torchvision:regnet_y_128gf", "torchvision:regnet_y_32gf", "torchvision:vgg11", "torchvision:vgg11_bn",
    "torchvision:vgg13", "torchvision:vgg13_bn", "torchvision:vgg16", "torchvision:vgg16_bn", "torchvision:vgg19",
    "torchvision:vgg19_bn", "torchvision:vit_h_14", "torchvision:vit_l_16", "torchvision:vit_l_32",
    "torchvision:wide_resnet101_2",
}

MODELS = zoo_models("all")


def _param(spec: ZooModel):
    marks = [pytest.mark.slow] if spec.key in LARGE | GIANT else []
    return pytest.param(spec, id=spec.key, marks=marks)


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()


# -------------------------------------------------------------------------------------------- the checks
def _check(model: nn.Module, x: torch.Tensor, label: str) -> tuple[str | None, list[str]]:
    """``(refusal message or None, failures)`` of the identity plan and ``Plan.sample(chain, 0)``.

    Everything big is freed before returning, so a failing model does not keep its memory in the traceback.
    """
    try:
        pruner = LayerMergePruner(model, 0.7, x, cache_dir=None, progress=False)
    except LayerMergeError as exc:
        return f"{type(exc).__name__}: {exc}".strip() if str(exc).strip() else "", []
    failures: list[str] = []
    for name, make in (("identity", Plan.identity), ("random0", lambda chain: Plan.sample(chain, 0))):
        captured: dict[str, nn.Module] = {}

        def merge_fn(m: nn.Module, captured=captured) -> nn.Module:
            captured["merged"] = out = pruner.merge(m)
            return out

        try:
            trainable = pruner.apply(make(pruner.chain))
            err = merge_error(trainable, merge_fn, x)
            if not err <= EXACT:
                failures.append(f"{label} plan {name}: merged network differs from its trainable form: float64 "
                                f"error {err:.2e}")
            if name == "identity":
                # merge_error merged a float64 copy: compare that float64 network with a float64 copy of the model.
                orig = output_error(model, captured["merged"], x, dtype=torch.float64)
                if not orig <= EXACT:
                    failures.append(f"{label} identity plan: merged network differs from the original model: "
                                    f"float64 error {orig:.2e}")
        except MergeError as exc:
            failures.append(f"{label} plan {name}: merge raised MergeError: {exc}")
        except Exception as exc:  # report it like a failure, after freeing the model
            failures.append(f"{label} plan {name}: {type(exc).__name__}: {exc}\n"
                            + "".join(traceback.format_exc().splitlines(True)[-8:]))
        finally:
            trainable = None
            captured.clear()
            gc.collect()
    return None, failures


def _assert(spec: ZooModel, refusal: str | None, failures: list[str]) -> None:
    if refusal is not None:
        assert refusal.strip(), f"{spec.key} was refused with an empty message"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("spec", [_param(s) for s in MODELS if s.key not in GIANT])
def test_model_is_refused_or_merges_exactly(spec: ZooModel, one_thread):
    side = spec.side(SIDE)
    model = spec.build(side)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    refusal, failures = _check(model, x, spec.key)
    del model
    gc.collect()
    _assert(spec, refusal, failures)


# ------------------------------------------------------------------------------------------------ giants
#: Builder settings of the giant RegNets (torchvision.models.regnet): depth, w_0, w_a, w_m, group width, SE ratio.
_REGNET = {
    "regnet_y_128gf": (27, 456, 160.83, 2.52, 264, 0.25),
    "regnet_y_32gf": (20, 232, 115.89, 2.53, 232, 0.25),
    "regnet_x_32gf": (23, 320, 69.86, 2.0, 168, None),
}


def _twin(spec: ZooModel, side: int) -> nn.Module:
    """A narrow model of the same architecture as the giant ``spec``: same stages, blocks, kernels, strides,
    group counts and activations; only the widths that hold the parameters are small. Public torchvision
    classes only."""
    import torchvision
    from torchvision.models import convnext, regnet, vision_transformer

    name = spec.name
    torch.manual_seed(0)
    if name.startswith("vgg"):
        model = torchvision.models.get_model(name, num_classes=10)
        # Every conv stays as it is; only the 25088-4096-4096 classifier (~120 M parameters) is made narrow.
        model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(),
                                         nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    elif name.startswith("vit_"):
        layers = {"vit_l_16": 24, "vit_l_32": 24, "vit_h_14": 32}[name]
        model = vision_transformer.VisionTransformer(image_size=side, patch_size=spec.multiple, num_layers=layers,
                                                     num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10)
    elif name in _REGNET:
        depth, w_0, w_a, w_m, group_width, se = _REGNET[name]
        full = regnet.BlockParams.from_init_params(depth=depth, w_0=w_0, w_a=w_a, w_m=w_m, group_width=group_width,
                                                   se_ratio=se)
        # Same depths, strides and group counts per stage; group widths (and so stage widths) divided by 8.
        narrow = [max(1, g // 8) for g in full.group_widths]
        widths = [w // g * n for w, g, n in zip(full.widths, full.group_widths, narrow)]
        block = regnet.BlockParams(depths=full.depths, widths=widths, group_widths=narrow,
                                   bottleneck_multipliers=full.bottleneck_multipliers, strides=full.strides,
                                   se_ratio=full.se_ratio)
        model = regnet.RegNet(block, num_classes=10)
    elif name == "convnext_large":
        cnf = convnext.CNBlockConfig  # convnext_large: 192-384-768-1536 channels, 3-3-27-3 blocks
        model = convnext.ConvNeXt([cnf(16, 32, 3), cnf(32, 64, 3), cnf(64, 128, 27), cnf(128, None, 3)],
                                  num_classes=10)
    else:
        raise KeyError(f"no twin for {spec.key}; add one to _twin")
    return randomize_norms(model, 0).eval()


@pytest.mark.slow
@pytest.mark.parametrize("spec", [pytest.param(s, id=s.key) for s in MODELS if s.key in GIANT])
def test_giant_is_refused_or_builds_and_its_twin_merges_exactly(spec: ZooModel, one_thread):
    side = spec.side(SIDE)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    model = spec.build(side)
    refused = None
    try:
        pruner = LayerMergePruner(model, 0.7, x, cache_dir=None, progress=False)
    except LayerMergeError as exc:
        refused = exc
    if refused is not None:
        del model
        gc.collect()
        assert str(refused).strip(), f"{spec.key} was refused with an empty message"
    else:
        Plan.sample(pruner.chain, 0).validate(pruner.chain)
        assert pruner.candidates, f"{spec.key}: a chain of {pruner.chain.length} convs but no candidate block"
        del model, pruner
        gc.collect()
    twin = _twin(spec, side)
    twin_refusal, failures = _check(twin, x, f"{spec.key} (twin)")
    del twin
    gc.collect()
    if refused is not None:
        assert twin_refusal is not None, f"{spec.key} is refused but its twin is not"
    _assert(spec, twin_refusal, failures)
