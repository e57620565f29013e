"""Stage 4 of the data flow: tables -> the optimal plan under a latency budget."""

from .dp import Entry, InfeasibleBudgetError, Solution, min_latency, solve

__all__ = ["Entry", "InfeasibleBudgetError", "Solution", "min_latency", "solve"]
