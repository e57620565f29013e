"""Who holds a claim or lock, and whether that holder still runs.

A holder is recorded as host name, process id and the process's start time (from ``/proc``, where there is one).
On the same host a holder is alive while a process with that id runs, is not a zombie and started at the recorded
time (so a recycled pid is not mistaken for the holder). Another host's process cannot be checked: its claim
lives until its lease runs out.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time in clock ticks since boot)`` of ``pid`` from ``/proc``, or None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # the command name in parentheses may contain spaces
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Holder:
    """A process that may hold claims: host name, pid and start time (None where ``/proc`` is missing)."""

    host: str
    pid: int
    started: str | None

    @classmethod
    def current(cls) -> Holder:
        """This process."""
        pid = os.getpid()
        stat = _proc_stat(pid)
        return cls(socket.gethostname(), pid, stat[1] if stat else None)

    def label(self) -> str:
        """``host:pid``, the default owner name of this process's claims."""
        return f"{self.host}:{self.pid}"

    def is_dead(self) -> bool:
        """True when this holder is known to have exited: same host, and no live process with its pid and start
        time. A holder on another host is never known dead (its lease decides)."""
        if self.host != socket.gethostname():
            return False
        if not _pid_running(self.pid):
            return True
        stat = _proc_stat(self.pid)
        if stat is None:
            return False
        state, started = stat
        return state in ("Z", "X") or (self.started is not None and started != self.started)
