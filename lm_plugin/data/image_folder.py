"""Users' own images on disk: a torchvision ``ImageFolder`` tree with ``train/``, ``val/`` and an optional ``test/``.

The layout is checked before any image is decoded (missing splits, empty classes, class folders that differ between
splits), so a wrong folder fails in a second with the expected layout instead of after the model has been traced.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .splits import DataError, DataSplits, subset_loader

__all__ = ["LAYOUT", "ImageFolderLayout", "check_image_folder", "image_folder"]

LAYOUT = (
    "expected layout: DIR/train/<class>/<image> and DIR/val/<class>/<image> (required), DIR/test/<class>/<image> "
    "(optional; without it the accuracy is reported on val), the same class folders in every split"
)


@dataclass(frozen=True)
class ImageFolderLayout:
    """What :func:`check_image_folder` found: the splits present and their (common) classes."""

    root: Path
    splits: tuple[str, ...]  # ("train", "val") or ("train", "val", "test")
    classes: tuple[str, ...]


def _extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return tuple(IMG_EXTENSIONS)


def _has_image(folder: str, extensions: tuple[str, ...]) -> bool:
    # ImageFolder finds images anywhere below a class folder; stop at the first one (the check stays cheap).
    for _, _, files in os.walk(folder, followlinks=True):
        if any(name.lower().endswith(extensions) for name in files):
            return True
    return False


def check_image_folder(root: str | os.PathLike[str]) -> ImageFolderLayout:
    """Check an image folder's layout without decoding images.

    Raises:
        DataError: ``root``, ``root/train`` or ``root/val`` missing, a split without class folders, a class folder
            without images, or splits whose class folders differ; the message names them and the expected layout.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"image folder {str(base)!r} does not exist; {LAYOUT}")
    missing = [s for s in ("train", "val") if not (base / s).is_dir()]
    if missing:
        raise DataError(f"image folder {str(base)!r} has no {' and no '.join(f'{s}/' for s in missing)} folder; "
                        f"{LAYOUT}")
    splits = ("train", "val", "test") if (base / "test").is_dir() else ("train", "val")
    extensions = _extensions()
    found: dict[str, tuple[str, ...]] = {}
    for split in splits:
        with os.scandir(base / split) as entries:
            classes = tuple(sorted(e.name for e in entries if e.is_dir()))
        if not classes:
            raise DataError(f"{str(base / split)!r} has no class folders (images must sit in one folder per "
                            f"class); {LAYOUT}")
        empty = [c for c in classes if not _has_image(str(base / split / c), extensions)]
        if empty:
            raise DataError(f"class folder(s) {', '.join(empty[:8])}{' ...' if len(empty) > 8 else ''} in "
                            f"{str(base / split)!r} hold no images ({', '.join(extensions)}): add images or remove "
                            "the folder from every split")
        found[split] = classes
    for split in splits[1:]:
        if found[split] != found["train"]:
            lacks = sorted(set(found["train"]) - set(found[split]))
            extra = sorted(set(found[split]) - set(found["train"]))
            raise DataError(f"the class folders of {split}/ differ from train/'s"
                            + (f"; {split}/ lacks {', '.join(lacks[:8])}" if lacks else "")
                            + (f"; {split}/ has {', '.join(extra[:8])} that train/ lacks" if extra else "")
                            + ": labels are numbered by sorted class folder name, so every split needs the same ones")
    return ImageFolderLayout(base, splits, found["train"])


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise DataError(f"images are read with input shape C,H,W and C 1 (grayscale) or 3 (RGB), got "
                        f"{','.join(map(str, shape))}: pass e.g. --input-shape 3,224,224 or 1,28,28")
    return shape  # type: ignore[return-value]


def _check_normalize(normalize: tuple[Sequence[float], Sequence[float]], channels: int) -> tuple[list[float], ...]:
    try:
        mean, std = ([float(v) for v in values] for values in normalize)
    except (TypeError, ValueError):
        raise DataError(f"normalisation {normalize!r} is not (mean, std) as numbers: give one mean and one std per "
                        "channel, e.g. --normalize 0.5,0.5,0.5:0.25,0.25,0.25") from None
    mean, std = (v * channels if len(v) == 1 else v for v in (mean, std))
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise DataError(f"normalisation mean {mean} std {std} does not fit {channels}-channel images: give "
                        f"{channels} means and {channels} positive stds (or one of each for all channels)")
    return mean, std


