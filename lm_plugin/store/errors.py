"""The record store's warning and errors. Every message names the table the store belongs to."""

from __future__ import annotations

from ..errors import LayerMergeError


class CacheWarning(UserWarning):
    """A table's cache could not be (fully) used: a file set aside, or damaged rows dropped and recomputed.

    The message names the table (``"latency table cache …"``, ``"importance table cache …"``), the file and the
    cause: stale or damaged data is never used silently.
    """


class StoreError(LayerMergeError):
    """A record store cannot be read or written (busy for too long, read-only, disk full, ...)."""


class StoreBusyError(StoreError, TimeoutError):
    """Another process held a store's write lock, or its exclusive build lock, for longer than allowed."""
