"""The measurement harness: pluggable profilers, a resumable on-disk cache, and lookup tables of any modules.

It knows nothing of LayerMerge (it imports only :mod:`lm_plugin.store` and the package's error root): what to time
for a candidate block lives next to the latency table, in :mod:`lm_plugin.tables.conv_block`.

Typical use:

```python
from lm_plugin.latency import LatencyTable, ModuleSpec, get_profiler, measure

m = measure(model, (1, 3, 224, 224), backend="cpu", batch_size=64)      # one module, one number
profiler = get_profiler("auto", batch_size=64)                          # CUDA if usable, else CPU
specs = {k: ModuleSpec(lambda k=k: nn.Conv2d(32, 32, k), (1, 32, 28, 28), {"k": k}) for k in (1, 3, 5)}
table = LatencyTable.build(specs, profiler, cache="lat.sqlite")
table.ms(3)
```

See ``docs/latency.md`` for the measurement protocol and the cache.
"""

# Import for the side effect of registering the built-in backends, and to expose their classes.
from .backends import CUDAProfiler, EagerCPUProfiler, MacsProfiler, OnnxRuntimeProfiler, TensorRTProfiler
from .cache import LatencyCache, latency_cache_path
from .compare import compare_latency
from .errors import (
    BackendUnavailableError,
    CacheWarning,
    LatencyCacheWarning,
    LatencyDriftWarning,
    LatencyError,
    LatencyModelWarning,
    UnsendableModuleError,
    UnstableMeasurementWarning,
    WorkerFallbackWarning,
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
from .worker import MeasurementWorker, RemoteWorker, WorkerConfig, default_worker

__all__ = [
    "AUTO",
    "DEFAULT_MAX_SPREAD",
    "DEFAULT_REPEATS",
    "DEFAULT_RETRIES",
    "DEFAULT_WARMUP",
    "BackendUnavailableError",
    "CUDAProfiler",
    "CacheWarning",
    "EagerCPUProfiler",
    "InputsLike",
    "LatencyCache",
    "LatencyCacheWarning",
    "LatencyDriftWarning",
    "LatencyError",
    "LatencyModelWarning",
    "LatencyTable",
    "MacsProfiler",
    "Measurement",
    "MeasurementWorker",
    "ModuleSpec",
    "OnnxRuntimeProfiler",
    "Profiler",
    "RemoteWorker",
    "TensorRTProfiler",
    "TimingSpec",
    "UnsendableModuleError",
    "UnstableMeasurementWarning",
    "WorkerConfig",
    "WorkerFallbackWarning",
    "available_backends",
    "backend_class",
    "backend_names",
    "compare_latency",
    "default_worker",
    "get_profiler",
    "latency_cache_path",
    "measure",
    "register_backend",
    "resolve_backend",
]
