"""Data loaders of the reference workload (Fashion-MNIST) and of the test workload (scikit-learn digits).

Both datasets are small enough to be held as one normalised tensor in memory, which makes a CPU
epoch several times faster than decoding PIL images item by item.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..errors import ConfigurationError
from ..store.paths import data_root

# DataSplits, the registry and DataUnavailableError live in lm_plugin.data; the names stay importable from here.
from .splits import DATASETS, DataSplits, DataUnavailableError, data_splits, register_dataset

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "DataSplits",
    "DataUnavailableError",
    "data_splits",
    "default_data_root",
    "digits",
    "digits_image_folder",
    "digits_tensors",
    "fashion_mnist",
    "fashion_mnist_tensors",
    "register_dataset",
]

FASHION_MNIST_MEAN = 0.286
FASHION_MNIST_STD = 0.353
#: Where Debian's ``dataset-fashion-mnist`` package installs the original gzip files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FM_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def default_data_root() -> Path:
    """Return the data directory: ``$LM_PLUGIN_DATA`` or ``<cache root>/data`` (:mod:`lm_plugin.store.paths`)."""
    return data_root()


def _raw_dir(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"


def _stage_debian_copy(root: Path) -> bool:
    """Unpack the Debian package's gzip files where torchvision looks for raw files.

    torchvision's own download path cannot be used on these files: Debian recompressed them, so
    their md5 sums differ from the ones torchvision checks.
    """
    raw = _raw_dir(root)
    if all((raw / name).is_file() for name in _FM_FILES):
        return True
    sources = [DEBIAN_FASHION_MNIST_DIR / f"{name}.gz" for name in _FM_FILES]
    if not all(src.is_file() for src in sources):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in zip(_FM_FILES, sources):
        dst = raw / name
        if dst.is_file():
            continue
        tmp = dst.with_suffix(f".{os.getpid()}.part")  # per process: two processes may stage at once
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        tmp.replace(dst)  # atomic: a concurrent reader never sees a half-written file
    return True


def fashion_mnist_tensors(root: str | os.PathLike[str] | None = None, train: bool = True) -> TensorDataset:
    """Load a Fashion-MNIST split as one normalised in-memory ``TensorDataset``.

    Sources, in order: files already under ``<root>/FashionMNIST/raw``; Debian's
    ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``), unpacked into
    ``root``; torchvision's download.

    Args:
        root: Data directory; defaults to :func:`default_data_root`.
        train: The 60,000-image training split, or the 10,000-image test split.

    Returns:
        A dataset of ``(image, label)`` with images ``(1, 28, 28)`` float32 normalised by mean
        0.286 and std 0.353.

    Raises:
        DataUnavailableError: If no source works, with instructions to obtain the data.
    """
    from torchvision.datasets import FashionMNIST

    root_path = Path(root).expanduser() if root is not None else default_data_root()
    if _stage_debian_copy(root_path):
        ds = FashionMNIST(str(root_path), train=train, download=False)
    else:
        try:
            ds = FashionMNIST(str(root_path), train=train, download=True)
        except Exception as exc:
            raise DataUnavailableError(
                f"Fashion-MNIST is not available under {root_path} and could not be downloaded "
                f"({type(exc).__name__}: {exc}). Either install the Debian package "
                "(`apt-get install dataset-fashion-mnist`, files land in "
                f"{DEBIAN_FASHION_MNIST_DIR}), or place the four unpacked idx files "
                f"{', '.join(_FM_FILES)} in {_raw_dir(root_path)}, or set LM_PLUGIN_DATA to a "
                "directory that already holds them."
            ) from exc
    images = ds.data.unsqueeze(1).float().div_(255.0)
    images = images.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return TensorDataset(images, ds.targets.long().clone())


def _loader(
    dataset: TensorDataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool, num_workers: int
) -> DataLoader:
    if batch_size < 1:
        raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=num_workers,
    )


def fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    train: bool = True,
    batch_size: int = 128,
    *,
    shuffle: bool | None = None,
    seed: int = 0,
    subset: int | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """Fashion-MNIST loader of the reference workload (see :func:`fashion_mnist_tensors`).

    Args:
        root: Data directory; defaults to ``$LM_PLUGIN_DATA`` or ``~/.cache/lm_plugin/data``.
        train: Training split (60,000 images) or test split (10,000).
        batch_size: Images per batch.
        shuffle: Shuffle every epoch; defaults to ``train``.
        seed: Seed of the shuffling generator and of ``subset`` selection.
        subset: If given, a fixed random subset of this many images (for calibration sets).
        drop_last: Drop the last incomplete batch.
        num_workers: DataLoader worker processes (0 is fastest for in-memory tensors).

    Returns:
        A ``DataLoader`` yielding ``(images, labels)``.
    """
    dataset = fashion_mnist_tensors(root, train)
    if subset is not None:
        dataset = _subset(dataset, subset, seed)
    return _loader(dataset, batch_size, train if shuffle is None else shuffle, seed, drop_last, num_workers)


def _subset(dataset: TensorDataset, size: int, seed: int) -> TensorDataset:
    n = len(dataset)
    if not 1 <= size <= n:
        raise ConfigurationError(f"subset must be in [1, {n}], got {size}")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
    return TensorDataset(*(t[idx] for t in dataset.tensors))


def digits_tensors(train: bool = True, test_fraction: float = 0.25, split_seed: int = 0) -> TensorDataset:
    """scikit-learn's 1,797 8×8 handwritten digits as a normalised ``TensorDataset``.

    The train/test split is stratified and fixed by ``split_seed``; normalisation uses the training
    split's mean and standard deviation, so both splits are scaled identically.

    Args:
        train: Return the training split (default) or the held-out test split.
        test_fraction: Fraction of images held out for testing.
        split_seed: Seed of the split.

    Returns:
        A dataset of ``(image (1, 8, 8) float32, label int64)``.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dev dependency
        raise DataUnavailableError("digits() needs scikit-learn: pip install scikit-learn") from exc

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=test_fraction, random_state=split_seed, stratify=bunch.target
    )
    x_train = x[idx_train]
    mean, std = x_train.mean(), x_train.std()
    idx = idx_train if train else idx_test
    return TensorDataset((x[idx] - mean) / std, y[idx])


