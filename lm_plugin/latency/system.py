"""Descriptions of the host that belong in a profiler signature (processor model, package versions)."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
from pathlib import Path

_CPUINFO = Path("/proc/cpuinfo")
# Keys that name the processor in /proc/cpuinfo: x86 uses "model name"; some ARM kernels only give the others.
_CPUINFO_NAME_KEYS = ("model name", "Hardware", "Processor", "cpu model")


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """Human-readable processor model, e.g. ``"Intel(R) Xeon(R) Processor @ 2.50GHz"``.

    Read from ``/proc/cpuinfo`` on Linux, from :mod:`platform` elsewhere; never empty.
    """
    try:
        for line in _CPUINFO.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() in _CPUINFO_NAME_KEYS and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def package_version(distribution: str) -> str | None:
    """Installed version of a distribution (from its metadata, which is more reliable than ``__version__``)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
