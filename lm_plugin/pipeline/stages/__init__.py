"""The built-in stages, registered in :data:`lm_plugin.pipeline.STAGES` when this package is imported.

- :mod:`~lm_plugin.pipeline.stages.layermerge`: ``layermerge``.
- :mod:`~lm_plugin.pipeline.stages.channels`: ``channel_prune_tp`` (torch-pruning) and ``channel_prune_nni``
  (NNI), which prune LayerMerge's trainable form when they directly follow ``layermerge``.
- :mod:`~lm_plugin.pipeline.stages.quantize`: ``quantize_nni`` (simulated int8) and ``quantize_torch`` (int8
  kernels); both are final.
"""

from __future__ import annotations

# imported in this order so that STAGES keeps its registration order
# isort: off
from .layermerge import layermerge_stage
from .channels import channel_prune_nni_stage, channel_prune_tp_stage
from .quantize import quantize_nni_stage, quantize_torch_stage

# isort: on

__all__ = [
    "channel_prune_nni_stage",
    "channel_prune_tp_stage",
    "layermerge_stage",
    "quantize_nni_stage",
    "quantize_torch_stage",
]
