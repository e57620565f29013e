"""Built-in latency backends. Importing this package registers them."""

from .cuda import CUDAProfiler
from .eager import EagerCPUProfiler
from .ort import OnnxRuntimeProfiler
from .tensorrt import TensorRTProfiler

__all__ = ["CUDAProfiler", "EagerCPUProfiler", "OnnxRuntimeProfiler", "TensorRTProfiler"]
