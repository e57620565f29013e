"""The model zoo, CI-sized: every torchvision classifier, the timm selection and EfficientNet-Lite0 from PyPI.

The same models as ``benchmarks/coverage.py`` (:mod:`lm_plugin.workloads.zoo`), in-process, at the smallest input
each model accepts (32x32 unless it needs more), in float64, with the identity plan and ``Plan.sample(chain, 0)``.

Each model must either

* be refused at construction with a ``LayerMergeError`` whose message is not empty, or
* merge with float64 error <= 1e-10 for every plan tried (the merge checks itself; the test compares independently
  with ``output_error``), the identity plan's merged network
  matching the original model (<= 1e-10).

A wrong merge, a ``MergeError`` from ``merge`` or any other exception fails the test. Nothing is skipped or expected
to fail. Three tiers, all run by a plain ``pytest``:

* every model not listed below (61 models, one or more of every family): the full check, about 4 minutes in all on
  a 2-core machine;
* :data:`SLOW` — the full check, marked ``slow`` because it takes longer (the bigger members of each family; measured
  times in the table, ~6.5 minutes in all); ``pytest -m "not slow"`` leaves them and the giants out;
* :data:`GIANT` — models whose float64 merge check needs more than ~5.5 GB (the trainable form, its float64 copy and
  the merge's own float64 copies and check: 40-90 bytes per parameter), marked ``slow`` and checked more cheaply:
  the real model is built and its pruner constructed (trace, chain, candidates: what fails first on a new
  architecture) and a random plan validated, then the full float64 check runs on a *twin* — the same
  architecture (stages, blocks, kernels, strides, group counts, activations) with the widths that hold the
  parameters made narrow; see :func:`_twin`. ``benchmarks/coverage.py --memory-gb 15`` runs the full check on the
  real giants (results in ``docs/coverage.md``).
"""

from __future__ import annotations

import ctypes
import gc
import traceback
from functools import partial

import pytest
import torch
from torch import nn

from lm_plugin import LayerMergePruner, Plan
from lm_plugin.errors import LayerMergeError, MergeError
from lm_plugin.merge import output_error
from lm_plugin.workloads.zoo import ZooModel, randomize_norms, zoo_models

pytestmark = pytest.mark.zoo  # registered in pyproject.toml: ``-m "not zoo"`` leaves this file out

SIDE = 32
EXACT = 1e-10

#: Full check, marked slow: seconds the check took here (`pytest --durations`, one thread, a 2-core machine shared
#: with other work). The rest (61 models) takes ~4 minutes; these ~6.5; the giants ~3.
SLOW: dict[str, float] = {
    "timm:densenet121": 6.0, "timm:dpn68": 6.0, "timm:mobileone_s0": 9.7, "timm:xception41": 9.0,
    "torchvision:convnext_base": 12.0, "torchvision:convnext_small": 6.3, "torchvision:densenet161": 9.5,
    "torchvision:densenet169": 6.6, "torchvision:densenet201": 7.1, "torchvision:efficientnet_b1": 6.5,
    "torchvision:efficientnet_b2": 6.4, "torchvision:efficientnet_b3": 9.5, "torchvision:efficientnet_b4": 16.8,
    "torchvision:efficientnet_b5": 19.6, "torchvision:efficientnet_b6": 25.1, "torchvision:efficientnet_v2_m": 25.8,
    "torchvision:efficientnet_v2_s": 11.6, "torchvision:maxvit_t": 18.5, "torchvision:mnasnet1_0": 4.2,
    "torchvision:mnasnet1_3": 6.4, "torchvision:regnet_x_16gf": 13.6, "torchvision:regnet_x_3_2gf": 5.8,
    "torchvision:regnet_x_8gf": 8.3, "torchvision:regnet_y_16gf": 13.4, "torchvision:regnet_y_1_6gf": 5.0,
    "torchvision:regnet_y_3_2gf": 6.6, "torchvision:regnet_y_8gf": 9.5, "torchvision:resnet101": 7.4,
    "torchvision:resnet152": 14.6, "torchvision:resnet34": 4.5, "torchvision:resnext101_32x8d": 16.2,
    "torchvision:resnext101_64x4d": 16.1, "torchvision:swin_b": 3.7, "torchvision:swin_s": 3.5,
    "torchvision:swin_v2_b": 3.9, "torchvision:swin_v2_s": 3.8, "torchvision:vit_l_16": 4.8,
    "torchvision:vit_l_32": 5.4, "torchvision:wide_resnet50_2": 13.2,
}

