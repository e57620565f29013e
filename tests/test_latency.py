"""Latency profilers, cache and tables (the measurement harness), and the candidate-block specs timed through it.
No assertion depends on how fast anything runs."""

from __future__ import annotations

import ast
import multiprocessing
import socket
import sqlite3
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lm_plugin.activations import ACTIVATIONS
from lm_plugin.blocks import BlockGeometry
from lm_plugin.latency import (
    BackendUnavailableError,
    LatencyCache,
    LatencyCacheWarning,
    LatencyTable,
    Measurement,
    ModuleSpec,
    UnstableMeasurementWarning,
    available_backends,
    get_profiler,
    measure,
    resolve_backend,
)
from lm_plugin.tables.conv_block import ConvBlockSpec, conv_block_module

# Few runs and a threshold no round can miss: these tests check behaviour, not speed.
FAST = {"warmup": 1, "repeats": 3, "retries": 0, "max_spread": 1e6}
BATCH = 2


def small_conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


def cpu_profiler(**overrides: object) -> object:
    return get_profiler("cpu", **{"batch_size": BATCH, "threads": 1, **FAST, **overrides})


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ------------------------------------------------------------------------------------------------ profilers
def check_sane(m: Measurement, backend: str, shape: tuple[int, ...]) -> None:
    assert m.backend == backend
    assert 0 < m.min_ms <= m.q1_ms <= m.median_ms <= m.q3_ms
    assert m.iqr_ms == pytest.approx(m.q3_ms - m.q1_ms)
    assert m.spread == pytest.approx(m.iqr_ms / m.median_ms)
    assert m.runs == FAST["repeats"] and m.attempts == 1 and m.stable
    assert m.input_shapes == (shape,) and m.batch_size == shape[0]
    assert m.dtype == "float32" and m.device_name


def test_cpu_backend_measures_a_small_conv(no_warnings):
    model = small_conv().train()
    threads_before = torch.get_num_threads()
    m = cpu_profiler().measure(model, (1, 4, 8, 8))
    check_sane(m, "cpu", (BATCH, 4, 8, 8))  # batch dimension replaced by the profiler's
    assert m.threads == 1
    assert torch.get_num_threads() == threads_before, "thread setting must be restored"
    assert all(mod.training for mod in model.modules()), "training flags must be restored"


def test_cpu_backend_evicts_private_caches_before_each_timed_run(monkeypatch):
    """A module timed alone in a loop keeps its weights in L1/L2, a layer inside a network does not: the CPU
    profiler touches a buffer before every timed run (not during warm-up), outside the timed interval."""
    from lm_plugin.latency import EagerCPUProfiler
    from lm_plugin.latency.system import private_cache_bytes

    seen: list[int | None] = []
    original = EagerCPUProfiler._before_timed_run

    def spy(self):
        seen.append(None if self._flush_buffer is None else self._flush_buffer.numel())
        original(self)

    monkeypatch.setattr(EagerCPUProfiler, "_before_timed_run", spy)
    # In this process, where the spy is: the protocol is the same inside the measurement worker.
    profiler = cpu_profiler(flush_bytes=4096, repeats=5, worker=None)
    profiler.measure(small_conv(), (1, 4, 8, 8))
    assert seen == [1024] * 5
    assert profiler._flush_buffer is None, "the buffer lives only while measuring"
    seen.clear()
    off = cpu_profiler(flush_bytes=0, worker=None)
    off.measure(small_conv(), (1, 4, 8, 8))
    assert seen == [None] * FAST["repeats"]
    # Flushing changes what is measured, so it is part of the signature (caches are not shared across it).
    assert profiler.signature()["flush_bytes"] == 4096 and off.signature()["flush_bytes"] == 0
    default = get_profiler("cpu", threads=2)
    assert default.flush_bytes == 2 * 2 * (private_cache_bytes() or 1024**2)
    with pytest.raises(ValueError, match="flush_bytes"):
        get_profiler("cpu", flush_bytes=-1)


