"""Spectral analysis of a group's gradient Gram matrix: singular values, numerical rank, importance.

Numerical rank rules (``rank_rule``):

* ``"energy"`` (default): the smallest ``r`` such that the ``r`` largest singular directions carry at
  least ``1 − tol`` of the squared-singular-value energy ``Σ σᵢ²``. Since ``Σ σᵢ²`` is the trace of
  the (empirical) Fisher block of the group, ``tol`` is the fraction of the pruning error's
  second-order curvature that the remaining directions may lose.
* ``"relative"``: the number of singular values ``σᵢ > tol · σ₁``, the classic numerical-rank test.

The filter-wise importance is a greedy column-subset selection (pivoted Cholesky of the Gram
matrix): the most important channel is the one with the most gradient energy; each next one is the
channel with the largest energy *not explained by the channels already chosen*. A channel that
duplicates (or is a linear combination of) kept channels therefore scores ~0 and is pruned first.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..errors import ConfigurationError

RankRule = Literal["energy", "relative"]

__all__ = ["RankRule", "effective_rank", "pivoted_importance", "rank_profile", "singular_values"]


def singular_values(gram: torch.Tensor) -> torch.Tensor:
    """Singular values of ``M`` from its Gram matrix ``K = M Mᵀ``, in descending order."""
    eig = torch.linalg.eigvalsh(gram.to(torch.float64))
    return eig.clamp_min(0.0).sqrt().flip(0)


def _check(tol: float, rule: str) -> None:
    if rule not in ("energy", "relative"):
        raise ConfigurationError(f"rank_rule must be 'energy' or 'relative', got {rule!r}")
    if not 0.0 < tol < 1.0:
        raise ConfigurationError(f"tol must be in (0, 1), got {tol}")


def effective_rank(sigma: torch.Tensor, tol: float, rule: RankRule = "energy") -> int:
    """Numerical rank of a matrix with singular values ``sigma`` (descending).

    Args:
        sigma: Singular values, descending.
        tol: Tolerance in ``(0, 1)`` (see the module docstring for its meaning under each rule).
        rule: ``"energy"`` or ``"relative"``.

    Returns:
        The rank, at least 1 (a group always keeps one channel).
    """
    _check(tol, rule)
    if sigma.numel() == 0 or float(sigma[0]) <= 0.0:
        return 1
    if rule == "relative":
        return max(1, int((sigma > tol * sigma[0]).sum()))
    energy = sigma.double().pow(2)
    cumulative = energy.cumsum(0) / energy.sum()
    # Small slack so float round-off in the cumulative sum cannot add a spurious direction.
    return max(1, int((cumulative < 1.0 - tol - 1e-12).sum()) + 1)


def rank_profile(sigma: torch.Tensor, rule: RankRule = "energy") -> torch.Tensor:
    """The "tolerance needed to drop each direction": ``profile[k]`` is the smallest ``tol`` at
    which the rank is at most ``k + 1``.

    Used by stage 1 to find, for a common tolerance level, how many channels every group keeps.
    """
    if sigma.numel() == 0 or float(sigma[0]) <= 0.0:
        return torch.zeros(max(1, sigma.numel()), dtype=torch.float64)
    if rule == "relative":
        # rank <= k+1  <=>  sigma[k+1] <= tol * sigma[0]
        ratio = torch.cat([sigma[1:].double() / sigma[0], sigma.new_zeros(1, dtype=torch.float64)])
        return ratio
    energy = sigma.double().pow(2)
    tail = 1.0 - energy.cumsum(0) / energy.sum()  # energy lost when keeping k+1 directions
    return tail.clamp_min(0.0)


def pivoted_importance(gram: torch.Tensor, rel_eps: float = 1e-10) -> torch.Tensor:
    """Greedy, redundancy-aware channel importance from a Gram matrix.

    Runs a pivoted Cholesky factorisation of ``gram``: at each step the channel with the largest
    residual energy (its squared gradient norm left after projecting out the channels already
    picked) is picked, and that residual is its score. Scores therefore decrease along the pick
    order, and ranking channels by score reproduces the order.

    Args:
        gram: ``(F, F)`` positive semi-definite Gram matrix.
        rel_eps: Residuals below ``rel_eps · trace`` are treated as zero: the remaining channels
            are fully explained by those picked and are ranked by their own energy, scaled below
            every picked channel's score.

    Returns:
        ``(F,)`` non-negative float32 importance scores, in channel order.
    """
    k = gram.to(torch.float64)
    n = k.shape[0]
    diag = torch.diagonal(k).clone().clamp_min(0.0)
    total = float(diag.sum())
    scores = torch.zeros(n, dtype=torch.float64)
    if total <= 0.0:
        return scores.float()
    residual = diag.clone()
    factor = torch.zeros(n, n, dtype=torch.float64)
    picked = torch.zeros(n, dtype=torch.bool)
    floor = rel_eps * total
    for j in range(n):
        masked = residual.masked_fill(picked, -1.0)
        p = int(masked.argmax())
        pivot = float(residual[p])
        if pivot <= floor:
            # Everything left is (numerically) in the span of what was picked.
            rest = ~picked
            smallest = float(scores[picked].min()) if picked.any() else 1.0
            own = diag[rest]
            scores[rest] = smallest * 1e-6 * own / (float(own.max()) + 1e-300)
            break
        scores[p] = pivot
        picked[p] = True
        col = (k[:, p] - factor[:, :j] @ factor[p, :j]) / pivot**0.5
        factor[:, j] = col
        residual = (residual - col.pow(2)).clamp_min(0.0)
    return scores.float()
