"""Compose compressions: LayerMerge, channel pruning (torch-pruning or NNI) and quantisation, in any order.

One job: run an ordered list of optional stages on a model and tabulate what each one did. After *every*
stage the model is checked (it runs on the example inputs and its output has the original's shape), and its
test accuracy, measured latency (side by side with the original, interleaved), MACs, parameters and size are
recorded.

```python
from lm_plugin.pipeline import run_pipeline

result = run_pipeline(
    model,
    ["layermerge", ("channel_prune_tp", {"macs_ratio": 0.7}), "quantize_torch"],
    example_inputs=torch.randn(64, 1, 8, 8),   # the batch latency is measured at
    train_data=train, test_data=test,
)
print(result.table())
result.final  # the last stage's model
```

Stages are looked up in :data:`STAGES` (name → :class:`StageSpec`); :func:`register_stage` adds one. A stage is a
function ``stage(model, ctx, **settings) -> StageOutput``: it must not modify ``model`` (copy it first), and the
keyword arguments it declares are its settings.

Layout, one job per module:

- :mod:`~lm_plugin.pipeline.contract`: what a stage receives and returns (:class:`PipelineContext`,
  :class:`StageOutput`, the :class:`LayerMergeHandoff`) and :class:`PipelineError`.
- :mod:`~lm_plugin.pipeline.registry`: :data:`STAGES`, :class:`StageSpec`, :func:`register_stage`,
  :func:`list_stages`.
- :mod:`~lm_plugin.pipeline.records`: what a run returns (:class:`StageRecord`, :class:`PipelineResult`).
- :mod:`~lm_plugin.pipeline.runner`: :func:`run_pipeline` (checks and measures the model after every stage).
- :mod:`~lm_plugin.pipeline.stages`: the built-in stages, registered when this package is imported.
"""

from __future__ import annotations

from .contract import LayerMergeHandoff, PipelineContext, PipelineError, StageOutput
from .records import PipelineResult, StageRecord
from .registry import STAGES, StageSpec, list_stages, register_stage
from .registry import Stage as Stage
from .runner import run_pipeline

# importing the stages registers them; the stage functions stay importable from here (not in __all__, as before)
from .stages import channel_prune_nni_stage as channel_prune_nni_stage
from .stages import channel_prune_tp_stage as channel_prune_tp_stage
from .stages import layermerge_stage as layermerge_stage
from .stages import quantize_nni_stage as quantize_nni_stage
from .stages import quantize_torch_stage as quantize_torch_stage

__all__ = [
    "STAGES",
    "LayerMergeHandoff",
    "PipelineContext",
    "PipelineError",
    "PipelineResult",
    "StageOutput",
    "StageRecord",
    "StageSpec",
    "list_stages",
    "register_stage",
    "run_pipeline",
]