def test_measure_accepts_example_tensors_and_leaves_the_module_alone():
    model = small_conv()
    m = measure(model, torch.randn(3, 4, 6, 6), backend="cpu", batch_size=5, dtype=torch.float64, **FAST)
    assert m.input_shapes == ((5, 4, 6, 6),) and m.dtype == "float64"
    assert all(p.dtype == torch.float32 for p in model.parameters()), "a dtype change must work on a copy"
    m = measure(model, torch.randn(3, 4, 6, 6), backend="cpu", **FAST)
    assert m.batch_size == 3, "without batch_size the inputs are timed as given"


class _Logged(nn.Module):
    """A real conv that notes each call, to see the order the profiler ran things in."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log, self.conv = name, log, small_conv()

    def forward(self, x):
        self.log.append(self.name)
        return self.conv(x)


@pytest.mark.parametrize("backend", ["cpu", "macs"])
def test_side_by_side_timing_alternates_single_runs(backend, no_warnings):
    """compare_latency times models in short chunks in turn, so drift of the machine hits all of them alike."""
    from lm_plugin.latency import compare_latency

    log: list[str] = []
    models = {"a": _Logged("a", log).eval(), "b": _Logged("b", log).train()}  # modes are restored
    threads = torch.get_num_threads()
    # worker=None: the log is kept in this process (the protocol is the same inside the measurement worker)
    profiler = get_profiler(backend, batch_size=BATCH,
                            **({**FAST, "warmup": 2, "worker": None} if backend == "cpu" else {}))
    together = profiler.measure_together(models, (1, 4, 8, 8))
    assert list(together) == ["a", "b"] and all(m.median_ms > 0 for m in together.values())
    if backend == "cpu":
        assert all(m.runs == FAST["repeats"] for m in together.values())
        # warm-ups, then chunks (an untimed run, then the timed ones) in turn
        assert log == ["a", "a", "b", "b"] + ["a"] * (1 + FAST["repeats"]) + ["b"] * (1 + FAST["repeats"])
        log.clear()
        profiler.measure_together(models, (1, 4, 8, 8), chunk=2)
        assert log[4:] == ["a"] * 3 + ["b"] * 3 + ["a"] * 2 + ["b"] * 2  # 3 repeats: a chunk of 2, then of 1
    assert torch.get_num_threads() == threads and models["b"].training and not models["a"].training
    log.clear()
    ms = compare_latency(profiler, models, (1, 4, 8, 8), rounds=2)
    assert list(ms) == ["a", "b"] and all(v > 0 for v in ms.values())
    if backend == "cpu":
        assert log[-2 * (1 + FAST["repeats"]):] == ["a"] * (1 + FAST["repeats"]) + ["b"] * (1 + FAST["repeats"])
    with pytest.raises(ValueError, match="chunk"):
        profiler.measure_together(models, (1, 4, 8, 8), chunk=0)


def test_onnxruntime_backend(no_warnings):
    if "onnxruntime" not in available_backends():
        pytest.skip("onnxruntime / onnx not installed")
    profiler = get_profiler("ort", batch_size=BATCH, threads=1, **FAST)
    m = profiler.measure(small_conv(), (1, 4, 8, 8))
    check_sane(m, "onnxruntime", (BATCH, 4, 8, 8))
    assert m.threads == 1
    signature = profiler.signature()
    assert signature["onnxruntime"] and signature["provider"] == "CPUExecutionProvider"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cuda_requested_without_gpu_is_a_clear_error():
    assert resolve_backend("auto") == "cpu"
    with pytest.raises(BackendUnavailableError, match="backend='cpu'"):
        get_profiler("cuda")
    assert "cuda" not in available_backends()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_backend(dtype):
    profiler = get_profiler("cuda", batch_size=BATCH, dtype=dtype, channels_last=True, **FAST)
    m = profiler.measure(small_conv(), (1, 4, 8, 8))
    assert m.backend == "cuda" and m.median_ms > 0 and m.threads is None
    assert m.dtype == str(dtype).removeprefix("torch.")
    assert profiler.signature()["device_name"] == torch.cuda.get_device_name()


def test_unknown_backend_and_bad_settings():
    with pytest.raises(BackendUnavailableError, match="choose one of"):
        get_profiler("tpu")
    with pytest.raises(ValueError, match="repeats"):
        get_profiler("cpu", repeats=0)
    with pytest.raises(TypeError, match="shape"):
        measure(small_conv(), "1x4x8x8", backend="cpu", **FAST)


class Jittery(nn.Module):
    """Alternately fast and slow forward passes: a real module whose timings cannot meet a tight spread."""

    def __init__(self, delay_s: float = 0.05) -> None:  # far above scheduling noise on a loaded machine
        super().__init__()
        self.delay_s = delay_s
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.delay_s * (self.calls % 2))
        return x


def test_noisy_measurement_is_remeasured_then_flagged():
    module = Jittery()
    profiler = cpu_profiler(repeats=6, retries=2, max_spread=0.5, worker=None)  # the call count is read here
    with pytest.warns(UnstableMeasurementWarning, match="max_spread"):
        m = profiler.measure(module, (1, 1))
    assert not m.stable and m.attempts == 3
    assert module.calls == FAST["warmup"] + 3 * 6


def test_a_tables_noisy_entries_are_announced_once_when_measured_not_on_every_load(tmp_path):
    from lm_plugin.latency import LatencyTable, ModuleSpec

    specs = {"jittery": ModuleSpec(lambda: Jittery(0.02), (1, 1)), "conv": ModuleSpec(small_conv, (1, 4, 8, 8))}
    profiler = cpu_profiler(repeats=6, max_spread=0.5)
    with pytest.warns(UnstableMeasurementWarning, match="1 of 2 latency entries measured now"):
        table = LatencyTable.build(specs, profiler, cache=tmp_path / "lat.sqlite", progress=False)
    assert table.unstable == ["jittery"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableMeasurementWarning)
        again = LatencyTable.build(specs, profiler, cache=tmp_path / "lat.sqlite", progress=False)
    assert again.unstable == ["jittery"] and again.measured == 0


# ------------------------------------------------------------------------------------------------ cache
@dataclass
class CountingSpec:
    """A conv timed at a spatial size of its own; counts builds and can fail after a number of them."""

    size: int
    built: list[int] = field(default_factory=list)
    fail_after: int | None = None

    @property
    def inputs(self) -> tuple[int, ...]:
        return (1, 4, self.size, self.size)

    def build(self) -> nn.Module:
        if self.fail_after is not None and len(self.built) >= self.fail_after:
            raise KeyboardInterrupt  # what an impatient user does halfway through a build
        self.built.append(self.size)
        return small_conv()

    def cache_key(self) -> dict:
        return {"op": "small_conv"}  # the input shape, which differs per entry, is added by the table


SIZES = [4, 5, 6, 7, 8]


def specs(built: list[int], fail_after: int | None = None) -> dict[str, CountingSpec]:
    return {f"s{n}": CountingSpec(n, built, fail_after) for n in SIZES}


def test_interrupted_build_resumes_and_measures_only_missing(tmp_path, no_warnings):
    path, profiler = tmp_path / "lat.sqlite", cpu_profiler()
    done = 2
    built: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        LatencyTable.build(specs(built, fail_after=done), profiler, cache=path, progress=False)
    assert len(built) == done

    built = []
    table = LatencyTable.build(specs(built), profiler, cache=path, progress=True)
    assert built == SIZES[done:], "only the entries missing from the cache are measured"
    assert (table.measured, table.reused, len(table)) == (len(SIZES) - done, done, len(SIZES))

    built = []
    table = LatencyTable.build(specs(built), profiler, cache=path, progress=False)
    assert built == [] and table.reused == len(SIZES)


def test_lookup_is_by_key_not_by_order(tmp_path, no_warnings):
    path, profiler = tmp_path / "lat.sqlite", cpu_profiler()
    LatencyTable.build(specs([]), profiler, cache=path, progress=False)
    reordered = list(reversed(list(specs([]).items())))
    table = LatencyTable.build(reordered, profiler, cache=path, progress=False)
    for n in SIZES:
        assert table[f"s{n}"].input_shapes == ((BATCH, 4, n, n),)
    assert table.keys() == [k for k, _ in reordered]
    with pytest.raises(KeyError, match="no latency entry"):
        table["missing"]

    # Dict keys work in any key order; tuples and lists with the same items are the same key.
    entries = [({"st": 0, "end": n}, CountingSpec(n)) for n in SIZES]
    table = LatencyTable.build(entries, profiler, cache=path, progress=False)
    assert table.measured == 0, "the modules are the same as above, so they come from the cache"
    assert table[{"end": 6, "st": 0}].input_shapes == ((BATCH, 4, 6, 6),)
    cache = LatencyCache(None, profiler.signature())
    cache.put(("a", 1), table[{"st": 0, "end": 6}])
    assert ["a", 1] in cache


def test_same_module_is_measured_once(no_warnings):
    built: list[int] = []
    entries = {"first": CountingSpec(5, built), "second": CountingSpec(5, built), "other": CountingSpec(6, built)}
    table = LatencyTable.build(entries, cpu_profiler(), progress=False)
    assert sorted(built) == [5, 6]
    assert table["first"] is table["second"]
    with pytest.raises(ValueError, match="given twice"):
        LatencyTable.build([("k", CountingSpec(5)), ("k", CountingSpec(6))], cpu_profiler(), progress=False)


def build_cache(path: Path) -> object:
    profiler = cpu_profiler()
    LatencyTable.build(specs([]), profiler, cache=path, progress=False)
    return profiler


def damage_third_row(path: Path, how: str) -> None:
    """Change one stored row behind the cache's back, as a bad disk or a foreign writer would."""
    with sqlite3.connect(path) as db:
        (key,) = db.execute("SELECT key FROM records ORDER BY rowid LIMIT 1 OFFSET 2").fetchone()
        if how == "tampered":  # a plausible value, but not the one the checksum was taken of
            db.execute("UPDATE records SET value = replace(value, '\"runs\":3', '\"runs\":4') WHERE key = ?", (key,))
        elif how == "garbage":
            db.execute("UPDATE records SET value = ? WHERE key = ?", (b"\x00\xff garbage }{", key))
        else:  # valid JSON under a matching checksum, but no measurement
            from lm_plugin.store.records import row_checksum

            db.execute("UPDATE records SET value = '[1]', checksum = ? WHERE key = ?", (row_checksum(key, "[1]"), key))


