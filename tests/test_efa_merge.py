"""LayerMerge followed by channel pruning: plan -> trainable form -> channel-prune it -> fine-tune -> exact merge.

The trainable form (``pruner.apply(plan)``) still has its BatchNorms; torch-pruning (or the hierarchical pruner)
prunes it in place, and ``pruner.merge`` must read the pruned widths from the modules and stay exact.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch_pruning as tp
from nets import randomize_bn
from torch import nn
from torchvision.models import resnet18

from lm_plugin import LayerMergePruner, Plan
from lm_plugin.data.datasets import digits
from lm_plugin.efa import HierarchicalPruner
from lm_plugin.train import fit
from lm_plugin.workloads.models import digits_resnet

pytestmark = pytest.mark.usefixtures("one_thread")

X_R18 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
X_DIGITS = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
# Plan.sample seeds (p_merge=0.8) whose plans fold identity and projection residuals into blocks and have
# block-internal convs (checked in test_sampled_plans_cover_the_interesting_cases).
R18_SEEDS = (0, 1)
DIGITS_SEEDS = (2, 11)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def classifier(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@pytest.fixture(scope="module")
def r18() -> LayerMergePruner:
    torch.manual_seed(0)
    model = randomize_bn(resnet18(num_classes=10)).eval()
    return LayerMergePruner(model, 0.7, example_inputs=X_R18, cache_dir=None, progress=False)


@pytest.fixture(scope="module")
def dig() -> LayerMergePruner:
    torch.manual_seed(0)
    model = randomize_bn(digits_resnet()).eval()
    return LayerMergePruner(model, 0.7, example_inputs=X_DIGITS, cache_dir=None, progress=False)


def sample(pruner: LayerMergePruner, seed: int) -> Plan:
    return Plan.sample(pruner.chain, seed, p_merge=0.8)


def assert_exact_merge(pruner: LayerMergePruner, trainable: nn.Module, x: torch.Tensor) -> nn.Module:
    """Merge a float64 copy of ``trainable`` and compare on random inputs; returns the merged model."""
    t64 = copy.deepcopy(trainable).double().eval()
    merged = pruner.merge(t64)
    xi = torch.randn(2, *x.shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(t64(xi), merged(xi)) <= 1e-10
    return merged


def merged_params(pruner: LayerMergePruner, plan: Plan) -> int:
    return n_params(pruner.merge(pruner.apply(plan)))


def test_sampled_plans_cover_the_interesting_cases(r18, dig):
    folded = {"identity": 0, "projection": 0}
    internal = 0
    for pruner, seeds in ((r18, R18_SEEDS), (dig, DIGITS_SEEDS)):
        for seed in seeds:
            plan = sample(pruner, seed)
            internal += len(pruner.internal_layers(pruner.apply(plan)))
            for st, end in plan.blocks():
                for r in pruner.chain.residuals_within(st, end):
                    folded["projection" if r.projection else "identity"] += 1
    assert folded["identity"] > 0 and folded["projection"] > 0 and internal > 0


@pytest.mark.parametrize("arch,seed", [("r18", s) for s in R18_SEEDS] + [("dig", s) for s in DIGITS_SEEDS])
def test_internal_layers_are_whole_coupled_groups(arch, seed, r18, dig):
    """torch-pruning traces the trainable form; every coupled group (residual streams included) is either
    wholly inside a merged block or not at all, so ignoring internal_layers never blocks a boundary group."""
    pruner, x = (r18, X_R18) if arch == "r18" else (dig, X_DIGITS)
    plan = sample(pruner, seed)
    trainable = pruner.apply(plan)
    internal = {id(m) for m in pruner.internal_layers(trainable)}
    assert internal
    block_outputs = set()
    for st, end in plan.blocks():
        kept = [j for j in range(st + 1, end + 1) if j in plan.kept_convs]
        block_outputs.add(id(trainable.get_submodule(pruner.chain.conv(kept[-1]).name)))
    assert not internal & block_outputs
    dg = tp.DependencyGraph().build_dependency(trainable, x)
    for group in dg.get_all_groups(root_module_types=(nn.Conv2d,)):
        producers = [it.dep.target.module for it in group.items
                     if dg.is_out_channel_pruning_fn(it.dep.handler) and isinstance(it.dep.target.module, nn.Conv2d)]
        assert len({id(p) in internal for p in producers}) == 1


@pytest.mark.parametrize("arch,seed", [("r18", R18_SEEDS[0]), ("dig", DIGITS_SEEDS[0]), ("dig", DIGITS_SEEDS[1])])
def test_magnitude_pruned_trainable_merges_exactly(arch, seed, r18, dig):
    pruner, x = (r18, X_R18) if arch == "r18" else (dig, X_DIGITS)
    plan = sample(pruner, seed)
    trainable = pruner.apply(plan)
    ignored = pruner.internal_layers(trainable) + [classifier(trainable)]
    tp.pruner.MetaPruner(trainable, x, tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=0.3,
                         ignored_layers=ignored).step()
    merged = assert_exact_merge(pruner, trainable, x)
    assert n_params(merged) < 0.75 * merged_params(pruner, plan)
    stem = pruner.chain.conv(1)
    assert trainable.get_submodule(stem.name).out_channels < stem.out_channels


def test_hierarchical_pruning_then_finetuning_then_merge_digits(dig):
    """The full order on real data: plan, trainable form, hierarchical pruning, a little fine-tuning (train
    mode: weights and BN statistics change), exact merge."""
    plan = sample(dig, DIGITS_SEEDS[0])
    trainable = dig.apply(plan)
    ignored = dig.internal_layers(trainable) + [classifier(trainable)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few calibration batches for the widths: the rank warning is expected
        hp = HierarchicalPruner(trainable, X_DIGITS, digits(32, seed=1), reduction=0.3, metric="params",
                                ignored_layers=ignored, num_batches=12)
    hp.step()
    before = copy.deepcopy(trainable)
    fit(trainable, digits(64), epochs=0.2, max_lr=0.02, progress=False, seed=0)
    changed = any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(),
                                                        trainable.state_dict().values()))
    assert changed
    merged = assert_exact_merge(dig, trainable, X_DIGITS)
    assert n_params(merged) < merged_params(dig, plan)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in merged.modules())


def test_hierarchical_pruning_of_resnet18_trainable_merges_exactly(r18):
    plan = sample(r18, R18_SEEDS[1])
    trainable = r18.apply(plan)
    ignored = r18.internal_layers(trainable) + [classifier(trainable)]
    g = torch.Generator().manual_seed(2)
    calib = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        HierarchicalPruner(trainable, X_R18, calib, reduction=0.2, metric="params", ignored_layers=ignored).step()
    merged = assert_exact_merge(r18, trainable, X_R18)
    assert n_params(merged) < merged_params(r18, plan)


def test_pruning_only_internal_channels_is_exact_and_leaves_deploy_size_unchanged(r18):
    """What internal_layers promises: those channels vanish at merge time anyway."""
    plan = sample(r18, R18_SEEDS[0])
    trainable = r18.apply(plan)
    internal = r18.internal_layers(trainable)
    widths = [m.out_channels for m in internal]
    tp.pruner.MetaPruner(trainable, X_R18, tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=0.0,
                         pruning_ratio_dict={m: 0.5 for m in internal}).step()
    assert all(m.out_channels < w for m, w in zip(internal, widths))
    merged = assert_exact_merge(r18, trainable, X_R18)
    assert n_params(merged) == merged_params(r18, plan)


def test_identity_branch_takes_the_pruned_width(dig):
    """A folded residual whose branch convs are all dropped adds the (pruned) stream to itself: its width must
    come from the pruned modules, not from the original chain."""
    chain = dig.chain
    plan = Plan(chain.length, frozenset({3, 4, 5, 6}), frozenset({1, 4, 5, 6, 7}), chain.fingerprint())
    plan.validate(chain)
    assert any(r.source == 1 and r.target == 3 for st, end in plan.blocks() for r in chain.residuals_within(st, end))
    trainable = dig.apply(plan)
    tp.pruner.MetaPruner(trainable, X_DIGITS, tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=0.25,
                         ignored_layers=[classifier(trainable)]).step()
    assert trainable.get_submodule(chain.conv(1).name).out_channels < chain.conv(1).out_channels
    assert_exact_merge(dig, trainable, X_DIGITS)
