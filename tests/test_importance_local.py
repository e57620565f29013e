"""The ``local`` importance estimator and the parts it is built from: the untouched-node analysis, extracted
pieces of a graph, the prefix cache and the weight-sharing trainable form — on torchvision models and real data."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torchvision
from nets import randomize_bn
from test_importance import digits_net

from lm_plugin import ConfigurationError, LayerMergePruner, Plan
from lm_plugin.data.datasets import digits
from lm_plugin.rewrite import to_trainable
from lm_plugin.tables.estimators import (
    ImportanceEstimator,
    LocalImportance,
    TailDistillImportance,
    ZeroShotImportance,
    make_estimator,
    prepare_context,
)
from lm_plugin.tables.importance import build_importance_table, single_block_plan
from lm_plugin.tables.prefix import PrefixCache
from lm_plugin.trace.subgraph import extract, frontier, unchanged_nodes
from lm_plugin.train import evaluate, fit


def _pruner(model, shape):
    return LayerMergePruner(model, example_inputs=torch.randn(*shape), backend="macs", cache_dir=None,
                            progress=False)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    return model, _pruner(model, (1, 3, 32, 32))


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5)).eval()
    return model, _pruner(model, (1, 3, 32, 32))


def _blocks(pruner, n, seed=0):
    compressing = [c for c in pruner.candidates if not c.uncompressed]
    return random.Random(seed).sample(compressing, n)


@pytest.mark.parametrize("fixture", ["resnet18", "mobilenet"])
def test_the_changed_part_fed_with_the_originals_values_is_the_whole_compressed_network(fixture, request):
    _, pruner = request.getfixturevalue(fixture)
    gm = copy.deepcopy(pruner.graph_module).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    cache = PrefixCache(gm, [(x,)])
    for c in _blocks(pruner, 6):
        plan = single_block_plan(pruner.chain, c.st, c.end, c.kept)
        compressed = to_trainable(gm, pruner.chain, plan, share_weights=True).eval()
        same = unchanged_nodes(gm, compressed)
        inputs = frontier(compressed, same)
        rest = extract(compressed, inputs)
        (values,) = cache.values(rest.meta["inputs"])
        expected = to_trainable(gm, pruner.chain, plan)(x)  # the independent, deep-copied form
        assert torch.allclose(rest(*values), expected, rtol=0, atol=1e-12), c.key
        assert len(same) > 0 and any(n not in same for n in rest.meta["nodes"])


def test_sharing_weights_leaves_the_original_untouched(resnet18):
    _, pruner = resnet18
    gm = pruner.graph_module
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    paddings = {n: m.padding for n, m in gm.named_modules() if isinstance(m, torch.nn.Conv2d)}
    x = torch.randn(1, 3, 32, 32)
    reference = gm(x)
    for c in _blocks(pruner, 4, seed=1):
        plan = single_block_plan(pruner.chain, c.st, c.end, c.kept)
        shared = to_trainable(gm, pruner.chain, plan, share_weights=True).eval()
        assert torch.equal(shared(x), to_trainable(gm, pruner.chain, plan).eval()(x))
    assert {n: m.padding for n, m in gm.named_modules() if isinstance(m, torch.nn.Conv2d)} == paddings
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert torch.equal(gm(x), reference)


def test_extracted_pieces_capture_values_before_in_place_activations(resnet18):
    _, pruner = resnet18
    gm = pruner.graph_module
    # torchvision's ReLU(inplace=True) overwrites its input: the BN output must still be captured unrectified
    bn = next(p.pre_node for p in pruner.chain.positions[1:] if p.activation == "relu" and p.pre_node != p.node)
    x = torch.randn(1, 3, 32, 32)
    (value,) = extract(gm, [n.name for n in gm.graph.nodes if n.op == "placeholder"], [bn])(x)
    assert value.min() < 0
    assert torch.equal(extract(gm, ["x"])(x), gm(x))  # the whole graph, out of place, computes the same


def test_prefix_cache_evicts_within_its_cap_and_recomputes_the_same_values(resnet18):
    _, pruner = resnet18
    gm = pruner.graph_module
    batches = [(torch.randn(4, 3, 32, 32),) for _ in range(2)]
    names = [p.node for p in pruner.chain.positions[1:6]]
    one = 2 * 4 * 64 * 8 * 8 * 4  # bytes of one early position's values over both batches (64 x 8 x 8 floats)
    cache = PrefixCache(gm, batches, capacity_bytes=one)
    first = cache.values(names[:1])
    cache.values(names[1:3])
    assert cache.nbytes <= 2 * one * 2 and names[0] not in cache._values  # the first is gone
    again = cache.values(names[:1])
    assert cache.computed == 4 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))


class FullNetworkZeroShot(ZeroShotImportance):
    """zero_shot the way it was computed before the prefix cache: the whole compressed network."""

    def score_entry(self, gm, original, chain, plan, rewrite):
        return ImportanceEstimator.score_entry(self, gm, original, chain, plan, rewrite)


@pytest.fixture(scope="module")
def digits_model():
    torch.manual_seed(0)
    model = digits_net()
    train, test = digits(64, train=True), digits(256, train=False)
    fit(model, train, epochs=4, max_lr=0.1, progress=False, seed=0)
    return model.eval(), train, test


def test_zero_shot_on_the_changed_part_scores_what_the_whole_network_scores(digits_model):
    model, _, test = digits_model
    pruner = _pruner(model, (1, 1, 8, 8))
    args = (pruner.graph_module, pruner.chain, pruner.candidates)
    fast = build_importance_table(*args, ZeroShotImportance(eval_data=test), progress=False)
    full = build_importance_table(*args, FullNetworkZeroShot(eval_data=test), progress=False)
    assert fast.values == full.values and min(fast.values.values()) < -1.0


def test_local_fitting_recovers_accuracy_and_leaves_the_model_alone(digits_model, tmp_path):
    model, train, test = digits_model
    pruner = _pruner(model, (1, 1, 8, 8))
    before = copy.deepcopy(pruner.graph_module.state_dict())
    args = (pruner.graph_module, pruner.chain, pruner.candidates)
    plain = build_importance_table(*args, LocalImportance(train_data=train, eval_data=test, steps=0,
                                                          recalibrate=False), progress=False)
    assert plain.values == build_importance_table(*args, ZeroShotImportance(eval_data=test), progress=False).values
    local = build_importance_table(*args, LocalImportance(train_data=train, eval_data=test), cache_dir=tmp_path,
                                   progress=False)
    keys = [k for k, v in plain.values.items() if v < -5.0]
    assert keys and sum(local.values[k] for k in keys) > sum(plain.values[k] for k in keys) + 5.0 * len(keys) / 4
    assert all(torch.equal(before[k], v) for k, v in pruner.graph_module.state_dict().items())
    assert evaluate(pruner.graph_module, test) == pytest.approx(local.base_metric)
    # deterministic: a second build from scratch scores every entry the same
    again = build_importance_table(*args, LocalImportance(train_data=train, eval_data=test), progress=False)
    assert again.values == local.values


def test_local_needs_training_batches_unless_it_only_scores(digits_model):
    model, _, test = digits_model
    pruner = _pruner(model, (1, 1, 8, 8))
    with pytest.raises(Exception, match="train_data"):
        build_importance_table(pruner.graph_module, pruner.chain, pruner.candidates,
                               LocalImportance(eval_data=test), progress=False)


@pytest.mark.parametrize("name", ["local", "tail_distill"])
def test_the_pruner_accepts_the_estimators_by_name(digits_model, tmp_path, name):
    model, train, test = digits_model
    pruner = LayerMergePruner(model, 0.8, example_inputs=torch.randn(1, 1, 8, 8), backend="macs",
                              importance=name, train_data=train, eval_data=test, cache_dir=tmp_path,
                              progress=False)
    plan = pruner.search().plan
    assert isinstance(plan, Plan) and pruner.importance_table().estimator["estimator"] == name


def test_tail_distillation_recovers_accuracy_deterministically_and_leaves_the_model_alone(digits_model):
    model, train, test = digits_model
    pruner = _pruner(model, (1, 1, 8, 8))
    before = copy.deepcopy(pruner.graph_module.state_dict())
    args = (pruner.graph_module, pruner.chain, pruner.candidates)
    plain = build_importance_table(*args, ZeroShotImportance(eval_data=test), progress=False)
    untrained = build_importance_table(*args, TailDistillImportance(train_data=train, eval_data=test, steps=0),
                                       progress=False)
    assert untrained.values == plain.values  # no steps: the metric right after compression
    tail = build_importance_table(*args, TailDistillImportance(train_data=train, eval_data=test), progress=False)
    keys = [k for k, v in plain.values.items() if v < -5.0]
    assert keys and sum(tail.values[k] for k in keys) > sum(plain.values[k] for k in keys) + 5.0 * len(keys) / 4
    assert all(torch.equal(before[k], v) for k, v in pruner.graph_module.state_dict().items())
    assert tail.base_metric == pytest.approx(evaluate(pruner.graph_module, test))
    again = build_importance_table(*args, TailDistillImportance(train_data=train, eval_data=test), progress=False)
    assert again.values == tail.values  # every entry trains on the same batches from the same seed


class ScaledOutput(torch.nn.Module):
    """A CNN whose logits are scaled by a parameter read with ``get_attr`` (no module owns it)."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.body(x) * self.scale


