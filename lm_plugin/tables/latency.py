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

"The original network" is timed in its deploy form — the identity plan merged, i.e. every BN folded — because
that is what a deployment of the uncompressed network runs, and because blocks are timed BN-free: timing the
unfolded original would charge all BatchNorms to ``rest`` and overstate every prediction.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..blocks import block_geometry
from ..candidates import Candidate
from ..errors import UnknownNameError
from ..latency import LatencyDriftWarning, LatencyTable, ModuleSpec, Profiler, latency_cache_path
from ..plan import Plan
from ..rewrite import to_trainable
from ..trace.chain import Chain, Residual
from .conv_block import conv_block_key, conv_block_module

#: Relative change of the original network's latency, table vs now, beyond which a warning is given.
DEFAULT_DRIFT_TOLERANCE = 0.15


class _ConvAddAct(nn.Module):
    """Merged conv, then a residual add of a tensor of the same shape, then the activation."""

    def __init__(self, block: nn.Sequential) -> None:
        super().__init__()
        self.conv, self.act = block[0], block[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.act(y + y)  # same memory traffic as adding the skip tensor


def candidate_spec(c: Candidate) -> ModuleSpec:
    """What to time for candidate ``c`` (shared across positions with the same geometry)."""
    key = {**conv_block_key(c.geometry, c.activation), "residual_add": c.residual_add}
    if c.residual_add:
        return ModuleSpec(lambda: _ConvAddAct(conv_block_module(c.geometry, c.activation)),
                          tuple(c.geometry.input_shape), key)
    return ModuleSpec(lambda: conv_block_module(c.geometry, c.activation), tuple(c.geometry.input_shape), key)


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
    """

    chain: Chain
    original_ms: float
    rest_ms: float
    block_ms: dict[tuple, float]
    skip_ms: dict[int, float]
    signature: dict[str, Any]
    check_ms: float | None = None

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
        return self.rest_ms + sum(self.skip_ms.values())

    def cost(self, st: int, end: int, kept) -> float:
        """What choosing block ``(st, end]`` adds to :attr:`fixed_ms`: its latency, minus the projection skips it
        folds (they disappear from the deployed network)."""
        saved = sum(self.skip_ms.get(r.target, 0.0) for r in self.chain.residuals_within(st, end))
        return self.block(st, end, kept) - saved

    def predict(self, plan: Plan) -> float:
        """Predicted end-to-end latency of ``plan`` in ms."""
        plan.validate(self.chain)
        return self.fixed_ms + sum(self.cost(st, end, plan.kept_convs) for st, end in plan.blocks())


def build_latency_model(gm: fx.GraphModule, chain: Chain, candidates: Sequence[Candidate],
                        example_inputs: Sequence[torch.Tensor], profiler: Profiler, *,
                        cache_dir: str | os.PathLike[str] | None = None, progress: bool = True,
                        drift_tolerance: float | None = DEFAULT_DRIFT_TOLERANCE) -> LatencyModel:
    """Time every candidate, the projection skips and the whole network; return the latency model.

    Args:
        gm: the traced original network.
        chain: its chain.
        candidates: the table's entries; the identity plan's blocks must be among them (single-conv blocks
            always are).
        example_inputs: inputs the network is timed with (the profiler's batch size replaces theirs).
        profiler: the profiler for every measurement.
        cache_dir: cache folder (one SQLite file per profiler signature, shared safely by processes that build
            at once: measuring is serialised, see :meth:`~lm_plugin.latency.LatencyTable.build`), or None for no
            cache.
        progress: show a progress bar.
        drift_tolerance: after the table is built or loaded from the cache, the original network is timed once
            more; if that differs from the table's figure by more than this fraction, a
            :class:`~lm_plugin.latency.LatencyDriftWarning` says so (the machine changed speed while or since the
            table was built). None skips the check; analytic backends never need it.
    """
    entries: list[tuple[Any, ModuleSpec]] = [(("block",) + c.key, candidate_spec(c)) for c in candidates]
    skips = [r for r in chain.residuals if r.projection is not None]
    entries += [(("skip", r.target), skip_spec(chain, r)) for r in skips]
    deployed = deploy_identity(gm, chain)
    entries.append((("network",), ModuleSpec(lambda: deployed, tuple(tuple(t.shape) for t in example_inputs),
                                              network_key(gm, example_inputs))))
    cache = cache_path(cache_dir, profiler) if cache_dir is not None else None
    table = LatencyTable.build(entries, profiler, cache=cache, progress=progress, description="latency table")
    block_ms = {c.key: table.ms(("block",) + c.key) for c in candidates}
    skip_ms = {r.target: table.ms(("skip", r.target)) for r in skips}
    original = table.ms(("network",))
    model = LatencyModel(chain, original, 0.0, block_ms, skip_ms, dict(table.signature))
    model.rest_ms = original - model.predict(Plan.identity(chain))  # rest is 0 here: this is what remains
    if drift_tolerance is not None and not profiler.deterministic:
        _check_drift(model, deployed, example_inputs, profiler, drift_tolerance, cache)
    return model



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


def deploy_identity(gm: fx.GraphModule, chain: Chain) -> fx.GraphModule:
    """The uncompressed network as deployed: the identity plan merged (every BN folded)."""
    from ..merge import merge  # local: merge imports the rewrite stage, which imports tables' neighbours

    return merge(to_trainable(gm, chain, Plan.identity(chain)), chain)


__all__ = ["DEFAULT_DRIFT_TOLERANCE", "LatencyModel", "build_latency_model", "cache_path", "candidate_spec"]