#: ``normalize=`` values that are not statistics: compute them from the training images, or leave pixels in [0, 1].
FROM_DATA, NO_NORMALIZATION = "data", "none"
Normalization = tuple[Sequence[float], Sequence[float]] | str | None


def declared_normalization(model: torch.nn.Module | None) -> tuple[list[float], list[float], str] | None:
    """The input statistics a model declares it was trained with, and where they were found, or None.

    timm models carry them in ``pretrained_cfg`` (``default_cfg`` in older timm): ImageNet's for most. A user who
    trained a timm model with timm's transforms normalised with exactly these. A torchvision classifier declares
    them through its architecture's weights (``weights.transforms()``, what torchvision's recipes train with).
    """
    for attribute in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attribute, None)
        if isinstance(cfg, dict) and cfg.get("mean") is not None and cfg.get("std") is not None:
            return [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]], f"the model's {attribute}"
    return _torchvision_normalization(model)


def _torchvision_normalization(model: torch.nn.Module | None) -> tuple[list[float], list[float], str] | None:
    """The statistics of the weights torchvision publishes for the model's architecture (same module)."""
    module = type(model).__module__
    if model is None or not module.startswith("torchvision.models."):
        return None
    import torchvision

    for name in torchvision.models.list_models(module=torchvision.models):
        weights = torchvision.models.get_model_weights(name)
        if weights.__module__ == module:
            transform = weights.DEFAULT.transforms()
            return ([float(v) for v in transform.mean], [float(v) for v in transform.std],
                    f"the transforms of torchvision's {type(model).__name__} weights")
    return None


def _channel_stats(dataset: torch.utils.data.Dataset, images: int, seed: int) -> tuple[list[float], list[float]]:
    sample = subset_loader(DataLoader(dataset, batch_size=64), images, seed)
    total, squares, count = 0.0, 0.0, 0
    for x, _ in sample:  # x: (B, C, H, W) in [0, 1]
        total = total + x.double().sum(dim=(0, 2, 3))
        squares = squares + x.double().pow(2).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (squares / count - mean.pow(2)).clamp_min(0).sqrt()
    if float(std.min()) < 1e-6:
        raise DataError("a channel of the sampled training images is constant, so it cannot be normalised by its "
                        "std: pass the normalisation explicitly (--normalize MEAN,...:STD,...)")
    return mean.tolist(), std.tolist()


