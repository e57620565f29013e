"""The GPU benchmark's logic (benchmarks/gpu.py, run here with ``--device cpu``) and the CUDA profiler's L2 flush and
CUDA-graph paths. Without a GPU the profiler's parts are driven with stand-ins for ``torch.cuda``; the tests that
need a card are skipped. No assertion depends on how fast anything runs."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lm_plugin.latency import CUDAProfiler, LatencyError, get_profiler
from lm_plugin.latency.backends import cuda as cuda_backend

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
gpu = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = gpu  # its dataclasses look their module up there
spec.loader.exec_module(gpu)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FAST = {"warmup": 1, "repeats": 3, "retries": 0, "max_spread": 1e6}
ROW_FIELDS = {"backend", "model", "batch", "variant", "table_backend", "measure_backend", "plan", "budget", "blocks",
              "budget_ms", "kept_convs", "predicted_ms", "measured_ms", "rel_error", "original_table_ms",
              "original_measured_ms", "predicted_speedup", "measured_speedup", "speedup_rel_error"}


def positive(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


# ------------------------------------------------------------------------------------------ benchmarks/gpu.py
@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One quick CPU run of the benchmark, shared by the tests below: two configurations (batch 1 and 2), and the
    cpu backend standing in for TensorRT (what is tested is the wiring), its engine "failing" at batch 2."""
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    measure_in_trt = gpu.run_tensorrt

    def stand_in(done, args):
        if done.config.batch == 2:
            raise RuntimeError("engine build failed")
        return measure_in_trt(done, args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu, "tensorrt_status", lambda args: {"available": True, "note": "stand-in"})
        mp.setattr(gpu, "TENSORRT_VARIANTS", ("fp32",))
        mp.setattr(gpu, "TENSORRT_BACKEND", "cpu")
        mp.setattr(gpu, "run_tensorrt", stand_in)
        result = gpu.main(["--device", "cpu", "--quick", "--batches", "1", "2", "--out", str(out),
                           "--cache-dir", str(out.parent / "cache")])
    return result, json.loads(out.read_text())


