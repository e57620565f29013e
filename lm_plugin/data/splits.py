"""The data a compression run needs (:class:`DataSplits`), named datasets, and checking users' loaders and models.

A run scores importance on one split and reports accuracy on another; :class:`DataSplits` says which is which, so
that a report never passes off importance images as held-out ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..errors import LayerMergeError
from ..registry import Registry

__all__ = [
    "DATASETS",
    "DataError",
    "DataSplits",
    "DataUnavailableError",
    "DatasetFactory",
    "as_data_splits",
    "check_model_fits",
    "data_splits",
    "list_datasets",
    "output_width",
    "register_dataset",
    "subset_loader",
]

#: The expected return value of a user's data factory, shown in every message about one.
SPLITS_FORM = (
    "return a lm_plugin.data.DataSplits, a dict {'train': loader, 'val': loader[, 'test': loader]} or a tuple "
    "(train, val[, test]) of DataLoaders yielding (images, labels) batches"
)


class DataError(LayerMergeError, ValueError):
    """Data that cannot be used as given (layout, shapes, classes); the message says what to change."""


class DataUnavailableError(LayerMergeError, RuntimeError):
    """A dataset is neither cached, installed from a system package, nor downloadable."""


@dataclass(frozen=True)
class DataSplits:
    """The three loaders a compression run needs, plus the input shape of one example.

    Attributes:
        train: Shuffled training loader (fine-tuning, importance adaptation).
        val: The images importance is scored on: a held-out validation split, or a fixed subset of the
            *training* split, so that the images of the reported accuracy stay unseen until the end.
        test: The images of the reported accuracy (the split named by ``test_name``).
        input_shape: Shape of one example, without the batch dimension, e.g. ``(1, 28, 28)``.
        num_classes: Number of classes, where known (checked against the model's head).
        classes: Class names, where known (e.g. an image folder's class folders).
        test_name: Which split the reported accuracy is on: ``"test"``, or ``"val"`` for data without a test split.
        notes: Where each split comes from and how it was prepared, one line each (logged and reported).
    """

    train: Iterable[Any]
    val: Iterable[Any]
    test: Iterable[Any]
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    classes: tuple[str, ...] | None = None
    test_name: str = "test"
    notes: tuple[str, ...] = ()


#: ``factory(root, batch_size, val_size, seed) -> DataSplits`` of a named dataset.
DatasetFactory = Callable[[str | os.PathLike[str] | None, int, int, int], DataSplits]

def _identifier(name: str, _factory: object) -> None:
    if not name.isidentifier():
        raise DataError(f"dataset name {name!r} must be an identifier (letters, digits, _), so that a --data value "
                        "with a colon stays a data spec")


#: Named datasets (``--data NAME``); add yours with :func:`register_dataset`. The reference workload's
#: (``digits``, ``fashion_mnist``) are registered by :mod:`lm_plugin.data.datasets` on the first lookup.
DATASETS: Registry[DatasetFactory] = Registry("dataset", builtins=("lm_plugin.data.datasets",), check=_identifier)


def register_dataset(name: str, factory: DatasetFactory) -> None:
    """Make ``factory(root, batch_size, val_size, seed) -> DataSplits`` available as ``--data name``.

    Raises:
        DataError: the name is not an identifier.
        ConfigurationError: another factory has that name.
    """
    DATASETS.register(name, factory)


def list_datasets() -> list[str]:
    """Names of the registered datasets (the built-in ``digits`` and ``fashion_mnist`` included)."""
    return DATASETS.names()


def data_splits(
    name: str, root: str | os.PathLike[str] | None = None, *, batch_size: int = 128, val_size: int = 2000,
    seed: int = 0,
) -> DataSplits:
    """Train / importance / test loaders of a registered dataset, e.g. ``data_splits("fashion_mnist")``.

    Raises:
        KeyError: unknown dataset name (the message lists the known ones).
        DataUnavailableError: the data cannot be found or downloaded (the message says how to get it).
    """
    return DATASETS[name](root, batch_size, val_size, seed)


def subset_loader(loader: DataLoader, size: int, seed: int = 0, batch_size: int | None = None) -> DataLoader:
    """A fixed random subset of ``size`` examples of a map-style loader's dataset, in a fixed order.

    Raises:
        DataError: the loader is not a ``DataLoader`` over a map-style dataset with a length.
    """
    dataset = getattr(loader, "dataset", None)
    if not isinstance(loader, DataLoader) or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise DataError("a subset needs a DataLoader over a map-style dataset (one with __len__ and __getitem__)")
    n = len(dataset)  # type: ignore[arg-type]
    if n < 1:
        raise DataError("the training loader's dataset is empty")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(size, n)].tolist()
    return DataLoader(Subset(dataset, idx), batch_size=batch_size or loader.batch_size or 1, shuffle=False,
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers)


def _first_batch(loader: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(loader, (str, bytes, Mapping, torch.Tensor, Dataset)) or not isinstance(loader, Iterable):
        wrap = " (wrap a dataset in a torch.utils.data.DataLoader)" if isinstance(loader, Dataset) else ""
        raise DataError(f"the {name!r} loader is a {type(loader).__name__}{wrap}: {SPLITS_FORM}")
    if iter(loader) is loader:
        raise DataError(f"the {name!r} loader is a one-pass iterator, but it is read once per epoch: {SPLITS_FORM}")
    batch = next(iter(loader), None)
    if batch is None:
        raise DataError(f"the {name!r} loader yields no batches: give it a non-empty dataset (and drop_last=False "
                        "if it holds less than one batch)")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
        raise DataError(f"a batch of the {name!r} loader is a {type(batch).__name__}, not a pair of tensors "
                        f"(images, labels): {SPLITS_FORM}")
    images, labels = batch
    if images.dim() < 2 or labels.dim() != 1 or len(labels) != len(images) or labels.is_floating_point():
        raise DataError(f"a batch of the {name!r} loader holds images {tuple(images.shape)} and labels "
                        f"{tuple(labels.shape)} ({labels.dtype}): expected images (batch, C, H, W) and integer class "
                        "labels (batch,)")
    return images, labels


def as_data_splits(obj: Any, *, val_size: int = 2000, seed: int = 0, source: str = "the data factory") -> DataSplits:
    """Turn what a user's data factory returned into :class:`DataSplits`, checking it on one batch per split.

    Args:
        obj: A :class:`DataSplits` (used as given), a dict ``{"train", "val"[, "test"]}`` or a tuple
            ``(train, val[, test])`` of loaders yielding ``(images, labels)``. With a test split, importance is
            scored on ``val`` and accuracy on ``test``; without one, accuracy is on ``val`` and importance on a
            fixed subset of ``val_size`` training examples (or, for a loader that cannot be subset, on ``val`` too
            — the notes say so).
        val_size: Training examples to score importance on when there is no test split.
        seed: Seed of that subset.
        source: How to name the factory in messages.

    Raises:
        DataError: anything else, or batches that are not ``(images, labels)`` of one shape; the message shows the
            expected form.
    """
    if isinstance(obj, DataSplits):
        shape = tuple(_first_batch(obj.train, "train")[0].shape[1:])
        if shape != tuple(obj.input_shape):
            raise DataError(f"{source} says input_shape={tuple(obj.input_shape)}, but its training batches hold "
                            f"inputs of shape {shape}")
        return obj
    if isinstance(obj, Mapping):
        unknown = set(obj) - {"train", "val", "test"}
        if unknown or not {"train", "val"} <= set(obj):
            raise DataError(f"{source} returned a dict with keys {sorted(map(str, obj))}: {SPLITS_FORM}")
        train, val, test = obj["train"], obj["val"], obj.get("test")
    elif isinstance(obj, (tuple, list)) and len(obj) in (2, 3):
        train, val, test = obj[0], obj[1], (obj[2] if len(obj) == 3 else None)
    else:
        raise DataError(f"{source} returned a {type(obj).__name__}: {SPLITS_FORM}")
    shapes = {name: tuple(_first_batch(loader, name)[0].shape[1:])
              for name, loader in (("train", train), ("val", val), ("test", test)) if loader is not None}
    if len(set(shapes.values())) > 1:
        raise DataError(f"the splits of {source} hold inputs of different shapes {shapes}: give every split the "
                        "same input shape (resize in the loaders' transforms)")
    if test is not None:
        return DataSplits(train, val, test, shapes["train"],
                          notes=("importance scored on 'val', accuracy reported on 'test'",))
    try:
        scored = subset_loader(train, val_size, seed)
        note = f"no test split: accuracy reported on 'val', importance scored on {val_size} training examples"
    except DataError:
        scored = val
        note = ("no test split and the training loader cannot be subset: importance is scored on 'val', the SAME "
                "images the accuracy is reported on; return a test split to keep them apart")
    return DataSplits(train, scored, val, shapes["train"], test_name="val", notes=(note,))


def output_width(model: nn.Module, input_shape: tuple[int, ...]) -> int | None:
    """The number of outputs of the model's head, found by running it once on one zero input of ``input_shape``.

    Returns:
        ``K`` for an output of shape ``(1, K)``; ``None`` for any other output (several tensors, a feature map).

    Raises:
        DataError: the model does not run on an input of this shape (the message quotes the model's error).
    """
    was_training = model.training
    model.eval()  # batch statistics of one example are undefined
    try:
        with torch.no_grad():
            param = next(model.parameters(), None)
            x = torch.zeros(1, *input_shape, dtype=param.dtype if param is not None else torch.float32,
                            device=param.device if param is not None else None)
            out = model(x)
    except Exception as exc:  # any failure of the user's forward means: wrong shape for this model
        raise DataError(f"the model does not run on inputs of shape {'×'.join(map(str, input_shape))} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): give the input "
                        "shape the model was built for (channels first, without the batch)") from None
    finally:
        model.train(was_training)
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 1 else None


def check_model_fits(model: nn.Module, splits: DataSplits, data_name: str = "the data") -> None:
    """Refuse a model whose head does not match the data's classes, before anything is traced or trained.

    The head's width is found by computation (:func:`output_width`); it must equal ``splits.num_classes`` where
    known, and exceed every label of one training batch otherwise.

    Raises:
        DataError: the model does not run on the data's input shape, or its head has the wrong number of outputs.
    """
    width = output_width(model, tuple(splits.input_shape))
    if width is None:
        return
    advice = ("build the model with that many outputs (e.g. torchvision:resnet18:num_classes=N, "
              "timm:NAME:num_classes=N, or your factory's argument) or give data with the model's classes")
    if splits.num_classes is not None:
        if width != splits.num_classes:
            names = f" ({', '.join(splits.classes[:12])}{', ...' if len(splits.classes) > 12 else ''})" \
                if splits.classes else ""
            raise DataError(f"the model's head has {width} outputs but {data_name} has {splits.num_classes} "
                            f"classes{names}: {advice}")
        return
    labels = _first_batch(splits.train, "train")[1]
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= width):
        raise DataError(f"{data_name} has labels {int(labels.min())}..{int(labels.max())} but the model's head has "
                        f"{width} outputs (labels 0..{width - 1}): {advice}")
