"""Stage 3a: the latency table of a chain and the end-to-end latency model built on it.

Every candidate block is timed as the module it becomes in the deployed network — the merged conv, plus the
residual add that follows it when the block ends a residual it does not fold, plus its activation — at its
*true* input shape (the traced shape, after any pooling), with the core's private caches flushed before each
timed run as a layer inside the network finds them (see ``EagerCPUProfiler``: timed in a warm tight loop, small
blocks look cheaper than they are in the network, the difference lands in ``rest`` and the model under-credits
every block a plan removes). Projection skips are timed on their own, since
folding a residual removes them. The rest of the network (stem pooling, head, ...) is measured once as

    rest = T(original network) − Σ T(blocks of the identity plan) − Σ T(projection skips)

so that ``predict(plan) = rest + Σ T(plan's blocks) + Σ T(its unfolded projection skips)`` is an end-to-end
latency, and budgets can be stated as a fraction of the original network's measured latency.

The model checks itself: a few plans spanning the budget range are deployed and timed end to end in the same measurement
worker as the table (cached with it). ``rest`` and one scale factor on the block sums are fitted to those
networks through the original (predicted as measured, so budget 1.0 is the original; least squares on relative
errors; ``rest >= 0``: the part outside the chain is never negative), which absorbs what summing isolated blocks
misses — per-call overheads a network pays once, operator fusion across blocks in ONNX Runtime. The fit is kept
only where it predicts the sample plans better out of sample than the plain sum. Each network's error is reported
*out of sample* (the fit without it), recorded with the model (:class:`LatencyCheck`) and warned about beyond
``check_tolerance``.

"The original network" is timed in its deploy form — the identity plan merged, i.e. every BN folded — because
that is what a deployment of the uncompressed network runs, and because blocks are timed BN-free: timing the
unfolded original would charge all BatchNorms to ``rest`` and overstate every prediction.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..blocks import block_geometry
from ..candidates import Candidate
from ..errors import UnknownNameError
from ..latency import (
    LatencyDriftWarning,
    LatencyModelWarning,
    LatencyTable,
    ModuleSpec,
    Profiler,
    latency_cache_path,
)
from ..plan import Plan
from ..trace.chain import Chain, Residual
from .conv_block import conv_block_key, conv_block_module

#: Relative change of the original network's latency, table vs now, beyond which a warning is given.
DEFAULT_DRIFT_TOLERANCE = 0.15
#: Plans (besides the original) deployed and timed end to end to fit and check the latency model.
DEFAULT_CHECK_PLANS = 5
#: Largest out-of-sample error of a checked plan's predicted latency before the model warns.
DEFAULT_CHECK_TOLERANCE = 0.10
# The check plans span predicted latencies from this fraction of the original's down to this one: the fit must see
# the whole range budgets reach, or it extrapolates (fitted on mild plans only, resnet_fm's model once predicted a
# plan at 19.7 ms that measured 4.0).
_CHECK_SPAN = (0.85, 0.25)
_CHECK_SEED = 20241


@dataclass(frozen=True)
class PlanCheck:
    """One network of the self-check: predicted (out of sample) vs measured end-to-end latency.

    Attributes:
        label: ``"original"`` or ``"sample<i>"``.
        blocks: how many blocks the plan deploys (the original: one per conv).
        summed_ms: the plan's measured blocks and skips summed (before the fit).
        predicted_ms: the model's prediction for the plan with the fit made *without* it.
        measured_ms: the deployed network timed end to end.
    """

    label: str
    blocks: int
    summed_ms: float
    predicted_ms: float
    measured_ms: float

    @property
    def error(self) -> float:
        """``predicted / measured − 1``."""
        return self.predicted_ms / self.measured_ms - 1.0


@dataclass(frozen=True)
class LatencyCheck:
    """How well the latency model predicts whole networks, measured when the table was built.

    Attributes:
        plans: the original and the sample plans, each predicted out of sample.
        rest_ms: fitted latency of the part of the network outside the chain (>= 0).
        scale: fitted factor on the summed block latencies.
        tolerance: the error beyond which the model warned.
    """

    plans: tuple[PlanCheck, ...]
    rest_ms: float
    scale: float
    tolerance: float = DEFAULT_CHECK_TOLERANCE

    @property
    def ms_errors(self) -> list[float]:
        """|predicted − measured| / measured of each checked network."""
        return [abs(p.error) for p in self.plans]

    @property
    def speedup_errors(self) -> list[float]:
        """|predicted − measured speed-up| / measured of each sample plan over the original."""
        base = self.plans[0]
        out = []
        for p in self.plans[1:]:
            measured = base.measured_ms / p.measured_ms
            out.append(abs(base.predicted_ms / p.predicted_ms - measured) / measured)
        return out

    @property
    def max_error(self) -> float:
        """The largest out-of-sample ms error."""
        return max(self.ms_errors, default=0.0)

    @property
    def ok(self) -> bool:
        """True if every checked network was predicted within the tolerance."""
        return self.max_error <= self.tolerance

    def summary(self) -> str:
        """One line for reports."""
        ms, sp = self.ms_errors, self.speedup_errors
        text = (f"latency model checked on {len(self.plans)} deployed networks: ms error median "
                f"{statistics.median(ms):.1%}, max {max(ms):.1%}")
        if sp:
            text += f"; speed-up error median {statistics.median(sp):.1%}, max {max(sp):.1%}"
        return text + f" (rest {self.rest_ms:.3f} ms, scale {self.scale:.3f})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for reports."""
        return {"rest_ms": self.rest_ms, "scale": self.scale, "tolerance": self.tolerance,
                "ms_error_median": statistics.median(self.ms_errors), "ms_error_max": self.max_error,
                "speedup_error_max": max(self.speedup_errors, default=0.0),
                "plans": [{"label": p.label, "blocks": p.blocks, "summed_ms": p.summed_ms,
                           "predicted_ms": p.predicted_ms, "measured_ms": p.measured_ms} for p in self.plans]}