def test_cpu_run_writes_a_row_per_plan_with_positive_numbers(cpu_run):
    result, written = cpu_run
    assert written["rows"] == json.loads(json.dumps(result["rows"], default=str))
    assert written["machine"]["device"] == "cpu" and written["machine"]["torch"] == torch.__version__
    assert "cuda" in written["machine"] and written["machine"]["device_name"]
    assert written["tensorrt"] == {"available": True, "note": "stand-in"}
    assert written["importance_proxy"].startswith("-(activations removed")
    guard = written["time_guard"]
    assert guard["max_seconds"] == 450 and guard["stopped_early"] is False and guard["skipped"] == []

    configs = [(s["backend"], s["model"], s["batch"], s["variant"]) for s in written["summary"]]
    assert configs == [("cpu", "resnet18", 1, "fp32"), ("cpu", "resnet18", 2, "fp32"),
                       ("tensorrt", "resnet18", 1, "fp32"), ("tensorrt", "resnet18", 2, "fp32")]
    assert not [s for s in written["summary"] if "error" in s]
    for s in written["summary"][:2]:
        assert s["backend"] == s["signature"]["backend"] == "cpu" and s["signature"]["batch_size"] == s["batch"]
        assert positive(s["original_ms"]) and s["input"] == [3, 32, 32] and s["max_kernel"] == 3
        plans = [r for r in written["rows"] if (r["measure_backend"], r["batch"]) == ("cpu", s["batch"])]
        assert sorted(r["plan"] for r in plans) == ["budget0.5", "budget0.6", "budget0.7", "identity"]
    for r in written["rows"]:
        if "error" in r:
            continue
        if r.get("infeasible"):  # possible on a noisy machine: the table's figures decide
            assert positive(r["min_predicted_ms"]) and r["min_predicted_fraction"] > r["budget"]
            continue
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["table_backend"] == "cpu" and r["measure_backend"] in ("cpu", "tensorrt")
        for key in ("predicted_ms", "measured_ms", "original_table_ms", "original_measured_ms",
                    "predicted_speedup", "measured_speedup"):
            assert positive(r[key]), (key, r[key])
        assert math.isclose(r["predicted_speedup"], r["original_table_ms"] / r["predicted_ms"])
        assert math.isclose(r["measured_speedup"], r["original_measured_ms"] / r["measured_ms"])
        assert math.isclose(r["rel_error"], (r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"])


def test_budget_plans_meet_their_budget_and_compress(cpu_run):
    _, written = cpu_run
    for s in written["summary"][:2]:
        rows = {r["plan"]: r for r in written["rows"] if (r["measure_backend"], r["batch"]) == ("cpu", s["batch"])}
        identity = rows["identity"]
        assert identity["budget"] is None and identity["budget_ms"] is None
        assert identity["kept_convs"] == identity["chain_length"] == s["chain_length"]
        assert identity["kept_activations"] == identity["chain_length"] - 1
        for label in ("budget0.7", "budget0.6", "budget0.5"):
            r = rows[label]
            if r.get("infeasible"):
                continue
            # The DP met its budget on the table's figures, and compressed (kept fewer convs or activations) unless
            # the model predicts the uncompressed network within it (possible on a noisy machine: the table's
            # measured original is the budget's reference, the model's fit predicts the identity plan).
            assert math.isclose(r["budget_ms"], r["budget"] * s["original_ms"])
            assert r["predicted_ms"] <= r["budget_ms"] * (1 + 1e-9)
            kept = r["kept_convs"] + r["kept_activations"]
            if identity["predicted_ms"] > r["budget_ms"]:
                assert kept < identity["kept_convs"] + identity["kept_activations"]


def test_plans_get_smaller_with_the_budget_and_come_from_search():
    torch.manual_seed(0)
    pruner = gpu.ProxyPruner(gpu.MODELS["resnet18"]().eval(), example_inputs=torch.randn(1, 3, 32, 32),
                             backend="macs", max_kernel=3, cache_dir=None, progress=False, screen=None)
    found = {b: gpu.dp_plan(pruner, b) for b in (0.9, 0.7, 0.5)}
    original = pruner.latency_model().original_ms
    for b, f in found.items():
        assert f.predicted_ms == pruner.predict_latency(f.plan) <= b * original * (1 + 1e-9)
        f.plan.validate(pruner.chain)
    # The proxy charges each removed activation and conv: the objective is minus what the plan removes, and a
    # looser budget never removes more.
    removed = {b: 2 * f.plan.length - 1 - len(f.plan.kept_acts) - len(f.plan.kept_convs) for b, f in found.items()}
    assert all(f.objective == -removed[b] for b, f in found.items())
    assert 0 < removed[0.9] <= removed[0.7] <= removed[0.5]
    with pytest.raises(gpu.InfeasibleBudgetError) as info:
        gpu.dp_plan(pruner, 0.01)
    assert info.value.min_latency_ms > 0.01 * original  # end-to-end: the fixed part of the network is counted


def test_time_guard_stops_adding_configurations_and_says_so(tmp_path):
    out = tmp_path / "guard.json"
    result = gpu.main(["--device", "cpu", "--quick", "--max-seconds", "0", "--out", str(out),
                       "--cache-dir", str(tmp_path / "cache")])
    assert result["rows"] == [] and result["summary"] == []
    guard = json.loads(out.read_text())["time_guard"]
    assert guard["stopped_early"] is True and guard["max_seconds"] == 0
    assert [(s["model"], s["batch"]) for s in guard["skipped"]] == [("resnet18", 1)]
    assert "time guard" in guard["skipped"][0]["reason"]


def test_a_failing_configuration_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    calls = []

    def fails(config, args, cache_dir, deploy_cache=None):
        calls.append(config.batch)
        raise MemoryError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(gpu, "run_config", fails)
    result = gpu.main(["--device", "cpu", "--quick", "--batches", "1", "2", "--out", str(tmp_path / "f.json")])
    assert calls == [1, 2] and result["rows"] == []
    assert [(s["batch"], s["error"]) for s in result["summary"]] == [(1, "MemoryError: CUDA out of memory (stand-in)"),
                                                                      (2, "MemoryError: CUDA out of memory (stand-in)")]
    assert json.loads((tmp_path / "f.json").read_text())["summary"] == result["summary"]


def test_time_guard_estimates_from_earlier_configurations():
    guard = gpu.TimeGuard(100.0)
    a, b = gpu.Config("cuda", "m", 1, "fp32"), gpu.Config("cuda", "m", 128, "fp32")
    assert guard.estimate(a) == 0.0
    guard.record(a, 30.0)
    assert guard.estimate(gpu.Config("cuda", "m", 1, "fp16_cl")) == 30.0  # same model and batch
    assert guard.estimate(b) == 30.0  # same model, another batch
    guard.record(b, 80.0)
    assert guard.estimate(gpu.Config("cuda", "m", 128, "fp16_cl")) == 80.0
    assert guard.estimate(gpu.Config("cuda", "other", 1, "fp32")) == 0.0
    guard.start -= 30  # 30 s have passed: 30 + 80 > 100
    assert not guard.allows(gpu.Config("cuda", "m", 128, "fp16_cl"))
    assert guard.allows(gpu.Config("cuda", "other", 1, "fp32"))
    assert guard.summary()["stopped_early"] and len(guard.summary()["skipped"]) == 1


def test_tensorrt_rows_are_the_cuda_plans_measured_again_and_failures_are_rows(cpu_run):
    _, written = cpu_run
    trt = [r for r in written["rows"] if r["measure_backend"] == "tensorrt" and r["batch"] == 1]
    own = [r for r in written["rows"] if r["measure_backend"] == "cpu" and r["batch"] == 1 and "measured_ms" in r]
    assert [r["plan"] for r in trt] == [r["plan"] for r in own] and "identity" in [r["plan"] for r in trt]
    for mine, theirs in zip(own, trt):
        assert theirs["table_backend"] == "cpu" and theirs["predicted_ms"] == mine["predicted_ms"]
        assert positive(theirs["measured_ms"]) and positive(theirs["measured_speedup"])
    failed = [r for r in written["rows"] if r["measure_backend"] == "tensorrt" and r["batch"] == 2]
    assert failed == [{"backend": "cpu", "model": "resnet18", "batch": 2, "variant": "fp32", "table_backend": "cpu",
                       "measure_backend": "tensorrt", "error": "RuntimeError: engine build failed"}]
    assert any(r["measure_backend"] == "cpu" and r["batch"] == 2 for r in written["rows"])  # cuda-side rows survive
    assert written["summary"][3]["median_abs_rel_error"] is None


def test_arguments(tmp_path):
    args = gpu.parse_args(["--out", str(tmp_path / "x.json")])
    assert (args.models, args.batches, args.variants, args.size) == (
        ["resnet34", "mobilenet_v2"], [1, 128], ["fp32", "fp16_cl"], 224)
    assert args.max_kernel == 7 and args.max_seconds == 450 and args.rounds == 3
    assert gpu.parse_args([]).out.endswith("results/gpu.json")
    assert gpu.parse_args(["--quick"]).out.endswith("results/gpu_quick.json")
    assert gpu.parse_args(["--device", "cpu"]).out.endswith("results/gpu_cpu.json")
    assert gpu.profiler_settings(args, "fp16_cl") == {"dtype": torch.float16, "channels_last": True}
    with pytest.raises(SystemExit):
        gpu.parse_args(["--device", "cpu", "--variants", "fp16_cl"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["--budgets", "1.5"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_run_without_a_gpu_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="--device cpu"):
        gpu.main(["--quick", "--out", str(tmp_path / "x.json")])


# ------------------------------------------------------------------------- CUDAProfiler, without a GPU
def bare_profiler(flush_bytes: int = 64, cuda_graphs: bool = False) -> CUDAProfiler:
    """A CUDAProfiler whose constructor (which needs a GPU) did not run; its buffer lives on the CPU."""
    p = object.__new__(CUDAProfiler)
    p._device, p.flush_bytes, p.flush_l2, p.cuda_graphs = torch.device("cpu"), flush_bytes, flush_bytes > 0, cuda_graphs
    p._flush_buffer = None
    return p


def test_l2_flush_size():
    assert cuda_backend.l2_flush_bytes(50 * 2**20) == 100 * 2**20  # an H100's L2, twice
    assert cuda_backend.l2_flush_bytes(None) == cuda_backend.l2_flush_bytes(0) == 256 * 2**20


class SyncedStream:
    def __init__(self, log: list, buffer_of: CUDAProfiler) -> None:
        self.log, self.profiler = log, buffer_of

    def synchronize(self) -> None:  # records whether the flush had written the buffer when the host waited
        self.log.append(("sync", bool(self.profiler._flush_buffer.any())))


def test_flush_writes_the_whole_buffer_then_waits_for_it(monkeypatch):
    log: list = []
    p = bare_profiler(flush_bytes=64)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SyncedStream(log, p))
    with p._l2_flush():
        buffer = p._flush_buffer
        assert buffer is not None and buffer.numel() * buffer.element_size() == 64
        buffer.fill_(1.0)
        p._before_timed_run()
        assert not buffer.any()
    assert log == [("sync", False)]  # one wait per timed run, after the write
    off = bare_profiler(flush_bytes=0)
    with off._l2_flush():
        assert off._flush_buffer is None
        off._before_timed_run()  # nothing to flush, nothing to wait for
    assert log == [("sync", False)]


def test_flush_buffer_is_shared_by_nested_sessions_and_freed_by_the_outermost():
    p = bare_profiler(flush_bytes=64)
    with p._l2_flush():
        outer = p._flush_buffer
        with p._l2_flush():
            assert p._flush_buffer is outer
        assert p._flush_buffer is outer
    assert p._flush_buffer is None


class FakeEvent:
    def __init__(self, log: list, times: list) -> None:
        self.log, self.times = log, times

    def record(self) -> None:
        self.log.append("event")
        self.at = len(self.times)
        self.times.append(float(len(self.times)))

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.times[end.at] - self.times[self.at]


def test_timed_runs_flush_outside_the_event_bracket(monkeypatch):
    log, times = [], []
    monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing: FakeEvent(log, times))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    p = bare_profiler()
    with p._l2_flush():
        monkeypatch.setattr(p, "_before_timed_run", lambda: log.append("flush"))
        samples = p._timed_runs(lambda: log.append("run"), 3)
    assert log == ["flush", "event", "run", "event"] * 3 + ["sync"]  # one host synchronisation per round
    assert samples == [1.0, 1.0, 1.0]


class FakeStream:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(f"{self.name} waits {other.name}")


def fake_cuda(monkeypatch, log: list, *, capture_error: Exception | None = None) -> None:
    """Stand-ins for the torch.cuda stream and graph API, logging what the profiler does with them."""
    current, side = FakeStream(log, "current"), FakeStream(log, "side")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)

    @contextlib.contextmanager
    def on(stream):
        log.append(f"on {stream.name}")
        yield
        log.append(f"off {stream.name}")

    class Graph:
        def replay(self) -> None:
            log.append("replay")

    @contextlib.contextmanager
    def capture(graph):
        log.append("capture")
        yield
        if capture_error is not None:
            raise capture_error
        log.append("captured")

    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)


