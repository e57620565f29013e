"""How long an importance table will take, known before it is built: entries still to score × the measured cost of
one entry (the entries timed for the estimate are real entries, kept in the cache, so estimating wastes nothing)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .importance import ImportanceScorer

__all__ = ["SCREENED_SHARE", "TableEstimate", "estimate_table"]

#: The share of a table a screened search scores with the exact estimator: 13-26 % on the reference workload
#: (docs/benchmarks.md, screened search: 114-122 of 864 entries on mbv2_fm, 13-14 of 53 on resnet_fm), rounded out.
SCREENED_SHARE = (0.10, 0.30)


@dataclass(frozen=True)
class TableEstimate:
    """The time an importance table will take.

    Attributes:
        estimator: The estimator's name.
        entries: Entries still to score (the cache holds the others).
        table_entries: Entries of the complete table.
        seconds_per_entry: Measured on an entry scored for the estimate (0 when nothing is left).
        share: The fraction of ``entries`` expected to be scored, as a range: ``(1, 1)`` for a complete table,
            :data:`SCREENED_SHARE` for the entries a screened search scores exactly.
        then: With a screened search: the screen's table is this estimate, ``then`` the exact estimator's entries.
    """

    estimator: str
    entries: int
    table_entries: int
    seconds_per_entry: float
    share: tuple[float, float] = (1.0, 1.0)
    then: TableEstimate | None = None

    @property
    def seconds(self) -> tuple[float, float]:
        """The estimated seconds, low and high (the same for a complete table)."""
        own = tuple(self.entries * f * self.seconds_per_entry for f in self.share)
        more = self.then.seconds if self.then is not None else (0.0, 0.0)
        return own[0] + more[0], own[1] + more[1]

    def summary(self) -> str:
        """One line: what is left to score, at what cost per entry, and the total."""
        parts = [self._part()] + ([self.then._part()] if self.then is not None else [])
        low, high = self.seconds
        if high == 0:
            return f"importance: {'; '.join(parts)}: nothing to score."
        total = _duration(low) if high - low < 1 else f"{_duration(low)} to {_duration(high)}"
        return f"importance: {'; then '.join(parts)}. Estimated {total}."

    def _part(self) -> str:
        if self.entries == 0:
            return f"{self.estimator}: all {self.table_entries} entries cached"
        what = f"{self.entries} of {self.table_entries} entries" if self.entries < self.table_entries else \
            f"{self.entries} entries"
        if self.share != (1.0, 1.0):
            what = f"the entries the plan needs ({self.share[0]:.0%}-{self.share[1]:.0%} of {self.entries})"
        return f"{self.estimator} on {what} at {self.seconds_per_entry:.2f} s each"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for reports), with the estimated seconds."""
        low, high = self.seconds
        return {"summary": self.summary(), "estimator": self.estimator, "entries": self.entries,
                "table_entries": self.table_entries,
                "seconds_per_entry": self.seconds_per_entry, "share": list(self.share),
                "estimated_s": [low, high], "then": self.then.to_dict() if self.then is not None else None}


def estimate_table(scorer: ImportanceScorer, share: tuple[float, float] = (1.0, 1.0),
                   samples: int = 2) -> TableEstimate:
    """Estimate what building ``scorer``'s entries will cost, by scoring up to ``samples`` of the missing ones.

    The first entry also pays for one-off work (the original's metric, copies, caches), so with two or more
    samples the last one's time is the cost per entry (the first one's is an upper bound).
    """
    todo = scorer.missing()
    per = 0.0
    for key in todo[:samples]:
        start = time.perf_counter()
        scorer.score([key], progress=False)
        per = time.perf_counter() - start
    return TableEstimate(scorer.estimator.name, len(todo), len(scorer.scored), per, share)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"
