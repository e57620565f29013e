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


_CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_SIZE_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3}


@functools.lru_cache(maxsize=1)
def private_cache_bytes() -> int | None:
    """Size in bytes of the largest cache private to one core (L2 on most x86 / ARM server parts), read from
    ``/sys/devices/system/cpu/cpu0/cache`` on Linux; None where it cannot be read.

    A cache counts as private when its ``shared_cpu_list`` names a single CPU.
    """
    best = None
    try:
        for index in sorted(_CPU_CACHES.glob("index*")):
            kind = (index / "type").read_text().strip()
            shared = (index / "shared_cpu_list").read_text().strip()
            raw = (index / "size").read_text().strip()
            if kind == "Instruction" or "," in shared or "-" in shared:
                continue
            unit = _SIZE_UNITS.get(raw[-1:].upper(), 1)
            size = int(raw.rstrip("KMGkmg")) * unit
            best = size if best is None else max(best, size)
    except (OSError, ValueError):
        return None
    return best
