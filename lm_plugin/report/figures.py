"""Pictures of a compression run: the plan drawn over the network's layers, and the accuracy/latency trade-off."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# Figure objects without pyplot: no GUI backend needed, and a user's pyplot state is never touched.
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..blocks import block_geometry
from ..plan import Plan
from ..trace.chain import Chain

__all__ = ["plot_plan", "plot_tradeoff"]

KEPT, MERGED, DROPPED = "#4c9a2a", "#2f6db5", "#c8c8c8"


def plot_plan(chain: Chain, plan: Plan, path: str | Path, title: str = "") -> Path:
    """Draw the chain's convs left to right, coloured by what the plan does with each, one bracket per block.

    Green: a conv left alone (a block of one); blue: a conv merged with its neighbours into one conv;
    grey: a conv dropped (replaced by identity). Circles between convs are activations: filled = kept,
    open = removed; a vertical bar marks a position no block may cross (pooling, a branch, ...).
    """
    n = chain.length
    fig = Figure(figsize=(max(6.0, 0.32 * n + 2), 3.2))
    ax = fig.subplots()
    for st, end in plan.blocks():
        kept = [j for j in range(st + 1, end + 1) if j in plan.kept_convs]
        merged_block = len(kept) > 1
        for j in range(st + 1, end + 1):
            colour = DROPPED if j not in plan.kept_convs else (MERGED if merged_block else KEPT)
            ax.add_patch(Rectangle((j - 0.4, 0), 0.8, 1, color=colour))
        geo = block_geometry(chain, st, end, plan.kept_convs)
        ax.plot([st + 0.55, end + 0.45], [1.15, 1.15], color="black", lw=1)
        if end - st > 1:
            ax.text((st + end + 1) / 2, 1.22, f"{geo.kernel_size[0]}×{geo.kernel_size[1]}", ha="center",
                    va="bottom", fontsize=7)
    for pos in range(1, n):
        position = chain.positions[pos]
        if position.is_break:
            ax.plot([pos + 0.5, pos + 0.5], [-0.1, 1.1], color="black", lw=1.5)
        elif position.activation is not None or pos in plan.kept_acts:
            filled = pos in plan.kept_acts
            ax.plot(pos + 0.5, 0.5, "o", ms=5, mfc="black" if filled else "white", mec="black")
    ax.set_xlim(0.3, n + 0.7)
    ax.set_ylim(-0.9, 1.6)
    ax.set_yticks([])
    ax.set_xticks(range(1, n + 1))
    ax.set_xticklabels([chain.conv(j).name for j in range(1, n + 1)], rotation=90, fontsize=6)
    for spine in ("top", "right", "left"):
        ax.spines[spine].set_visible(False)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in (KEPT, MERGED, DROPPED)]
    ax.legend(handles, ["kept", "merged", "dropped"], loc="lower right", ncol=3, fontsize=7, frameon=False,
              bbox_to_anchor=(1.0, -0.02))
    ax.set_title(title or f"plan: {len(plan.blocks())} convs from {n}", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=150)
    return out


def plot_tradeoff(
    frontier: Sequence[tuple[float, float]],
    measured: dict[str, tuple[float, float]],
    path: str | Path,
    title: str = "accuracy vs latency",
) -> Path:
    """Measured accuracy against latency relative to the original, with the DP's objective on its own axis.

    The DP's objective (the original's metric plus the chosen blocks' summed importance) ranks plans; it is not a
    forecast of the fine-tuned accuracy, so it is drawn against a separate right-hand axis and labelled as such,
    never on the accuracy axis.

    Args:
        frontier: ``(relative predicted latency, DP objective)`` of the DP's solutions before fine-tuning
            (:func:`lm_plugin.compress.tradeoff`).
        measured: ``name → (relative measured latency, measured accuracy)``, e.g. original and compressed.
        path: Output image file.
        title: Figure title.
    """
    fig = Figure(figsize=(5.6, 3.8))
    ax = fig.subplots()
    handles = []
    markers = iter("s^Dv*P")
    for name, (x, y) in measured.items():
        handles += ax.plot(x, y, next(markers, "o"), ms=8, label=f"{name}: measured accuracy")
    ax.set_xlabel("latency / original latency")
    ax.set_ylabel("measured accuracy (%)")
    ax.grid(alpha=0.3)
    if frontier:
        right = ax.twinx()
        xs, ys = zip(*sorted(frontier), strict=True)
        handles += right.plot(xs, ys, "-o", ms=3, color="#888888",
                              label="DP objective (a ranking, before fine-tuning)")
        right.set_ylabel("DP objective: summed importance", color="#666666", fontsize=8)
        right.tick_params(axis="y", colors="#666666", labelsize=7)
    # Below the axes, never over a point.
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
              frameon=False)
    ax.set_title(title, fontsize=9)
    out = Path(path)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    return out
