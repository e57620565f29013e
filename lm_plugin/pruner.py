"""``LayerMergePruner``: the user-facing object, in torch-pruning's habits.

It owns the traced copy of the model and its chain; ``apply(plan)`` gives the trainable form and
``merge(trainable)`` the deploy form. The user's model is never modified.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .budget import DEFAULT_BUDGET, Budget
from .candidates import DEFAULT_MAX_KERNEL, Candidate, enumerate_candidates
from .errors import ConfigurationError, LayerMergeRuntimeError
from .latency import Profiler, get_profiler
from .merge import deploy_plan
from .merge import internal_layers as _internal_layers
from .merge import merge as _merge
from .metrics import ModelCost, model_cost
from .plan import Plan
from .rewrite import RewriteOptions, to_trainable
from .screening import ScreenedSearch
from .solve import (
    Entry,
    InfeasibleBudgetError,
    ScreenedValues,
    Solution,
    min_latency,
    screened_values,
    slower_blocks,
    solve,
)
from .store.paths import cache_root
from .tables.estimate import SCREENED_SHARE, TableEstimate, estimate_table
from .tables.estimators import DEFAULT_ESTIMATOR, ImportanceEstimator, make_estimator
from .tables.importance import ImportanceScorer, ImportanceTable, representative
from .tables.latency import LatencyModel, build_latency_model
from .trace import Chain, extract_chain, trace
from .trace.graph import normalize_inputs

#: ``screen="auto"`` screens a table of at least this many compressing candidates. A screened search scores its
#: calibration sample and the entries of its plans (on the reference workload 1-8 times the sample): on a smaller
#: table that is a good part of it, for plans less certain than the complete table's (docs/selection.md).
AUTO_SCREEN_MIN_ENTRIES = 160


def default_cache_dir() -> Path:
    """Where tables are cached by default: ``$LM_PLUGIN_CACHE`` or ``~/.cache/lm_plugin``
    (:func:`lm_plugin.store.paths.cache_root`)."""
    return cache_root()


def _si(n: float) -> str:
    """``3.6 M``-style count (torch-pruning prints MACs in G and params in M)."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


@dataclass(frozen=True)
class SearchResult:
    """What :meth:`LayerMergePruner.search` found for one budget.

    Attributes:
        plan: The chosen plan (which activations and convs are kept).
        budget: The budget that was solved for.
        budget_ms: The budget in ms of the latency table's backend.
        predicted_ms: Predicted end-to-end latency of the plan's deploy form.
        original_ms: Predicted (= measured, in the table) latency of the BN-folded original.
        objective: The DP's objective: the chosen blocks' summed importance (for accuracy: the estimated change
            in percentage points right after compression, before fine-tuning). A ranking signal, not a forecast
            of the fine-tuned accuracy.
        solution: The DP's raw answer (chosen entries, summed latency, bins).
        scored_entries: With a screen: the entries the importance estimator scored (or found cached) for this
            search, of the ``table_entries`` a complete table has; None without a screen (the complete table).
        table_entries: Entries of a complete importance table (candidates that are scored).
    """

    plan: Plan
    budget: Budget
    budget_ms: float
    predicted_ms: float
    original_ms: float
    objective: float
    solution: Solution
    scored_entries: int | None = None
    table_entries: int | None = None

    @property
    def predicted_speedup(self) -> float:
        """``original_ms / predicted_ms``."""
        return self.original_ms / self.predicted_ms


