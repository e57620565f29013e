"""Importance estimators: how one candidate block's importance is measured (stage 3b's methods).

Each estimator scores a network with one block compressed, through one interface (:class:`ImportanceEstimator`):
``finetune`` (the paper's), ``distill`` (the default), ``local``, ``tail_distill`` and ``zero_shot``; the table
that asks them for entries, caches and resumes is :mod:`lm_plugin.tables.importance`. Look estimators up by name in
:data:`ESTIMATORS` (or :func:`make_estimator`); register your own there.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigurationError
from ..plan import Plan
from ..registry import Registry
from ..rewrite import RewriteOptions, to_trainable
from ..rewrite.trainable import META_KEY
from ..trace.chain import Chain
from ..trace.fxedit import set_submodule
from ..trace.subgraph import extract, frontier, needed_nodes, trained_modules, unchanged_nodes
from ..train import distillation_loss, evaluate, fit, metric_function, resolve_device, seeded_shuffle, split_batch
from .prefix import PrefixCache

MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass
class ImportanceEstimator:
    """Scores candidate blocks. Subclasses set ``name`` and implement :meth:`adapt`.

    Args:
        train_data: batches ``(inputs, targets)`` used for training (finetune / distill).
        eval_data: batches used to measure the metric.
        metric: ``"accuracy"`` (top-1 %, higher is better) or ``metric(logits, targets) -> float`` (higher is
            better).
        steps: optimiser steps per entry (training estimators).
        max_lr: peak learning rate of the per-entry OneCycle schedule.
        seed: seed of every per-entry run, so entries are comparable.
        device: where to train and evaluate.
        loss_fn: task loss ``loss_fn(outputs, targets)`` for training (default: cross-entropy).
        fit_batch_size: images per training step: ``train_data``'s batches are cut into slices of this many
            (``None``: the batches as they come). A step's cost is proportional to it.
        eval_images: score on the first this many images of ``eval_data`` (``None``: all of them). A scoring
            pass's cost is proportional to it.
    """

    train_data: Iterable[Any] | None = None
    eval_data: Iterable[Any] | None = None
    metric: str | MetricFn = "accuracy"
    steps: int = 50
    max_lr: float = 0.02
    seed: int = 0
    device: str | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    fit_batch_size: int | None = None
    eval_images: int | None = None

    name = "base"
    #: The screen a search with this estimator uses unless told otherwise (``LayerMergePruner(screen="auto")``):
    #: estimators that train the whole network per entry are worth screening, cheap ones are not.
    default_screen: ClassVar[str | None] = None

    def adapt(self, model: nn.Module, original: nn.Module) -> None:
        """Train ``model`` (the network with one block compressed) in place; default: nothing."""

    def same_batches(self) -> contextlib.AbstractContextManager[None]:
        """Inside the block, iterating ``train_data`` yields the batches every other entry got.

        A ``DataLoader`` with its own ``generator`` advances it each epoch, so without this entry *k* would train on
        other batches than entry *k − 1*, and a score would depend on the order entries are built in (a resumed
        or sharded build would differ from an uninterrupted one). The generator is re-seeded with :attr:`seed`
        and restored afterwards (:func:`~lm_plugin.train.seeded_shuffle`); a loader without one shuffles with the
        global RNG, which :func:`fit` seeds.
        """
        return seeded_shuffle(self.train_data, self.seed)

    def score_entry(self, gm: fx.GraphModule, original: fx.GraphModule, chain: Chain, plan: Plan,
                    rewrite: RewriteOptions | None) -> float:
        """The metric of the network with ``plan`` applied (one block compressed), after :meth:`adapt`.

        ``gm`` is the traced network, ``original`` a private eval-mode copy of it (the teacher; never trained).
        """
        model = to_trainable(gm, chain, plan, rewrite)
        self.adapt(model, original)
        return self.score(model)

    def score(self, model: nn.Module) -> float:
        if self.eval_data is None:
            raise ConfigurationError(f"the {self.name} importance estimator needs eval_data (a DataLoader)")
        if self.eval_images is None:
            return evaluate(model, self.eval_data, self.metric, device=self.device)
        # the images the entries are scored on, or every entry would differ from the base by the other images
        return evaluate(model, _first_images([split_batch(b) for b in self.eval_data], self.eval_images),
                        self.metric, device=self.device)

    def training_batches(self) -> Iterable[Any]:
        """``train_data`` in steps of :attr:`fit_batch_size` images (what :meth:`adapt` trains on)."""
        if self.train_data is None:
            raise ConfigurationError(f"the {self.name} importance estimator needs train_data (a DataLoader)")
        if self.fit_batch_size is None:
            return self.train_data
        return _Sliced(self.train_data, _positive("fit_batch_size", self.fit_batch_size))

    def settings(self) -> dict[str, Any]:
        """Everything that changes a score (part of the cache signature)."""
        metric = self.metric if isinstance(self.metric, str) else getattr(self.metric, "__qualname__", "custom")
        loss = None if self.loss_fn is None else getattr(self.loss_fn, "__qualname__", type(self.loss_fn).__name__)
        # optional settings are absent at their default, so tables built before they existed stay valid
        optional = {k: v for k, v in (("fit_batch_size", self.fit_batch_size), ("eval_images", self.eval_images))
                    if v is not None}
        return {"estimator": self.name, "metric": metric, "loss": loss, "steps": self.steps,
                "max_lr": self.max_lr, "seed": self.seed, "train": _data_id(self.train_data),
                "eval": _data_id(self.eval_data), "batches": "same for every entry", **optional}


class _Sliced:
    """A loader's batches cut into slices of ``size`` images, re-iterable (one pass per iteration)."""

    def __init__(self, loader: Iterable[Any], size: int) -> None:
        self.loader, self.size = loader, size

    @property
    def generator(self) -> Any:
        """The loader's shuffling generator, which :func:`~lm_plugin.train.fit` re-seeds for a seeded run."""
        return getattr(self.loader, "generator", None)

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        for batch in self.loader:
            inputs, targets = split_batch(batch)
            for start in range(0, len(targets), self.size):
                part = slice(start, start + self.size)
                yield (tuple(x[part] for x in inputs) if isinstance(inputs, (tuple, list)) else inputs[part],
                       targets[part])


