"""The reference workload (Fashion-MNIST, ``resnet_fm``, ``mbv2_fm``) and a digits workload for tests."""

from ..data.datasets import DataUnavailableError, default_data_root, digits, fashion_mnist
from .models import (
    MODELS,
    create_model,
    digits_resnet,
    list_models,
    mbv2_fm,
    register_model,
    resnet_fm,
    small_cnn,
    trained,
)

__all__ = [
    "MODELS",
    "DataUnavailableError",
    "create_model",
    "default_data_root",
    "digits",
    "digits_resnet",
    "fashion_mnist",
    "list_models",
    "mbv2_fm",
    "register_model",
    "resnet_fm",
    "small_cnn",
    "trained",
]
