"""Data for a compression run: :class:`DataSplits`, named datasets, users' image folders and loaders.

* ``data_splits("fashion_mnist")`` — a registered dataset (``list_datasets()``; add yours with
  :func:`register_dataset`);
* ``image_folder("DIR", (3, 224, 224))`` — a torchvision ``ImageFolder`` tree ``DIR/train``, ``DIR/val``
  (and optionally ``DIR/test``), resized and normalised;
* ``as_data_splits(obj)`` — what your own factory returns (``DataSplits``, a dict or tuple of loaders), checked;
* ``check_model_fits(model, splits)`` — the model runs on the data's shape and its head matches the classes.

The CLI's ``--data NAME``, ``--data imagefolder:DIR`` and ``--data package.module:factory`` are these calls.
"""

from . import datasets as datasets  # registers the reference workload's datasets (digits, fashion_mnist)
from .image_folder import LAYOUT, ImageFolderLayout, check_image_folder, declared_normalization, image_folder
from .splits import (
    DATASETS,
    DataError,
    DatasetFactory,
    DataSplits,
    DataUnavailableError,
    as_data_splits,
    check_model_fits,
    data_splits,
    list_datasets,
    output_width,
    register_dataset,
    subset_loader,
)

__all__ = [
    "DATASETS",
    "LAYOUT",
    "DataError",
    "DataSplits",
    "DataUnavailableError",
    "DatasetFactory",
    "ImageFolderLayout",
    "as_data_splits",
    "check_image_folder",
    "check_model_fits",
    "data_splits",
    "declared_normalization",
    "image_folder",
    "list_datasets",
    "output_width",
    "register_dataset",
    "subset_loader",
]
