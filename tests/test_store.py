"""The record store under the tables: crash-safe, shared by real processes, claims and locks, damage detected.

Writers are real processes (multiprocessing, fork) on real files; who computed what is counted in a side file that
each computation appends one line to. No assertion depends on how fast anything runs.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sqlite3
import sys
import time
import warnings
from pathlib import Path

import pytest

from lm_plugin.latency import LatencyCache, LatencyCacheWarning, Measurement
from lm_plugin.store import CacheWarning, RecordStore, StoreBusyError, signed_store_path
from lm_plugin.store.owner import Holder
from lm_plugin.tables.importance import ImportanceCache

if "fork" not in multiprocessing.get_all_start_methods():  # pragma: no cover
    pytest.skip("the multi-process tests fork", allow_module_level=True)
FORK = multiprocessing.get_context("fork")
SIGNATURE = {"what": "squares", "version": 1}
KEYS = list(range(12))


class SquaresStore(RecordStore):
    """A table of squares: a stand-in for any table whose entries take a while to compute."""

    TABLE = "squares table"
    SIGNED_BY = "recipe"

    def _decode_value(self, data):
        if not isinstance(data, int):
            raise TypeError("a square is an integer")
        return data


def square(log: Path, delay_s: float = 0.0):
    """``n -> n * n``, appending ``"<n> <pid>"`` to ``log`` first: the log says who computed what, how often."""

    def compute(n: int) -> int:
        with open(log, "a") as f:  # one short O_APPEND write per line: lines of processes never mix
            f.write(f"{n} {os.getpid()}\n")
        time.sleep(delay_s)
        return n * n

    return compute


def computed(log: Path) -> list[tuple[int, int]]:
    """``(key, pid)`` per computation, in order."""
    if not log.exists():
        return []
    return [(int(n), int(pid)) for n, pid in (line.split() for line in log.read_text().splitlines())]


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------- crash and resume
def _fill_until_hanging(path: str, log: str, hang_at: int) -> None:
    compute = square(Path(log))

    def hangs(n: int) -> int:
        if n == hang_at:
            time.sleep(600)  # killed in here, holding the claim on this entry
        return compute(n)

    SquaresStore(path, SIGNATURE).fill(KEYS, hangs)


def test_a_killed_build_keeps_its_entries_and_the_resumed_one_computes_only_the_missing(tmp_path):
    path, log, hang_at = tmp_path / "squares.sqlite", tmp_path / "log", 5
    writer = FORK.Process(target=_fill_until_hanging, args=(str(path), str(log), hang_at))
    writer.start()
    try:
        wait_for(lambda: path.exists(), "the store file")
        store = SquaresStore(path, SIGNATURE)
        wait_for(lambda: store.holder(hang_at) is not None, "the writer to claim the entry it hangs in")
        assert store.holder(hang_at) == f"{socket.gethostname()}:{writer.pid}"
    finally:
        os.kill(writer.pid, signal.SIGKILL)  # no clean-up of any kind: what a crash or an OOM kill does
        writer.join(30)
    assert writer.exitcode == -signal.SIGKILL
    assert len(store) == hang_at, "every committed entry stays"
    assert store.holder(hang_at) is None, "the claim of the killed writer lapsed"

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing about the crash needs repairing
        resumed = SquaresStore(path, SIGNATURE)
        values = resumed.fill(KEYS, square(log))
    assert values == [n * n for n in KEYS]
    assert [n for n, pid in computed(log) if pid == os.getpid()] == KEYS[hang_at:], "only the missing ones"
    assert [n for n, _ in computed(log)] == KEYS, "each entry computed once over both runs"


# --------------------------------------------------------------------------------------- concurrent writers
def run_together(count: int, target, path: Path, log: Path) -> list[int | None]:
    """Start ``count`` processes running ``target(path, log, start)``, let them go at once, return their exit codes."""
    start = FORK.Event()
    workers = [FORK.Process(target=target, args=(str(path), str(log), start)) for _ in range(count)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(120)
    return [worker.exitcode for worker in workers]


def _fill_together(path: str, log: str, start) -> None:
    start.wait(30)
    values = SquaresStore(path, SIGNATURE).fill(KEYS, square(Path(log), delay_s=0.05))
    sys.exit(0 if values == [n * n for n in KEYS] else 1)


def test_processes_filling_one_store_compute_each_entry_exactly_once(tmp_path):
    path, log = tmp_path / "squares.sqlite", tmp_path / "log"
    SquaresStore(path, SIGNATURE).close()  # the file exists before the race, so they all race on the entries
    assert run_together(3, _fill_together, path, log) == [0, 0, 0], "every worker returns the complete table"
    done = computed(log)
    assert sorted(n for n, _ in done) == KEYS, "each entry computed exactly once"
    assert len({pid for _, pid in done}) > 1, "the work was shared"
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM claims").fetchone() == (0,), "every claim released by its put"


def test_processes_opening_a_foreign_file_at_once_set_it_aside_once(tmp_path):
    path, log = tmp_path / "squares.sqlite", tmp_path / "log"
    path.write_bytes(b"not a database " * 100)
    assert run_together(3, _fill_together, path, log) == [0, 0, 0]
    assert Path(str(path) + ".bak").read_bytes() == b"not a database " * 100, "the foreign file, not a fresh store"
    assert sorted(n for n, _ in computed(log)) == KEYS


# ----------------------------------------------------------------------------------------------- claims
def _claim_and_die(path: str, key: int) -> None:
    assert SquaresStore(path, SIGNATURE).claim(key)
    os._exit(0)  # exits without releasing it


def test_claims_go_to_one_claimant_and_lapse_with_their_holder(tmp_path):
    path = tmp_path / "squares.sqlite"
    a, b = SquaresStore(path, SIGNATURE, owner="a"), SquaresStore(path, SIGNATURE, owner="b")
    assert a.claim(1) and a.claim(1), "one claimant; claiming again what it holds succeeds"
    assert not b.claim(1) and b.holder(1) == "a"
    a.put(1, 1)
    assert a.holder(1) is None and not b.claim(1) and not a.claim(1), "released by put; a stored entry is done"
    assert a.claim(2)
    a.release(2)
    assert b.claim(2) and b.holder(2) == "b"

    short = SquaresStore(path, SIGNATURE, owner="short", lease_s=0.05)  # a holder whose lease runs out
    assert short.claim(3) and not b.claim(3)
    time.sleep(0.1)
    assert b.claim(3), "an expired lease is taken over"

    child = FORK.Process(target=_claim_and_die, args=(str(path), 4))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert b.holder(4) is None and b.claim(4), "the claim of a process that exited is taken over at once"


def test_a_recycled_pid_or_a_zombie_is_not_the_holder():
    me = Holder.current()
    assert not me.is_dead()
    if me.started is not None:  # /proc is there
        assert Holder(me.host, me.pid, "0").is_dead(), "same pid, another start time: another process"
        child = FORK.Process(target=os._exit, args=(0,))
        child.start()
        wait_for(lambda: open(f"/proc/{child.pid}/stat").read().split(")")[1].split()[0] == "Z", "a zombie")
        assert Holder(me.host, child.pid, None).is_dead(), "exited but not yet reaped"
        child.join()
    assert not Holder("some-other-host", 1, None).is_dead(), "another host's process: its lease decides"


def _measure_exclusively(path: str, log: str, start) -> None:
    store = SquaresStore(path, SIGNATURE)
    start.wait(30)
    with store.exclusive("measure"):
        missing = [n for n in KEYS if n not in store]
        with open(log, "a") as f:
            f.write(f"enter {os.getpid()} {len(missing)}\n")
        for n in missing:
            store.put(n, square(Path(log + ".entries"), delay_s=0.01)(n))
        with open(log, "a") as f:
            f.write(f"leave {os.getpid()} 0\n")


def test_the_exclusive_lock_serialises_processes_and_the_waiter_reads_what_was_done(tmp_path):
    path, log = tmp_path / "squares.sqlite", tmp_path / "log"
    SquaresStore(path, SIGNATURE).close()
    assert run_together(2, _measure_exclusively, path, log) == [0, 0]
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["enter", "leave", "enter", "leave"], "never two inside at once"
    assert events[0][1] == events[1][1] and events[2][1] == events[3][1]
    assert (int(events[0][2]), int(events[2][2])) == (len(KEYS), 0), "the second found everything done"
    assert sorted(n for n, _ in computed(Path(str(log) + ".entries"))) == KEYS


def test_waiting_for_the_lock_can_time_out(tmp_path):
    path = tmp_path / "squares.sqlite"
    holder, waiter = SquaresStore(path, SIGNATURE, owner="holder"), SquaresStore(path, SIGNATURE, owner="waiter")
    waits: list[str] = []
    busy = rf"^squares table cache {path}: waited over 0.1 s for the 'measure' lock, which holder holds"
    with holder.exclusive("measure"), holder.exclusive("measure"):  # nested in one process: allowed
        with pytest.raises(StoreBusyError, match=busy):
            with waiter.exclusive("measure", timeout_s=0.1, poll_s=0.02, on_wait=waits.append):
                pass
    assert waits == ["holder"]
    with waiter.exclusive("measure", timeout_s=0.1):  # free again after the outer block
        pass


def _use_the_parents_store(store: SquaresStore) -> None:
    store.put(2, 4)  # through a connection of its own: SQLite's locks do not survive a fork
    sys.exit(0 if store.get(1) == 1 else 1)


def test_a_forked_child_can_use_the_store_it_inherited(tmp_path):
    store = SquaresStore(tmp_path / "squares.sqlite", SIGNATURE)
    store.put(1, 1)
    child = FORK.Process(target=_use_the_parents_store, args=(store,))
    child.start()
    child.join(30)
    assert child.exitcode == 0 and store.get(2) == 4


# ------------------------------------------------------------------------------------ damage and foreign data
MEASUREMENT = Measurement(1.0, 0.9, 1.1, 0.8, 0.2, 0.2, 3, 1, True, "cpu", "x", 1, 1, "float32", ((1, 4),))
TABLES = [(LatencyCache, "latency table", MEASUREMENT), (ImportanceCache, "importance table", -1.5)]


def make_foreign(path: Path, how: str, cls) -> None:
    if how == "not-a-database":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" * 64)
        return
    if how == "other-program":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE notes (text TEXT)")
        return
    other = ImportanceCache if cls is LatencyCache else LatencyCache
    opener = other if how == "other-table" else cls
    opener(path, {"v": 2} if how == "other-signature" else {"v": 1}).close()
    if how == "other-version":
        with sqlite3.connect(path) as db:
            db.execute("UPDATE meta SET value = '99' WHERE name = 'version'")


@pytest.mark.parametrize(("cls", "table", "value"), TABLES, ids=["latency", "importance"])
@pytest.mark.parametrize(
    ("how", "cause"),
    [
        ("not-a-database", "it is not a readable database"),
        ("other-program", "it is a database of another program"),
        ("other-version", "it has format version '99', this lm_plugin reads 1"),
        ("other-table", "it belongs to another table"),
        ("other-signature", r"it was built with a different .*\(v: 2 -> 1\)"),
    ],
)
def test_a_foreign_file_is_set_aside_with_a_warning_naming_the_table(tmp_path, cls, table, value, how, cause):
    path = tmp_path / "cache.sqlite"
    make_foreign(path, how, cls)
    before = path.read_bytes()
    with pytest.warns(CacheWarning, match=rf"^{table} cache {path}: {cause}.*moved to {path}.bak.*starts empty"):
        store = cls(path, {"v": 1})
    assert len(store) == 0 and len(store.problems) == 1
    assert Path(str(path) + ".bak").read_bytes()[:16] == before[:16], "kept aside, not deleted"
    store.put(["k"], value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cls(path, {"v": 1}).get(["k"]) == value, "the fresh store is used from then on"


@pytest.mark.parametrize(("cls", "table", "value"), TABLES, ids=["latency", "importance"])
def test_a_row_failing_its_checksum_is_dropped_and_recomputed(tmp_path, cls, table, value):
    path = tmp_path / "cache.sqlite"
    store = cls(path, {"v": 1})
    for n in range(3):
        store.put([n], value)
    with sqlite3.connect(path) as db:  # a flipped digit, as a bad sector or a careless hand leaves it
        db.execute("UPDATE records SET value = replace(value, '1', '7') WHERE key = '[1]'")
    with pytest.warns(CacheWarning, match=rf"^{table} cache {path}: dropped 1 damaged entry \(entry \[1\]: checksum"):
        assert store.get([1]) is None, "never used"
    redone: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = store.fill([[n] for n in range(3)], lambda key: redone.append(key) or value)
    assert redone == [[1]] and values == [value] * 3


def test_damaged_rows_are_reported_when_the_store_is_opened(tmp_path):
    path = tmp_path / "squares.sqlite"
    store = SquaresStore(path, SIGNATURE)
    store.fill(KEYS, lambda n: n * n)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE records SET checksum = 'x' WHERE key IN ('2', '3')")
        db.execute("UPDATE records SET value = X'00ff' WHERE key = '4'")
    with pytest.warns(CacheWarning, match=r"^squares table cache .*: dropped 3 damaged entries .*will be recomputed"):
        reopened = SquaresStore(path, SIGNATURE)
    assert len(reopened) == len(KEYS) - 3 and len(reopened.problems) == 3
    assert {k for k, _ in reopened.items()} == set(KEYS) - {2, 3, 4}


def test_keys_compare_in_canonical_form_and_none_is_refused(tmp_path):
    store = SquaresStore(None, SIGNATURE)
    store.put({"b": [1, 2], "a": (3,)}, 1)
    assert store.get({"a": [3], "b": (1, 2)}) == 1 and len(store) == 1
    with pytest.raises(TypeError, match=r"squares table cache .*cannot store None"):
        store.put("k", None)
    assert LatencyCacheWarning is CacheWarning, "the old name of the one cache warning still works"
    path = signed_store_path(tmp_path, "squares", SIGNATURE)
    assert path.suffix == ".sqlite"
    assert path == signed_store_path(tmp_path, "squares", dict(reversed(SIGNATURE.items()))), "canonical signature"
