"""The record store: values by key for one table kind and signature, in a SQLite database in WAL mode.

One database file holds one table kind (``"latency table"``, ``"importance table"``) for one signature (the
profiler's, or the estimator's settings); :func:`signed_store_path` names it after a hash of the signature, so
stores of different settings sit side by side. Its schema (format version 1):

* ``meta(name, value)``: ``format`` = ``lm_plugin.record-store``, ``version`` = ``1``, ``table`` = the table kind,
  ``signature`` = the signature in canonical JSON;
* ``records(key, value, checksum, owner, written)``: ``key`` and ``value`` in canonical JSON, ``checksum`` the first
  16 hex digits of the SHA-256 of ``key + "\\n" + value``; ``owner`` and ``written`` (Unix time) say who wrote it;
* ``claims(name, owner, host, pid, started, expires)``: entries being computed, one row per key;
* ``locks(...)``, the same columns: exclusive build locks by name.

Every write is one short transaction (``BEGIN IMMEDIATE`` … ``COMMIT``, ``synchronous=FULL``), so an interrupted
build keeps every committed entry and any number of processes on one host may read and write one store at once;
each lookup is one query, so a process sees the others' entries as soon as they are committed. Processes that build
one table together :meth:`~RecordStore.claim` an entry before computing it, so none is computed twice
(:meth:`~RecordStore.fill` does the bookkeeping); work that must not run concurrently at all (timing latencies: two
processes timing at once slow each other down) runs under :meth:`~RecordStore.exclusive`.

Nothing damaged or foreign is used silently. A file that is not a SQLite database, a database of another program,
format version, table kind or signature is moved aside to ``<name>.bak`` and the store starts empty; a row whose
checksum fails is dropped and its entry computed again. Each case warns with a :class:`~lm_plugin.store.CacheWarning`
naming the table, the file and the cause.

WAL mode needs a local file system (shared memory between the processes that open the file): keep stores off
network mounts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ArgumentTypeError, UnknownNameError
from .canonical import canonical_json, checksum, to_jsonable
from .errors import CacheWarning, StoreBusyError, StoreError
from .owner import Holder

try:  # serialises the open / check / set-aside step between processes; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows: a single process opens a store at a time
    fcntl = None  # type: ignore[assignment]

FORMAT_NAME = "lm_plugin.record-store"
FORMAT_VERSION = 1
BACKUP_SUFFIX = ".bak"
STORE_SUFFIX = ".sqlite"
#: How long a write waits for another process's transaction before giving up (seconds).
DEFAULT_BUSY_TIMEOUT_S = 60.0
#: How long a claim or lock of a holder that cannot be checked (another host) stays valid without a write.
DEFAULT_LEASE_S = 3600.0

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE records (key TEXT PRIMARY KEY, value TEXT NOT NULL, checksum TEXT NOT NULL, owner TEXT, written REAL);
CREATE TABLE claims (name TEXT PRIMARY KEY, owner TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
                     started TEXT, expires REAL NOT NULL);
CREATE TABLE locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
                    started TEXT, expires REAL NOT NULL);
"""
#: How many damaged rows a warning names before abbreviating.
_SHOWN = 5


class _BadRow(ValueError):
    """One row cannot be trusted."""


def row_checksum(key: str, value: str) -> str:
    """Checksum of a row from its key and value in canonical JSON (canonical JSON never contains a newline)."""
    return checksum(key + "\n" + value)