def test_tail_distillation_never_trains_a_parameter_of_the_original(digits_model):
    model, train, test = digits_model
    wrapped = ScaledOutput(copy.deepcopy(model)).eval()
    pruner = _pruner(wrapped, (1, 1, 8, 8))
    before = copy.deepcopy(pruner.graph_module.state_dict())
    table = build_importance_table(pruner.graph_module, pruner.chain, pruner.candidates,
                                   TailDistillImportance(train_data=train, eval_data=test, steps=4), progress=False)
    assert min(table.values.values()) < 0.0
    assert all(torch.equal(before[k], v) for k, v in pruner.graph_module.state_dict().items())
    assert all(p.requires_grad for p in wrapped.parameters())  # the user's model: not even its flags change


def test_the_fitting_batches_hold_enough_images_for_the_steps(digits_model):
    model, _, test = digits_model
    pruner = _pruner(model, (1, 1, 8, 8))
    small = digits(8, train=True)  # 8 images a batch: 10 steps of 32 images need 40 of them
    estimator = TailDistillImportance(train_data=small, eval_data=test)
    context = prepare_context(estimator, None, copy.deepcopy(pruner.graph_module).eval(), 1, 320)
    assert sum(len(x) for (x,) in context.fit.batches) == 320


def test_training_the_tail_never_moves_the_originals_batchnorm_statistics(digits_model):
    model, train, test = digits_model
    torch.manual_seed(0)
    plain = torch.nn.Sequential(copy.deepcopy(model[:-3]), torch.nn.BatchNorm2d(16, affine=False),
                                *copy.deepcopy(model[-3:])).eval()  # statistics without parameters
    fit(plain, train, steps=20, max_lr=0.05, progress=False, seed=0)
    pruner = _pruner(plain.eval(), (1, 1, 8, 8))
    original = copy.deepcopy(pruner.graph_module).eval()
    before = copy.deepcopy(original.state_dict())
    estimator = TailDistillImportance(train_data=train, eval_data=test, steps=4)
    plans = [single_block_plan(pruner.chain, c.st, c.end, c.kept) for c in _blocks(pruner, 4)]
    first = [estimator.score_entry(pruner.graph_module, original, pruner.chain, p, None) for p in plans]
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())
    assert [estimator.score_entry(pruner.graph_module, original, pruner.chain, p, None) for p in plans] == first


