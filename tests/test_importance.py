"""Importance estimators on real data (scikit-learn digits), their cache, and search() end to end."""

from __future__ import annotations

import json
import math
import sqlite3
import warnings

import pytest
import torch
import torch.nn as nn
from nets import ConvBN
from test_candidates import oracle_candidates
from test_dp import brute_force

from lm_plugin import LayerMergePruner, Plan
from lm_plugin.data.datasets import digits
from lm_plugin.store import CacheWarning
from lm_plugin.tables.estimators import DistillImportance, FinetuneImportance, ZeroShotImportance
from lm_plugin.tables.importance import ImportanceCache, build_importance_table
from lm_plugin.train import evaluate, fit

FAST = {"warmup": 1, "repeats": 3, "max_spread": 1e9}


def digits_net() -> nn.Module:
    layers = [ConvBN(1, 16), nn.ReLU()]
    for _ in range(3):
        layers += [ConvBN(16, 16), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)]
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = digits_net()
    train, test = digits(64, train=True), digits(256, train=False)
    fit(model, train, epochs=4, max_lr=0.1, progress=False, seed=0)
    assert evaluate(model, test) > 80.0
    return model.eval(), train, test


def pruner_for(model, estimator, tmp_path, budget=0.8, backend="cpu"):
    settings = FAST if backend == "cpu" else None
    return LayerMergePruner(model, budget, example_inputs=torch.randn(1, 1, 8, 8), backend=backend,
                            profiler_settings=settings, importance=estimator, cache_dir=tmp_path, progress=False)


@pytest.mark.parametrize("cls, kw", [(ZeroShotImportance, {}), (DistillImportance, {"steps": 4}),
                                     (FinetuneImportance, {"steps": 4})])
def test_estimators_run_end_to_end(trained, tmp_path, cls, kw):
    model, train, test = trained
    pruner = pruner_for(model, cls(train_data=train, eval_data=test, **kw), tmp_path)
    table = pruner.importance_table()
    assert set(table.values) == {c.key for c in pruner.selectable()}
    assert table.base_metric == pytest.approx(evaluate(model, test))
    singles = [c.key for c in pruner.candidates if c.uncompressed]
    assert singles and all(table.values[k] == 0.0 for k in singles)
    others = [v for k, v in table.values.items() if k not in singles]
    assert others and all(-100.0 <= v <= 100.0 for v in others)
    if cls is ZeroShotImportance:  # removing activations without any training hurts a trained net
        assert min(others) < -1.0


def test_representative_subset_keeps_the_heaviest_convs(trained, tmp_path):
    model, _, test = trained
    pruner = pruner_for(model, ZeroShotImportance(eval_data=test), tmp_path)
    table = pruner.importance_table()
    chain = pruner.chain
    subsets = {o.key: o.subsets for o in oracle_candidates(chain, pruner.mode, max_kernel=pruner.max_kernel,
                                                           inserted_act=pruner.rewrite.inserted_kind(chain))}
    multi = [c for c in pruner.selectable() if len(subsets[c.key]) > 1]
    assert multi
    for c in multi:
        norms = {j: pruner.graph_module.get_submodule(chain.conv(j).name).weight.abs().sum().item()
                 for j in range(c.st + 1, c.end + 1)}
        best = max(sum(norms[j] for j in s) for s in subsets[c.key])
        assert sum(norms[j] for j in table.subsets[c.key]) == pytest.approx(best)


class Interrupting(ZeroShotImportance):
    """A real estimator that is interrupted (Ctrl-C) after a few entries."""

    def __init__(self, limit, **kw):
        super().__init__(**kw)
        self.limit, self.calls = limit, 0

    def score_entry(self, *args):
        self.calls += 1
        if self.calls > self.limit:
            raise KeyboardInterrupt
        return super().score_entry(*args)