def digits(
    batch_size: int = 64,
    train: bool = True,
    *,
    shuffle: bool | None = None,
    seed: int = 0,
    split_seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """Loader over scikit-learn's digits (1×8×8 images, 10 classes), for fast tests on real data.

    Args:
        batch_size: Images per batch.
        train: Training split (1,347 images) or test split (450 images).
        shuffle: Shuffle every epoch; defaults to ``train``.
        seed: Seed of the shuffling generator.
        split_seed: Seed of the fixed, stratified train/test split.
        drop_last: Drop the last incomplete batch.

    Returns:
        A ``DataLoader`` yielding ``(images, labels)``.
    """
    dataset = digits_tensors(train=train, split_seed=split_seed)
    return _loader(dataset, batch_size, train if shuffle is None else shuffle, seed, drop_last, 0)


def digits_image_folder(
    root: str | os.PathLike[str], size: int = 16, per_class: tuple[int, int, int] = (60, 20, 20)
) -> Path:
    """Write scikit-learn's digits as an ``ImageFolder`` tree of PNGs: ``root/{train,val,test}/<digit>/<n>.png``.

    A real image folder to try ``lm_plugin.data.image_folder`` (``--data imagefolder:DIR``) offline; the images are
    upscaled from 8×8 to ``size``×``size`` grayscale.

    Args:
        root: Folder to write into (created; existing files of the same names are replaced).
        size: Side of the written images.
        per_class: Images per class in train, val and test (at most 174 in all: the rarest digit's count); a test
            count of 0 writes no ``test/`` folder.

    Returns:
        ``root`` as a ``Path``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dev dependency
        raise DataUnavailableError("digits_image_folder() needs scikit-learn: pip install scikit-learn") from exc
    from PIL import Image

    bunch = load_digits()
    if min(per_class) < 0 or sum(per_class) > min(int((bunch.target == c).sum()) for c in range(10)):
        raise ConfigurationError(f"per_class {per_class}: give counts >= 0 that sum to at most 174 per digit")
    out = Path(root)
    for digit in range(10):
        images = bunch.images[bunch.target == digit]  # values 0..16
        start = 0
        for split, count in zip(("train", "val", "test"), per_class):
            if count == 0:
                continue
            folder = out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images[start:start + count]):
                pixels = (image * (255 / 16)).round().astype("uint8")
                Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).save(folder / f"{i}.png")
            start += count
    return out


def _fashion_mnist_splits(root: str | os.PathLike[str] | None, batch_size: int, val_size: int, seed: int) -> DataSplits:
    return DataSplits(
        fashion_mnist(root, train=True, batch_size=batch_size, seed=seed),
        fashion_mnist(root, train=True, batch_size=512, shuffle=False, subset=val_size, seed=seed),
        fashion_mnist(root, train=False, batch_size=512),
        (1, 28, 28),
        num_classes=10,
        notes=(f"importance scored on {val_size} training images; accuracy reported on the 10,000 test images",),
    )


def _digits_splits(root: str | os.PathLike[str] | None, batch_size: int, val_size: int, seed: int) -> DataSplits:
    train = digits_tensors(train=True)
    return DataSplits(
        digits(batch_size, train=True, seed=seed),
        _loader(_subset(train, min(val_size, len(train)), seed), 512, False, seed, False, 0),
        digits(512, train=False),
        (1, 8, 8),
        num_classes=10,
        notes=(f"importance scored on {min(val_size, len(train))} training images; accuracy reported on the "
               "held-out test split",),
    )


register_dataset("fashion_mnist", _fashion_mnist_splits)
register_dataset("digits", _digits_splits)