def _positive(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{name} must be a positive number of images or None, got {value!r}")
    return value


@dataclass
class LocalImportance(ImportanceEstimator):
    """Fit only the compressed block to what the original computes at its end, then score end to end.

    An entry changes one block; everything before it, and every skip that bypasses it, computes what it computed
    in the original. Those values are computed once per table on the evaluation (and fitting) batches
    (:class:`~lm_plugin.tables.prefix.PrefixCache`), so an entry runs only the block and what follows it. The
    block's own layers (its kept convs, their BN, folded skips and parallel branches) are then trained with
    Adam for ``steps`` steps to reproduce the original's value at the block's end — the activation the rest of
    the network reads — on ``fit_batches`` cached training batches (normalised mean squared error), and the
    network is scored with the rest of it unchanged. Nothing but the block's layers is copied or trained.

    Args (beyond :class:`ImportanceEstimator`'s):
        steps: Adam steps of the local fit (0 = score right after compression, as ``zero_shot``).
        max_lr: Adam's learning rate (cosine-decayed to 0 over the steps).
        fit_batches: training batches the block is fitted on (the first ones ``train_data`` yields).
        fit_batch_size: images per fitting step (slices of those batches).
        recalibrate: re-estimate the BatchNorm statistics from the block on, on the same batches, before
            scoring (without, the network after the block sees inputs it was not normalised for).
        cache_bytes: most bytes of cached node values (evaluation and fitting batches together); more is
            recomputed when needed, never an error.
        eval_images: score on the first this many images of ``eval_data`` (``None``: all of them). An entry's
            scoring pass runs the block and everything after it, so its cost is proportional to this.
    """

    steps: int = 40
    max_lr: float = 1e-3
    fit_batches: int = 4
    fit_batch_size: int = 32
    cache_bytes: int = 2 << 30
    recalibrate: bool = True
    eval_images: int | None = None
    name = "local"
    _context: _LocalContext | None = field(default=None, init=False, repr=False, compare=False)

    def score_entry(self, gm: fx.GraphModule, original: fx.GraphModule, chain: Chain, plan: Plan,
                    rewrite: RewriteOptions | None) -> float:
        return _score_rest(self, self.adapted_rest(original, chain, plan, rewrite), self._prepare(original))

    def adapted_rest(self, original: fx.GraphModule, chain: Chain, plan: Plan, rewrite: RewriteOptions | None
                     ) -> fx.GraphModule:
        """The changed part of the network with ``plan`` applied, fitted: what an entry scores.

        It reads the cached values of the unchanged part (``rest.meta["inputs"]`` on :attr:`evaluation`).
        """
        context = self._prepare(original)
        model, inputs = _compressed(original, chain, plan, rewrite)
        if self.steps > 0:
            self._fit_block(model, original, inputs, context)
        rest = extract(model, inputs)
        if self.recalibrate and context.fit is not None:
            rest = self._recalibrate(model, original, inputs, rest, context.fit)
        return rest

    @property
    def evaluation(self) -> PrefixCache:
        """The original's node values on the evaluation images of the current table."""
        if self._context is None:
            raise ConfigurationError("no table is being scored yet: call score_entry or adapted_rest first")
        return self._context.eval

    def _fit_block(self, model: fx.GraphModule, original: fx.GraphModule, inputs: list[str],
                   context: _LocalContext) -> None:
        assert context.fit is not None
        (record,) = [r for r in model.meta[META_KEY]["blocks"]  # the one block the plan compresses
                     if r.end > r.st + 1 or r.kept != (r.end,)]
        position, reference = record.position, record.position_reference
        names = trained_modules(model, needed_nodes(model, inputs, [position]))
        _own(model, original, names)  # train copies, never a layer shared with the original
        params = [p for name in names for p in model.get_submodule(name).parameters()]
        if not params:
            return
        block = extract(model, inputs, [position])
        # Steps take ``fit_batch_size`` images at a time: a conv's kernel sees every pixel of an image as a
        # sample, so a few images per step fit it as well as a full batch, at a fraction of the cost.
        xs = _slices(context.fit, block.meta["inputs"], self.fit_batch_size)
        ys = [y for (y,) in _slices(context.fit, [reference], self.fit_batch_size)]
        scales = [float(y.pow(2).mean()) + 1e-12 for y in ys]
        optimizer = torch.optim.Adam(params, lr=self.max_lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps)
        for step in range(self.steps):
            b = step % len(xs)
            (out,) = block(*xs[b])
            loss = F.mse_loss(out, ys[b]) / scales[b]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        for p in params:
            p.requires_grad_(False)

    def _recalibrate(self, model: fx.GraphModule, original: fx.GraphModule, inputs: list[str],
                     rest: fx.GraphModule, batches: PrefixCache) -> fx.GraphModule:
        """Re-estimate the running statistics of every BatchNorm from the block on, on the fitting batches.

        What fine-tuning does first (BN in train mode): the layers after the block see a shifted distribution,
        and normalising it again is most of what a short fine-tune recovers (EagleEye's "adaptive BN").
        """
        norms = [n for n in trained_modules(model, rest.meta["nodes"], buffers=True)
                 if isinstance(model.get_submodule(n), nn.modules.batchnorm._BatchNorm)
                 and model.get_submodule(n).track_running_stats]
        if not norms:
            return rest
        _own(model, original, norms)
        rest = extract(model, inputs)
        layers = [model.get_submodule(n) for n in norms]
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the batches
            bn.train()
        with torch.no_grad():
            for values in batches.values(rest.meta["inputs"]):
                rest(*values)
        for bn in layers:
            bn.eval()
        return rest

    def _prepare(self, original: fx.GraphModule) -> _LocalContext:
        needs = self.fit_batches if self.steps > 0 or self.recalibrate else 0
        if needs and self.train_data is None:
            raise ConfigurationError(f"the {self.name} importance estimator needs train_data (a DataLoader) to fit "
                                     "blocks and recalibrate BatchNorm on; or use steps=0, recalibrate=False "
                                     "(zero_shot)")
        self._context = prepare_context(self, self._context, original, needs)
        return self._context

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "fit": "block to the original's position value, Adam, cosine",
                "fit_batches": self.fit_batches, "fit_batch_size": self.fit_batch_size,
                "recalibrate": self.recalibrate}


