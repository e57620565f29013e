"""Reports of compression runs: the output folder (Markdown, JSON, figures, exported models)."""

from .figures import plot_plan, plot_tradeoff
from .writer import render_markdown, write_run

__all__ = ["plot_plan", "plot_tradeoff", "render_markdown", "write_run"]
