"""Backend registry: names -> profiler classes, ``"auto"`` resolution, and the one-call :func:`measure`."""

from __future__ import annotations

import importlib
import os
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import ConfigurationError
from .errors import BackendUnavailableError
from .inputs import InputsLike
from .measurement import Measurement
from .profiler import Profiler

#: Picks the runtime a deployment most likely uses: ``"cuda"`` when a GPU is usable, else ``"onnxruntime"`` when it
#: is installed (the CPU runtime most users deploy with), else ``"cpu"`` (PyTorch eager).
AUTO = "auto"
#: Environment variable that says what ``"auto"`` means on this machine.
BACKEND_ENV = "LM_PLUGIN_BACKEND"
#: Short spellings accepted wherever a backend name is.
ALIASES = {"eager": "cpu", "ort": "onnxruntime", "trt": "tensorrt"}

_REGISTRY: dict[str, type[Profiler]] = {}
_P = TypeVar("_P", bound=type[Profiler])


def register_backend(cls: _P) -> _P:
    """Class decorator adding a :class:`Profiler` subclass to the registry under ``cls.name``.

    Raises:
        ValueError: if the name is empty or already taken by another class.
    """
    name = cls.name
    if not name or name == AUTO or name in ALIASES:
        raise ConfigurationError(f"{cls.__name__}.name must be a new, non-reserved backend name, got {name!r}")
    if _REGISTRY.get(name, cls) is not cls:
        raise ConfigurationError(f"latency backend {name!r} is already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def _load_builtin_backends() -> None:
    # Imported lazily: the backend modules import this one to register themselves.
    importlib.import_module(f"{__package__}.backends")


def backend_names() -> list[str]:
    """All registered backend names, whether or not they can run here."""
    _load_builtin_backends()
    return sorted(_REGISTRY)


def available_backends() -> list[str]:
    """Registered backends that can run on this machine."""
    return [name for name in backend_names() if _REGISTRY[name].is_available()]


def resolve_backend(backend: str) -> str:
    """Canonical backend name: aliases expanded; ``"auto"`` -> ``$LM_PLUGIN_BACKEND`` if set (a machine-wide
    choice, named once), else ``"cuda"`` if a GPU is usable, else ``"onnxruntime"`` if it is installed, else
    ``"cpu"``.

    The table is searched on the runtime the network will run in: eager PyTorch and ONNX Runtime reward different
    plans (ONNX Runtime fuses BN, activations and adds into its 3×3 convs; a plan searched on eager tables measured
    1.83× in eager but 0.79× in ONNX Runtime)."""
    name = backend.lower()
    if name == AUTO:
        chosen = os.environ.get(BACKEND_ENV, "").strip().lower()
        if chosen and chosen != AUTO:
            return resolve_backend(chosen)
        if torch.cuda.is_available():
            return "cuda"
        _load_builtin_backends()
        ort = _REGISTRY.get("onnxruntime")
        return "onnxruntime" if ort is not None and ort.is_available() else "cpu"
    return ALIASES.get(name, name)


def backend_class(backend: str) -> type[Profiler]:
    """The profiler class registered for ``backend`` (aliases and ``"auto"`` accepted).

    Raises:
        BackendUnavailableError: if no backend has that name.
    """
    _load_builtin_backends()
    name = resolve_backend(backend)
    if name not in _REGISTRY:
        where = f" (from ${BACKEND_ENV})" if backend.lower() == AUTO else ""
        raise BackendUnavailableError(
            f"unknown latency backend {name!r}{where}; choose one of {[AUTO, *sorted(_REGISTRY)]}"
        )
    return _REGISTRY[name]


def get_profiler(backend: str = AUTO, **settings: Any) -> Profiler:
    """Create a profiler.

    Args:
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"onnxruntime"``, ``"tensorrt"`` or another registered
            name.
        **settings: the backend's constructor arguments (``batch_size``, ``warmup``, ``repeats``, ``threads``
            ...); see the backend classes.

    Raises:
        BackendUnavailableError: if the backend is unknown or cannot run here.
    """
    return backend_class(backend)(**settings)


def measure(module: nn.Module, inputs: InputsLike, *, backend: str = AUTO, **settings: Any) -> Measurement:
    """Time ``module`` once with a throw-away profiler.

    Example:
        ```python
        m = measure(torchvision.models.resnet18(), (1, 3, 224, 224), backend="cpu", batch_size=8)
        print(f"{m.median_ms:.2f} ms ± {m.iqr_ms:.2f} on {m.device_name} ({m.threads} threads)")
        ```

    Args:
        module: the module to time.
        inputs: input shape(s) or example tensor(s); see :meth:`Profiler.measure`.
        backend: backend name, as for :func:`get_profiler`.
        **settings: profiler settings, as for :func:`get_profiler`.
    """
    return get_profiler(backend, **settings).measure(module, inputs)
