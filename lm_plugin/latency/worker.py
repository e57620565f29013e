"""Timing in a controlled process: the measurement worker.

CPU timings of layers whose activations are megabytes depend on the state of the process that runs them: glibc's
allocator serves large blocks from fresh, page-faulting ``mmap`` s or from a reused heap depending on what the
process allocated and freed before (its *dynamic* mmap threshold). Measured here: one 16→16 3×3 conv at
64×16×28×28 took 7.5 ms in a fresh process, 3.9 ms after loading a dataset and training, and 3.8 ms in either state
with the thresholds fixed. A latency table timed in the caller's process therefore depends on whatever the caller
did first (loaded data, trained, ran inside an NNI trial), and so did every prediction built on it.

So profilers send what they time to a *worker*: a separate Python process started with a fixed configuration
(:class:`WorkerConfig`: allocator thresholds pinned, one inter-op thread, optional CPU affinity, the same
environment whatever the caller's), reused for every measurement of the calling process, and doing nothing but
timing. A machine-wide lock around each measurement keeps two workers (two tables, two test processes) from timing
at once. The profiler's own protocol (warm-up, flushes, rounds) runs unchanged inside the worker.

The worker speaks :mod:`multiprocessing.connection` (authenticated, pickles as ``torch.save`` bytes, so it crosses
machines): :class:`RemoteWorker` connects to one started elsewhere with ``python -m lm_plugin.latency
--listen HOST:PORT`` — the deployment box timing for a search that runs on a training machine.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import fcntl
import io
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigurationError, LayerMergeError
from .errors import LatencyError, UnsendableModuleError

if TYPE_CHECKING:
    from .measurement import Measurement
    from .profiler import Profiler

#: glibc allocator settings of a worker. Fixing the mmap threshold turns off its dynamic adjustment (the cause of
#: the state dependence): blocks up to 32 MiB (glibc's largest allowed threshold) come from the heap, and a trim
#: threshold of 4 GiB keeps freed heap memory mapped, so a layer run twice finds its memory as a long-running
#: inference server would. Larger blocks are mmapped afresh every time, in every state alike.
DEFAULT_MALLOC: Mapping[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024**2),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 1024**3),
    "MALLOC_TOP_PAD_": str(64 * 1024**2),
}
#: Environment variables a worker never inherits from its caller: they would change what it measures.
_CONTROLLED_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "OMP_", "MKL_", "KMP_", "LD_PRELOAD")
#: Seconds a starting worker may take to import torch and report ready.
START_TIMEOUT = 180.0
#: The environment variable that holds a worker's authentication key (never on its command line).
AUTHKEY_ENV = "LM_PLUGIN_WORKER_AUTHKEY"
#: ``LM_PLUGIN_WORKER=off`` makes ``worker="auto"`` time in the calling process (debugging only: timings then
#: depend on what that process did before).
WORKER_ENV = "LM_PLUGIN_WORKER"
#: Where the machine-wide measurement lock lives unless ``LM_PLUGIN_MEASURE_LOCK`` names another file.
LOCK_ENV = "LM_PLUGIN_MEASURE_LOCK"


@dataclass(frozen=True)
class WorkerConfig:
    """How a local measurement worker process is started. Part of every profiler signature that uses it, so a
    table timed under another configuration is never reused.

    Attributes:
        malloc: glibc allocator environment of the worker (see :data:`DEFAULT_MALLOC`); the caller's own
            ``MALLOC_*`` settings are never passed on.
        cpus: CPU cores the worker is pinned to (``os.sched_setaffinity``), or None to leave it to the scheduler.
            Pinning to idle cores makes timings steadier on a busy machine; pin as many cores as the profiler's
            threads.
        lock: take the machine-wide measurement lock around each measurement, so that two workers on one machine
            never time at once.
    """

    malloc: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_MALLOC))
    cpus: tuple[int, ...] | None = None
    lock: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "malloc", dict(self.malloc))
        if self.cpus is not None:
            cpus = tuple(int(c) for c in self.cpus)
            if not cpus or any(c < 0 for c in cpus):
                raise ConfigurationError(f"cpus must be a non-empty list of core numbers or None, got {self.cpus}")
            object.__setattr__(self, "cpus", cpus)

    def describe(self) -> dict[str, Any]:
        """What about the worker changes a measurement (goes into profiler signatures)."""
        return {"process": "worker", "malloc": dict(sorted(self.malloc.items())),
                "cpus": list(self.cpus) if self.cpus is not None else None}

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.malloc.items())), self.cpus, self.lock))


def _encode(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _decode(data: bytes) -> Any:
    # Our own peer's bytes over an authenticated connection: full pickles (modules, profilers) are intended.
    return torch.load(io.BytesIO(data), weights_only=False)


class MeasurementWorker:
    """A separate process that times modules for profilers, started on first use and reused.

    Profilers use the process-wide default worker (:func:`default_worker`) unless given another; build one
    yourself to pin it to cores or change its allocator settings:

    ```python
    worker = MeasurementWorker(WorkerConfig(cpus=(1,)))
    profiler = get_profiler("cpu", batch_size=64, threads=1, worker=worker)
    ```

    A worker that dies (killed, out of memory, a crashing module) is started again and the request is sent once
    more; a second death raises :class:`~lm_plugin.latency.LatencyError`. Errors inside the worker (a module
    that cannot run on the inputs) come back as :class:`~lm_plugin.latency.LatencyError` with the worker's
    message.

    Args:
        config: how the process is started.
        start_timeout: seconds to wait for a starting worker to report ready.
    """

    def __init__(self, config: WorkerConfig | None = None, *, start_timeout: float = START_TIMEOUT) -> None:
        self.config = config or WorkerConfig()
        self.start_timeout = start_timeout
        #: How many times the worker process was started (1 after first use; more after restarts).
        self.starts = 0
        #: How many measurement requests the worker answered.
        self.requests = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._mutex = threading.Lock()  # one request at a time per worker (threads share a connection)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        atexit.register(self.close)

    # ------------------------------------------------------------------------------------------ lifecycle
    def describe(self) -> dict[str, Any]:
        """The worker's part of a profiler signature."""
        return self.config.describe()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()}, pid={self.pid}, starts={self.starts})"

    @property
    def pid(self) -> int | None:
        """Process id of the running worker, or None when none runs."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_CONTROLLED_PREFIXES)}
        env.update(self.config.malloc)
        # The worker must import what the caller imports (its models' classes): hand on the caller's path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
        return env

    def _start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="lm_plugin-worker-")
        address = str(Path(self._tmp.name) / "socket")
        authkey = secrets.token_bytes(16)
        command = [sys.executable, "-m", "lm_plugin.latency", "--listen", f"unix:{address}", "--once"]
        if self.config.cpus is not None:
            command += ["--cpus", ",".join(map(str, self.config.cpus))]
        if not self.config.lock:
            command += ["--no-lock"]
        env = self._environment() | {AUTHKEY_ENV: authkey.hex()}
        self._process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert self._process.stdout is not None
        line = _readline(self._process.stdout, self.start_timeout)
        if line.strip() != b"ready":
            code = self._process.poll()
            self._kill()
            raise LatencyError(
                f"the measurement worker did not start (exit code {code}, said {line[:200]!r}); run "
                "`python -m lm_plugin.latency --check` to see its error, or time in this process with "
                "worker=None (timings then depend on what this process did before)."
            )
        self._conn = Client(address, family="AF_UNIX", authkey=authkey)
        self.starts += 1

    def _kill(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            with contextlib.suppress(Exception):
                self._process.wait(timeout=10)
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def close(self) -> None:
        """Stop the worker process (a later request starts a new one)."""
        with self._mutex:
            if self._conn is not None:
                with contextlib.suppress(OSError, EOFError):
                    self._conn.send_bytes(_encode(("stop",)))
            self._kill()

    def __enter__(self) -> MeasurementWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ requests
    def _connected(self) -> Connection:
        if self._conn is None or self.pid is None:
            self._kill()
            self._start()
        assert self._conn is not None
        return self._conn

    def _exchange(self, payload: bytes) -> Any:
        conn = self._connected()
        conn.send_bytes(payload)
        return _decode(conn.recv_bytes())

    def _request(self, request: tuple[Any, ...], what: str) -> Any:
        try:
            payload = _encode(request)
        except Exception as exc:  # pickling raises many types
            raise UnsendableModuleError(
                f"{what} cannot be sent to the measurement worker ({type(exc).__name__}: {exc}); define its classes "
                "in an importable module rather than in a notebook cell or a function"
            ) from exc
        with self._mutex:
            for attempt in (1, 2):
                try:
                    reply = self._exchange(payload)
                    break
                except (EOFError, ConnectionError, BrokenPipeError, OSError) as exc:
                    code = self._process.poll() if self._process is not None else None
                    self._kill()
                    if attempt == 2:
                        raise LatencyError(
                            f"the measurement worker died twice while timing {what} (exit code {code}: "
                            f"{type(exc).__name__}). A module that crashes its process, or too little memory for "
                            "it, are the usual causes."
                        ) from exc
            self.requests += 1
        status, *body = reply
        if status == "ok":
            return body[0]
        kind, message, trace, raised = body
        if isinstance(raised, LayerMergeError):
            raise raised  # the library's own refusal (bad settings, bad inputs): same type as in this process
        if kind == "unpickle":
            raise UnsendableModuleError(
                f"the measurement worker could not load {what} ({message}); its classes must be importable by a "
                "fresh Python process (not defined in __main__, a notebook or a function) and pickle"
            )
        raise LatencyError(f"the measurement worker could not time {what}: {message}\n--- in the worker ---\n{trace}")

    def measure(self, profiler: Profiler, module: nn.Module, inputs: Any) -> Measurement:
        """``profiler.measure(module, inputs)`` run in the worker (without warnings: the caller reports)."""
        return self._request(("measure", _here(profiler), module, inputs), _describe(module))

    def measure_together(self, profiler: Profiler, modules: Mapping[str, nn.Module], inputs: Any,
                         chunk: int) -> dict[str, Measurement]:
        """``profiler.measure_together(modules, inputs, chunk=chunk)`` run in the worker."""
        return self._request(("together", _here(profiler), dict(modules), inputs, chunk),
                             ", ".join(_describe(m) for m in modules.values()))

    def ping(self) -> dict[str, Any]:
        """The worker's own account of its configuration (pid, allocator environment, threads, affinity)."""
        return self._request(("ping",), "a ping")


