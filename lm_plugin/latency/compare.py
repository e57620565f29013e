"""Side-by-side latency of several models: the only fair way to state a speed-up on a shared machine.

Absolute milliseconds drift by tens of percent within seconds on a shared host, so models are timed in short chunks
in turn (A×5, B×5, A×5, ...: :meth:`Profiler.measure_together`), in ``rounds`` such rounds, and each model's
figure is the median of its per-round medians. Ratios between models measured this way hold even when the
absolute numbers do not.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

from torch import nn

from ..errors import ConfigurationError
from .inputs import InputsLike
from .profiler import Profiler

__all__ = ["compare_latency"]


def compare_latency(
    profiler: Profiler, models: Mapping[str, nn.Module], inputs: InputsLike, rounds: int = 3
) -> dict[str, float]:
    """Median latency (ms) of each model, measured side by side in ``rounds`` rounds of alternating chunks.

    Args:
        profiler: The profiler to time with (its backend, batch size, warm-up and repeats apply).
        models: Named models; they are put in eval mode by the profiler and not modified.
        inputs: An input shape or example tensor(s), as for :meth:`Profiler.measure`.
        rounds: Rounds of alternating chunks (``repeats`` timed runs of each model per round); each model's
            result is the median of its round medians.

    Returns:
        ``{name: median ms}`` in the order of ``models``.
    """
    if rounds < 1:
        raise ConfigurationError(f"rounds must be >= 1, got {rounds}")
    per_round: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, measurement in profiler.measure_together(models, inputs).items():
            per_round[name].append(measurement.median_ms)
    return {name: statistics.median(values) for name, values in per_round.items()}