def test_importance_cache_resumes_and_detects_corruption(trained, tmp_path):
    model, _, test = trained
    pruner = pruner_for(model, Interrupting(3, eval_data=test), tmp_path)
    chain, cands = pruner.chain, pruner.candidates
    with pytest.raises(KeyboardInterrupt):
        build_importance_table(pruner.graph_module, chain, cands, pruner.estimator, cache_dir=tmp_path,
                               progress=False)
    resumed = build_importance_table(pruner.graph_module, chain, cands, ZeroShotImportance(eval_data=test),
                                     cache_dir=tmp_path, progress=False)
    to_score = sum(1 for c in cands if not c.uncompressed)
    assert resumed.evaluated == to_score - 3  # the three finished entries were not scored again

    (path,) = tmp_path.glob("importance-zero_shot-*.sqlite")
    with sqlite3.connect(path) as db:  # damage the last entry: its value no longer matches its checksum
        db.execute("UPDATE records SET value = value || '1' WHERE rowid = (SELECT MAX(rowid) FROM records)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = build_importance_table(pruner.graph_module, chain, cands, ZeroShotImportance(eval_data=test),
                                       cache_dir=tmp_path, progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(messages) == 1 and messages[0].startswith("importance table cache ") and "damaged" in messages[0]
    assert again.evaluated == 1 and again.values == resumed.values


def test_search_returns_the_best_plan_within_budget(trained, tmp_path):
    model, _, test = trained
    # analytic costs: on a busy machine noisy timings can make the part outside the blocks negative, and then even
    # a 1 ns budget below looks reachable
    pruner = pruner_for(model, ZeroShotImportance(eval_data=test), tmp_path, budget=0.9, backend="macs")
    found = pruner.search()
    plan = found.plan
    assert plan.is_valid(pruner.chain)
    assert found.predicted_ms == pruner.predict_latency(plan) and found.budget_ms == pruner.budget_ms()
    assert found.predicted_ms <= found.budget_ms + 1e-9
    # No decomposition of the chain within the budget scores higher (exhaustive check).
    lat, sol = pruner.latency_model(), found.solution
    assert found.objective == sol.objective
    block_budget = pruner.budget_ms() - lat.rest_ms - sum(lat.skip_ms.values())
    best = brute_force(pruner.entries(), pruner.chain.length, math.floor(block_budget / sol.step_ms + 1e-9),
                       sol.step_ms)
    assert sol.objective == pytest.approx(best)
    trainable = pruner.step()
    merged = pruner.merge(trainable.eval())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(trainable(x), merged(x), atol=1e-4)
    with pytest.raises(Exception, match="smallest achievable"):
        pruner.search("0.000001ms")  # below any network's cost
    assert Plan.from_json(plan.to_json()) == plan


class OtherWorkerFinishes(ZeroShotImportance):
    """A real estimator; while it scores its first entry, another worker sharing the cache file (a second handle
    on the same file here) stores the entries ``finished``."""

    def __init__(self, other, finished, **kw):
        super().__init__(**kw)
        self.other, self.finished, self.calls = other, finished, 0

    def score_entry(self, *args):
        self.calls += 1
        if self.calls == 1:
            for key, value in self.finished.items():
                self.other.put(list(key), value)
        return super().score_entry(*args)


def the_cache(cache_dir):
    """The one importance cache file in ``cache_dir``."""
    (path,) = cache_dir.glob("importance-zero_shot-*.sqlite")
    return path


def stored_keys(cache_dir):
    """The keys committed to the importance cache in ``cache_dir``, in the order they were written."""
    with sqlite3.connect(the_cache(cache_dir)) as db:
        return [tuple(json.loads(k)) for (k,) in db.execute("SELECT key FROM records ORDER BY rowid")]


def reference_build(trained, tmp_path):
    """An uninterrupted zero-shot table of the digits net: the pruner's pieces, the table, the keys it scores."""
    model, _, test = trained
    pruner = pruner_for(model, ZeroShotImportance(eval_data=test), tmp_path / "reference")
    reference = pruner.importance_table()
    scored = [c.key for c in pruner.selectable() if not c.uncompressed]
    return (pruner.graph_module, pruner.chain, pruner.selectable()), reference, scored


def test_workers_sharing_a_cache_split_the_table(trained, tmp_path):
    test = trained[2]
    (graph, chain, cands), reference, scored = reference_build(trained, tmp_path)

    # worker 1 of 2 starts halfway through the entries
    shared = tmp_path / "shared"
    with pytest.raises(KeyboardInterrupt):
        build_importance_table(graph, chain, cands, Interrupting(3, eval_data=test), cache_dir=shared,
                               progress=False, shard=(1, 2))
    written = stored_keys(shared)
    assert written[1:] == scored[len(scored) // 2:][:3]  # after the base metric: from its start, in order

    # worker 0 picks up what the other process finishes while it runs, and scores only the rest
    others = {k: v for k, v in reference.values.items() if k in scored and k not in written}
    worker = OtherWorkerFinishes(ImportanceCache(the_cache(shared), reference.estimator), others, eval_data=test)
    table = build_importance_table(graph, chain, cands, worker, cache_dir=shared, progress=False, shard=(0, 2))
    assert table.evaluated == 1 and worker.calls == 1
    assert table.values == pytest.approx(reference.values)

    with pytest.raises(ValueError, match="cache_dir"):
        build_importance_table(graph, chain, cands, worker, cache_dir=None, progress=False, shard=(0, 2))
    with pytest.raises(ValueError, match="index < count"):
        build_importance_table(graph, chain, cands, worker, cache_dir=shared, progress=False, shard=(2, 2))


def test_an_entry_claimed_by_a_live_worker_is_left_to_it(trained, tmp_path):
    """Claims, not re-reads: the entry another worker has claimed is not scored here; its score is read from the
    cache once that worker stores it."""
    test = trained[2]
    (graph, chain, cands), reference, scored = reference_build(trained, tmp_path)
    shared = tmp_path / "shared"
    other = ImportanceCache(shared / the_cache(tmp_path / "reference").name, reference.estimator, owner="other")
    claimed = scored[0]  # the first entry this worker would score
    assert other.claim(list(claimed))

    worker = OtherWorkerFinishes(other, {claimed: reference.values[claimed]}, eval_data=test)
    table = build_importance_table(graph, chain, cands, worker, cache_dir=shared, progress=False)
    assert table.evaluated == worker.calls == len(scored) - 1, "every entry but the claimed one scored here"
    assert table.values == pytest.approx(reference.values)


def test_entries_train_on_the_same_batches_whatever_the_order(trained, tmp_path):
    """A shuffling loader with its own generator: an entry's distill score is the same whether it is scored first,
    last, or by another shard, and the user's loader is left as it was."""
    model, train, test = trained
    assert isinstance(train.generator, torch.Generator)
    before = train.generator.get_state()

    def build(cache, shard=None, progress=False):
        est = DistillImportance(train_data=train, eval_data=test, steps=3)
        pruner = pruner_for(model, est, cache)
        return build_importance_table(pruner.graph_module, pruner.chain, pruner.candidates, est, cache_dir=cache,
                                      progress=progress, shard=shard)

    forward = build(tmp_path / "one")
    assert torch.equal(train.generator.get_state(), before)
    backward = build(tmp_path / "two", shard=(1, 2))  # the same entries in another order (its share first)
    assert backward.values == forward.values
    assert torch.equal(train.generator.get_state(), before)


def test_memo_teacher_answers_seen_batches_from_memory():
    from lm_plugin.tables.estimators import MemoTeacher

    calls = []
    teacher = nn.Linear(4, 3).eval()
    teacher.register_forward_hook(lambda m, a, out: calls.append(1))
    memo = MemoTeacher(teacher, capacity=2)
    a, b, c = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        first = memo(a)
        assert torch.equal(memo(a.clone()), first) and len(calls) == 1  # same bytes: from memory
        memo(b), memo(c)  # capacity 2: a is evicted
        assert len(calls) == 3
        memo(a)
        assert len(calls) == 4
    with torch.enable_grad():  # outside no_grad the teacher always runs (its output could carry a graph)
        memo(b)
        memo(b)
    assert len(calls) == 6