def test_cuda_graph_warms_up_on_a_side_stream_then_captures_and_replays(monkeypatch):
    log: list[str] = []
    fake_cuda(monkeypatch, log)
    replay = bare_profiler(cuda_graphs=True)._graphed(lambda: log.append("run"), "Net")
    assert log == ["side waits current", "on side", "run", "run", "run", "off side", "current waits side",
                   "capture", "run", "captured"]
    replay()
    assert log[-1] == "replay"


def test_cuda_graph_capture_failure_is_a_latency_error(monkeypatch):
    fake_cuda(monkeypatch, [], capture_error=RuntimeError("operation not permitted when stream is capturing"))
    with pytest.raises(LatencyError, match=r"could not capture Net in a CUDA graph.*not permitted.*cuda_graphs=False"):
        bare_profiler(cuda_graphs=True)._graphed(lambda: None, "Net")


# ---------------------------------------------------------------------------- CUDAProfiler, on a GPU
class Syncs(nn.Module):
    """Reads a value back to the host: legal in eager mode, illegal while a CUDA graph is being captured."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.sum().item()


@needs_gpu
def test_cuda_profiler_flush_and_graph_settings():
    p = get_profiler("cuda", batch_size=2, **FAST)
    assert p.flush_l2 and not p.cuda_graphs
    l2 = getattr(torch.cuda.get_device_properties(p.device), "L2_cache_size", None)
    assert p.flush_bytes == cuda_backend.l2_flush_bytes(l2) >= 2 * (l2 or 0)
    signature = p.signature()
    assert signature["flush_l2"] is True and signature["cuda_graphs"] is False
    other = get_profiler("cuda", batch_size=2, flush_l2=False, cuda_graphs=True, **FAST)
    assert other.flush_bytes == 0 and other.signature() != signature  # a cache never mixes the two
    assert other.signature()["flush_l2"] is False and other.signature()["cuda_graphs"] is True


@needs_gpu
def test_cuda_profiler_flushes_before_every_timed_run(monkeypatch):
    seen = []
    original = CUDAProfiler._before_timed_run

    def spy(self):
        seen.append(None if self._flush_buffer is None else self._flush_buffer.numel() * 4)
        original(self)

    monkeypatch.setattr(CUDAProfiler, "_before_timed_run", spy)
    p = get_profiler("cuda", batch_size=2, **{**FAST, "repeats": 5})
    p.measure(nn.Conv2d(4, 4, 3), (1, 4, 8, 8))
    assert seen == [p.flush_bytes] * 5  # the warm-up runs are not flushed: they are not timed
    seen.clear()
    get_profiler("cuda", batch_size=2, flush_l2=False, **FAST).measure(nn.Conv2d(4, 4, 3), (1, 4, 8, 8))
    assert seen == [None] * FAST["repeats"]


@needs_gpu
@pytest.mark.parametrize("flush_l2", [True, False])
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_cuda_profiler_measures_with_and_without_flush_and_graphs(flush_l2, cuda_graphs):
    p = get_profiler("cuda", batch_size=2, flush_l2=flush_l2, cuda_graphs=cuda_graphs, dtype=torch.float16,
                     channels_last=True, **FAST)
    conv = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
    m = p.measure(conv, (1, 4, 16, 16))
    assert m.backend == "cuda" and m.median_ms > 0 and m.runs == 3
    assert p._flush_buffer is None  # freed with the session
    together = p.measure_together({"a": conv, "b": nn.Conv2d(4, 4, 1)}, (1, 4, 16, 16))
    assert set(together) == {"a", "b"} and all(v.median_ms > 0 for v in together.values())
    assert next(conv.parameters()).device.type == "cpu"  # the caller's module is untouched


@needs_gpu
def test_cuda_graph_capture_failure_on_a_gpu_is_a_latency_error_and_eager_still_works():
    with pytest.raises(LatencyError, match="cuda_graphs=False"):
        get_profiler("cuda", batch_size=2, cuda_graphs=True, **FAST).measure(Syncs(), (1, 4, 8, 8))
    assert get_profiler("cuda", batch_size=2, **FAST).measure(Syncs(), (1, 4, 8, 8)).median_ms > 0


@needs_gpu
def test_gpu_benchmark_quick_on_cuda(tmp_path):
    result = gpu.main(["--quick", "--models", "resnet18", "--variants", "fp16_cl", "--no-tensorrt",
                       "--out", str(tmp_path / "g.json"), "--cache-dir", str(tmp_path / "cache")])
    assert result["machine"]["device_name"] == torch.cuda.get_device_name()
    assert not [s for s in result["summary"] if "error" in s]
    assert result["summary"][0]["signature"]["flush_l2"] is True
    measured = [r for r in result["rows"] if "measured_ms" in r]
    assert measured and all(positive(r["measured_ms"]) and positive(r["predicted_ms"]) for r in measured)
