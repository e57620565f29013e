"""Screened search: solve with a cheap importance table, score exactly only the entries the plans need.

A complete importance table scores every candidate block, although a plan uses a handful. A screened search
starts from a cheap table (the *screen*, e.g. ``tail_distill`` with few steps on few images) and asks the exact
estimator only for the entries the DP picks. A seeded sample of the better half of the screen
(:func:`calibration_sample`) is scored first; then the DP solves on the exact values of the scored entries and a
value derived from the screen for the others (the *lift*); the picked entries that are not scored yet are scored;
it solves again, until every entry of the plan is exact. The final plan's objective is always computed from exact
values only.

``lift="median"`` (the default, :func:`median_lift`): the screen put on the exact estimator's scale by the
*typical* under-rating, learned from the calibration sample alone: the median of
``(exact − screen) / max(|screen|, 1)`` over it, applied in proportion to each entry's screening loss. Scored and
unscored entries then compete on one scale (the picked entries, which the screen over-rates, are not used to fit
it: they would pull the scale down), and re-scoring corrects the *winner's curse* (the DP picks, among nearly tied
entries, those the screen over-rates). Not a bound, so the plan need not be the complete table's; but the exact
estimator is itself noisy (another seed of ``distill`` picks other plans, some 0.5 %p worse after fine-tuning),
and on the reference workload this rule's plans fine-tune as well as that estimator's over its seeds, at about
half the entries of the envelope (docs/selection.md).

``lift="envelope"`` (:func:`envelope_lift`): the screen plus a bound on how far it under-rates, learned from the
entries scored so far (the calibration sample shows the gaps without the bias of the picked entries). If every
lift is a true bound, the plan is optimal under the exact values (no unscored entry can beat what it was credited
with): the complete table's plan, at about a fifth of its cost on the reference workload.

``lift="none"`` (:func:`no_lift`): the screen's value as it is. This corrects only the winner's curse (the DP
picks, among nearly tied entries, those the screen over-rates, and re-scoring them removes the errors that decide
the plan), at a third to a fifth of the entries. But exact values sit on another scale than the screen's (a short
fit under-rates blocks), so scored entries look better than unscored ones just for being scored: the plan depends
on which entries were scored first, and with some calibration samples it is much worse (docs/selection.md).

The search stops early once no plan can gain much by scoring more (``tolerance``): each round also solves on the
scored entries alone (the best plan whose every entry is exact, the *incumbent*), and when the lifted optimum
promises at most ``tolerance × |incumbent|`` more, the incumbent is the answer. The exact estimator cannot tell such
plans apart anyway: the summed value of a plan varies over ``distill``'s seeds by 9-28 % of itself (standard
deviation, reference workload, docs/selection.md), so plans a tenth apart are within its noise. With the
``envelope`` lift, whose values are bounds, this is a branch-and-bound stop with that guarantee.

Every round scores at least one new entry, so a search takes at most as many rounds as there are entries; each
round is two DP solves and an ``O(n·h)`` lift (``h`` hull points), polynomial in the network's depth.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from ..errors import ConfigurationError
from ..registry import Registry
from .dp import InfeasibleBudgetError

K = TypeVar("K", bound=Hashable)

#: Entries scored exactly before the first solve, drawn from the better half of the screen.
DEFAULT_CALIBRATION = 8
#: How a screened search values the entries it has not scored unless told otherwise (a key of :data:`LIFTS`).
DEFAULT_LIFT = "median"
#: A screened search stops when the lifted optimum promises at most this fraction of the incumbent's objective more.
DEFAULT_TOLERANCE = 0.1


@dataclass(frozen=True)
class ScreenedValues:
    """What a screened search settled on.

    Attributes:
        values: the values the final solve uses: exact for every scored entry; for the rest, the lift's (when the
            plan on them is all exact) or ``-inf`` (when the search stopped on the incumbent).
        exact: the exactly scored entries and their values (every entry of the final plan is among them).
        rounds: rounds of the search (each one or two DP solves).
        gap: how much more than the final plan's objective the lifted values promised when the search stopped
            (0 when the plan on the lifted values was all exact).
    """

    values: dict
    exact: dict
    rounds: int
    gap: float = 0.0


def screened_values(screen: Mapping[K, float], rescore: Callable[[list[K]], Mapping[K, float]],
                    pick: Callable[[dict[K, float]], tuple[Iterable[K], float]], *,
                    calibration: int = DEFAULT_CALIBRATION, seed: int = 0, lift: str = DEFAULT_LIFT,
                    tolerance: float = DEFAULT_TOLERANCE) -> ScreenedValues:
    """Solve on lifted values, score what the solution picks, repeat until the solution is all exact or the
    incumbent is within ``tolerance``.

    Args:
        screen: cheap value of every entry that is scored (entries absent from it are exact already, e.g. the
            uncompressed layers that score 0).
        rescore: the exact values of a list of entries (scores those not cached).
        pick: solves on a complete ``{entry: value}`` map and returns the entries of the solution and its
            objective; it may raise :class:`~lm_plugin.solve.InfeasibleBudgetError` for a map with ``-inf``
            values (no plan of finite value).
        calibration: entries of the better half of the screen scored exactly before the first solve.
        seed: seed of the calibration sample.
        lift: how unscored entries are valued: ``"median"`` (:data:`DEFAULT_LIFT`; :func:`median_lift`, the
            screen on the exact scale by the calibration sample's typical under-rating), ``"envelope"``
            (:func:`envelope_lift`, a learned bound on the screen's under-rating) or ``"none"`` (:func:`no_lift`,
            the screen's value as it is).
        tolerance: stop when the lifted optimum exceeds the incumbent (the best plan of scored entries) by at
            most this fraction of the incumbent's objective; 0: only when the lifted optimum is all exact.
    """
    check_lift(lift, calibration)
    check_tolerance(tolerance)
    lifted = LIFTS[lift]
    exact: dict[K, float] = dict(rescore(calibration_sample(screen, calibration, seed))) if calibration else {}
    sample = dict(exact)
    rounds = 0
    while True:
        rounds += 1
        values = lifted(screen, exact, sample)
        keys, promised = pick(values)
        new = [k for k in dict.fromkeys(keys) if k in screen and k not in exact]
        if not new:
            return ScreenedValues(values, exact, rounds)
        if tolerance > 0 and exact:
            settled = {k: exact.get(k, -math.inf) for k in screen}
            try:
                _, incumbent = pick(settled)
            except InfeasibleBudgetError:  # no plan of scored entries meets the budget yet
                incumbent = -math.inf
            if math.isfinite(incumbent) and promised - incumbent <= tolerance * abs(incumbent):
                return ScreenedValues(settled, exact, rounds, max(0.0, promised - incumbent))
        exact.update(rescore(new))


def envelope_lift(screen: Mapping[K, float], exact: Mapping[K, float],
                  calibration: Mapping[K, float] | None = None) -> dict[K, float]:
    """Optimistic values: exact where scored, else ``screen + lift(|screen|)``.

    ``lift(x)`` is the smallest ``L0 + L1·x`` (``L0, L1 ≥ 0``) over the lines that lie above every scored entry's
    under-rating ``(|screen|, exact − screen)``: the least concave non-decreasing majorant of those points. It is
    scale-free (a large screening loss may be under-rated by more than a small one), 0 where the screen never
    under-rated, and at least the largest under-rating seen for losses beyond every scored one. A two-variable LP,
    so its optimum is a vertex: an upper-hull edge, the horizontal line through the highest point, or the line
    through the origin and the steepest point. (Learned from every scored entry: ``calibration`` is not needed.)
    """
    if not exact:
        return dict(screen)
    points = sorted({(abs(screen[k]), v - screen[k]) for k, v in exact.items() if k in screen})
    if not points:
        return {k: exact.get(k, v) for k, v in screen.items()}
    hull: list[tuple[float, float]] = []  # upper hull, left to right: every point lies on or below its edges
    for p in points:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    lines = [(max(0.0, max(g for _, g in points)), 0.0)]
    slope = max([0.0] + [g / a for a, g in points if a > 0])
    # a point at |screen| = 0 above 0 rules the line through the origin out
    if all(g <= slope * a + 1e-12 * (1.0 + abs(g)) for a, g in points):
        lines.append((0.0, slope))
    for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
        if x1 > x0:
            m = (y1 - y0) / (x1 - x0)
            c = y0 - m * x0
            if c >= 0 and m >= 0:
                lines.append((c, m))

    def lift(x: float) -> float:
        return min(c + m * x for c, m in lines)

    return {k: exact[k] if k in exact else v + lift(abs(v)) for k, v in screen.items()}


def median_lift(screen: Mapping[K, float], exact: Mapping[K, float],
                calibration: Mapping[K, float] | None = None) -> dict[K, float]:
    """Exact where scored, else ``screen + a·max(|screen|, 1)``: the screen on the exact estimator's scale.

    ``a`` is the median over the ``calibration`` sample of ``(exact − screen) / max(|screen|, 1)`` (not below 0):
    the typical relative under-rating of the screen. The sample is drawn before any solve, so unlike the entries
    the plans pick (which the screen over-rates) it is not biased toward small gaps; the floor of 1 %p keeps
    near-zero screening losses from dividing by noise. Without a calibration sample nothing is lifted.
    """
    gaps = [(v - screen[k]) / max(abs(screen[k]), 1.0) for k, v in (calibration or {}).items() if k in screen]
    a = max(0.0, statistics.median(gaps)) if gaps else 0.0
    return {k: exact[k] if k in exact else v + a * max(abs(v), 1.0) for k, v in screen.items()}


def no_lift(screen: Mapping[K, float], exact: Mapping[K, float],
            calibration: Mapping[K, float] | None = None) -> dict[K, float]:
    """Exact values where scored, the screen's elsewhere (re-scoring corrects only the entries a plan picks)."""
    return {k: exact.get(k, v) for k, v in screen.items()}


#: A lift ``(screen, exact, calibration) -> values``: every entry's value for the next solve, from the screen,
#: the exactly scored entries and the calibration sample's exact values (a subset of them).
Lift = Callable[[Mapping[K, float], Mapping[K, float], Mapping[K, float]], dict[K, float]]
#: How a screened search values the entries it has not scored, by name (``ScreenedSearch(lift=...)``).
LIFTS: Registry[Lift] = Registry("screening lift")
for _name, _lift in (("envelope", envelope_lift), ("median", median_lift), ("none", no_lift)):
    LIFTS.register(_name, _lift)
#: The lifts learned from the calibration sample alone (they need one).
CALIBRATED_LIFTS = frozenset({"median"})


def check_lift(lift: str, calibration: int) -> None:
    """Raise :class:`ConfigurationError` unless ``lift`` is known and has the calibration sample it needs."""
    LIFTS[lift]  # an unknown name raises UnknownNameError listing the lifts
    if lift in CALIBRATED_LIFTS and calibration < 1:
        raise ConfigurationError(f"the {lift!r} lift is learned from the calibration sample: use at least one "
                                 f"calibration entry (calibration, default {DEFAULT_CALIBRATION}) or another "
                                 "lift")


def check_tolerance(tolerance: float) -> None:
    """Raise :class:`ConfigurationError` unless ``tolerance`` is a finite fraction ``>= 0``."""
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigurationError(f"tolerance must be a finite fraction >= 0 (0: score until the plan is all "
                                 f"exact; default {DEFAULT_TOLERANCE}), got {tolerance!r}")


def calibration_sample(screen: Mapping[K, float], m: int, seed: int = 0) -> list[K]:
    """``m`` entries drawn (seeded) from the better half of ``screen`` by value (ties broken by key order)."""
    ranked = sorted(screen, key=lambda k: (-screen[k], repr(k)))
    pool = ranked[: max(m, len(ranked) // 2)]
    return sorted(random.Random(seed).sample(pool, min(m, len(pool))), key=repr)


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
