"""Backend registry: names -> profiler classes, ``"auto"`` resolution, and the one-call :func:`measure`."""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
from torch import nn

from ..errors import ConfigurationError
from ..registry import Registry
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

def _reserved(name: str, cls: type[Profiler]) -> None:
    if name == AUTO or name in ALIASES:
        raise ConfigurationError(f"{cls.__name__}.name must not be a reserved backend name ({AUTO}, "
                                 f"{', '.join(ALIASES)}), got {name!r}")


#: Latency backends by name (the built-in ones are registered by :mod:`lm_plugin.latency.backends`).
BACKENDS: Registry[type[Profiler]] = Registry("latency backend", builtins=(f"{__package__}.backends",),
                                              check=_reserved)
_P = TypeVar("_P", bound=type[Profiler])


def register_backend(cls: _P) -> _P:
    """Class decorator adding a :class:`Profiler` subclass to :data:`BACKENDS` under ``cls.name``.

    Raises:
        ConfigurationError: if the name is empty, reserved or already taken by another class.
    """
    BACKENDS.register(cls.name, cls)
    return cls


def backend_names() -> list[str]:
    """All registered backend names, whether or not they can run here."""
    return BACKENDS.names()


def available_backends() -> list[str]:
    """Registered backends that can run on this machine."""
    return [name for name in backend_names() if BACKENDS[name].is_available()]


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
        ort = BACKENDS.get("onnxruntime")
        return "onnxruntime" if ort is not None and ort.is_available() else "cpu"
    return ALIASES.get(name, name)


def backend_class(backend: str) -> type[Profiler]:
    """The profiler class registered for ``backend`` (aliases and ``"auto"`` accepted).

    Raises:
        BackendUnavailableError: if no backend has that name.
    """
    name = resolve_backend(backend)
    if name not in BACKENDS:
        where = f" (from ${BACKEND_ENV})" if backend.lower() == AUTO else ""
        raise BackendUnavailableError(
            f"unknown latency backend {name!r}{where}; choose one of {[AUTO, *BACKENDS.names()]}"
        )
    return BACKENDS[name]


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