class LayerMergePruner:
    """Depth compression of a CNN by removing activations and conv layers and merging what remains.

    Args:
        model: the network to compress (any ``nn.Module`` torch.fx can trace). It is never modified.
        budget: latency budget: a fraction in ``(0, 1]`` of the original network's measured latency, or an
            absolute time such as ``"12.5ms"``.
        example_inputs: a tensor (or tuple of tensors) with the shape the network will run at; convs are
            profiled at the shapes this produces.
        ignored_layers: conv modules (or their qualified names) that must be kept as they are.
        rewrite: options of the trainable form (see :class:`lm_plugin.rewrite.RewriteOptions`).
        mode: ``"layermerge"`` (joint), ``"act_only"`` or ``"layer_only"`` (the two baselines).
        max_kernel: largest merged kernel the search considers.
        backend: latency backend: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``,
            ``"onnxruntime"``, ``"tensorrt"``, ``"macs"``; or a ready :class:`lm_plugin.latency.Profiler`. Build
            the table with the backend you deploy with: a plan searched with eager-PyTorch latencies is
            faster in eager PyTorch, less so in ONNX Runtime (``backend="onnxruntime"``).
        batch_size: batch size latency is measured at (default: that of ``example_inputs``); with a backend
            name only.
        profiler_settings: further profiler settings (``warmup``, ``repeats``, ``threads`` ...); with a backend
            name only.
        cache_dir: where tables are cached (default ``$LM_PLUGIN_CACHE`` or ``~/.cache/lm_plugin``); None
            disables caching.
        progress: show progress bars on long work.
        importance: importance estimator: ``"distill"`` (default; a few distillation steps per block),
            ``"tail_distill"`` (distillation of the block and what follows only), ``"local"`` (fit the block
            alone), ``"finetune"`` (the paper's), ``"zero_shot"`` (no training), or a ready
            :class:`~lm_plugin.tables.estimators.ImportanceEstimator` (which carries its own data and settings).
        train_data: ``(inputs, targets)`` batches for the training estimators (a ``DataLoader``); with an
            estimator name only. :func:`lm_plugin.compress` fine-tunes on it too unless told otherwise.
        eval_data: batches the importance metric is measured on; with an estimator name only.
        importance_settings: further estimator settings (``steps``, ``max_lr``, ``metric``, ``seed`` ...); with
            an estimator name only.
        screen: search with a cheap estimator first and score with ``importance`` only the entries the plans
            need (:class:`~lm_plugin.screening.ScreenedSearch`: the screen, its settings, the lift, calibration
            and tolerance, configured once), instead of every entry. A name or a ready estimator stands for
            ``ScreenedSearch(screen)``. ``"auto"`` (default): the importance estimator's own choice (``distill`` is
            screened by ``tail_distill``, the cheap estimators by nothing) when it has training and evaluation data
            and the network has at least :data:`AUTO_SCREEN_MIN_ENTRIES` compressing candidates; ``None``: search
            on the complete table.
        skip_slower_blocks: leave out of every search, and never score, the candidate blocks that the latency
            table shows not faster than the uncompressed layers they replace (:mod:`lm_plugin.solve.dominance`):
            they could enter a plan only by scoring an accuracy gain from compression, which is estimator noise.
            ``False``: every candidate, as the reference does.

    Raises:
        ConfigurationError: a part configured twice (a ready object plus settings for it), or bad settings.
        resolution: latency resolution of the DP, as a fraction of the original latency (0.001 = 0.1 %).

    Example:
        >>> pruner = LayerMergePruner(model, 0.7, torch.randn(1, 3, 224, 224), train_data=loader)
        >>> found = pruner.search()             # found.plan, found.predicted_ms, found.objective
        >>> plan = found.plan
        >>> trainable = pruner.apply(plan)      # fine-tune this
        >>> deployed = pruner.merge(trainable)  # one conv per block, BN folded
    """

    def __init__(
        self,
        model: nn.Module,
        budget: float | str | Budget = DEFAULT_BUDGET,
        example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
        *,
        ignored_layers: Iterable[nn.Module | str] = (),
        rewrite: RewriteOptions | None = None,
        mode: str = "layermerge",
        max_kernel: int | None = DEFAULT_MAX_KERNEL,
        backend: str | Profiler = "auto",
        batch_size: int | None = None,
        profiler_settings: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = "default",
        progress: bool = True,
        importance: str | ImportanceEstimator = DEFAULT_ESTIMATOR,
        train_data: Any = None,
        eval_data: Any = None,
        importance_settings: dict[str, Any] | None = None,
        screen: str | ImportanceEstimator | ScreenedSearch | None = "auto",
        skip_slower_blocks: bool = True,
        resolution: float = 1e-3,
    ) -> None:
        if example_inputs is None:
            raise ConfigurationError(
                "example_inputs is required: pass a tensor shaped like one real input batch, e.g. "
                "LayerMergePruner(model, 0.7, torch.randn(1, 3, 224, 224))"
            )
        _one_way("backend", backend, Profiler, batch_size=batch_size, profiler_settings=profiler_settings)
        _one_way("importance", importance, ImportanceEstimator, train_data=train_data, eval_data=eval_data,
                 importance_settings=importance_settings)
        if rewrite is not None and not isinstance(rewrite, RewriteOptions):
            raise ConfigurationError(f"rewrite must be a lm_plugin.RewriteOptions, got {type(rewrite).__name__}")
        self.model = model
        self.budget = Budget.parse(budget)
        self.example_inputs = normalize_inputs(example_inputs)
        self.rewrite = rewrite or RewriteOptions()
        self.mode = mode
        self.max_kernel = max_kernel
        self.progress = progress
        self.graph_module: fx.GraphModule = trace(model, self.example_inputs)
        self.ignored_layers = tuple(self._names(model, ignored_layers))
        self.chain: Chain = extract_chain(self.graph_module, self.ignored_layers)
        self.candidates: list[Candidate] = enumerate_candidates(
            self.chain, mode, max_kernel=max_kernel, inserted_act=self.rewrite.inserted_kind(self.chain),
            weights=self._conv_scores())
        self._backend = backend
        self._batch_size = batch_size or self.example_inputs[0].shape[0]
        self._profiler_settings = dict(profiler_settings or {})
        self.cache_dir = default_cache_dir() if cache_dir == "default" else cache_dir
        self._profiler: Profiler | None = backend if isinstance(backend, Profiler) else None
        self._latency: LatencyModel | None = None
        if isinstance(importance, ImportanceEstimator):
            self.estimator = importance
        else:
            self.estimator = make_estimator(importance, train_data=train_data, eval_data=eval_data,
                                            **(importance_settings or {}))
        #: The training batches of this pruner (its estimator's): what :func:`lm_plugin.compress` fine-tunes on.
        self.train_data = getattr(self.estimator, "train_data", None)
        #: The batches importance is measured on (its estimator's): where ``compress`` decides when fine-tuning
        #: stops.
        self.eval_data = getattr(self.estimator, "eval_data", None)
        if screen == "auto":  # the estimator's own choice, when it has the data a screen needs and the table is large
            large = sum(not c.uncompressed for c in self.candidates) >= AUTO_SCREEN_MIN_ENTRIES
            has_data = self.train_data is not None and self.eval_data is not None
            screen = self.estimator.default_screen if has_data and large else None
        #: How searches are screened (None: every search uses the complete importance table).
        self.screening: ScreenedSearch | None = (
            screen if isinstance(screen, ScreenedSearch) or screen is None else ScreenedSearch(screen))
        #: The screening estimator (None without a screened search).
        self.screen: ImportanceEstimator | None = (
            self.screening.estimator(self.train_data, self.eval_data) if self.screening is not None else None)
        if not 0 < resolution < 1:
            raise ConfigurationError(f"resolution must be a fraction in (0, 1), e.g. 1e-3; got {resolution}")
        self.resolution = resolution
        self.skip_slower_blocks = bool(skip_slower_blocks)
        self._selectable: list[Candidate] | None = None
        self._importance: ImportanceTable | None = None
        self._scorer: ImportanceScorer | None = None
        self._screen_table: ImportanceTable | None = None

    def _conv_scores(self) -> dict[int, float]:
        """Σ|W| of each prunable conv: a candidate keeps the subset of largest score (the reference's rule).

        Unprunable convs are in every subset of their block, so their score cannot change a choice: 0.
        """
        def score(j: int) -> float:
            c = self.chain.conv(j)
            if not c.prunable:
                return 0.0
            # the L1 norm without abs()'s temporary copy (a large model's weights, allocated once more)
            return float(torch.linalg.vector_norm(self.graph_module.get_submodule(c.name).weight.detach(), 1))
        return {j: score(j) for j in range(1, self.chain.length + 1)}

    # ------------------------------------------------------------------------------------------- latency
    @property
    def profiler(self) -> Profiler:
        """The profiler every latency of this pruner is measured with (created on first use)."""
        if self._profiler is None:
            self._profiler = get_profiler(str(self._backend), batch_size=self._batch_size,
                                          **self._profiler_settings)
        return self._profiler

    def latency_model(self) -> LatencyModel:
        """Build (or load from the cache) the latency table of every candidate block."""
        if self._latency is None:
            self._latency = build_latency_model(
                self.graph_module, self.chain, self.candidates, self.example_inputs, self.profiler,
                lambda plan: deploy_plan(self.graph_module, self.chain, plan), cache_dir=self.cache_dir,
                progress=self.progress)
        return self._latency

    def selectable(self) -> list[Candidate]:
        """The candidate blocks a search may pick and the importance tables score: every candidate but, with
        ``skip_slower_blocks``, those not faster than the uncompressed layers they replace (this needs the latency
        table)."""
        if self._selectable is None:
            if self.skip_slower_blocks:
                slower = slower_blocks(self._entries(self.candidates, None),
                                       {c.key for c in self.candidates if c.uncompressed}, self._step_ms())
                self._selectable = [c for c in self.candidates if c.key not in slower]
            else:
                self._selectable = list(self.candidates)
        return self._selectable

    def _step_ms(self) -> float:
        """The DP's latency resolution in ms."""
        return self.resolution * self.latency_model().original_ms

    def predict_latency(self, plan: Plan) -> float:
        """Predicted end-to-end latency (ms) of the network ``plan`` deploys to."""
        return self.latency_model().predict(plan)

    def measure_latency(self, model: nn.Module) -> float:
        """Measured latency (ms, median) of any model, with the same backend and settings as the table."""
        return self.profiler.measure(model, self.example_inputs).median_ms

    def cost_report(self, compressed: nn.Module, *, show: bool = True) -> dict[str, ModelCost]:
        """torch-pruning's before/after habit: MACs and params of the original and ``compressed``.

        Counted with ``tp.utils.count_ops_and_params`` (:func:`lm_plugin.metrics.model_cost`) on one example
        image, so MACs are per image. Prints one line such as
        ``MACs: 3.60 M -> 2.86 M (79.2%), #Params: 56.4 k -> 44.8 k (79.4%), convs: 7 -> 4`` unless ``show=False``.

        Returns:
            ``{"original": ModelCost, "compressed": ModelCost}``.
        """
        one = tuple(x[:1] for x in self.example_inputs)
        before, after = model_cost(self.model, one), model_cost(compressed, one)
        if show:
            print(f"MACs: {_si(before.macs)} -> {_si(after.macs)} ({after.macs / before.macs:.1%}), "
                  f"#Params: {_si(before.params)} -> {_si(after.params)} ({after.params / before.params:.1%}), "
                  f"convs: {before.convs} -> {after.convs}")
        return {"original": before, "compressed": after}

    # ---------------------------------------------------------------------------------------- selection
    def importance_table(self, *, shard: tuple[int, int] | None = None) -> ImportanceTable:
        """Build (or load from the cache) the importance of every candidate block.

        With a ``screen``, :meth:`search` does not need this (it scores only what its plans need); entries it
        scored are cached and reused here.

        Args:
            shard: ``(index, count)`` to build the table with ``count`` processes that share ``cache_dir``
                (one per core, say): each starts on its own share and then helps with the rest; see
                :func:`~lm_plugin.tables.importance.build_importance_table`.
        """
        if self._importance is None:
            self._importance = self.scorer.table(shard=shard)
        return self._importance

    def use_importance(self, table: ImportanceTable) -> None:
        """Search on an importance table made elsewhere (values averaged over seeds, another estimator's, a study's
        what-if values) instead of building one: :meth:`search` reads it as its own. For a pruner without a
        ``screen`` (a screened search scores what it needs itself).

        Raises:
            ConfigurationError: the pruner has a screen, or the table lacks a candidate this pruner may pick.
        """
        if self.screen is not None:
            raise ConfigurationError("use_importance() sets the complete table a search reads; this pruner screens "
                                     "(pass screen=None)")
        missing = [c.key for c in self.selectable() if c.key not in table.values]
        if missing:
            raise ConfigurationError(f"the table has no value for {len(missing)} candidates, e.g. {missing[0]!r}")
        self._importance = table

    @property
    def scorer(self) -> ImportanceScorer:
        """Scores importance entries on demand (cached in ``cache_dir``, shared with :meth:`importance_table`)."""
        if self._scorer is None:
            self._scorer = self._make_scorer(self.estimator)
        return self._scorer

    def screen_table(self) -> ImportanceTable:
        """The screen's complete (cheap) table.

        Raises:
            ConfigurationError: the pruner has no screen.
        """
        if self.screen is None:
            raise ConfigurationError("this pruner has no screen; pass screen='tail_distill' (say)")
        if self._screen_table is None:
            self._screen_table = self._make_scorer(self.screen).table()
        return self._screen_table

    def search_tables(self) -> ImportanceTable:
        """Build (or load) and return what :meth:`search` reads: the complete importance table, or with a
        ``screen`` the screen's table (the search then scores only the entries its plans need)."""
        return self.importance_table() if self.screen is None else self.screen_table()

    def estimate_importance(self) -> TableEstimate:
        """How long :meth:`search_tables` plus a search's exact entries will take, before they run.

        Entries still to score × the measured time of one: one or two missing entries are scored to time them
        (kept in the cache: nothing is wasted). With a ``screen``, the screen's table, then the share of the
        exact estimator's entries a screened search typically scores (:data:`~lm_plugin.tables.estimate.
        SCREENED_SHARE`).
        """
        if self.screen is None:
            return estimate_table(self.scorer)
        return replace(estimate_table(self._make_scorer(self.screen)),
                       then=estimate_table(self.scorer, SCREENED_SHARE, samples=1))

    def _make_scorer(self, estimator: ImportanceEstimator) -> ImportanceScorer:
        cache = Path(self.cache_dir) if self.cache_dir is not None else None
        return ImportanceScorer(self.graph_module, self.chain, self.selectable(), estimator, rewrite=self.rewrite,
                                cache_dir=cache, progress=self.progress)

    def entries(self, values: dict[tuple, float] | None = None) -> list[Entry]:
        """The DP's items: each selectable candidate (:meth:`selectable`) with its representative subset, latency
        cost and importance.

        A block that folds a projection skip is credited with the skip's latency (the skip disappears).

        Args:
            values: importance by candidate key (default: the complete importance table).
        """
        if values is None:
            values = self.importance_table().values
        return self._entries(self.selectable(), values)

    def _entries(self, candidates: Iterable[Candidate], values: dict[tuple, float] | None) -> list[Entry]:
        """Entries of ``candidates`` valued from ``values`` (None: 0, for what reads only latencies)."""
        lat = self.latency_model()
        return [Entry(c.st, c.end, representative(c), lat.cost(c.st, c.end, representative(c)),
                      0.0 if values is None else values[c.key], c.key) for c in candidates]

    def search(self, budget: float | str | Budget | None = None) -> SearchResult:
        """The plan of highest summed importance whose predicted end-to-end latency meets the budget.

        Builds (or loads) the latency and importance tables, then solves the DP. Nothing is stored on the
        pruner: solving again at another budget is cheap (the tables are built once). With a ``screen``, it builds
        the screen's table instead and scores with the importance estimator only the entries the plans need
        (:func:`~lm_plugin.solve.screen.screened_values`); another budget may need a few more, and entries already
        scored come from the cache. ``scored_entries`` on the result says how many this budget used.

        Returns:
            The plan with its predicted latency and objective (:class:`SearchResult`).

        Raises:
            InfeasibleBudgetError: no plan meets the budget; the message gives the smallest achievable latency.
        """
        target = Budget.parse(budget) if budget is not None else self.budget
        lat = self.latency_model()
        budget_ms = target.to_ms(lat.original_ms)
        fixed = lat.fixed_ms
        self.check_budget(target)  # from latencies alone, before a single importance entry is scored

        def solve_on(values: dict[tuple, float] | None) -> Solution:
            return solve(self.entries(values), self.chain.length, budget_ms - fixed, self._step_ms())

        scored = None
        try:
            if self.screen is None:
                solution = solve_on(None)
            else:
                screened = self._screened(solve_on)
                solution, scored = solve_on(self._complete(screened.values)), len(screened.exact)
                if any(e.key in self.scorer.scored and e.key not in screened.exact for e in solution.entries):
                    raise LayerMergeRuntimeError("screened search: the plan has an entry that was not scored exactly")
        except InfeasibleBudgetError as exc:
            lowest = exc.min_latency_ms + fixed
            raise InfeasibleBudgetError(
                f"no plan meets the budget of {budget_ms:.3f} ms ({budget_ms / lat.original_ms:.1%} of the "
                f"original {lat.original_ms:.3f} ms). The smallest achievable predicted latency is "
                f"{lowest:.3f} ms ({lowest / lat.original_ms:.1%}) in mode {self.mode!r} with "
                f"max_kernel={self.max_kernel}; raise the budget to at least that.", lowest) from None
        kept_acts = {e.end for e in solution.entries} - {self.chain.length}
        kept_convs = {j for e in solution.entries for j in e.kept}
        plan = Plan(self.chain.length, kept_acts, kept_convs, self.chain.fingerprint())
        return SearchResult(plan, target, budget_ms, lat.predict(plan), lat.original_ms, solution.objective,
                            solution, scored, len(self.scorer.scored))

    def check_budget(self, budget: float | str | Budget | None = None) -> float:
        """Refuse a budget no plan can meet, from the latency table alone (seconds, before any importance entry).

        Feasibility does not depend on importance, so the DP is solved once with every value 0.

        Returns:
            The smallest achievable predicted latency in ms.

        Raises:
            InfeasibleBudgetError: no plan meets the budget; the message gives the smallest achievable latency.
        """
        target = Budget.parse(budget) if budget is not None else self.budget
        lat = self.latency_model()
        budget_ms = target.to_ms(lat.original_ms)
        entries = self._entries(self.selectable(), None)
        lowest = min_latency(entries, self.chain.length) + lat.fixed_ms
        try:
            solve(entries, self.chain.length, budget_ms - lat.fixed_ms, self._step_ms())
        except InfeasibleBudgetError as exc:
            lowest = exc.min_latency_ms + lat.fixed_ms
            raise InfeasibleBudgetError(
                f"no plan meets the budget of {budget_ms:.3f} ms ({budget_ms / lat.original_ms:.1%} of the "
                f"original {lat.original_ms:.3f} ms). The smallest achievable predicted latency is "
                f"{lowest:.3f} ms ({lowest / lat.original_ms:.1%}) in mode {self.mode!r} with "
                f"max_kernel={self.max_kernel}; raise the budget to at least that. (Checked from the latency table "
                "alone: no importance entry was scored.)", lowest) from None
        return lowest

    def screen_summary(self, found: SearchResult) -> dict[str, Any]:
        """What a screened search did, for reports: the screen's settings and the entries scored with the
        importance estimator (``{"estimator": {...}, "scored_entries": n, "table_entries": m}``); ``{}`` for a
        search on the complete table."""
        if found.scored_entries is None or self.screen is None:
            return {}
        assert self.screening is not None
        return {"estimator": dict(self.screen.settings()), **self.screening.to_dict(),
                "scored_entries": found.scored_entries,
                "table_entries": found.table_entries}

    def _screened(self, solve_on: Callable[[dict[tuple, float] | None], Solution]) -> ScreenedValues:
        """Optimistic values from the screen, exact where the plans need them (:func:`screened_values`)."""
        cheap = self.screen_table().values
        screen = {k: cheap[k] for k in self.scorer.scored}
        seed = getattr(self.estimator, "seed", 0)

        def pick(values: dict[tuple, float]) -> tuple[list[tuple], float]:
            solution = solve_on(self._complete(values))
            return [e.key for e in solution.entries], solution.objective

        assert self.screening is not None
        return screened_values(screen, self.scorer.score, pick, calibration=self.screening.calibration, seed=seed,
                               lift=self.screening.lift, tolerance=self.screening.tolerance)

    def _complete(self, values: dict[tuple, float]) -> dict[tuple, float]:
        """``values`` of the scored entries plus the uncompressed single convs, which score 0."""
        return {c.key: values[c.key] if c.key in self.scorer.scored else 0.0 for c in self.selectable()}

    def step(self, budget: float | str | Budget | None = None) -> fx.GraphModule:
        """``search()`` then ``apply()``: the trainable form of the best plan (torch-pruning's habit).

        The plan travels with the result: ``Plan.of(trainable)`` reads it back.
        """
        return self.apply(self.search(budget).plan)

    def baseline(self) -> fx.GraphModule:
        """The uncompressed network in deploy form (identity plan merged: BN folded).

        This is what the latency table calls "original": compare compressed models against it.
        """
        return deploy_plan(self.graph_module, self.chain, Plan.identity(self.chain))

    def budget_ms(self) -> float:
        """The budget in ms (a ratio budget is relative to the original network's measured latency)."""
        return self.budget.to_ms(self.latency_model().original_ms)

    @staticmethod
    def _names(model: nn.Module, layers: Iterable[nn.Module | str]) -> list[str]:
        names = {id(m): n for n, m in model.named_modules()}
        out = []
        for layer in layers:
            if isinstance(layer, str):
                out.append(layer)
            elif id(layer) in names:
                out.append(names[id(layer)])
            else:
                raise ConfigurationError(f"ignored_layers: {type(layer).__name__} is not a submodule of the model; "
                                         "pass the model's own modules or their qualified names")
        return out

    def identity_plan(self) -> Plan:
        """The plan that keeps everything."""
        return Plan.identity(self.chain)

    def apply(self, plan: Plan) -> fx.GraphModule:
        """Trainable form of ``plan``: a new module to fine-tune, then pass to :meth:`merge`.

        Raises:
            InvalidPlanError: the plan does not fit this chain.
        """
        return to_trainable(self.graph_module, self.chain, plan, self.rewrite)

    def merge(self, trainable: fx.GraphModule, *, check: bool = True) -> fx.GraphModule:
        """Deploy form: one conv per block, BN folded, exact w.r.t. ``trainable`` (in eval mode).

        ``trainable`` may have been channel-pruned in place since :meth:`apply` (torch-pruning, or
        :class:`lm_plugin.efa.HierarchicalPruner`); the merged convs then have the pruned widths.

        Args:
            trainable: the (fine-tuned) trainable form.
            check: verify the result in float64 and raise :class:`~lm_plugin.MergeError` if it is wrong
                (default; see :func:`lm_plugin.merge.merge`).
        """
        return _merge(trainable, self.chain, check=check)

    def internal_layers(self, trainable: fx.GraphModule) -> list[nn.Module]:
        """Convs of ``trainable`` whose output channels exist only inside a merged block.

        Pass them as ``ignored_layers`` when channel-pruning the trainable form: merging removes those
        channels anyway (a merged conv's size depends only on its block's input and output widths), so
        pruning them would cost accuracy without shrinking the deploy network. Block boundaries, residual
        streams included, stay prunable.

        Example:
            >>> trainable = pruner.apply(plan)
            >>> ignored = pruner.internal_layers(trainable) + [trainable.fc]
            >>> tp.pruner.MetaPruner(trainable, x, imp, pruning_ratio=0.3, ignored_layers=ignored).step()
            >>> deployed = pruner.merge(trainable)  # after fine-tuning
        """
        return _internal_layers(trainable, self.chain)


def _one_way(part: str, value: Any, ready: type, **settings: Any) -> None:
    """A part is configured by a name plus settings, or by a ready object that carries its own: not both."""
    given = [name for name, v in settings.items() if v is not None]
    example = {"backend": "cpu", "screen": "tail_distill"}.get(part, DEFAULT_ESTIMATOR)
    if isinstance(value, ready) and given:
        raise ConfigurationError(
            f"{part}= is a ready {type(value).__name__}, which carries its own settings, so "
            f"{', '.join(given)} would be ignored. Either configure the {type(value).__name__} itself, or pass "
            f"{part} by name (e.g. {part}={example!r}) with "
            f"{', '.join(given)}.")