def image_folder(
    root: str | os.PathLike[str],
    input_shape: Sequence[int],
    *,
    normalize: Normalization = None,
    model: torch.nn.Module | None = None,
    batch_size: int = 128,
    eval_batch_size: int | None = None,
    val_size: int = 2000,
    seed: int = 0,
    stats_images: int = 500,
    num_workers: int = 0,
) -> DataSplits:
    """Loaders over an ``ImageFolder`` tree: ``root/train``, ``root/val`` and optionally ``root/test``.

    Images are resized to ``input_shape`` (``C,H,W``; ``C`` = 1 reads them as grayscale, 3 as RGB) and normalised
    per channel. With ``root/test``, importance is scored on (up to ``val_size`` images of) ``root/val`` and the
    accuracy reported on ``root/test``; without it, the accuracy is reported on ``root/val`` and importance is
    scored on ``val_size`` images of ``root/train``, so the reported images stay unseen. ``notes`` of the result
    says which, and the normalisation used.

    Args:
        root: The folder holding ``train/`` and ``val/`` (and ``test/``), one sub-folder per class in each.
        input_shape: ``(C, H, W)`` of the model's input.
        normalize: ``(mean, std)`` per channel (or one value each) — the statistics the model was trained with;
            ``"data"``: computed on ``stats_images`` training images; ``"none"``: pixels stay in [0, 1]. None: what
            ``model`` declares (:func:`declared_normalization`: timm's ``pretrained_cfg``); a model that declares
            nothing needs one of the others, since evaluating it on inputs normalised otherwise than it was
            trained measures another function.
        model: the model the data is for (only read for its declared normalisation).
        batch_size: Batch size of the (shuffled) training loader.
        eval_batch_size: Batch size of the other loaders (default ``batch_size``).
        val_size: At most this many images are scored for importance.
        seed: Seed of the shuffling, of the importance subset and of the statistics sample.
        stats_images: Training images the normalisation statistics are computed on.
        num_workers: DataLoader worker processes (images are decoded per item).

    Raises:
        DataError: a bad layout (see :func:`check_image_folder`), shape or normalisation; the message says what to do.
    """
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    channels, height, width = _check_shape(input_shape)
    layout = check_image_folder(root)
    if batch_size < 1 or val_size < 1 or stats_images < 1:
        raise DataError(f"batch_size, val_size and stats_images must be positive, got {batch_size}, {val_size}, "
                        f"{stats_images}")
    steps = [transforms.Resize((height, width))]
    if channels == 1:
        steps.append(transforms.Grayscale(num_output_channels=1))
    steps.append(transforms.ToTensor())
    declared = declared_normalization(model) if normalize is None else None
    if normalize is None and declared is None:
        raise DataError(
            "which normalisation was the model trained with? It declares none: pass the statistics you trained "
            "with (--normalize MEAN,...:STD,..., e.g. 0.485,0.456,0.406:0.229,0.224,0.225 for ImageNet's; "
            "normalize=(mean, std) in Python), or 'data' to compute them from the training images, or 'none' for "
            "pixels in [0, 1]")
    if declared is not None:
        mean, std, source = declared
        if len(mean) != channels and len(set(mean)) > 1:
            raise DataError(f"{source} declares {len(mean)}-channel statistics (mean {_fmt(mean)}) but the images are "
                            f"{channels}-channel: pass the normalisation you trained with (--normalize MEAN:STD)")
        mean, std = _check_normalize((mean[:1], std[:1]) if len(mean) != channels else (mean, std), channels)
        how = f"declared by {source}"
    elif normalize == FROM_DATA:
        plain = ImageFolder(str(layout.root / "train"), transforms.Compose(steps))
        mean, std = _channel_stats(plain, stats_images, seed)
        how = f"computed on {min(stats_images, len(plain))} training images, as asked"
    elif normalize == NO_NORMALIZATION:
        mean, std, how = [0.0] * channels, [1.0] * channels, "none: pixels in [0, 1]"
    else:
        mean, std = _check_normalize(normalize, channels)  # type: ignore[arg-type]
        how = "given"
    transform = transforms.Compose([*steps, transforms.Normalize(mean, std)])
    sets = {split: ImageFolder(str(layout.root / split), transform) for split in layout.splits}
    eval_bs = eval_batch_size or batch_size
    train = DataLoader(sets["train"], batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed), num_workers=num_workers)
    loaders = {s: DataLoader(d, batch_size=eval_bs, shuffle=False, num_workers=num_workers) for s, d in sets.items()}
    if "test" in sets:
        scored, reported = subset_loader(loaders["val"], val_size, seed), loaders["test"]
        where = f"importance scored on {min(val_size, len(sets['val']))} images of val/, accuracy reported on test/"
    else:
        scored, reported = subset_loader(loaders["train"], val_size, seed), loaders["val"]
        where = (f"no test/ folder: accuracy reported on val/; importance scored on "
                 f"{min(val_size, len(sets['train']))} images of train/")
    counts = ", ".join(f"{s}/ {len(d)}" for s, d in sets.items())
    return DataSplits(
        train, scored, reported, (channels, height, width), num_classes=len(layout.classes), classes=layout.classes,
        test_name="test" if "test" in sets else "val",
        notes=(f"{layout.root}: {len(layout.classes)} classes; images {counts}", where,
               f"resized to {height}×{width}, {'grayscale' if channels == 1 else 'RGB'}; normalised with mean "
               f"{_fmt(mean)} std {_fmt(std)} ({how})"),
    )


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
