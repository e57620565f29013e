"""LayerMerge with torch-pruning's habits: example_inputs, ignored_layers, step(), MACs/params before and after.

A small residual CNN is trained on scikit-learn's digits. Then, exactly as with a torch-pruning pruner:
build the pruner with ``example_inputs`` and ``ignored_layers``, call ``step()``, fine-tune, and compare
``tp.utils.count_ops_and_params`` before and after. LayerMerge's ``step()`` returns the *trainable form*
(the chosen activations and layers removed, still with BatchNorm); ``merge()`` gives the deploy form, one conv
per block. The end channel-prunes the trainable form with torch-pruning itself before merging: the two compose.

Run: python examples/torch_pruning_style.py [--quick]     (under a minute on one CPU core)
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
import torch_pruning as tp

from lm_plugin import LayerMergePruner, Plan
from lm_plugin.data.datasets import digits
from lm_plugin.latency import compare_latency
from lm_plugin.train import evaluate, fit
from lm_plugin.workloads.models import digits_resnet


def main(quick: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    train, test = digits(64, train=True), digits(256, train=False)
    model = digits_resnet(width=16 if quick else 32)
    fit(model, train, epochs=3 if quick else 8, max_lr=0.1, seed=0, progress=False)
    model.eval()

    example_inputs = torch.randn(1, 1, 8, 8)  # torch-pruning counts MACs per example batch: one image
    base_macs, base_params = tp.utils.count_ops_and_params(model, example_inputs)

    # ---- LayerMerge, torch-pruning style ----
    ignored_layers = [model[0][0]]  # the stem conv: never merged with its neighbours (tp: never pruned)
    pruner = LayerMergePruner(
        model, budget=0.8,                             # 80 % of the original's measured latency ...
        example_inputs=torch.randn(64, 1, 8, 8),       # ... at batch 64, on this CPU
        ignored_layers=ignored_layers,
        backend="cpu", profiler_settings={"warmup": 2, "repeats": 5 if quick else 10, "max_spread": 1e9},
        train_data=train, eval_data=train, importance_settings={"steps": 3 if quick else 10},
        cache_dir=tempfile.mkdtemp(prefix="lm_plugin-"), progress=False,
    )
    trainable = pruner.step()                          # search + apply, like tp's pruner.step()
    print(Plan.of(trainable).summary(pruner.chain), end="\n\n")
    fit(trainable, train, epochs=1 if quick else 2, max_lr=0.02, seed=0, progress=False)
    deployed = pruner.merge(trainable.eval())          # one conv per block, BatchNorm folded

    macs, params = tp.utils.count_ops_and_params(deployed, example_inputs)
    print(f"MACs: {base_macs / 1e6:.3f} M -> {macs / 1e6:.3f} M, #Params: {base_params / 1e3:.1f} k -> "
          f"{params / 1e3:.1f} k")
    pruner.cost_report(deployed)                       # the same, plus conv layers, in one call
    assert isinstance(dict(deployed.named_modules())["0.0"], torch.nn.Conv2d)  # the ignored stem is still there

    # ---- then torch-pruning itself: channel-prune the trainable form (it still has BatchNorm), fine-tune, merge ----
    slim = copy.deepcopy(trainable)
    # Keep the head (tp habit) and the convs whose channels exist only inside a merged block: merging removes
    # those channels anyway, so pruning them would spend the pruning ratio on nothing.
    ignored = [m for m in slim.modules() if isinstance(m, torch.nn.Linear)] + pruner.internal_layers(slim)
    tp.pruner.MetaPruner(slim, example_inputs, tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=0.25,
                         ignored_layers=ignored).step()
    fit(slim, train, epochs=1 if quick else 2, max_lr=0.02, seed=0, progress=False)
    channel_pruned = pruner.merge(slim.eval())         # merged convs take the pruned widths
    pruner.cost_report(channel_pruned)

    ms = compare_latency(pruner.profiler, {"original": pruner.baseline(), "LayerMerge": deployed,
                                           "LayerMerge + tp": channel_pruned}, pruner.example_inputs, rounds=3)
    acc = {"original": evaluate(model, test), "LayerMerge": evaluate(deployed, test),
           "LayerMerge + tp": evaluate(channel_pruned, test)}
    print(f"\n{'':16} {'accuracy (%)':>12} {'latency b64 (ms)':>17}")
    for name in ms:
        print(f"{name:16} {acc[name]:>12.2f} {ms[name]:>17.3f}")
    print("(latency measured side by side; the original has its BatchNorm folded, as it would be deployed)")
    return {"macs_before": base_macs, "macs_after": macs, "params_before": base_params, "params_after": params,
            **{f"acc {k}": v for k, v in acc.items()}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and shorter runs (for tests)")
    main(parser.parse_args().quick)