class FirstImages:
    """An evaluation loader cut by hand to its first ``n`` images: what ``eval_images=n`` must score."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __iter__(self):
        left = self.n
        for x, y in self.loader:
            if left <= 0:
                return
            yield x[:left], y[:left]
            left -= len(y[:left])


@pytest.mark.parametrize("name", ["zero_shot", "tail_distill", "distill"])
def test_scoring_on_the_first_images_is_scoring_a_loader_of_those_images(digits_model, name):
    model, train, test = digits_model
    pruner = _pruner(model, (1, 1, 8, 8))
    args = (pruner.graph_module, pruner.chain, pruner.candidates)
    n = 300  # not a multiple of the loader's 256-image batches: the second batch is cut
    settings = {"steps": 3, "train_data": train} if name != "zero_shot" else {}

    def table(**kwargs):
        return build_importance_table(*args, make_estimator(name, **settings, **kwargs), progress=False)

    cut, by_hand = table(eval_data=test, eval_images=n), table(eval_data=FirstImages(test, n))
    assert cut.values == by_hand.values and cut.base_metric == by_hand.base_metric
    assert cut.estimator["eval_images"] == n and "eval_images" not in by_hand.estimator
    everything = table(eval_data=test)
    assert everything.values != cut.values  # the images left out change scores: the option is not a no-op


class Slices:
    """A training loader whose batches are cut by hand into ``size``-image slices: what ``fit_batch_size`` must
    train on (the loader's own shuffling generator is the one :meth:`same_batches` re-seeds)."""

    def __init__(self, loader, size):
        self.loader, self.size = loader, size
        self.generator = getattr(loader, "generator", None)

    def __iter__(self):
        for x, y in self.loader:
            for i in range(0, len(y), self.size):
                yield x[i:i + self.size], y[i:i + self.size]


@pytest.mark.parametrize("name", ["distill", "finetune"])
def test_training_steps_of_fit_batch_size_images_are_slices_of_the_loaders_batches(digits_model, name):
    model, train, test = digits_model
    pruner = _pruner(model, (1, 1, 8, 8))
    args = (pruner.graph_module, pruner.chain, pruner.candidates)
    size = 48  # not a divisor of the loader's batches: each batch ends with a shorter slice

    def table(**kwargs):
        return build_importance_table(*args, make_estimator(name, steps=4, eval_data=test, **kwargs), progress=False)

    sliced, by_hand = table(train_data=train, fit_batch_size=size), table(train_data=Slices(train, size))
    assert sliced.values == by_hand.values
    assert sliced.estimator["fit_batch_size"] == size and "fit_batch_size" not in table(train_data=train).estimator
    assert table(train_data=train).values != sliced.values  # smaller steps change the scores
    with pytest.raises(ConfigurationError, match="fit_batch_size"):
        table(train_data=train, fit_batch_size=0)


def test_zero_shot_fits_nothing_so_its_signature_has_no_fit_batch_size(digits_model):
    _, _, test = digits_model
    assert "fit_batch_size" not in ZeroShotImportance(eval_data=test).settings()


def test_eval_images_must_be_a_positive_count(digits_model):
    model, _, test = digits_model
    pruner = _pruner(model, (1, 1, 8, 8))
    with pytest.raises(ConfigurationError, match="eval_images"):
        build_importance_table(pruner.graph_module, pruner.chain, pruner.candidates,
                               ZeroShotImportance(eval_data=test, eval_images=0), progress=False)
