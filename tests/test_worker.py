"""The measurement worker: timings come from a separate, controlled process, which survives its own death."""

from __future__ import annotations

import os
import signal
import warnings

import pytest
import torch
from torch import nn

from lm_plugin.latency import (
    LatencyError,
    LatencyTable,
    MeasurementWorker,
    ModuleSpec,
    WorkerConfig,
    WorkerFallbackWarning,
    default_worker,
    get_profiler,
)
from lm_plugin.latency.worker import DEFAULT_MALLOC

FAST = {"warmup": 1, "repeats": 3, "retries": 0, "max_spread": 1e6, "threads": 1, "batch_size": 2}


class WhereAmI(nn.Module):
    """Records the id of the process that runs it (in a buffer the worker cannot send back) and raises if asked."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("this module refuses to run")
        _RAN_IN.add(os.getpid())
        return self.conv(x)


_RAN_IN: set[int] = set()


@pytest.fixture(scope="module")
def worker():
    with MeasurementWorker() as w:
        yield w


def test_cpu_backends_time_in_the_default_worker_not_in_this_process():
    profiler = get_profiler("cpu", **FAST)
    assert profiler.worker is default_worker()
    assert profiler.signature()["timed_in"]["process"] == "worker"
    _RAN_IN.clear()
    m = profiler.measure(WhereAmI(), (1, 3, 8, 8))
    assert m.median_ms > 0 and m.runs == 3
    assert os.getpid() not in _RAN_IN, "the module ran in the calling process"
    # An explicit worker=None times here (and the signature says so, so the two never share a cache).
    here = get_profiler("cpu", **FAST, worker=None)
    here.measure(WhereAmI(), (1, 3, 8, 8))
    assert os.getpid() in _RAN_IN
    assert here.signature() != profiler.signature()


def test_worker_runs_with_its_own_allocator_settings_whatever_the_caller_has(worker, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # what made one user's table 2x too slow
    worker.close()
    info = worker.ping()
    assert info["pid"] != os.getpid()
    assert info["malloc"] == dict(DEFAULT_MALLOC)
    assert info["interop_threads"] == 1


def test_worker_pinned_to_a_core():
    core = sorted(os.sched_getaffinity(0))[-1]
    with MeasurementWorker(WorkerConfig(cpus=(core,))) as pinned:
        assert pinned.ping()["cpus"] == [core]
        assert get_profiler("cpu", **FAST, worker=pinned).signature()["timed_in"]["cpus"] == [core]


def test_a_module_that_fails_gives_the_workers_message_and_the_worker_lives_on(worker):
    profiler = get_profiler("cpu", **FAST, worker=worker)
    with pytest.raises(LatencyError, match="refuses to run"):
        profiler.measure(WhereAmI(fail=True), (1, 3, 8, 8))
    pid = worker.pid
    assert profiler.measure(WhereAmI(), (1, 3, 8, 8)).median_ms > 0
    assert worker.pid == pid, "an error inside a measurement does not cost a restart"


def test_a_module_that_cannot_be_sent_is_timed_here_with_a_warning(worker):
    class Local(nn.Module):  # defined in a function: a fresh process cannot import it
        def forward(self, x):
            return x + 1

    profiler = get_profiler("cpu", **FAST, worker=worker)
    # timed in this process instead, with a warning that says why and what that means
    with pytest.warns(WorkerFallbackWarning, match="importable module.*depends on what this process did"):
        assert profiler.measure(Local(), (1, 3, 8, 8)).median_ms > 0
    with pytest.warns(WorkerFallbackWarning):
        assert set(profiler.measure_together({"a": Local(), "b": WhereAmI()}, (1, 3, 8, 8))) == {"a", "b"}
    # bad inputs are refused in this process with the library's usual error
    with pytest.raises(TypeError, match="inputs must be"):
        profiler.measure(WhereAmI(), "not a shape")


def test_a_worker_killed_mid_table_is_restarted_and_the_build_resumes(tmp_path):
    worker = MeasurementWorker()
    profiler = get_profiler("cpu", **FAST, worker=worker)
    killed: list[int] = []

    def build(k: int) -> nn.Module:
        if k == 3 and not killed:  # the worker dies while the table is being built
            killed.append(worker.pid)
            os.kill(worker.pid, signal.SIGKILL)
        return nn.Conv2d(4, 4, k, padding=k // 2)

    specs = {k: ModuleSpec(lambda k=k: build(k), (1, 4, 8, 8), {"k": k}) for k in (1, 3, 5)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = LatencyTable.build(specs, profiler, cache=tmp_path / "lat.sqlite", progress=False)
    assert killed and worker.starts == 2 and worker.pid not in killed
    assert sorted(table.keys()) == [1, 3, 5] and all(table.ms(k) > 0 for k in (1, 3, 5))
    worker.close()


def test_remote_worker_over_tcp(tmp_path):
    """A worker started by hand (as on a deployment machine) and reached by address and key."""
    import socket
    import subprocess
    import sys

    from lm_plugin.latency import RemoteWorker
    from lm_plugin.latency.worker import AUTHKEY_ENV

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "00112233445566778899aabbccddeeff"
    env = {**os.environ, AUTHKEY_ENV: key, "PYTHONPATH": os.pathsep.join(sys.path)}
    server = subprocess.Popen([sys.executable, "-m", "lm_plugin.latency", "--listen", f"127.0.0.1:{port}",
                               "--no-lock"], env=env, stdout=subprocess.PIPE)
    try:
        assert server.stdout.readline().strip() == b"ready"
        remote = RemoteWorker(f"127.0.0.1:{port}", key, description="test box")
        profiler = get_profiler("cpu", **FAST, worker=remote)
        assert profiler.signature()["timed_in"] == {"process": "remote worker", "at": "test box"}
        assert profiler.measure(WhereAmI(), (1, 3, 8, 8)).median_ms > 0
        with pytest.raises(LatencyError, match="refuses to run"):
            profiler.measure(WhereAmI(fail=True), (1, 3, 8, 8))
        remote.close()
    finally:
        server.kill()
        server.wait()
    with pytest.raises(LatencyError, match="cannot reach"):
        get_profiler("cpu", **FAST, worker=RemoteWorker(f"127.0.0.1:{port}", key)).measure(WhereAmI(), (1, 3, 8, 8))
