"""Latency measurement for LayerMerge: pluggable profilers, a resumable on-disk cache, and lookup tables.

Typical use:

```python
from lm_plugin.latency import ConvBlockSpec, LatencyTable, get_profiler, measure

m = measure(model, (1, 3, 224, 224), backend="cpu", batch_size=64)      # one module, one number
profiler = get_profiler("auto", batch_size=64)                          # CUDA if usable, else CPU
table = LatencyTable.build({key: ConvBlockSpec(geometry, "relu"), ...}, profiler, cache="lat.jsonl")
table.ms(key)
```

See ``docs/latency.md`` for the measurement protocol and the cache file format.
"""

# Import for the side effect of registering the built-in backends, and to expose their classes.
from ..activations import ACTIVATIONS
from .backends import CUDAProfiler, EagerCPUProfiler, MacsProfiler, OnnxRuntimeProfiler, TensorRTProfiler
from .cache import LatencyCache
from .compare import compare_latency
from .conv_block import ConvBlockSpec, activation_module, conv_block_key, conv_block_module
from .errors import (
    BackendUnavailableError,
    LatencyCacheWarning,
    LatencyDriftWarning,
    LatencyError,
    UnstableMeasurementWarning,
)
from .inputs import InputsLike
from .measurement import Measurement
from .profiler import DEFAULT_MAX_SPREAD, DEFAULT_REPEATS, DEFAULT_RETRIES, DEFAULT_WARMUP, Profiler
from .registry import (
    AUTO,
    available_backends,
    backend_class,
    backend_names,
    get_profiler,
    measure,
    register_backend,
    resolve_backend,
)
from .table import LatencyTable, ModuleSpec, TimingSpec

__all__ = [
    "ACTIVATIONS",
    "AUTO",
    "DEFAULT_MAX_SPREAD",
    "DEFAULT_REPEATS",
    "DEFAULT_RETRIES",
    "DEFAULT_WARMUP",
    "BackendUnavailableError",
    "CUDAProfiler",
    "ConvBlockSpec",
    "EagerCPUProfiler",
    "InputsLike",
    "LatencyCache",
    "LatencyCacheWarning",
    "LatencyDriftWarning",
    "LatencyError",
    "LatencyTable",
    "MacsProfiler",
    "Measurement",
    "ModuleSpec",
    "OnnxRuntimeProfiler",
    "Profiler",
    "TensorRTProfiler",
    "TimingSpec",
    "UnstableMeasurementWarning",
    "activation_module",
    "available_backends",
    "backend_class",
    "backend_names",
    "compare_latency",
    "conv_block_key",
    "conv_block_module",
    "get_profiler",
    "measure",
    "register_backend",
    "resolve_backend",
]
