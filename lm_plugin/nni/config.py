"""Which convs may take part in LayerMerge, read from an NNI ``config_list``.

Module selection is NNI's own (``select_modules_by_config``, the function NNI's wrappers use), so
``op_types``/``op_names``/``op_names_re`` and their ``exclude_*`` forms mean exactly what they mean for any NNI
pruner. LayerMerge has no per-layer sparsity, so sparsity settings are rejected rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from typing import Any

import torch.nn as nn
from nni.compression.base.config import default_config_schema, select_modules_by_config, trans_legacy_config_list

from ..errors import ConfigurationError

#: Every Conv2d may be merged or pruned.
DEFAULT_CONFIG_LIST: list[dict[str, Any]] = [{"op_types": ["Conv2d"]}]

# Keys of NNI's pruning schema that set how much to prune; LayerMerge takes one latency budget instead.
_SPARSITY_KEYS = ("sparse_ratio", "sparse_threshold", "max_sparse_ratio", "min_sparse_ratio", "global_group_id",
                  "dependency_group_id", "target_settings", "target_names", "granularity", "align")


def normalize_config_list(config_list: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Validate ``config_list`` with NNI's pruning schema and convert legacy (v2) configs.

    Args:
        config_list: NNI config dicts, or None for :data:`DEFAULT_CONFIG_LIST`.

    Returns:
        A new list in NNI 3.0 form.

    Raises:
        ValueError: a config sets a sparsity (LayerMerge is driven by ``budget`` alone).
        schema.SchemaError: a config does not follow NNI's schema (unknown key, wrong type).
    """
    configs = trans_legacy_config_list(deepcopy(list(config_list or DEFAULT_CONFIG_LIST)))
    if not configs:
        raise ConfigurationError("config_list is empty: pass None to let every Conv2d take part, or e.g. "
                         "[{'op_types': ['Conv2d'], 'exclude_op_names': ['conv1']}]")
    schema = default_config_schema("pruning")
    for config in configs:
        schema.validate(config)
        found = [key for key in _SPARSITY_KEYS if key in config]
        if found:
            raise ConfigurationError(
                f"config {config} sets {found}: LayerMerge removes whole layers for a latency target and has no "
                "per-layer sparsity. Keep only the module selection keys (op_types, op_names, op_names_re, "
                "exclude_op_types, exclude_op_names, exclude_op_names_re) and pass the target as "
                "LayerMergePruner(model, budget=...)."
            )
    return configs


def selected_convs(model: nn.Module, config_list: Sequence[dict[str, Any]] | None) -> set[str]:
    """Qualified names of the ``nn.Conv2d`` modules any config of ``config_list`` selects (NNI's rules)."""
    names: set[str] = set()
    for config in normalize_config_list(config_list):
        modules, _, _ = select_modules_by_config(model, config)
        names.update(name for name, module in modules.items() if isinstance(module, nn.Conv2d))
    return names


def ignored_convs(model: nn.Module, config_list: Sequence[dict[str, Any]] | None) -> list[str]:
    """Every ``nn.Conv2d`` that ``config_list`` does *not* select: kept exactly as it is by LayerMerge."""
    chosen = selected_convs(model, config_list)
    return sorted({name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)} - chosen)
