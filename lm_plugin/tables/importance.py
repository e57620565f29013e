"""Stage 3b: the importance table — how much each candidate block costs in accuracy.

Every estimator scores a candidate the same way: build the network with *only that block* compressed (the
candidate's representative kept subset, everything else as in the original), optionally train it briefly, and
measure the metric. ``importance = metric(compressed) − metric(original)`` (percentage points for accuracy).
Summing these over the chosen blocks is the DP's objective; maximising the sum of ``Δacc`` is the same as
maximising the paper's product of ``exp(Δacc / 100)``.

Estimators (:mod:`lm_plugin.tables.estimators`, one interface, :class:`ImportanceEstimator`):

* ``finetune``  — the paper's: fine-tune the whole network for ``steps`` on the training data, then evaluate;
* ``zero_shot`` — no training: the metric right after compression, on a calibration set (cheapest);
* ``local``     — fit only the compressed block to the original's activation at its end, re-estimate the BatchNorm
  statistics after it, then score. ``local`` and ``zero_shot`` compute the part of the network an entry leaves
  alone once per table (:mod:`lm_plugin.tables.prefix`) and run only the block and what follows it;
* ``distill``   — a few steps of distillation toward the original network's logits (our cheap proxy of
  ``finetune``: the student starts next to the teacher, so a short KD run recovers most of what a longer
  task-loss fine-tune recovers, at a fraction of the steps).

Entries are independent, cached one by one (a :class:`~lm_plugin.store.RecordStore`, like the latency cache:
checksummed rows in a SQLite file) and resumable; processes sharing the cache claim entries, so none is scored twice.
Every entry trains on the *same* batches (the loader's shuffling generator is re-seeded with the estimator's seed
for each entry, then put back), so an entry's score does not depend on which entries ran before it: a resumed or
sharded build gives the table an uninterrupted one gives, and ``distill`` computes the teacher's logits for those
batches once per table instead of once per entry.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.fx as fx
import torch.nn as nn
from tqdm import tqdm

from ..candidates import Candidate
from ..errors import ArgumentTypeError, ConfigurationError
from ..plan import Plan
from ..rewrite import RewriteOptions
from ..store import RecordStore, signed_store_path
from ..trace.chain import Chain
from .estimators import ImportanceEstimator


class ImportanceCache(RecordStore):
    """Importance values (floats) by candidate key, for one estimator signature (see
    :class:`~lm_plugin.store.RecordStore`)."""

    TABLE = "importance table"
    SIGNED_BY = "estimator, network or rewrite"

    def _decode_value(self, data: Any) -> float:
        if not isinstance(data, (int, float)) or isinstance(data, bool):
            raise ArgumentTypeError("importance must be a number")
        return float(data)


def representative(candidate: Candidate) -> tuple[int, ...]:
    """The kept subset that stands for a candidate: the one keeping the most ``Σ‖W‖₁`` (as the reference).

    Enumeration chooses it (:func:`~lm_plugin.candidates.enumerate_candidates` with ``weights`` = each conv's
    ``Σ|W|``, as :class:`~lm_plugin.LayerMergePruner` does), so the candidates must come from the network that is
    scored.
    """
    return candidate.kept


def single_block_plan(chain: Chain, st: int, end: int, kept: Sequence[int]) -> Plan:
    """The identity plan except block ``(st, end]``, which keeps only ``kept``."""
    L = chain.length
    acts = set(range(1, L)) - set(range(st + 1, end))
    convs = (set(range(1, L + 1)) - set(range(st + 1, end + 1))) | set(kept)
    return Plan(L, acts, convs, chain.fingerprint())


@dataclass
class ImportanceTable:
    """Importance per candidate key, the subset that represents each key, and the original's metric."""

    values: dict[tuple, float]
    subsets: dict[tuple, tuple[int, ...]]
    base_metric: float
    estimator: dict[str, Any]
    evaluated: int = 0