@pytest.mark.parametrize(
    ("how", "cause"),
    [("tampered", "checksum mismatch"), ("garbage", "not a text row"), ("not-a-measurement", "bad value")],
)
def test_damaged_entries_are_detected_and_remeasured(tmp_path, how, cause):
    path = tmp_path / "lat.sqlite"
    profiler = build_cache(path)
    damage_third_row(path, how)

    built: list[int] = []
    with pytest.warns(LatencyCacheWarning, match=rf"^latency table cache {path}: dropped 1 damaged entry .*{cause}"):
        table = LatencyTable.build(specs(built), profiler, cache=path, progress=False)
    assert len(built) == 1 and table.measured == 1, "exactly the damaged entry is measured again"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reopened = LatencyCache(path, profiler.signature())
    assert len(reopened) == len(SIZES) and not reopened.problems, "the store holds every entry, clean"


def test_a_file_that_is_no_cache_is_kept_aside_and_rebuilt(tmp_path):
    path, content = tmp_path / "lat.sqlite", b"\x89PNG\r\n\x1a\n not a cache at all" * 10
    path.write_bytes(content)
    profiler = cpu_profiler()
    with pytest.warns(LatencyCacheWarning, match="latency table cache .* is not a readable database"):
        table = LatencyTable.build(specs([]), profiler, cache=path, progress=False)
    assert table.measured == len(SIZES)
    assert (tmp_path / "lat.sqlite.bak").read_bytes() == content
    assert len(LatencyCache(path, profiler.signature())) == len(SIZES)