def signature_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Readable list of the fields that differ between two signatures."""
    changed = [
        f"{name}: {old.get(name, '<absent>')!r} -> {new.get(name, '<absent>')!r}"
        for name in sorted(set(old) | set(new))
        if old.get(name, "<absent>") != new.get(name, "<absent>")
    ]
    return "; ".join(changed)


def signed_store_path(cache_dir: str | os.PathLike[str], stem: str, signature: Mapping[str, Any]) -> Path:
    """``<cache_dir>/<stem>-<hash of signature>.sqlite``: one file per signature, so stores of different settings
    (backends, batch sizes, estimators) sit side by side instead of replacing each other."""
    import hashlib

    digest = hashlib.sha1(canonical_json(to_jsonable(dict(signature))).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{stem}-{digest}{STORE_SUFFIX}"


class RecordStore:
    """Values by key for one table kind and one signature, in memory or in a SQLite file shared by processes.

    Subclasses say what the table is (:attr:`TABLE`, named in every message), what signs it (:attr:`SIGNED_BY`)
    and how a value becomes JSON (``_encode_value`` / ``_decode_value``). File format and recovery rules: see the
    module docstring.

    Keys are any JSON-able values (dicts, lists, tuples, dataclasses, ...; see
    :func:`~lm_plugin.store.to_jsonable`) compared in canonical form: ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}``
    are one key, and a tuple equals the list with the same items.

    Args:
        path: the database file, created with its parent directories if missing; None keeps the store in memory
            (private to this process).
        signature: what every value depends on besides its key (a profiler's or estimator's settings).
        owner: name of this process's claims and locks (default ``host:pid``).
        lease_s: how long a claim or lock stays valid without a write from its holder. Holders on this host are
            checked directly (a claim of an exited process is taken over at once); the lease matters only for
            processes elsewhere.
        busy_timeout_s: how long one write waits for other processes' transactions.

    Attributes:
        path: the file, or None.
        signature: the signature, in JSON form.
        owner: the default owner name of claims.
        problems: what was wrong with the file or its rows (set aside, dropped), in the order found.
    """

    #: The table this store belongs to, as messages name it.
    TABLE: ClassVar[str] = "record"
    #: What the signature describes, as messages name it (``"it was built with a different <SIGNED_BY> (...)"``).
    SIGNED_BY: ClassVar[str] = "signature"

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        signature: Mapping[str, Any],
        *,
        owner: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.signature: dict[str, Any] = to_jsonable(dict(signature))
        self.lease_s = float(lease_s)
        self.busy_timeout_s = float(busy_timeout_s)
        self._holder = Holder.current()
        self.owner = owner if owner is not None else self._holder.label()
        self.problems: list[str] = []
        self._lock = threading.RLock()
        self._held: dict[str, int] = {}  # exclusive locks held by this object, with nesting depth
        self._inherited: list[sqlite3.Connection] = []  # connections of a parent process, never touched again
        self._conn = self._open()
        self._conn_pid = os.getpid()

    # ------------------------------------------------------------------------------------ value codec
    def _encode_value(self, value: Any) -> Any:
        """The JSON-able form of ``value``."""
        return value

    def _decode_value(self, data: Any) -> Any:
        """The value of a JSON form; raises TypeError, ValueError or KeyError if ``data`` is not one."""
        return data

    # --------------------------------------------------------------------------------------- mapping
    def get(self, key: Any) -> Any:
        """The value stored for ``key``, or None (a damaged row is dropped with a warning and reads as None)."""
        k = canonical_json(key)
        with self._errors():
            row = self._db().execute("SELECT value, checksum FROM records WHERE key = ?", (k,)).fetchone()
        if row is None:
            return None
        try:
            return self._decode_row(k, row[0], row[1])
        except _BadRow as exc:
            self._drop([(k, row[1], str(exc))])
            return None

    def __getitem__(self, key: Any) -> Any:
        found = self.get(key)
        if found is None:
            raise UnknownNameError(f"{self.describe()} has no entry for key {canonical_json(key)}")
        return found

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        with self._errors():
            return self._db().execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def __iter__(self) -> Iterator[Any]:
        """Keys in JSON form (tuples read back as lists)."""
        return (key for key, _ in self.items())

    def items(self) -> Iterator[tuple[Any, Any]]:
        """``(key, value)`` pairs, keys in JSON form; damaged rows are dropped with a warning."""
        return iter(self._load_all())

    def put(self, key: Any, value: Any) -> None:
        """Store ``value`` under ``key`` (replacing any earlier value) in one committed transaction; releases any
        claim on ``key`` and renews the leases of this process's locks.

        Raises:
            TypeError: for a None value (it would read back as a missing entry) or a value that is not JSON-able.
        """
        if value is None:
            raise ArgumentTypeError(f"{self.describe()}: cannot store None (it reads back as a missing entry)")
        k = canonical_json(key)
        v = canonical_json(self._encode_value(value))
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO records (key, value, checksum, owner, written) VALUES (?, ?, ?, ?, ?)",
                (k, v, row_checksum(k, v), self.owner, now),
            )
            db.execute("DELETE FROM claims WHERE name = ?", (k,))
            db.execute("UPDATE locks SET expires = ? WHERE host = ? AND pid = ?",
                       (now + self.lease_s, self._holder.host, self._holder.pid))

    def describe(self) -> str:
        """``"<table> cache <file>"`` (or ``"in memory"``), as every message starts."""
        return f"{self.TABLE} cache {self.path if self.path is not None else '(in memory)'}"

    # ---------------------------------------------------------------------------------------- claims
    def claim(self, key: Any, owner: str | None = None) -> bool:
        """Reserve ``key`` for this process to compute; True for exactly one claimant at a time.

        False when the entry is already stored, or another live holder claims it. A claim is released by
        :meth:`put` (or :meth:`release`), and expires when its holder has exited (checked for this host) or its
        lease ran out; claiming again what this process holds succeeds.
        """
        k = canonical_json(key)
        with self._transaction() as db:
            row = db.execute("SELECT value, checksum FROM records WHERE key = ?", (k,)).fetchone()
            if row is not None:
                try:
                    self._decode_row(k, row[0], row[1])
                    return False
                except _BadRow as exc:  # damaged: drop it here and compute the entry again
                    db.execute("DELETE FROM records WHERE key = ? AND checksum = ?", (k, row[1]))
                    self._report_dropped([(k, str(exc))])
            return self._acquire(db, "claims", k, owner or self.owner)

    def release(self, key: Any, owner: str | None = None) -> None:
        """Give up this process's claim on ``key`` without storing a value (the computation failed)."""
        self._release("claims", canonical_json(key), owner or self.owner)

    def holder(self, key: Any) -> str | None:
        """The owner of a live claim on ``key``, or None."""
        return self._live_holder("claims", canonical_json(key))

    @contextlib.contextmanager
    def exclusive(
        self,
        name: str = "build",
        *,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> Iterator[None]:
        """Hold the store's lock ``name`` inside the block: other processes asking for it wait until it is free.

        For work that must not run concurrently at all (latency measurement: two processes timing at once on one
        machine slow each other down). A waiting process then finds the entries the holder stored. The lock is
        given up at the end of the block, or taken over when its holder has exited or its lease ran out (each
        :meth:`put` renews it). Nested use in one process is allowed.

        Args:
            name: the lock's name.
            poll_s: how often a waiting process looks again.
            timeout_s: give up waiting after this long (None: wait as long as a live holder holds it).
            on_wait: called once with the holder's owner name if this process has to wait.

        Raises:
            StoreBusyError: when ``timeout_s`` passed first.
        """
        start, told = time.monotonic(), False
        while True:
            with self._transaction() as db:
                if name in self._held or self._acquire(db, "locks", name, self.owner):
                    break
            holder = self._live_holder("locks", name) or "another process"
            if on_wait is not None and not told:
                on_wait(holder)
                told = True
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise StoreBusyError(
                    f"{self.describe()}: waited over {timeout_s:g} s for the {name!r} lock, which {holder} holds; "
                    "let it finish, or stop that process (its lock is freed when it exits)"
                )
            time.sleep(poll_s)
        self._held[name] = self._held.get(name, 0) + 1
        try:
            yield
        finally:
            self._held[name] -= 1
            if not self._held[name]:
                del self._held[name]
                self._release("locks", name, self.owner)

    def fill(
        self,
        keys: Iterable[Any],
        compute: Callable[[Any], Any],
        *,
        on_entry: Callable[[Any, Any, bool], None] | None = None,
        poll_s: float = 0.5,
    ) -> list[Any]:
        """Make sure every key has a value, computing each missing one exactly once among the processes filling
        this store at the same time.

        Keys are visited in order: a stored one is read, a missing one is claimed and computed here (and stored at
        once), one that another process is computing is visited again after the others, until it is stored or its
        claim expires (then this process takes it over).

        Args:
            keys: the keys (duplicates are visited once).
            compute: ``compute(key) -> value`` for a key this process claimed. If it raises, the claim is released
                and the exception propagates; what was stored before stays.
            on_entry: called as ``on_entry(key, value, computed_here)`` when a key's value is known.
            poll_s: pause between visits to the entries others are computing.

        Returns:
            The values, in the order of ``keys``.
        """
        keys = list(keys)
        pending: dict[str, Any] = {}
        for key in keys:
            pending.setdefault(canonical_json(key), key)
        values: dict[str, Any] = {}
        while pending:
            waiting: dict[str, Any] = {}
            for k, key in pending.items():
                value, computed = self.get(key), False
                if value is None and self.claim(key):
                    try:
                        value = compute(key)
                    except BaseException:
                        self.release(key)
                        raise
                    self.put(key, value)
                    computed = True
                elif value is None:
                    value = self.get(key)  # stored between the lookup and the claim, or still being computed
                if value is None:
                    waiting[k] = key
                    continue
                values[k] = value
                if on_entry is not None:
                    on_entry(key, value, computed)
            pending = waiting
            if pending:
                time.sleep(poll_s)
        return [values[canonical_json(key)] for key in keys]

    def close(self) -> None:
        """Close the database connection (the object is unusable afterwards)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- internals
    def _db(self) -> sqlite3.Connection:
        """This process's connection: a forked child must not use its parent's (SQLite's locks are per process)."""
        if self.path is not None and os.getpid() != self._conn_pid:
            with self._lock:
                if os.getpid() != self._conn_pid:
                    self._inherited.append(self._conn)  # closing it here could release the parent's locks
                    self._holder = Holder.current()
                    if self.owner == f"{self._holder.host}:{self._conn_pid}":
                        self.owner = self._holder.label()
                    self._conn, self._conn_pid = self._connect(), os.getpid()
                    with self._errors():
                        self._configure(self._conn)
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        target = ":memory:" if self.path is None else str(self.path)
        with self._errors():
            return sqlite3.connect(target, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)

    @staticmethod
    def _configure(db: sqlite3.Connection) -> None:
        """WAL: readers never block the writer, and a crash leaves every committed transaction. ``FULL``: a
        committed entry survives a crash of the machine, too (one fsync per entry: entries take far longer)."""
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's operational errors as store errors that name the table and say what to do."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                raise StoreBusyError(
                    f"{self.describe()}: another process kept the database locked for over {self.busy_timeout_s:g} s "
                    f"({text}); retry, or raise busy_timeout_s"
                ) from exc
            raise StoreError(
                f"{self.describe()}: {text}; check that the folder is writable, local (not a network mount) and "
                "has free space"
            ) from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction, taken at once (``BEGIN IMMEDIATE``) so it never deadlocks on upgrade."""
        with self._lock, self._errors():
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _acquire(self, db: sqlite3.Connection, table: str, name: str, owner: str) -> bool:
        row = db.execute(f"SELECT owner, host, pid, started, expires FROM {table} WHERE name = ?", (name,)).fetchone()
        now = time.time()
        mine = (owner, self._holder.host, self._holder.pid)
        if row is not None and tuple(row[:3]) != mine and not self._expired(row, now):
            return False
        db.execute(
            f"INSERT OR REPLACE INTO {table} (name, owner, host, pid, started, expires) VALUES (?, ?, ?, ?, ?, ?)",
            (name, *mine, self._holder.started, now + self.lease_s),
        )
        return True

    @staticmethod
    def _expired(row: tuple, now: float) -> bool:
        _, host, pid, started, expires = row
        return expires <= now or Holder(host, pid, started).is_dead()

    def _release(self, table: str, name: str, owner: str) -> None:
        with self._transaction() as db:
            db.execute(f"DELETE FROM {table} WHERE name = ? AND owner = ? AND host = ? AND pid = ?",
                       (name, owner, self._holder.host, self._holder.pid))

    def _live_holder(self, table: str, name: str) -> str | None:
        with self._lock, self._errors():
            row = self._db().execute(
                f"SELECT owner, host, pid, started, expires FROM {table} WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None or self._expired(row, time.time()) else row[0]

    def _decode_row(self, key: Any, value: Any, stored: Any) -> Any:
        if not (isinstance(key, str) and isinstance(value, str) and isinstance(stored, str)):
            raise _BadRow("not a text row")
        if row_checksum(key, value) != stored:
            raise _BadRow("checksum mismatch")
        try:
            return self._decode_value(json.loads(value))
        except (TypeError, ValueError, KeyError) as exc:
            raise _BadRow(f"bad value ({exc})") from None

    def _load_all(self) -> list[tuple[Any, Any]]:
        with self._errors():
            rows = self._db().execute("SELECT key, value, checksum FROM records ORDER BY rowid").fetchall()
        good, bad = [], []
        for k, v, stored in rows:
            try:
                good.append((json.loads(k), self._decode_row(k, v, stored)))
            except (_BadRow, ValueError, TypeError) as exc:
                bad.append((k, stored, str(exc)))
        if bad:
            self._drop(bad)
        return good

    def _drop(self, rows: list[tuple[Any, Any, str]]) -> None:
        """Delete damaged rows (unless another process rewrote them meanwhile) and say so."""
        with self._transaction() as db:
            for k, stored, _ in rows:
                db.execute("DELETE FROM records WHERE key IS ? AND checksum IS ?", (k, stored))
        self._report_dropped([(k, reason) for k, _, reason in rows])

    def _report_dropped(self, rows: list[tuple[Any, str]]) -> None:
        found = [f"entry {str(k)[:60]!s}: {reason}" for k, reason in rows]
        self.problems += found
        shown = "; ".join(found[:_SHOWN]) + (" ..." if len(found) > _SHOWN else "")
        self._warn(
            f"dropped {len(found)} damaged entr{'y' if len(found) == 1 else 'ies'} ({shown}); "
            f"{'it' if len(found) == 1 else 'they'} will be recomputed"
        )

    def _warn(self, message: str) -> None:
        warnings.warn(f"{self.describe()}: {message}", CacheWarning, stacklevel=4)

    # ------------------------------------------------------------------------------------ opening
    def _open(self) -> sqlite3.Connection:
        if self.path is None:
            db = self._connect()
            self._create(db)
            return db
        with self._errors():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._open_lock():
            db = self._connect()
            problem = self._check_or_create(db)
            if problem is not None:
                db.close()
                backup = self._set_aside()
                self.problems.append(problem)
                self._warn(f"{problem}; the old file was moved to {backup} and the cache starts empty")
                db = self._connect()
                again = self._check_or_create(db)
                if again is not None:
                    raise StoreError(f"{self.describe()}: cannot create a fresh store ({again}); delete the file")
        self._conn = db  # _load_all below reads through it
        self._conn_pid = os.getpid()
        self._load_all()  # every row's checksum once: damaged rows are reported when the store is opened
        return db

    @contextlib.contextmanager
    def _open_lock(self) -> Iterator[None]:
        """Only one process at a time checks, sets aside or creates the file (another would move a fresh one)."""
        assert self.path is not None
        if fcntl is None:
            yield
            return
        with self._errors(), open(self.path.with_name(self.path.name + ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _check_or_create(self, db: sqlite3.Connection) -> str | None:
        """Why the database cannot be used for this store, or None (creating the schema in an empty file)."""
        try:
            with self._errors():
                self._configure(db)
                db.execute("BEGIN IMMEDIATE")
                try:
                    problem = self._check_schema(db)
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
            return f"it is not a readable database ({exc})"  # (operational errors became StoreErrors above)
        return problem

    def _check_schema(self, db: sqlite3.Connection) -> str | None:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            self._create(db)
            return None
        if not {"meta", "records", "claims", "locks"} <= tables:
            return f"it is a database of another program (tables {sorted(tables)})"
        meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
        if meta.get("format") != FORMAT_NAME:
            return f"it is not an lm_plugin record store (format {meta.get('format')!r})"
        if meta.get("version") != str(FORMAT_VERSION):
            return f"it has format version {meta.get('version')!r}, this lm_plugin reads {FORMAT_VERSION}"
        if meta.get("table") != self.TABLE:
            return f"it belongs to another table ({meta.get('table')!r})"
        try:
            signature = json.loads(meta.get("signature", ""))
        except ValueError:
            return "its signature is unreadable"
        if signature != self.signature:
            return f"it was built with a different {self.SIGNED_BY} ({signature_diff(signature, self.signature)})"
        (integrity,) = db.execute("PRAGMA quick_check").fetchone()
        if integrity != "ok":
            return f"the database is damaged ({integrity})"
        return None

    def _create(self, db: sqlite3.Connection) -> None:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.executemany(
            "INSERT INTO meta (name, value) VALUES (?, ?)",
            [("format", FORMAT_NAME), ("version", str(FORMAT_VERSION)), ("table", self.TABLE),
             ("signature", canonical_json(self.signature))],
        )

    def _set_aside(self) -> Path:
        """Move the file (and SQLite's -wal / -shm companions) to ``<name>.bak``; return the backup's path."""
        assert self.path is not None
        backup = self.path.with_name(self.path.name + BACKUP_SUFFIX)
        for companion in ("", "-wal", "-shm"):
            source = Path(str(self.path) + companion)
            if source.exists():
                with self._errors():
                    os.replace(source, Path(str(backup) + companion))
            else:
                Path(str(backup) + companion).unlink(missing_ok=True)  # an older backup's companion is not this one's
        return backup