class ImportanceScorer:
    """Scores the entries of one estimator's importance table on demand: the whole table, or only the entries a
    search asks for (:func:`~lm_plugin.solve.screen.screened_values`).

    Each finished entry is committed to the cache at once (signed by :func:`table_signature`), so an interrupted
    build resumes where it stopped, and entries scored one search at a time and a table built whole share them.
    Several processes sharing ``cache_dir`` claim entries before scoring them
    (:meth:`~lm_plugin.store.RecordStore.fill`), so none is scored twice; an entry claimed by a process that has
    exited is taken over. Uncompressed single convs score 0 by definition and are never run.
    """

    def __init__(self, gm: fx.GraphModule, chain: Chain, candidates: Sequence[Candidate],
                 estimator: ImportanceEstimator, *, rewrite: RewriteOptions | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> None:
        self.gm, self.chain, self.estimator, self.rewrite, self.progress = gm, chain, estimator, rewrite, progress
        self.signature = table_signature(gm, chain, estimator, rewrite)
        self.path = _cache_path(cache_dir, self.signature)
        self.subsets = {c.key: representative(c) for c in candidates}
        self.candidates = {c.key: c for c in candidates}
        #: the entries that are scored (every candidate but the uncompressed single convs)
        self.scored = {c.key: c for c in candidates if not c.uncompressed}
        self._original: fx.GraphModule | None = None
        self._base: float | None = None
        self._values: dict[tuple, float] = {}  # what this scorer has seen (the cache may be in memory only)
        #: entries this scorer computed (not found in the cache)
        self.evaluated = 0
        #: seconds each entry this scorer computed took, in the order they were computed (for cost studies)
        self.entry_seconds: dict[tuple, float] = {}

    @property
    def original(self) -> fx.GraphModule:
        """The unchanged network every entry is compared with (a copy: estimators train their own)."""
        if self._original is None:
            self._original = copy.deepcopy(self.gm).eval()
        return self._original

    def score(self, keys: Iterable[tuple], *, shard: tuple[int, int] | None = None,
              progress: bool | None = None) -> dict[tuple, float]:
        """The importance of ``keys`` (candidate keys), scoring those not cached yet; progress bar over them.

        ``shard=(index, count)`` makes cooperating workers start apart: worker ``index`` of ``count`` starts at the
        ``index``-th ``count``-th of the missing entries and goes round. ``progress`` overrides the scorer's
        setting for this call.
        """
        keys = list(dict.fromkeys(keys))
        unknown = [k for k in keys if k not in self.candidates]
        if unknown:
            raise ConfigurationError(f"{len(unknown)} keys are not candidates of this network, e.g. {unknown[0]!r}")
        todo = [k for k in keys if k in self.scored and k not in self._values]
        if todo:
            with ImportanceCache(self.path, self.signature) as cache:
                self._base_from(cache)
                order = todo
                if shard is not None:  # start apart: offset into what is still missing, the rest after it
                    missing = [k for k in todo if list(k) not in cache]
                    start, stored = shard[0] * len(missing) // shard[1], set(todo) - set(missing)
                    order = missing[start:] + missing[:start] + [k for k in todo if k in stored]
                with tqdm(total=len(order), desc=f"importance ({self.estimator.name})", unit="entry",
                          disable=not (self.progress if progress is None else progress)) as bar:

                    def done(key: list, value: float, computed: bool) -> None:
                        self.evaluated += computed
                        bar.update(1)

                    found = cache.fill([list(k) for k in order], self._score_one, on_entry=done)
                self._values.update(zip(order, found))
        return {k: self._values.get(k, 0.0) for k in keys}

    def missing(self) -> list[tuple]:
        """The scored entries neither this scorer nor the cache holds yet (what building the table would run)."""
        todo = [k for k in self.scored if k not in self._values]
        if not todo or self.path is None or not self.path.is_file():
            return todo
        with ImportanceCache(self.path, self.signature) as cache:
            return [k for k in todo if list(k) not in cache]

    @property
    def base_metric(self) -> float:
        """The original network's metric (scored once, then cached)."""
        if self._base is None:
            with ImportanceCache(self.path, self.signature) as cache:
                self._base_from(cache)
        return self._base

    def _base_from(self, cache: ImportanceCache) -> float:
        if self._base is None:
            (self._base,) = cache.fill([["base_metric"]], lambda _: self.estimator.score(self.original))
        return self._base

    def table(self, *, shard: tuple[int, int] | None = None) -> ImportanceTable:
        """Every entry: the complete table (``shard``: see :meth:`score`)."""
        if shard is not None:
            index, count = shard
            if self.path is None:
                raise ConfigurationError(
                    "shard needs a cache_dir that the workers share; without one they cannot cooperate")
            if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
                raise ConfigurationError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
        values = self.score(self.candidates, shard=shard)
        return ImportanceTable(values, self.subsets, self.base_metric, self.signature, evaluated=self.evaluated)

    def _score_one(self, key: list) -> float:
        start = time.perf_counter()
        c = self.scored[tuple(key)]
        plan = single_block_plan(self.chain, c.st, c.end, self.subsets[c.key])
        value = self.estimator.score_entry(self.gm, self.original, self.chain, plan, self.rewrite) - self.base_metric
        self.entry_seconds[c.key] = time.perf_counter() - start
        return value


def build_importance_table(gm: fx.GraphModule, chain: Chain, candidates: Sequence[Candidate],
                           estimator: ImportanceEstimator, *, rewrite: RewriteOptions | None = None,
                           cache_dir: str | os.PathLike[str] | None = None, progress: bool = True,
                           shard: tuple[int, int] | None = None) -> ImportanceTable:
    """Score every candidate that is not an uncompressed single conv (those score 0 by definition).

    Each finished entry is committed to the cache at once: an interrupted build (exception, Ctrl-C, a killed
    process) resumes where it stopped and scores only the missing entries.

    Several processes can build one table together by sharing ``cache_dir`` (one per core, say): each claims an
    entry before scoring it (:meth:`~lm_plugin.store.RecordStore.fill`), so no entry is scored twice; an entry
    claimed by a process that has exited is taken over. ``shard=(index, count)`` makes the workers start apart:
    worker ``index`` of ``count`` starts at the ``index``-th ``count``-th of the missing entries and goes round.
    Every worker returns the complete table.
    """
    scorer = ImportanceScorer(gm, chain, candidates, estimator, rewrite=rewrite, cache_dir=cache_dir,
                              progress=progress)
    return scorer.table(shard=shard)


def table_signature(gm: fx.GraphModule, chain: Chain, estimator: ImportanceEstimator,
                    rewrite: RewriteOptions | None = None) -> dict[str, Any]:
    """What a table's scores depend on (its cache is signed by it): the estimator's settings, the chain, the
    weights and the rewrite options."""
    return {**estimator.settings(), "chain": chain.fingerprint(), "weights": weights_id(gm),
            "rewrite": asdict(rewrite or RewriteOptions())}


def _cache_path(cache_dir: str | os.PathLike[str] | None, signature: dict[str, Any]) -> Path | None:
    if cache_dir is None:
        return None
    return signed_store_path(cache_dir, f"importance-{signature['estimator']}", signature)


def weights_id(module: nn.Module) -> str:
    """Hash of the weights: a table is only valid for the network it was scored on."""
    h = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