class RemoteWorker(MeasurementWorker):
    """A worker started elsewhere (``python -m lm_plugin.latency --listen HOST:PORT`` on the deployment
    machine, with the key in ``$LM_PLUGIN_WORKER_AUTHKEY``): this process only connects to it.

    The worker must run the same lm_plugin and torch versions, and import the modules' classes. It serves one
    connection at a time, so profilers of several searches sharing it never time at once.

    Args:
        address: ``"host:port"`` or ``"unix:/path"``.
        authkey: the worker's key (bytes or hex string).
        description: how the worker's machine is named in signatures (defaults to the address).
    """

    def __init__(self, address: str, authkey: bytes | str, *, description: str | None = None) -> None:
        super().__init__(WorkerConfig(malloc={}, lock=False))
        self.address = address
        self.authkey = bytes.fromhex(authkey) if isinstance(authkey, str) else authkey
        self.description = description or address

    def describe(self) -> dict[str, Any]:
        return {"process": "remote worker", "at": self.description}

    @property
    def pid(self) -> int | None:
        return None

    def _connected(self) -> Connection:
        if self._conn is None:
            family, target = _parse_address(self.address)
            try:
                self._conn = Client(target, family=family, authkey=self.authkey)
            except OSError as exc:
                raise LatencyError(f"cannot reach the measurement worker at {self.address}: {exc}") from exc
            self.starts += 1
        return self._conn

    def _kill(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None


def worker_disabled() -> bool:
    """True when ``$LM_PLUGIN_WORKER`` turns the default worker off."""
    return os.environ.get(WORKER_ENV, "").strip().lower() in {"0", "off", "no", "none", "inline", "false"}


_DEFAULT: dict[WorkerConfig, MeasurementWorker] = {}
_DEFAULT_LOCK = threading.Lock()


def default_worker(config: WorkerConfig | None = None) -> MeasurementWorker:
    """The process-wide worker for ``config`` (the default configuration if None), created on first use and
    shared by every profiler of this process that does not name another."""
    config = config or WorkerConfig()
    with _DEFAULT_LOCK:
        if config not in _DEFAULT:
            _DEFAULT[config] = MeasurementWorker(config)
        return _DEFAULT[config]


def _here(profiler: Profiler) -> Profiler:
    """A copy of ``profiler`` that times in the process it is in (what runs inside the worker)."""
    inline = copy.copy(profiler)
    inline.worker = None
    return inline


def _describe(module: nn.Module) -> str:
    return f"{type(module).__name__} module"


def _readline(stream: io.BufferedReader | Any, timeout: float) -> bytes:
    """One line from a child's stdout, or b"" after ``timeout`` seconds (the child is then killed by the caller)."""
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else b""


def _parse_address(address: str) -> tuple[str, Any]:
    if address.startswith("unix:"):
        return "AF_UNIX", address.removeprefix("unix:")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigurationError(f"worker address must be 'host:port' or 'unix:/path', got {address!r}")
    return "AF_INET", (host or "127.0.0.1", int(port))


# ---------------------------------------------------------------------------------------------- the worker side
def _lock_path() -> Path:
    return Path(os.environ.get(LOCK_ENV) or Path(tempfile.gettempdir()) / f"lm_plugin-measure-{os.getuid()}.lock")


@contextlib.contextmanager
def _machine_lock(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    with open(_lock_path(), "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _answer(request: tuple[Any, ...], lock: bool) -> tuple[Any, ...]:
    op = request[0]
    if op == "ping":
        return ("ok", {
            "pid": os.getpid(),
            "malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        })
    with _machine_lock(lock):
        if op == "measure":
            _, profiler, module, inputs = request
            return ("ok", profiler.measure(module, inputs, warn_unstable=False))
        if op == "together":
            _, profiler, modules, inputs, chunk = request
            return ("ok", profiler.measure_together(modules, inputs, chunk=chunk))
    raise ConfigurationError(f"unknown worker request {op!r}")


def _serve_connection(conn: Connection, lock: bool) -> bool:
    """Answer requests until the peer leaves (returns False) or asks the worker to stop (returns True)."""
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return False
        try:
            request = _decode(data)
        except Exception as exc:
            conn.send_bytes(_encode(("error", "unpickle", f"{type(exc).__name__}: {exc}", "", None)))
            continue
        if request[0] == "stop":
            return True
        try:
            reply = _answer(request, lock)
        except Exception as exc:
            ours = exc if isinstance(exc, LayerMergeError) else None
            reply = ("error", type(exc).__name__, f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=8), ours)
        try:
            conn.send_bytes(_encode(reply))
        except Exception as exc:  # an exception object that does not pickle: send its text only
            conn.send_bytes(_encode(("error", type(exc).__name__, str(reply[2]), str(reply[3]), None)))


def serve(address: str, authkey: bytes, *, once: bool = False, lock: bool = True) -> None:
    """Run a worker: listen on ``address`` and answer one connection at a time (forever, or the first one only)."""
    family, target = _parse_address(address)
    with Listener(target, family=family, authkey=authkey) as listener:
        print("ready", flush=True)
        # Replies go through the socket; whatever imported libraries print later must not fill the caller's
        # unread pipe (which would block the worker): stdout joins stderr from here on.
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        while True:
            with listener.accept() as conn:
                stop = _serve_connection(conn, lock)
            if once or stop:
                return


def main(argv: list[str] | None = None) -> None:
    """``python -m lm_plugin.latency --listen ADDRESS``: the worker process."""
    ap = argparse.ArgumentParser(prog="python -m lm_plugin.latency", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", help="'host:port' or 'unix:/path'; the key is read from $" + AUTHKEY_ENV)
    ap.add_argument("--once", action="store_true", help="exit when the first client leaves (local workers)")
    ap.add_argument("--cpus", help="comma-separated cores to pin the worker to")
    ap.add_argument("--no-lock", action="store_true", help="do not take the machine-wide measurement lock")
    ap.add_argument("--check", action="store_true", help="import everything a worker needs, print its setup, exit")
    args = ap.parse_args(argv)
    torch.set_num_interop_threads(1)  # profilers set intra-op threads per measurement; inter-op is never used
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    from . import backends  # noqa: F401  (registers the built-in backends before requests name them)

    if args.check:
        print({"malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
               "cpus": sorted(os.sched_getaffinity(0)), "torch": torch.__version__})
        return
    if not args.listen:
        ap.error("--listen is required")
    key = os.environ.pop(AUTHKEY_ENV, "")
    if not key:
        ap.error(f"set the worker's key (hex) in ${AUTHKEY_ENV}")
    serve(args.listen, bytes.fromhex(key), once=args.once, lock=not args.no_lock)