def fit_rest_and_scale(summed: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """``(rest, scale)`` with ``rest + scale·summed[0] == measured[0]`` (the original network, first, is predicted
    as measured: budget 1.0 is the original) and ``scale`` minimising the other networks' relative errors
    Σ ((rest + scale·summed_i − measured_i) / measured_i)²; ``rest >= 0``.

    Relative errors, because budgets and speed-ups are ratios. With the original alone, the scale is 1 and rest
    what remains.
    """
    s0, m0 = summed[0], measured[0]
    pairs = [(s - s0, m - m0, 1.0 / (m * m)) for s, m in zip(summed[1:], measured[1:])]
    sxx = sum(w * dx * dx for dx, _, w in pairs)
    scale = sum(w * dx * dy for dx, dy, w in pairs) / sxx if sxx > 0 else 1.0
    if scale <= 0:  # noise swamped every difference: fall back to the plain sum
        scale = 1.0
    rest = m0 - scale * s0
    if rest < 0:  # the part outside the chain cannot take negative time: proportional through the original
        rest, scale = 0.0, m0 / s0
    return rest, scale


def _free_fit(summed: Sequence[float], measured: Sequence[float]) -> tuple[float, float] | None:
    """Least squares of relative errors without the anchor (``rest >= 0``), or None without two distinct points."""
    if len(summed) < 2 or max(summed) - min(summed) <= 1e-9 * max(summed):
        return None
    w = [1.0 / (m * m) for m in measured]
    sw, sx = sum(w), sum(wi * x for wi, x in zip(w, summed))
    sy = sum(wi * y for wi, y in zip(w, measured))
    sxx = sum(wi * x * x for wi, x in zip(w, summed))
    sxy = sum(wi * x * y for wi, x, y in zip(w, summed, measured))
    det = sw * sxx - sx * sx
    rest, scale = (sxx * sy - sx * sxy) / det, (sw * sxy - sx * sy) / det
    if rest < 0 or scale <= 0:
        rest, scale = 0.0, sxy / sxx
    return rest, scale


class _ConvAddAct(nn.Module):
    """Merged conv, then the residual add of a second input (the skip), then the activation.

    The skip is an input of its own, as in the network: ONNX Runtime fuses conv + add + activation into one kernel
    when the added tensor comes from elsewhere, not when it is the conv's own output (``y + y``, which timed
    resnet_fm's residual blocks 20-30 % slow in ONNX Runtime and made every plan that folds them look too cheap).
    """

    def __init__(self, block: nn.Sequential) -> None:
        super().__init__()
        self.conv, self.act = block[0], block[1]

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x) + skip)


