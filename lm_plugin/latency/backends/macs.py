"""An analytic cost model instead of a timer: "latency" = multiply-accumulates, counted by torch-pruning.

Use it for a hardware-independent budget ("half the MACs") and wherever a run must be reproducible bit for
bit (tests, CI, comparing selection methods without timing noise). Its unit is **one million MACs per
"ms"**: every number this backend reports in a ``*_ms`` field is MMACs of one forward pass per input
sample (torch-pruning's convention: the batch size does not change the count). It knows nothing about
kernels' real speed — on real hardware a merged 5×5 conv can be slower than two 3×3 convs with fewer MACs
in total — so publish speed-ups from a timing backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch_pruning as tp
from torch import Tensor, nn

from ..inputs import InputsLike, effective_shapes, materialize
from ..measurement import Measurement
from ..profiler import Profiler, RunFn, dtype_name, prepared_module
from ..registry import register_backend


@register_backend
class MacsProfiler(Profiler):
    """Counts MACs (via ``torch_pruning.utils.count_ops_and_params``) and reports them as latency.

    Deterministic: every measurement is exact and ``stable``; warm-up, repeats and spread are ignored.
    """

    name = "macs"
    deterministic = True

    @property
    def device_name(self) -> str:
        return "analytic: 1 ms = 1e6 MACs"

    def measure(self, module: nn.Module, inputs: InputsLike, *, warn_unstable: bool = True) -> Measurement:
        tensors = materialize(inputs, self.batch_size, dtype=self.dtype, device=self.device)
        with prepared_module(module, self.device, self.dtype) as model:
            macs, _ = tp.utils.count_ops_and_params(model, tensors[0] if len(tensors) == 1 else tensors)
        value = float(macs) / 1e6
        shapes = effective_shapes(tensors, None)
        return Measurement(median_ms=value, q1_ms=value, q3_ms=value, min_ms=value, iqr_ms=0.0, spread=0.0, runs=1,
                           attempts=1, stable=True, backend=self.name, device_name=self.device_name, threads=None,
                           batch_size=shapes[0][0], dtype=dtype_name(self.dtype), input_shapes=shapes)

    @contextlib.contextmanager
    def _session(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> Iterator[RunFn]:
        # Not used: measure() counts instead of running. Kept so the class is a complete Profiler.
        with prepared_module(module, self.device, self.dtype) as model:
            yield lambda: model(*inputs)