@dataclass
class _LocalContext:
    """Per table: the original's node values on the evaluation batches (and on the first training batches)."""

    original: fx.GraphModule
    eval: PrefixCache
    targets: torch.Tensor
    fit: PrefixCache | None


def prepare_context(estimator: LocalImportance, context: _LocalContext | None, original: fx.GraphModule,
                     fit_batches: int, fit_images: int = 0) -> _LocalContext:
    """``context`` if it belongs to this table (``original``), else a new one with at least ``fit_batches``
    training batches holding at least ``fit_images`` images (the ones every entry trains on,
    :meth:`ImportanceEstimator.same_batches`)."""
    if context is not None and context.original is original:
        return context
    if estimator.eval_data is None:
        raise ConfigurationError(f"the {estimator.name} importance estimator needs eval_data (a DataLoader)")
    fit: list[Any] = []
    if fit_batches or fit_images:
        assert estimator.train_data is not None

        def short() -> bool:
            return len(fit) < fit_batches or sum(len(_inputs(b)[0]) for b in fit) < fit_images

        with estimator.same_batches():
            while short():  # the loader's batches from its first, over epochs if one is too short
                before = len(fit)
                for batch in estimator.train_data:
                    fit.append(batch)
                    if not short():
                        break
                if len(fit) == before:
                    raise ConfigurationError("the training loader yielded no batches")
    evaluation = _first_images([split_batch(b) for b in estimator.eval_data], estimator.eval_images)
    if not evaluation:
        raise ConfigurationError("the evaluation loader yielded no batches")
    device = resolve_device(original, estimator.device)
    original.to(device)
    cap = estimator.cache_bytes // (2 if fit else 1)

    def move(xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(x.to(device) for x in xs)

    return _LocalContext(
        original, PrefixCache(original, [move(_inputs(b)) for b in evaluation], cap),
        torch.cat([torch.as_tensor(t).cpu() for _, t in evaluation]),
        PrefixCache(original, [move(_inputs(b)) for b in fit], cap) if fit else None)


def _first_images(batches: list[tuple[Any, Any]], limit: int | None) -> list[tuple[Any, Any]]:
    """The ``(inputs, targets)`` batches cut to their first ``limit`` images (all if ``None``)."""
    if limit is None:
        return batches
    out, left = [], _positive("eval_images", limit)
    for inputs, targets in batches:
        if left <= 0:
            break
        n = len(targets)
        if n > left:
            inputs = tuple(x[:left] for x in inputs) if isinstance(inputs, (tuple, list)) else inputs[:left]
            targets = targets[:left]
        out.append((inputs, targets))
        left -= min(n, left)
    return out


def _compressed(original: fx.GraphModule, chain: Chain, plan: Plan, rewrite: RewriteOptions | None
                ) -> tuple[fx.GraphModule, list[str]]:
    """The trainable form of ``plan`` sharing every layer it does not change with ``original``, and the nodes
    where its changed part starts (what it reads of the unchanged part)."""
    model = to_trainable(original, chain, plan, rewrite, share_weights=True).eval()
    return model, frontier(model, unchanged_nodes(original, model))


def _slices(cache: PrefixCache, names: Sequence[str], size: int) -> list[tuple[torch.Tensor, ...]]:
    """The values of ``names`` on the cached batches, in slices of ``size`` images (steps of a fit)."""
    out: list[tuple[torch.Tensor, ...]] = []
    for batch, values in zip(cache.batches, cache.values(names)):
        n = len(batch[0])
        out += zip(*(_batch_slices(v, n, size) for v in values))
    return out


def _batch_slices(value: torch.Tensor, n: int, size: int) -> list[torch.Tensor]:
    """``value`` of a batch of ``n`` images in slices of ``size``; a value without that batch dimension (a
    parameter or constant the network reads) is the same for every slice."""
    count = -(-n // size)
    if value.dim() == 0 or value.shape[0] != n:
        return [value] * count
    return list(value.split(size))


def _score_rest(estimator: ImportanceEstimator, rest: fx.GraphModule, context: _LocalContext) -> float:
    """The metric of the network whose changed part is ``rest``, on the evaluation batches."""
    rest.eval()
    with torch.no_grad():
        outputs = [rest(*values).float().cpu() for values in context.eval.values(rest.meta["inputs"])]
    return float(metric_function(estimator.metric)(torch.cat(outputs), context.targets))


def _inputs(batch: Any) -> tuple[torch.Tensor, ...]:
    """A batch's network inputs as a tuple (one tensor per network input)."""
    inputs = split_batch(batch)[0] if isinstance(batch, (tuple, list)) and len(batch) >= 2 else batch
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _own(model: fx.GraphModule, original: nn.Module, names: Iterable[str]) -> None:
    """Give ``model`` its own copy of each layer in ``names`` that it shares with ``original`` (about to change)."""
    for name in names:
        layer = model.get_submodule(name)
        try:
            shared = original.get_submodule(name) is layer
        except AttributeError:
            shared = False
        if shared:
            set_submodule(model, name, copy.deepcopy(layer))


@dataclass
class ZeroShotImportance(LocalImportance):
    """Metric change right after compression, no training (only the block and what follows it are run)."""

    steps: int = 0
    recalibrate: bool = False
    name = "zero_shot"

    def settings(self) -> dict[str, Any]:
        fitted = ImportanceEstimator.settings(self)
        del fitted["fit_batch_size"]  # nothing is fitted
        return {**fitted, "steps": 0, "max_lr": 0.0, "train": None}


@dataclass
class TailDistillImportance(LocalImportance):
    """Distil the block and everything after it toward the original's logits; the part before it stays frozen.

    ``distill`` trains the whole network for an entry although the part before the block computes what it
    computed in the original. Here that part is frozen: its values on the fitting and evaluation batches are
    computed once per table (:class:`~lm_plugin.tables.prefix.PrefixCache`), and only the compressed block and
    the layers after it — copies, never the original's — train in train mode (BatchNorm included) for ``steps``
    SGD steps of :func:`~lm_plugin.train.fit`'s recipe on ``fit_batch_size`` images each, with the distillation
    loss to the original's logits (computed once per table). Then the network is scored as :class:`LocalImportance`
    scores it. What it recovers is what a short fine-tune of the layers from the block on recovers — where most of
    a short whole-network fine-tune's recovery is made — without the repeated forward and backward pass through
    the unchanged part.

    Args (beyond :class:`LocalImportance`'s):
        steps: SGD steps per entry (OneCycle schedule peaking at ``max_lr``).
        max_lr: peak learning rate.
        fit_batches: fewest training batches drawn (more are drawn until there are ``steps × fit_batch_size``
            images); every entry trains on the same ones.
        fit_batch_size: images per step (slices of those batches).
        temperature: distillation temperature.
        recalibrate: re-estimate the BatchNorm statistics from the block on after training (training in train mode
            already moves them toward the compressed network's).
        eval_images: as :class:`LocalImportance`'s. ``steps=5, fit_batch_size=16, eval_images=250`` builds
            ``mbv2_fm``'s table at about a fifteenth of ``distill``'s (10 steps) cost, with plans about 0.3 %p less
            accurate after fine-tuning; ``steps=3`` (:data:`SCREEN_SETTINGS`, the screen of a search) at about a
            twentieth (docs/benchmarks.md).
    """

    steps: int = 10
    max_lr: float = 0.02
    fit_batches: int = 1
    fit_batch_size: int = 32
    temperature: float = 4.0
    recalibrate: bool = False
    name = "tail_distill"
    _teacher: tuple[PrefixCache, list[torch.Tensor]] | None = field(default=None, init=False, repr=False,
                                                                    compare=False)

    def adapted_rest(self, original: fx.GraphModule, chain: Chain, plan: Plan, rewrite: RewriteOptions | None
                     ) -> fx.GraphModule:
        context = self._prepare(original)
        model, inputs = _compressed(original, chain, plan, rewrite)
        # train copies, never a layer shared with the original (nor its BatchNorm statistics, which train mode moves)
        _own(model, original, trained_modules(model, needed_nodes(model, inputs), buffers=True))
        rest = extract(model, inputs)
        if self.steps > 0:
            assert context.fit is not None
            self._distil(rest, original, context.fit)
        if self.recalibrate and context.fit is not None:
            rest = self._recalibrate(model, original, inputs, rest, context.fit)
        return rest

    def _distil(self, rest: fx.GraphModule, original: fx.GraphModule, fit_cache: PrefixCache) -> None:
        chunks = _slices(fit_cache, rest.meta["inputs"], self.fit_batch_size)
        batches = list(zip(chunks, self._teacher_logits(original, fit_cache)))
        # Parameters the tail reads but does not own (get_attr constants of the original) stay fixed for the fit,
        # so the original is never trained; owned copies train where the network's own flags let them.
        shared = {id(p) for p in original.parameters()}
        frozen = [(p, p.requires_grad) for p in rest.parameters() if id(p) in shared]
        if not any(p.requires_grad for p in rest.parameters() if id(p) not in shared):
            return
        temperature = self.temperature
        try:
            for p, _ in frozen:
                p.requires_grad_(False)
            fit(rest, batches, steps=self.steps, max_lr=self.max_lr, device=self.device, progress=False,
                seed=self.seed, loss_fn=lambda out, teacher: distillation_loss(out, teacher, temperature))
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)

    def _teacher_logits(self, original: fx.GraphModule, fit_cache: PrefixCache) -> list[torch.Tensor]:
        """The original's outputs on the fitting batches, in ``fit_batch_size`` slices (once per table)."""
        memo = self._teacher
        if memo is None or memo[0] is not fit_cache:
            with torch.no_grad():
                logits = [original(*batch) for batch in fit_cache.batches]
            if not all(isinstance(t, torch.Tensor) for t in logits):
                raise ConfigurationError("the tail_distill importance estimator needs a network that returns one "
                                         "tensor of logits; use local or distill")
            size = self.fit_batch_size
            memo = (fit_cache, [t.detach() for out in logits for t in _batch_slices(out, len(out), size)])
            self._teacher = memo
        return memo[1]

    def _prepare(self, original: fx.GraphModule) -> _LocalContext:
        if self.train_data is None and (self.steps > 0 or self.recalibrate):
            raise ConfigurationError("the tail_distill importance estimator needs train_data (a DataLoader); or "
                                     "use steps=0 (zero_shot)")
        images = self.steps * self.fit_batch_size if self.steps > 0 else 0
        self._context = prepare_context(self, self._context, original,
                                         self.fit_batches if self.steps > 0 or self.recalibrate else 0, images)
        return self._context

    def settings(self) -> dict[str, Any]:
        return {**ImportanceEstimator.settings(self),
                "fit": "block and what follows, KD to the original's logits, SGD OneCycle",
                "fit_batches": self.fit_batches, "fit_batch_size": self.fit_batch_size,
                "temperature": self.temperature, "recalibrate": self.recalibrate}


@dataclass
class FinetuneImportance(ImportanceEstimator):
    """The paper's estimator: fine-tune all weights for ``steps`` with the task loss, then evaluate."""

    steps: int = 200
    name = "finetune"

    def adapt(self, model: nn.Module, original: nn.Module) -> None:
        # fit re-seeds the loader's generator with the seed: every entry trains on the same batches
        fit(model, self.training_batches(), steps=self.steps, max_lr=self.max_lr, loss_fn=self.loss_fn,
            device=self.device, progress=False, seed=self.seed)


@dataclass
class DistillImportance(ImportanceEstimator):
    """A few steps of distillation toward the original network (teacher), then evaluate."""

    steps: int = 30
    temperature: float = 4.0
    name = "distill"
    default_screen = "tail_distill"
    _teacher: MemoTeacher | None = field(default=None, init=False, repr=False, compare=False)

    def adapt(self, model: nn.Module, original: nn.Module) -> None:
        if self._teacher is None or self._teacher.teacher is not original:  # a new table, a new memory
            self._teacher = MemoTeacher(original, capacity=2 * self.steps)
        # fit re-seeds the loader's generator with the seed: every entry trains on the same batches
        fit(model, self.training_batches(), steps=self.steps, max_lr=self.max_lr, teacher=self._teacher,
            distill_alpha=1.0, temperature=self.temperature, device=self.device, progress=False, seed=self.seed)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "temperature": self.temperature}