def candidate_spec(c: Candidate) -> ModuleSpec:
    """What to time for candidate ``c`` (shared across positions with the same geometry)."""
    key = {**conv_block_key(c.geometry, c.activation), "residual_add": c.residual_add}
    shape = tuple(c.geometry.input_shape)
    if c.residual_add:
        with torch.device("meta"):  # the block's output shape, without computing anything
            out = tuple(conv_block_module(c.geometry, c.activation)(torch.empty(shape)).shape)
        return ModuleSpec(lambda: _ConvAddAct(conv_block_module(c.geometry, c.activation)), (shape, out),
                          {**key, "skip": "input"})
    return ModuleSpec(lambda: conv_block_module(c.geometry, c.activation), shape, key)


def skip_spec(chain: Chain, r: Residual) -> ModuleSpec:
    """The projection conv of residual ``r`` (BN folded), at its input shape."""
    src = chain.conv(r.source + 1).input_shape
    cin, cout = src[1], chain.conv(r.target).out_channels

    def build() -> nn.Module:
        return nn.Conv2d(cin, cout, r.kernel_size, r.stride, r.padding, groups=r.groups, bias=True)

    key = {"op": "skip_conv2d", "in_channels": cin, "out_channels": cout, "kernel_size": list(r.kernel_size),
           "stride": list(r.stride), "padding": list(r.padding), "groups": r.groups, "input_shape": list(src[1:])}
    return ModuleSpec(build, tuple(src), key)


