"""LayerMerge with NNI's face: a real ``nni.compression`` pruner, plus a ``ModelSpeedup`` that works on current torch.

This is the only part of ``lm_plugin`` that imports NNI; install it with ``pip install lm-plugin[nni]``.

Example:
    >>> from lm_plugin.nni import LayerMergePruner
    >>> pruner = LayerMergePruner(model, 0.6, [{"op_types": ["Conv2d"], "exclude_op_names": ["conv1"]}],
    ...                           evaluator)
    >>> trainable, masks = pruner.compress()   # masks == {}: the model is already physically smaller
    >>> deployed = pruner.merge(trainable)
"""

from __future__ import annotations

from ..errors import MissingDependencyError

try:
    import nni  # noqa: F401
    from nni.compression.base.compressor import Pruner as _NNIPruner  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only where NNI is absent
    raise MissingDependencyError(
        "lm_plugin.nni needs NNI 3.0 (the nni.compression package), which is not installed or cannot be "
        f"imported ({exc}). Install it with:  pip install 'lm-plugin[nni]'"
    ) from exc

from .config import DEFAULT_CONFIG_LIST, ignored_convs, selected_convs
from .experiment import ExperimentRun, run_experiment
from .importance import EvaluatorImportance
from .pruner import LayerMergePruner
from .report import ExperimentReport, experiment_report
from .speedup import speedup
from .training import train_with_evaluator

__all__ = [
    "DEFAULT_CONFIG_LIST",
    "EvaluatorImportance",
    "ExperimentReport",
    "ExperimentRun",
    "LayerMergePruner",
    "experiment_report",
    "ignored_convs",
    "run_experiment",
    "selected_convs",
    "speedup",
    "train_with_evaluator",
]
