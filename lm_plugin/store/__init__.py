"""The bottom layer: a generic record store for the tables (latency, importance), on SQLite in WAL mode.

It knows nothing of LayerMerge or of latency measurement. A :class:`RecordStore` keeps values by key for one table
kind and one signature in a database file that several processes may read and write at once; claims make
processes that build one table together compute each entry once, an exclusive lock serialises work that must not
run concurrently, and every row is checksummed. See :mod:`lm_plugin.store.records` for the file format and the
recovery rules.

```python
from lm_plugin.store import RecordStore

class SquaresStore(RecordStore):
    TABLE = "squares table"

store = SquaresStore("cache/squares.sqlite", {"version": 1})
squares = store.fill(range(10), lambda n: n * n)   # each missing entry computed once, by whichever process claims it
store.get(3)                                        # 9, here and in every other process
```
"""

from .canonical import canonical_json, checksum, to_jsonable
from .errors import CacheWarning, StoreBusyError, StoreError
from .records import (
    BACKUP_SUFFIX,
    DEFAULT_BUSY_TIMEOUT_S,
    DEFAULT_LEASE_S,
    FORMAT_NAME,
    FORMAT_VERSION,
    STORE_SUFFIX,
    RecordStore,
    signature_diff,
    signed_store_path,
)

__all__ = [
    "BACKUP_SUFFIX",
    "DEFAULT_BUSY_TIMEOUT_S",
    "DEFAULT_LEASE_S",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "STORE_SUFFIX",
    "CacheWarning",
    "RecordStore",
    "StoreBusyError",
    "StoreError",
    "canonical_json",
    "checksum",
    "signature_diff",
    "signed_store_path",
    "to_jsonable",
]
