"""Where lm_plugin keeps what it caches: one folder, ``$LM_PLUGIN_CACHE`` or ``~/.cache/lm_plugin``.

Tables (latency, importance) live at its top, trained workload checkpoints in ``checkpoints/``, datasets in
``data/`` (``$LM_PLUGIN_DATA`` overrides that one: datasets are often shared between projects).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "checkpoint_dir", "data_root"]


def cache_root() -> Path:
    """``$LM_PLUGIN_CACHE`` or ``~/.cache/lm_plugin``: the tables' folder and the parent of the others."""
    env = os.environ.get("LM_PLUGIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lm_plugin"


def checkpoint_dir() -> Path:
    """``<cache_root>/checkpoints``: trained workload models."""
    return cache_root() / "checkpoints"


def data_root() -> Path:
    """``$LM_PLUGIN_DATA`` or ``<cache_root>/data``: datasets."""
    env = os.environ.get("LM_PLUGIN_DATA")
    return Path(env).expanduser() if env else cache_root() / "data"