def test_mismatched_signature_is_detected(tmp_path):
    path = tmp_path / "lat.sqlite"
    profiler = build_cache(path)
    other = cpu_profiler(batch_size=BATCH + 1)  # stands in for another machine, thread count, version ...
    with pytest.warns(LatencyCacheWarning, match=r"latency table cache .*different profiler \(batch_size: 2 -> 3\)"):
        cache = LatencyCache(path, other.signature())
    assert len(cache) == 0 and cache.problems
    with pytest.raises(ValueError, match="another profiler"):
        LatencyTable.build(specs([]), profiler, cache=cache, progress=False)


def _measure_while_holding_the_lock(path: str, signature: dict, keys: list, ready, release) -> None:
    """Another process measuring into the cache: it holds the lock, stores its entries, then lets go."""
    cache = LatencyCache(path, signature)
    with cache.exclusive("measure"):
        ready.set()
        release.wait(30)
        for key, n in keys:
            cache.put(key, Measurement(1.0, 0.9, 1.1, 0.8, 0.2, 0.2, 3, 1, True, "cpu", "other process", 1, BATCH,
                                       "float32", ((BATCH, 4, n, n),)))


class SignallingCache(LatencyCache):
    """A latency cache that tells when its build has to wait for the measuring lock."""

    def __init__(self, path: Path, signature: dict, on_wait) -> None:
        super().__init__(path, signature)
        self.on_wait = on_wait

    def exclusive(self, name: str = "build", **kw):
        return super().exclusive(name, **{**kw, "on_wait": self.on_wait})


