"""The result of timing one module: robust statistics over repeated runs."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ArgumentTypeError, ConfigurationError


@dataclass(frozen=True)
class Measurement:
    """Latency statistics of one module on one backend.

    Attributes:
        median_ms: median latency of one forward pass, in milliseconds. This is the number to use.
        q1_ms: first quartile of the timed runs, in milliseconds.
        q3_ms: third quartile of the timed runs, in milliseconds.
        min_ms: fastest timed run, in milliseconds.
        iqr_ms: interquartile range ``q3_ms - q1_ms``, in milliseconds.
        spread: relative spread ``iqr_ms / median_ms``; large values mean a noisy measurement.
        runs: number of timed runs the statistics come from (warm-up runs excluded).
        attempts: how many rounds of ``runs`` were timed; more than one means earlier rounds were too noisy.
        stable: False if even the best round exceeded the profiler's spread threshold.
        backend: registered name of the backend that timed it (e.g. ``"cpu"``, ``"onnxruntime"``).
        device_name: the processor or GPU the module ran on.
        threads: intra-op thread count during the measurement, or None where it does not apply (CUDA).
        batch_size: leading dimension of the inputs that were timed.
        dtype: floating-point type of the inputs and weights, e.g. ``"float32"``.
        input_shapes: full shapes of the timed inputs, batch dimension included.
    """

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    iqr_ms: float
    spread: float
    runs: int
    attempts: int
    stable: bool
    backend: str
    device_name: str
    threads: int | None
    batch_size: int
    dtype: str
    input_shapes: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (tuples become lists), the inverse of :meth:`from_dict`."""
        out = asdict(self)
        out["input_shapes"] = [list(s) for s in self.input_shapes]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        """Rebuild a measurement from :meth:`to_dict` output.

        Raises:
            ValueError: if fields are missing or unknown.
            TypeError: if a statistic is not a number.
        """
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            missing, extra = sorted(names - set(data)), sorted(set(data) - names)
            raise ConfigurationError(f"not a Measurement record (missing {missing}, unexpected {extra})")
        values = dict(data)
        values["input_shapes"] = tuple(tuple(int(d) for d in s) for s in data["input_shapes"])
        for name in ("median_ms", "q1_ms", "q3_ms", "min_ms", "iqr_ms", "spread"):
            if not isinstance(values[name], (int, float)) or isinstance(values[name], bool):
                raise ArgumentTypeError(f"Measurement field {name!r} must be a number, got {values[name]!r}")
            values[name] = float(values[name])
        return cls(**values)


@dataclass(frozen=True)
class RunStats:
    """Order statistics of one round of timed runs (milliseconds)."""

    median: float
    q1: float
    q3: float
    minimum: float
    count: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def spread(self) -> float:
        """IQR relative to the median; infinite for a zero median so it never passes a threshold."""
        return self.iqr / self.median if self.median > 0 else float("inf")


def summarize(samples_ms: Sequence[float]) -> RunStats:
    """Median, quartiles and minimum of timed runs.

    Args:
        samples_ms: per-run latencies in milliseconds (at least one).

    Returns:
        The order statistics. With fewer than two samples the quartiles equal the median.
    """
    if not samples_ms:
        raise ConfigurationError("summarize() needs at least one timed run")
    median = statistics.median(samples_ms)
    if len(samples_ms) < 2:
        q1 = q3 = median
    else:
        # "inclusive" treats the runs as the whole population: quartiles stay inside [min, max].
        q1, _, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return RunStats(median=median, q1=q1, q3=q3, minimum=min(samples_ms), count=len(samples_ms))
