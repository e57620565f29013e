"""Latency budgets: a fraction of the original network's measured latency, or an absolute time."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import ConfigurationError

__all__ = ["DEFAULT_BUDGET", "Budget"]

#: The default latency budget of the pruner, the CLI and the docs: 70 % of the original network's latency.
DEFAULT_BUDGET: float = 0.7

_NUMBER = re.compile(r"^[-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|nan|inf)$", re.IGNORECASE)
_MS = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*ms\s*$")


@dataclass(frozen=True)
class Budget:
    """``Budget.parse(0.6)`` (or ``"0.6"``, ``"60%"``) = 60 % of the original latency; ``"12.5ms"`` = 12.5 ms."""

    value: float
    unit: str  # "ratio" or "ms"

    @classmethod
    def parse(cls, budget: float | str | Budget) -> Budget:
        """Validate a user budget.

        Raises:
            ValueError: NaN, ≤ 0, a ratio above 1, or an unreadable string.
        """
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, str):
            text = budget.strip()
            # Command lines and config files give ratios as text too: "0.6" or "60%".
            if _NUMBER.match(text):
                return cls.parse(float(text))
            if text.endswith("%") and _NUMBER.match(text[:-1].strip()):
                return cls.parse(float(text[:-1]) / 100)
            match = _MS.match(budget)
            if not match:
                raise ConfigurationError(f"budget {budget!r} not understood: use a ratio such as 0.7 or '70%' (of "
                                 "the original latency) or a time such as '12.5ms'")
            ms = float(match.group(1))
            if not ms > 0 or math.isinf(ms):
                raise ConfigurationError(f"budget must be a positive time, got {budget!r}")
            return cls(ms, "ms")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ConfigurationError(
                f"budget must be a float ratio or a string like '12ms', got {type(budget).__name__}")
        value = float(budget)
        if math.isnan(value) or value <= 0 or value > 1:
            raise ConfigurationError(
                f"budget {budget!r} is not a latency ratio in (0, 1]: pass e.g. 0.7 for 70 % of the original "
                "network's latency, or an absolute budget as a string such as '12.5ms'"
            )
        return cls(value, "ratio")

    def to_ms(self, original_ms: float) -> float:
        return self.value * original_ms if self.unit == "ratio" else self.value

    def __str__(self) -> str:
        return f"{self.value:.0%} of original" if self.unit == "ratio" else f"{self.value:g} ms"