def test_a_second_builder_waits_for_the_one_measuring_and_reuses_its_entries(tmp_path, no_warnings):
    """Two processes timing at once on one machine slow each other down: measuring into one cache is serialised, and
    the waiting process finds the other's entries instead of timing them again."""
    path, profiler = tmp_path / "lat.sqlite", cpu_profiler()
    keys = [({"module": {"op": "small_conv"}, "inputs": [[BATCH, 4, n, n]]}, n) for n in SIZES]
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    other = context.Process(target=_measure_while_holding_the_lock,
                            args=(str(path), profiler.signature(), keys, ready, release))
    other.start()
    waited: list[str] = []
    try:
        assert ready.wait(30)
        cache = SignallingCache(path, profiler.signature(), lambda holder: (waited.append(holder), release.set()))
        built: list[int] = []
        table = LatencyTable.build(specs(built), profiler, cache=cache, progress=False)
    finally:
        release.set()
        other.join(30)
    assert waited == [f"{socket.gethostname()}:{other.pid}"], "it waited for the process holding the lock"
    assert built == [] and table.measured == 0 and table["s5"].device_name == "other process"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=50, deadline=None)
@given(key=json_values)
def test_any_json_key_survives_the_store(key):
    measurement = Measurement(1.0, 0.9, 1.2, 0.8, 0.3, 0.3, 30, 1, True, "cpu", "x", 1, 1, "float32", ((1, 2),))
    cache = LatencyCache(None, {"backend": "cpu"})
    cache.put(key, measurement)
    ((stored_key, stored),) = list(cache.items())
    assert stored == measurement
    assert cache.get(stored_key) == measurement, "a key read back from the store must find the entry"


