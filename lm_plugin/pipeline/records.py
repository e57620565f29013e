"""What a pipeline run returns: one :class:`StageRecord` per stage in a :class:`PipelineResult`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import UnknownNameError

__all__ = ["PipelineResult", "StageRecord"]


@dataclass
class StageRecord:
    """Measurements of the model after one stage (the first record is the original).

    Attributes:
        name: Stage name (``"original"`` for the first row; ``name#2`` when a stage repeats).
        settings: The settings it was run with.
        accuracy: Test accuracy (%) (None without test data).
        latency_ms: Measured median latency of this model.
        original_ms: The original's latency measured side by side with it (same run).
        macs: MACs per image (torch-pruning's count). For quantised stages: the count of the float model they
            quantised (the same multiply-accumulates, done in int8 or simulated).
        params: Parameters (for int8 models: the packed weights and biases).
        size_bytes: Size of the serialized ``state_dict``.
        convs: Conv layers.
        precision: ``"fp32"``, ``"int8"`` or ``"int8 (simulated)"``.
        seconds: Wall-clock seconds of the stage (measurement excluded).
        notes: The stage's notes.
        model: The model (not serialized).
        extras: The stage's non-JSON objects (not serialized).
    """

    name: str
    settings: dict[str, Any]
    accuracy: float | None
    latency_ms: float
    original_ms: float
    macs: int
    params: int
    size_bytes: int
    convs: int
    precision: str = "fp32"
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def speedup(self) -> float:
        """Measured speed-up over the original, from the same side-by-side run."""
        return self.original_ms / self.latency_ms

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the model excluded)."""
        return {
            "name": self.name, "settings": _jsonable(self.settings), "accuracy": self.accuracy,
            "latency_ms": self.latency_ms, "original_ms": self.original_ms, "speedup": self.speedup,
            "macs": self.macs, "params": self.params, "size_bytes": self.size_bytes, "convs": self.convs,
            "precision": self.precision, "seconds": self.seconds, "notes": _jsonable(self.notes),
        }


@dataclass
class PipelineResult:
    """One record per stage, the original first.

    Attributes:
        records: :class:`StageRecord` s in order.
        latency_settings: The profiler's signature (backend, threads, batch size, torch version).
        baseline: What "original" latency means (the BN-folded original when it could be folded).
    """

    records: list[StageRecord]
    latency_settings: dict[str, Any]
    baseline: str

    @property
    def final(self) -> nn.Module:
        """The last stage's model."""
        model = self.records[-1].model
        assert model is not None
        return model

    def __getitem__(self, name: str) -> StageRecord:
        for record in self.records:
            if record.name == name:
                return record
        raise UnknownNameError(f"no stage {name!r}; stages: {[r.name for r in self.records]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"stages": [r.to_dict() for r in self.records], "latency_settings": _jsonable(self.latency_settings),
                "baseline": self.baseline}

    def to_json(self, indent: int = 2) -> str:
        """``to_dict()`` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """A readable text table: one row per stage, cumulative from the original."""
        header = ("stage", "precision", "acc (%)", "latency (ms)", "orig (ms)", "speed-up", "MACs (M)",
                  "params (k)", "size (KB)", "convs")
        rows = [header]
        for r in self.records:
            rows.append((
                r.name, r.precision, "-" if r.accuracy is None else f"{r.accuracy:.2f}", f"{r.latency_ms:.3f}",
                f"{r.original_ms:.3f}", f"{r.speedup:.2f}x", f"{r.macs / 1e6:.3f}", f"{r.params / 1e3:.1f}",
                f"{r.size_bytes / 1024:.1f}", str(r.convs)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        s = self.latency_settings
        lines.append(f"latency: {s.get('backend')} batch {s.get('batch_size')}, {s.get('threads')} thread(s), "
                     f"median of {self.records[0].notes.get('rounds', '?')} interleaved rounds; 'orig' is the "
                     f"{self.baseline} timed in the same run.")
        if any(r.precision != "fp32" for r in self.records):
            lines.append("MACs of quantised rows: the float model's count (same multiply-accumulates, in int8 or "
                         "simulated); params of int8 rows: packed weights and biases.")
        return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