#: Construction on the real model, the float64 merge check on a narrow twin: peak memory (GB) the full check took
#: in-process (``regnet_y_128gf``: over 15 GB, out of memory). These tests take 6-25 s each, ~3 minutes in all.
GIANT: dict[str, float] = {
    "torchvision:convnext_large": 7.8, "torchvision:efficientnet_b7": 5.8, "torchvision:efficientnet_v2_l": 8.0,
    "torchvision:regnet_x_32gf": 6.0, "torchvision:regnet_y_128gf": 15.5, "torchvision:regnet_y_32gf": 6.8,
    "torchvision:vgg11": 7.6, "torchvision:vgg11_bn": 7.6, "torchvision:vgg13": 7.5, "torchvision:vgg13_bn": 7.6,
    "torchvision:vgg16": 7.5, "torchvision:vgg16_bn": 7.5, "torchvision:vgg19": 7.5, "torchvision:vgg19_bn": 6.7,
    "torchvision:vit_h_14": 6.3, "torchvision:wide_resnet101_2": 5.9,
}

MODELS = zoo_models("all")


def _trim() -> None:
    """Free the model's memory and hand it back to the OS (glibc keeps freed heap otherwise, and one big model
    would leave the process at its peak for the rest of the session)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    _trim()


# -------------------------------------------------------------------------------------------- the checks
def _check(model: nn.Module, x: torch.Tensor, label: str) -> tuple[str | None, list[str]]:
    """``(refusal message or None, failures)`` of the identity plan and ``Plan.sample(chain, 0)``.

    Everything big is freed before returning, so a failing model does not keep its memory in the traceback.
    """
    model, x = model.double(), x.double()  # float64 end to end: anything above ~1e-12 is a real mismatch
    try:
        pruner = LayerMergePruner(model, 0.7, x, cache_dir=None, progress=False)
    except LayerMergeError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc).strip() else "", []
    failures: list[str] = []
    for name, make in (("identity", Plan.identity), ("random0", lambda chain: Plan.sample(chain, 0))):
        trainable = merged = None
        try:
            trainable = pruner.apply(make(pruner.chain))
            merged = pruner.merge(trainable)  # checks itself; the comparison below is independent of that check
            err = output_error(trainable, merged, x, dtype=torch.float64)
            if not err <= EXACT:
                failures.append(f"{label} plan {name}: merged network differs from its trainable form: float64 "
                                f"error {err:.2e}")
            if name == "identity":
                orig = output_error(model, merged, x, dtype=torch.float64)
                if not orig <= EXACT:
                    failures.append(f"{label} identity plan: merged network differs from the original model: "
                                    f"float64 error {orig:.2e}")
        except MergeError as exc:
            failures.append(f"{label} plan {name}: merge raised MergeError: {exc}")
        except Exception as exc:  # reported like a failure, once the memory is freed
            tail = "".join(traceback.format_exc().splitlines(True)[-8:])
            failures.append(f"{label} plan {name}: {type(exc).__name__}: {exc}\n{tail}")
        finally:
            del trainable, merged
            _trim()
    pruner = None  # the merge closures hold it until here
    return None, failures


def _assert(key: str, refusal: str | None, failures: list[str]) -> None:
    if refusal is not None:
        assert refusal.strip(), f"{key} was refused with an empty message"
    assert not failures, "\n".join(failures)


def _example(side: int) -> torch.Tensor:
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))


def _param(spec: ZooModel):
    return pytest.param(spec, id=spec.key, marks=[pytest.mark.slow] if spec.key in SLOW else [])


@pytest.mark.parametrize("spec", [_param(s) for s in MODELS if s.key not in GIANT])
def test_model_is_refused_or_merges_exactly(spec: ZooModel, one_thread):
    side = spec.side(SIDE)
    model = spec.build(side)
    refusal, failures = _check(model, _example(side), spec.key)
    del model
    _trim()
    _assert(spec.key, refusal, failures)


# ------------------------------------------------------------------------------------------------ giants
#: Builder settings of the giant RegNets (torchvision.models.regnet): depth, w_0, w_a, w_m, group width, SE ratio.
_REGNET = {
    "regnet_y_128gf": (27, 456, 160.83, 2.52, 264, 0.25),
    "regnet_y_32gf": (20, 232, 115.89, 2.53, 232, 0.25),
    "regnet_x_32gf": (23, 320, 69.86, 2.0, 168, None),
}
# torchvision's EfficientNet tables: (expand, kernel, stride, in, out, layers); F = FusedMBConv.
_EFFNET_B = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
             (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
_EFFNET_V2_L = [("F", 1, 3, 1, 32, 32, 4), ("F", 4, 3, 2, 32, 64, 7), ("F", 4, 3, 2, 64, 96, 7),
                ("M", 4, 3, 2, 96, 192, 10), ("M", 6, 3, 1, 192, 224, 19), ("M", 6, 3, 2, 224, 384, 25),
                ("M", 6, 3, 1, 384, 640, 7)]


def _twin(spec: ZooModel, side: int) -> nn.Module:
    """A narrow model of the same architecture as the giant ``spec``: same stages, blocks, kernels, strides, group
    counts and activations; only the widths that hold the parameters are small. Public torchvision classes only."""
    import torchvision
    from torchvision.models import convnext, efficientnet, regnet, resnet, vision_transformer

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
    elif name == "wide_resnet101_2":
        # Same stages and blocks; the bottleneck width (128 per group in wide_resnet101_2) made 16.
        model = resnet.ResNet(resnet.Bottleneck, [3, 4, 23, 3], num_classes=10, width_per_group=16)
    elif name == "efficientnet_b7":
        # efficientnet_b7 is the b0 table at width 2.0, depth 3.1: same depth at width 0.25.
        cfg = partial(efficientnet.MBConvConfig, width_mult=0.25, depth_mult=3.1)
        model = efficientnet.EfficientNet([cfg(*row) for row in _EFFNET_B], 0.5, num_classes=10,
                                          norm_layer=partial(nn.BatchNorm2d, eps=0.001, momentum=0.01))
    elif name == "efficientnet_v2_l":
        kinds = {"F": efficientnet.FusedMBConvConfig, "M": efficientnet.MBConvConfig}
        eighth = lambda c: -(-c // 64) * 8  # noqa: E731 - a width / 8, rounded up to a multiple of 8
        rows = [kinds[k](e, ks, s, eighth(i), eighth(o), n) for k, e, ks, s, i, o, n in _EFFNET_V2_L]
        model = efficientnet.EfficientNet(rows, 0.4, num_classes=10, last_channel=160,
                                          norm_layer=partial(nn.BatchNorm2d, eps=1e-03))
    else:
        raise KeyError(f"no twin for {spec.key}; add one to _twin")
    return randomize_norms(model, 0).eval()


@pytest.mark.slow
@pytest.mark.parametrize("spec", [pytest.param(s, id=s.key) for s in MODELS if s.key in GIANT])
def test_giant_is_refused_or_builds_and_its_twin_merges_exactly(spec: ZooModel, one_thread):
    side = spec.side(SIDE)
    x = _example(side)
    model = spec.build(side)
    refusal = None
    try:
        pruner = LayerMergePruner(model, 0.7, x, cache_dir=None, progress=False)
    except LayerMergeError as exc:
        refusal = f"{type(exc).__name__}: {exc}" if str(exc).strip() else ""
    else:
        Plan.sample(pruner.chain, 0).validate(pruner.chain)
        assert pruner.candidates, f"{spec.key}: a chain of {pruner.chain.length} convs but no candidate block"
        del pruner
    del model
    _trim()
    _assert(spec.key, refusal, [])
    twin = _twin(spec, side)
    twin_refusal, failures = _check(twin, x, f"{spec.key} (twin)")
    del twin
    _trim()
    if refusal is None:
        assert twin_refusal is None, f"{spec.key} is accepted but its twin is refused: {twin_refusal}"
    _assert(f"{spec.key} (twin)", twin_refusal, failures)