def test_bad_keys_are_rejected():
    cache = LatencyCache(None, {"backend": "cpu"})
    with pytest.raises(TypeError, match="string keys"):
        cache.get({1: "a"})
    with pytest.raises(TypeError, match="non-finite"):
        cache.get({"a": float("nan")})


def imported_modules(package: Path) -> dict[str, set[str]]:
    """``{file: absolute names of the lm_plugin modules it imports}``, read from the source."""
    found: dict[str, set[str]] = {}
    for file in sorted(package.rglob("*.py")):
        home = list(file.relative_to(package.parents[1]).with_suffix("").parts)[:-1]  # its package
        names: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = home[: len(home) - node.level + 1] if node.level else []
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        found[str(file)] = {n for n in names if n.split(".")[0] == "lm_plugin"}
    return found


def test_the_harness_imports_nothing_of_layermerge():
    """latency/ (and the store under it) time any module: nothing of LayerMerge (chains, blocks, activations) is
    imported, only each other, the generic registry and the package's error root, which imports nothing."""
    root = Path(__file__).resolve().parents[1] / "lm_plugin"
    allowed = ("lm_plugin.latency", "lm_plugin.store", "lm_plugin.errors", "lm_plugin.registry")
    for package in ("latency", "store"):
        imports = imported_modules(root / package)
        assert imports, package
        for file, names in imports.items():
            foreign = {n for n in names if n != "lm_plugin" and not n.startswith(allowed)}
            assert not foreign, f"{file} imports {sorted(foreign)}"
    tree = ast.parse((root / "errors.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                and (getattr(n, "level", 0) or "lm_plugin" in (getattr(n, "module", "") or ""))]


# ------------------------------------------------------------------------------------------- merged blocks
def geometry(**changes: object) -> BlockGeometry:
    base = {
        "st": 0, "end": 2, "kept": (1, 2), "kernel_size": (5, 5), "stride": (2, 2), "padding": (2, 2),
        "in_channels": 4, "out_channels": 8, "groups": 1, "input_shape": (1, 4, 9, 9),
    }
    return BlockGeometry(**{**base, **changes})


@pytest.mark.parametrize("activation", [*sorted(ACTIVATIONS), None])
def test_conv_block_module_matches_geometry(activation):
    g = geometry(groups=4, out_channels=8)
    module = conv_block_module(g, activation)
    conv = module[0]
    assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == ((5, 5), (2, 2), (2, 2), 4)
    assert module(torch.randn(g.input_shape)).shape == (1, 8, 5, 5)


def test_conv_block_spec_is_timed_at_the_true_input_shape(no_warnings):
    with pytest.raises(ValueError, match="unknown activation"):
        ConvBlockSpec(geometry(), "swish")
    same_conv_elsewhere = geometry(st=4, end=6, kept=(5, 6))
    entries = {
        (0, 2): ConvBlockSpec(geometry(), "relu"),
        (4, 6): ConvBlockSpec(same_conv_elsewhere, "relu"),
        "linear": ModuleSpec(lambda: conv_block_module(geometry(), None), (1, 4, 9, 9), {"linear": True}),
    }
    table = LatencyTable.build(entries, cpu_profiler(), progress=False)
    assert table[(0, 2)].input_shapes == ((BATCH, 4, 9, 9),)
    assert table.measured == 2, "blocks that merge into the same conv share one measurement"


def test_auto_backend_is_the_runtime_users_deploy_with(monkeypatch):
    """auto: a GPU if there is one, else ONNX Runtime where it is installed, else eager; $LM_PLUGIN_BACKEND wins."""
    import importlib.util

    from lm_plugin.latency import resolve_backend

    monkeypatch.delenv("LM_PLUGIN_BACKEND", raising=False)
    has_ort = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
    expected = "cuda" if torch.cuda.is_available() else ("onnxruntime" if has_ort else "cpu")
    assert resolve_backend("auto") == expected
    monkeypatch.setenv("LM_PLUGIN_BACKEND", "eager")
    assert resolve_backend("auto") == "cpu"