class MemoTeacher(nn.Module):
    """The teacher, answering a batch it has seen from memory (the ``capacity`` most recent distinct batches).

    Entries train on the same batches (:meth:`ImportanceEstimator.same_batches`) and the teacher is the
    frozen original in eval mode, so its logits for a batch never change: after the first entry, the teacher's
    forward pass (a quarter of a distillation step's work) is skipped. Batches are recognised by their bytes, so
    a loader with random augmentation just misses and computes.
    """

    def __init__(self, teacher: nn.Module, capacity: int) -> None:
        super().__init__()
        self.teacher = teacher
        self.capacity = capacity
        self._memo: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = (self.teacher.training, *(_tensor_key(x) for x in inputs))
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        out = self.teacher(*inputs)
        if isinstance(out, torch.Tensor) and not self.teacher.training and not torch.is_grad_enabled():
            self._memo[key] = out.detach()
            while len(self._memo) > self.capacity:
                self._memo.popitem(last=False)
        return out


def _tensor_key(x: torch.Tensor) -> tuple:
    flat = x.detach().contiguous().reshape(-1)
    digest = hashlib.sha1(flat.view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
    return (tuple(x.shape), str(x.dtype), str(x.device), digest)


#: The estimator every entry point uses unless told otherwise.
DEFAULT_ESTIMATOR = "distill"
#: Settings a screen runs with by name (``LayerMergePruner(screen="tail_distill")``): 3 fitting steps of 16 images,
#: scored on the first 250 evaluation images. A screen only has to rank entries well enough for the search to pick
#: what to score exactly: on ``mbv2_fm`` 3 steps cost about 80 % of 5 and the search scores fewer entries with plans
#: as good (docs/selection.md, "Screened search", for the measurements).
SCREEN_SETTINGS: dict[str, dict[str, Any]] = {"tail_distill": {"steps": 3, "fit_batch_size": 16, "eval_images": 250}}

#: Importance estimators by name; register yours with ``ESTIMATORS.register("name", MyEstimator)``.
ESTIMATORS: Registry[type[ImportanceEstimator]] = Registry("importance estimator")
for _estimator in (ZeroShotImportance, LocalImportance, FinetuneImportance, DistillImportance, TailDistillImportance):
    ESTIMATORS.register(_estimator.name, _estimator)


def make_estimator(spec: str | ImportanceEstimator, **kwargs: Any) -> ImportanceEstimator:
    """An estimator from its name (``"finetune"``, ``"zero_shot"``, ``"distill"``, see :data:`ESTIMATORS`) or an
    instance.

    Raises:
        UnknownNameError: no estimator has that name (the message lists them).
    """
    if isinstance(spec, ImportanceEstimator):
        return spec
    return ESTIMATORS[spec](**kwargs)


def _data_id(data: Iterable[Any] | None) -> Any:
    """Identify a DataLoader cheaply: dataset type and size, batch size, and a hash of its first batch."""
    if data is None:
        return None
    dataset = getattr(data, "dataset", None)
    # The dataset's first sample, not the loader's first batch: a shuffling loader must not change the id.
    first = dataset[0] if dataset is not None and hasattr(dataset, "__getitem__") else next(iter(data))
    inputs = first[0] if isinstance(first, (list, tuple)) else first
    digest = hashlib.sha1(inputs.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:12] \
        if isinstance(inputs, torch.Tensor) else None
    return {"dataset": type(dataset).__name__ if dataset is not None else type(data).__name__,
            "size": len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None,
            "batch_size": getattr(data, "batch_size", None), "first_batch": digest}
