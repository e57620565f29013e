"""Built-in latency backends. Importing this package registers them."""

from .cuda import CUDAProfiler
from .eager import EagerCPUProfiler
from .macs import MacsProfiler
from .ort import OnnxRuntimeProfiler
from .tensorrt import TensorRTProfiler

__all__ = ["CUDAProfiler", "EagerCPUProfiler", "MacsProfiler", "OnnxRuntimeProfiler", "TensorRTProfiler"]
