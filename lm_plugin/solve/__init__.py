"""Stage 4 of the data flow: tables -> the optimal plan under a latency budget (all entries scored, or screened:
solve on a cheap table and score exactly only what the plan needs)."""

from .dominance import slower_blocks
from .dp import Entry, InfeasibleBudgetError, Solution, min_latency, solve
from .screen import (
                     CALIBRATED_LIFTS,
                     DEFAULT_CALIBRATION,
                     DEFAULT_LIFT,
                     DEFAULT_TOLERANCE,
                     LIFTS,
                     ScreenedValues,
                     calibration_sample,
                     check_lift,
                     check_tolerance,
                     envelope_lift,
                     median_lift,
                     no_lift,
                     screened_values,
)

__all__ = ["CALIBRATED_LIFTS", "DEFAULT_CALIBRATION", "DEFAULT_LIFT", "DEFAULT_TOLERANCE", "LIFTS", "Entry",
           "InfeasibleBudgetError", "ScreenedValues", "Solution", "calibration_sample", "check_lift", "check_tolerance",
           "envelope_lift", "median_lift", "min_latency", "no_lift", "screened_values", "slower_blocks", "solve"]