def network_key(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Cache key of the whole network: its traced code and module structure (weights do not matter)."""
    text = gm.code + repr(gm)
    return {"op": "network-bn-folded", "graph": hashlib.sha1(text.encode()).hexdigest()[:16],
            "inputs": [list(t.shape[1:]) for t in example_inputs]}


def cache_path(cache_dir: str | os.PathLike[str], profiler: Profiler) -> Path:
    """One cache file per profiler signature (``latency-<backend>-<hash>.sqlite``), so backends and batch sizes
    never overwrite each other."""
    return latency_cache_path(cache_dir, profiler.name, profiler.signature())


@dataclass
class LatencyModel:
    """End-to-end latency of any plan of a chain, from per-block measurements.

    Attributes:
        original_ms: measured latency of the uncompressed network.
        rest_ms: latency of everything outside the chain's blocks and skips.
        block_ms: ``Candidate.key -> ms``.
        skip_ms: residual target -> ms of its projection skip.
        signature: the profiler signature every number was measured with.
        check_ms: the original network measured again after the table was built or loaded (None: not checked).
        scale: factor on every block and skip latency (fitted with ``rest_ms`` by the self-check; 1 without it).
        check: the self-check of the model on deployed networks (None: not checked).
    """

    chain: Chain
    original_ms: float
    rest_ms: float
    block_ms: dict[tuple, float]
    skip_ms: dict[int, float]
    signature: dict[str, Any]
    check_ms: float | None = None
    scale: float = 1.0
    check: LatencyCheck | None = field(default=None, repr=False)

    @property
    def drift(self) -> float | None:
        """``check_ms / original_ms − 1``: how much faster (< 0) or slower the machine times the network now than
        its table says. Predicted milliseconds are off by about this much."""
        return None if self.check_ms is None else self.check_ms / self.original_ms - 1.0

    def entry_key(self, st: int, end: int, kept) -> tuple:
        geo = block_geometry(self.chain, st, end, kept)
        return (st, end, geo.kernel_size[0], geo.kernel_size[1], geo.groups)

    def block(self, st: int, end: int, kept) -> float:
        """Latency of block ``(st, end]`` keeping ``kept``.

        Raises:
            KeyError: the block is not in the table (e.g. its kernel exceeds the table's ``max_kernel``).
        """
        key = self.entry_key(st, end, kept)
        if key not in self.block_ms:
            raise UnknownNameError(f"block ({st},{end}] with kernel {key[2]}x{key[3]} is not in the latency table; "
                           "rebuild it with a larger max_kernel")
        return self.block_ms[key]

    @property
    def fixed_ms(self) -> float:
        """What every plan pays outside its blocks: the rest of the network and every projection skip."""
        return self.rest_ms + self.scale * sum(self.skip_ms.values())

    def _measured_cost(self, st: int, end: int, kept) -> float:
        saved = sum(self.skip_ms.get(r.target, 0.0) for r in self.chain.residuals_within(st, end))
        return self.block(st, end, kept) - saved

    def cost(self, st: int, end: int, kept) -> float:
        """What choosing block ``(st, end]`` adds to :attr:`fixed_ms`: its latency, minus the projection skips it
        folds (they disappear from the deployed network), times the fitted scale."""
        return self.scale * self._measured_cost(st, end, kept)

    def summed(self, plan: Plan) -> float:
        """The plan's measured blocks and unfolded projection skips, summed (no rest, no scale)."""
        plan.validate(self.chain)
        return sum(self.skip_ms.values()) + sum(self._measured_cost(st, end, plan.kept_convs)
                                                for st, end in plan.blocks())

    def predict(self, plan: Plan) -> float:
        """Predicted end-to-end latency of ``plan`` in ms."""
        return self.rest_ms + self.scale * self.summed(plan)

    def covers(self, plan: Plan) -> bool:
        """True if every block of ``plan`` is in the table."""
        return all(self.entry_key(st, end, plan.kept_convs) in self.block_ms for st, end in plan.blocks())


def build_latency_model(gm: fx.GraphModule, chain: Chain, candidates: Sequence[Candidate],
                        example_inputs: Sequence[torch.Tensor], profiler: Profiler,
                        deploy: Callable[[Plan], nn.Module], *,
                        cache_dir: str | os.PathLike[str] | None = None, progress: bool = True,
                        drift_tolerance: float | None = DEFAULT_DRIFT_TOLERANCE,
                        check_plans: int = DEFAULT_CHECK_PLANS,
                        check_tolerance: float = DEFAULT_CHECK_TOLERANCE) -> LatencyModel:
    """Time every candidate, the projection skips and the whole network; return the latency model.

    Args:
        gm: the traced original network.
        chain: its chain.
        candidates: the table's entries; the identity plan's blocks must be among them (single-conv blocks
            always are).
        example_inputs: inputs the network is timed with (the profiler's batch size replaces theirs).
        profiler: the profiler for every measurement.
        deploy: the deploy form of a plan of ``gm`` (:func:`lm_plugin.merge.deploy_plan` bound to the network, as the
            pruner passes it): the identity plan's is "the original", the self-check times others. A parameter,
            because deploying is a later stage (rewrite and merge) than this table.
        cache_dir: cache folder (one SQLite file per profiler signature, shared safely by processes that build
            at once: measuring is serialised, see :meth:`~lm_plugin.latency.LatencyTable.build`), or None for no
            cache.
        progress: show a progress bar.
        drift_tolerance: after the table is built or loaded from the cache, the original network is timed once
            more; if that differs from the table's figure by more than this fraction, a
            :class:`~lm_plugin.latency.LatencyDriftWarning` says so (the machine changed speed while or since the
            table was built). None skips the check; analytic backends never need it.
        check_plans: plans spanning the budget range (:func:`check_samples`), deployed and timed end to end
            (cached with the table) to fit ``rest`` and the scale and to check the model out of sample; 0 keeps the
            plain sum (rest = what the original leaves, at least 0). Analytic backends are never checked.
        check_tolerance: out-of-sample error of a checked network beyond which a
            :class:`~lm_plugin.latency.LatencyModelWarning` is given (when the check is measured, not when it is
            read from the cache).
    """
    entries: list[tuple[Any, ModuleSpec]] = [(("block",) + c.key, candidate_spec(c)) for c in candidates]
    skips = [r for r in chain.residuals if r.projection is not None]
    entries += [(("skip", r.target), skip_spec(chain, r)) for r in skips]
    deployed = deploy(Plan.identity(chain))
    entries.append((("network",), ModuleSpec(lambda: deployed, tuple(tuple(t.shape) for t in example_inputs),
                                              network_key(gm, example_inputs))))
    cache = cache_path(cache_dir, profiler) if cache_dir is not None else None
    table = LatencyTable.build(entries, profiler, cache=cache, progress=progress, description="latency table")
    model = LatencyModel(chain, table.ms(("network",)), 0.0, {c.key: table.ms(("block",) + c.key) for c in candidates},
                         {r.target: table.ms(("skip", r.target)) for r in skips}, dict(table.signature))
    # The self-check: plans chosen on the plain sum, deployed and timed end to end (cached like every entry).
    samples = [] if profiler.deterministic else check_samples(model, candidates, check_plans)
    if samples:
        # The original is timed again with the check plans, in the same session: the check then compares networks
        # timed at one machine speed, and its original (the budgets' reference) carries the table's blocks to it.
        plans = [Plan.identity(chain), *samples]
        net, shapes = network_key(gm, example_inputs), tuple(tuple(t.shape) for t in example_inputs)
        specs = [(("check", i), ModuleSpec(lambda p=p: deploy(p), shapes,
                                           {**net, "op": "network-plan", "plan": p.to_dict()}))
                 for i, p in enumerate(plans)]
        checks = LatencyTable.build(
            specs, profiler, cache=cache, progress=progress, description="latency self-check")
        model.original_ms = checks.ms(("check", 0))
        _fit(model, plans, [checks.ms(("check", i)) for i in range(len(plans))], check_tolerance,
             warn=checks.measured > 0)
    else:
        _fit(model, [Plan.identity(chain)], [model.original_ms], check_tolerance, warn=False)
    if drift_tolerance is not None and not profiler.deterministic:
        _check_drift(model, deployed, example_inputs, profiler, drift_tolerance, cache)
    return model



def check_samples(model: LatencyModel, candidates: Sequence[Candidate], count: int) -> list[Plan]:
    """``count`` plans whose predicted latency (the plain sum) spreads from 85 % of the original's down to 25 % (or
    the fastest plan there is): what budgets from mild to aggressive deploy, so that the fit interpolates.

    Each is the best plan of a seeded random value per candidate block minus λ × its latency, for λ from 0 (a
    random plan) to large (the fastest plan) — a shortest path over block boundaries, so plans look like the DP's
    (long merged blocks, most convs dropped), which random boundary draws rarely reach. Deterministic, so a cached
    check is found again.
    """
    if count < 1:
        return []
    chain, identity = model.chain, Plan.identity(model.chain)
    length, full = chain.length, model.summed(identity)
    rng = random.Random(_CHECK_SEED)
    value = {c.key: rng.random() for c in candidates}
    ending: dict[int, list[Candidate]] = {}
    for c in candidates:
        ending.setdefault(c.end, []).append(c)
    pool: dict[Plan, float] = {}
    for lam in (0.0, *(2.0 ** (k / 4) for k in range(-16, 80))):  # from random plans to the fastest
        best: list[tuple[float, Candidate | None]] = [(0.0, None)] + [(math.inf, None)] * length
        for end in range(1, length + 1):
            for c in ending.get(end, []):
                score = best[c.st][0] + lam * length * model.cost(c.st, c.end, c.kept) / full - value[c.key]
                if score < best[end][0]:
                    best[end] = (score, c)
        blocks, at = [], length
        while at > 0 and best[at][1] is not None:
            blocks.append(best[at][1])
            at = best[at][1].st
        if at != 0:
            continue
        plan = Plan(length, frozenset(b.end for b in blocks) - {length}, frozenset(j for b in blocks for j in b.kept),
                    chain.fingerprint())
        if plan != identity and plan.is_valid(chain):
            pool[plan] = model.summed(plan)
    high, low = _CHECK_SPAN
    chosen: list[Plan] = []
    for i in range(count):
        target = full * (high - (high - low) * i / max(1, count - 1))
        left = [p for p in pool if p not in chosen]
        if left:
            chosen.append(min(left, key=lambda p: abs(pool[p] - target)))
    return chosen


def _fit(model: LatencyModel, plans: list[Plan], measured: list[float], tolerance: float, *, warn: bool) -> None:
    """Fit ``rest`` and the scale on every checked network; check each out of sample; warn if one is off.

    The fit is kept only if it predicts the sample plans out of sample better than the plain sum through the
    original (scale 1): on a noisy machine a two-point line can be worse than no fit at all.
    """
    summed = [model.summed(p) for p in plans]
    plain = fit_rest_and_scale(summed[:1], measured[:1])

    def out_of_sample(i: int, fitted: bool) -> tuple[float, float]:
        others = [j for j in range(len(plans)) if j != i]
        if i == 0:  # the anchor: predicted from the samples alone
            fit = _free_fit([summed[j] for j in others], [measured[j] for j in others]) if fitted else None
        else:
            fit = fit_rest_and_scale([summed[j] for j in others], [measured[j] for j in others]) if fitted else plain
        return fit if fit is not None else plain

    def worst(fitted: bool) -> float:
        return max((abs(sum(x * y for x, y in zip(out_of_sample(i, fitted), (1.0, summed[i]))) / measured[i] - 1)
                    for i in range(1, len(plans))), default=0.0)

    fitted = len(plans) > 2 and worst(True) < worst(False)
    model.rest_ms, model.scale = fit_rest_and_scale(summed, measured) if fitted else plain
    if len(plans) < 2:  # nothing to check against (analytic backends, or no plan to sample)
        model.check = None
        return
    checks = []
    for i, (plan, s, m) in enumerate(zip(plans, summed, measured)):
        rest, scale = out_of_sample(i, fitted)
        checks.append(PlanCheck("original" if i == 0 else f"sample{i}", len(plan.blocks()), s, rest + scale * s, m))
    model.check = LatencyCheck(tuple(checks), model.rest_ms, model.scale, tolerance)
    if warn and len(plans) > 1 and not model.check.ok:
        worst = max(checks, key=lambda c: abs(c.error))
        warnings.warn(
            f"the latency model predicts deployed networks less well than {tolerance:.0%}: {model.check.summary()}; "
            f"worst {worst.label}: predicted {worst.predicted_ms:.3f} ms, measured {worst.measured_ms:.3f} ms. "
            "Budgets are met only that closely. Rebuild the table on a quieter machine (delete the cache file), "
            "pin the measurement worker to an idle core (WorkerConfig(cpus=...)), or time on the runtime you "
            "deploy with.", LatencyModelWarning, stacklevel=3)


def _check_drift(model: LatencyModel, deployed: nn.Module, example_inputs: Sequence[torch.Tensor],
                 profiler: Profiler, tolerance: float, cache: Path | None) -> None:
    """Time the network once more. A steady machine gives the table's figure back; a drifting one does not, and
    every absolute prediction then carries that error (each entry can still look steady on its own)."""
    model.check_ms = profiler.measure(deployed, tuple(example_inputs), warn_unstable=False).median_ms
    drift = model.drift
    assert drift is not None
    if abs(drift) > tolerance:
        where = f" (cache {cache})" if cache is not None else ""
        warnings.warn(
            f"the original network measures {model.check_ms:.3f} ms now but {model.original_ms:.3f} ms in the "
            f"latency table{where}: {drift:+.0%}, beyond the {tolerance:.0%} tolerance. The machine changed speed "
            "while or since the table was built (shared host, frequency scaling, other jobs), so predicted "
            "milliseconds are off by about that much; comparisons between plans and speed-ups measured side by "
            "side are much less affected. Rebuild the table on a quiet machine (delete the cache file), or pin "
            "the process to an idle core.", LatencyDriftWarning, stacklevel=3)


__all__ = ["DEFAULT_CHECK_PLANS", "DEFAULT_CHECK_TOLERANCE", "DEFAULT_DRIFT_TOLERANCE", "LatencyCheck",
           "LatencyModel", "PlanCheck", "build_latency_model", "cache_path", "candidate_spec", "check_samples",
           "fit_rest_and_scale"]
