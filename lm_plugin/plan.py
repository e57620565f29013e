"""A LayerMerge plan: which activations (set A) and which convs (set C) a compressed network keeps."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass

from .blocks import block_geometry, blocks_of, fold_problem, residual_relation
from .errors import InvalidPlanError
from .trace.chain import Chain, Pair

PLAN_FORMAT = 1


@dataclass(frozen=True)
class Plan:
    """Kept activations and kept convs over a chain's indices.

    Attributes:
        length: number of convs ``L`` of the chain the plan is for.
        kept_acts: positions in ``1 … L-1`` that stay block boundaries (their activation is kept; at an
            originally linear position a boundary just stops merging there). Every break must be listed.
        kept_convs: conv indices in ``1 … L`` that are kept; the others become identities.
        chain_id: fingerprint of the chain the plan was made for (checked when applied; "" skips the check).
    """

    length: int
    kept_acts: frozenset[int]
    kept_convs: frozenset[int]
    chain_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kept_acts", frozenset(int(i) for i in self.kept_acts))
        object.__setattr__(self, "kept_convs", frozenset(int(i) for i in self.kept_convs))

    # ----------------------------------------------------------------------------------------- constructors
    @classmethod
    def identity(cls, chain: Chain) -> Plan:
        """Keep everything: the plan of the uncompressed network."""
        return cls(chain.length, frozenset(range(1, chain.length)), frozenset(range(1, chain.length + 1)),
                   chain.fingerprint())

    @classmethod
    def merge_all(cls, chain: Chain) -> Plan:
        """Remove every removable activation and keep every conv: one merged conv per segment."""
        return cls(chain.length, chain.breaks - {0, chain.length}, frozenset(range(1, chain.length + 1)),
                   chain.fingerprint())

    @classmethod
    def sample(cls, chain: Chain, rng: random.Random | int | None = None, *, p_merge: float = 0.5,
               p_drop: float = 0.5, max_kernel: int | None = 9) -> Plan:
        """Draw a random *valid* plan (used by property-based tests and random search).

        Args:
            chain: the chain to plan for.
            rng: a ``random.Random`` or a seed.
            p_merge: probability that a removable activation is removed.
            p_drop: probability that a prunable conv is dropped (at least one conv per block is kept).
            max_kernel: split blocks whose merged kernel would exceed this size (None: no limit). Huge
                merged kernels are valid but slow and memory-hungry, and no latency budget would pick them.
        """
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        bounds = set(chain.breaks) | {i for i in chain.mergeable_positions if rng.random() >= p_merge}
        _repair_crossings(chain, bounds)
        kept = set(range(1, chain.length + 1))
        if max_kernel is not None:
            _split_large_blocks(chain, bounds, kept, max_kernel)
        # A residual that cannot fold even with every conv kept (unusual padding) must stay unfolded.
        for r in chain.residuals:
            if fold_problem(chain, r, kept) is not None:
                bounds |= {r.source, r.target, min(r.source + 1, r.target)}
        _repair_crossings(chain, bounds)
        for st, end in blocks_of(bounds, chain.length):
            members = list(range(st + 1, end + 1))
            drop = {j for j in members if chain.conv(j).prunable and rng.random() < p_drop}
            if drop == set(members):
                drop.discard(rng.choice(members))
            trial = kept - drop
            if all(fold_problem(chain, r, trial) is None for r in chain.residuals_within(st, end)):
                kept = trial
        plan = cls(chain.length, frozenset(bounds - {0, chain.length}), frozenset(kept), chain.fingerprint())
        plan.validate(chain)
        return plan

    # -------------------------------------------------------------------------------------------- queries
    @property
    def boundaries(self) -> list[int]:
        return sorted(self.kept_acts | {0, self.length})

    def blocks(self) -> list[Pair]:
        """The ``(st, end]`` blocks, each of which becomes one merged conv."""
        return blocks_of(self.kept_acts, self.length)

    @property
    def removed_acts(self) -> frozenset[int]:
        return frozenset(range(1, self.length)) - self.kept_acts

    @property
    def dropped_convs(self) -> frozenset[int]:
        return frozenset(range(1, self.length + 1)) - self.kept_convs

    def validate(self, chain: Chain) -> None:
        """Check the plan against ``chain``; raise :class:`InvalidPlanError` saying what is wrong.

        Rules: same length and chain; every break kept; only prunable convs dropped; each block keeps at least
        one conv; a block lies outside, inside or over each residual (never across); folded skips fit.
        """
        problems = self.problems(chain)
        if problems:
            raise InvalidPlanError(
                "Invalid plan:\n  - " + "\n  - ".join(problems)
                + "\nUse Plan.identity(chain) / Plan.sample(chain) for valid starting points, "
                "and chain.summary() to see breaks and prunable convs."
            )

    def problems(self, chain: Chain) -> list[str]:
        """Every rule the plan breaks (empty if valid)."""
        L = chain.length
        if self.length != L:
            return [f"plan is for a chain of {self.length} convs, this chain has {L}"]
        if self.chain_id and self.chain_id != chain.fingerprint():
            return [f"plan was made for chain {self.chain_id}, not this one ({chain.fingerprint()})"]
        out: list[str] = []
        bad_pos = sorted(i for i in self.kept_acts if not 0 < i < L)
        if bad_pos:
            out.append(f"kept_acts must be positions 1..{L - 1}; got {bad_pos}")
        bad_conv = sorted(j for j in self.kept_convs if not 1 <= j <= L)
        if bad_conv:
            out.append(f"kept_convs must be conv indices 1..{L}; got {bad_conv}")
        missing = sorted(chain.breaks - self.kept_acts - {0, L})
        if missing:
            out.append(f"positions {missing} are breaks (merging across them is impossible) and must be kept")
        unprunable = sorted(self.dropped_convs - chain.prunable)
        if unprunable:
            out.append(f"convs {unprunable} cannot become identity (channels or stride change) and must be kept")
        if out:
            return out
        for st, end in self.blocks():
            if not any(st < j <= end for j in self.kept_convs):
                out.append(f"block ({st}, {end}] keeps no conv")
            for r in chain.residuals:
                rel = residual_relation(st, end, r)
                if rel == "crosses":
                    out.append(f"block ({st}, {end}] crosses residual ({r.source}, {r.target}]: keep "
                               f"position {r.source if st < r.source else r.target}")
                elif rel == "covers" and (why := fold_problem(chain, r, self.kept_convs)):
                    out.append(f"block ({st}, {end}] cannot fold residual ({r.source}, {r.target}]: {why}")
        return out

    def is_valid(self, chain: Chain) -> bool:
        return not self.problems(chain)

    # --------------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "length": self.length,
            "chain_id": self.chain_id,
            "kept_acts": sorted(self.kept_acts),
            "kept_convs": sorted(self.kept_convs),
        }

    def to_json(self, path: str | None = None) -> str:
        """JSON text of the plan; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise InvalidPlanError(f"not an lm_plugin plan (format {PLAN_FORMAT} expected): {str(data)[:200]}")
        try:
            return cls(int(data["length"]), frozenset(data["kept_acts"]), frozenset(data["kept_convs"]),
                       str(data.get("chain_id", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidPlanError(f"malformed plan: {exc}") from exc

    @classmethod
    def of(cls, model: object) -> Plan:
        """The plan a trainable or deploy form was made from (``LayerMergePruner.apply`` records it).

        Raises:
            InvalidPlanError: ``model`` was not made by ``apply``/``merge``.
        """
        info = getattr(model, "meta", {}).get("lm_plugin") if hasattr(model, "meta") else None
        if not info or "plan" not in info:
            raise InvalidPlanError("this model carries no plan: only models made by LayerMergePruner.apply(plan) "
                                   "(and their merged forms) do")
        return cls.from_dict(info["plan"])

    @classmethod
    def from_json(cls, text_or_path: str) -> Plan:
        """Parse a plan from JSON text or from a file path."""
        text = text_or_path
        if not text_or_path.lstrip().startswith("{"):
            with open(text_or_path) as fh:
                text = fh.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidPlanError(f"plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    # -------------------------------------------------------------------------------------------- display
    def summary(self, chain: Chain) -> str:
        """Readable table: one row per block (the merged conv it becomes), every conv of every block listed
        (runs written ``a-b``; ``x`` marks dropped convs)."""
        rows = [f"Plan: {len(self.blocks())} blocks from {chain.length} convs; "
                f"{len(self.removed_acts - chain.breaks)} activations removed, "
                f"{len(self.dropped_convs)} convs dropped"]
        members = {(st, end): _runs(range(st + 1, end + 1), self.kept_convs) for st, end in self.blocks()}
        width = max([len("convs (x = dropped)"), *map(len, members.values())])
        head = f"{'block':<10} {'convs (x = dropped)':<{width}} {'merged k':>8} {'s':>3}  end"
        rows += [head, "-" * len(head)]
        for st, end in self.blocks():
            geo = block_geometry(chain, st, end, self.kept_convs)
            act = chain.positions[end].activation or "linear"
            folded = chain.residuals_within(st, end)
            tail = act + (f", folds {len(folded)} skip(s)" if folded else "")
            rows.append(f"({st},{end}]".ljust(10) + f" {members[st, end]:<{width}} "
                        f"{geo.kernel_size[0]}x{geo.kernel_size[1]:<6} {geo.stride[0]:>3}  {tail}")
        return "\n".join(rows)


def _runs(convs: Iterable[int], kept: set[int]) -> str:
    """``1-3 x4 5`` for convs 1..5 with 4 dropped: consecutive convs of the same fate as one run."""
    runs: list[list[int]] = []
    for j in convs:
        if runs and runs[-1][-1] == j - 1 and (runs[-1][0] in kept) == (j in kept):
            runs[-1].append(j)
        else:
            runs.append([j])
    return " ".join(("" if run[0] in kept else "x") + (f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}")
                    for run in runs)


def _repair_crossings(chain: Chain, bounds: set[int]) -> None:
    """Add residual ends as boundaries until no block crosses a residual."""
    changed = True
    while changed:
        changed = False
        for st, end in blocks_of(bounds, chain.length):
            for r in chain.residuals:
                if residual_relation(st, end, r) == "crosses":
                    bounds |= {r.source, r.target}
                    changed = True


def _split_large_blocks(chain: Chain, bounds: set[int], kept: set[int], max_kernel: int) -> None:
    """Add boundaries in the middle of blocks whose merged kernel (all convs kept) exceeds ``max_kernel``."""
    while True:
        too_big = [(st, end) for st, end in blocks_of(bounds, chain.length)
                   if end - st > 1 and max(block_geometry(chain, st, end, kept).kernel_size) > max_kernel]
        if not too_big:
            return
        for st, end in too_big:
            bounds.add((st + end) // 2)
        _repair_crossings(chain, bounds)
