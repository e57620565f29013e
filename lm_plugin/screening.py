"""How a screened search runs, configured once as one object: :class:`ScreenedSearch`.

A screened search solves the DP on a cheap estimator's complete table and scores with the importance estimator
only the entries its plans need (:mod:`lm_plugin.solve.screen`). Its settings belong together and are checked
together, here, instead of as five arguments of the pruner:

```python
from lm_plugin import LayerMergePruner, ScreenedSearch

pruner = LayerMergePruner(model, 0.6, x, train_data=train, eval_data=val,
                          screen=ScreenedSearch("tail_distill", settings={"steps": 5}, calibration=4))
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError
from .solve.screen import DEFAULT_CALIBRATION, DEFAULT_LIFT, DEFAULT_TOLERANCE, check_lift, check_tolerance
from .tables.estimators import ESTIMATORS, SCREEN_SETTINGS, ImportanceEstimator, make_estimator

__all__ = ["ScreenedSearch"]


@dataclass(frozen=True)
class ScreenedSearch:
    """A screened search's settings, checked when the object is made.

    Attributes:
        screen: The cheap estimator: a name (run with :data:`~lm_plugin.tables.estimators.SCREEN_SETTINGS`
            unless ``settings`` says otherwise, on the pruner's data) or a ready estimator (with its own data and
            settings).
        settings: Settings of a named screen (``{"steps": 5}``).
        lift: How entries not yet scored are valued: ``"median"`` (default: the screen on the exact scale by the
            calibration sample's typical under-rating; plans that fine-tune as well as the exact estimator's over
            its seeds), ``"envelope"`` (the screen plus a learned bound on how far it under-rates: the complete
            table's plan when the bound holds, at about twice the entries) or ``"none"`` (the screen's value as it
            is). docs/selection.md compares them.
        calibration: Entries scored exactly before the first solve, a seeded sample of the better half of the
            screen: the lifts learn from them how far the screen under-rates entries (``"median"`` needs one).
        tolerance: Stop once the best plan of scored entries is within this fraction of its own objective of
            what the lifted values promise (0: score until the plan on the lifted values is all exact).

    Raises:
        ConfigurationError: settings for a ready estimator, an unknown estimator or lift, a calibration that is
            not an int >= 0 (or 0 with the ``"median"`` lift), a negative tolerance.
    """

    screen: str | ImportanceEstimator = "tail_distill"
    settings: Mapping[str, Any] | None = None
    lift: str = DEFAULT_LIFT
    calibration: int = DEFAULT_CALIBRATION
    tolerance: float = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        if isinstance(self.screen, ImportanceEstimator):
            if self.settings is not None:
                raise ConfigurationError(f"the screen {type(self.screen).__name__} carries its own settings: set "
                                         "them on it, or pass its name with settings=")
        else:
            ESTIMATORS[self.screen]  # an unknown name raises, listing the estimators
        if not (isinstance(self.calibration, int) and self.calibration >= 0):
            raise ConfigurationError(f"calibration must be an int >= 0, got {self.calibration!r}")
        check_lift(self.lift, self.calibration)
        check_tolerance(self.tolerance)

    def estimator(self, train_data: Any, eval_data: Any) -> ImportanceEstimator:
        """The screen's estimator: the ready one, or the named one on this data."""
        if isinstance(self.screen, ImportanceEstimator):
            return self.screen
        options = {**SCREEN_SETTINGS.get(self.screen, {}), **(self.settings or {})}
        return make_estimator(self.screen, train_data=train_data, eval_data=eval_data, **options)

    def to_dict(self) -> dict[str, Any]:
        """The search settings, for reports (the estimator's own settings are reported by the estimator)."""
        return {"lift": self.lift, "calibration": self.calibration, "tolerance": float(self.tolerance)}
