"""How much of a latency number is the profiler itself, and what the cache costs per entry.

Run: ``python benchmarks/profiler_overhead.py [--backend cpu] [--entries 200]``

* *Timing floor*: the profiler timing ``nn.Identity`` on a tiny input, next to a bare ``perf_counter`` loop
  around the same call. Latencies close to the floor are dominated by framework and timer overhead, so compare
  table entries well above it.
* *Cache*: cost of appending one entry (write + flush + fsync) and of opening a cache of ``--entries`` entries.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lm_plugin.latency import DEFAULT_REPEATS, DEFAULT_WARMUP, LatencyCache, get_profiler


def bare_loop_ms(module: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            module(x)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu", help="latency backend to measure the floor of")
    parser.add_argument("--entries", type=int, default=200, help="cache entries to write and reload")
    args = parser.parse_args()

    profiler = get_profiler(args.backend, batch_size=1)
    module, shape = nn.Identity(), (1, 1)
    floor = profiler.measure(module, shape, warn_unstable=False)
    print(f"backend {profiler.name} on {floor.device_name} ({floor.threads} threads)")
    print(f"  profiler, nn.Identity     : median {floor.median_ms * 1e3:8.2f} us  (IQR/median {floor.spread:.2f})")
    if profiler.name == "cpu":  # the bare loop is eager PyTorch, comparable only with that backend
        bare = bare_loop_ms(module, torch.zeros(shape), DEFAULT_WARMUP, DEFAULT_REPEATS)
        print(f"  bare perf_counter loop    : median {bare * 1e3:8.2f} us")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.sqlite"
        cache = LatencyCache(path, profiler.signature())
        start = time.perf_counter()
        for i in range(args.entries):
            cache.put({"entry": i}, floor)
        put_ms = (time.perf_counter() - start) * 1e3 / args.entries
        start = time.perf_counter()
        reopened = LatencyCache(path, profiler.signature())
        open_ms = (time.perf_counter() - start) * 1e3
        assert len(reopened) == args.entries
        size_kib = path.stat().st_size / 1024
    print(f"cache: {put_ms:.3f} ms per committed entry; opening {args.entries} entries "
          f"({size_kib:.0f} KiB) takes {open_ms:.1f} ms")


if __name__ == "__main__":
    main()
