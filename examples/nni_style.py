"""LayerMerge with NNI's face, on real data, in well under a minute on a laptop CPU.

A small residual CNN is trained on scikit-learn's digits. Then, exactly as with any NNI 3.0 pruner:
a ``config_list`` says which layers may be compressed (here: all convs except the stem), a ``TorchEvaluator``
supplies the input shape and the training loop, and ``compress()`` returns ``(model, masks)``. LayerMerge's
``budget`` (a fraction of the measured latency) is a constructor argument; the returned model is already
smaller (layers removed, not masked), so ``masks`` is empty and no ``ModelSpeedup`` is needed.

The end shows ``lm_plugin.nni.speedup``, which makes NNI's own channel pruners usable again on current torch.

Run: python examples/nni_style.py     (needs: pip install 'lm-plugin[nni]')
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import nni
import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.compression import TorchEvaluator
from nni.compression.pruning import L1NormPruner

from lm_plugin.data.datasets import digits
from lm_plugin.nni import LayerMergePruner, speedup
from lm_plugin.train import evaluate, fit
from lm_plugin.workloads.models import digits_resnet

TRAIN, TEST = digits(64, train=True), digits(256, train=False)


# ---- the three functions an NNI TorchEvaluator is made of (NNI's contract, written by the user) ----
def training_step(batch: Any, model: nn.Module) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def training_func(model: nn.Module, optimizer: torch.optim.Optimizer, training_step: Any, lr_scheduler: Any = None,
                  max_steps: int | None = None, max_epochs: int | None = None) -> None:
    model.train()
    steps = 0
    for _ in range(max_epochs or 10**9):  # NNI passes max_steps or max_epochs
        for batch in TRAIN:
            optimizer.zero_grad()
            training_step(batch, model).backward()
            optimizer.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return


def evaluating_func(model: nn.Module) -> float:
    return evaluate(model, TEST)  # top-1 accuracy (%), higher is better


def make_evaluator(model: nn.Module) -> TorchEvaluator:
    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01, momentum=0.9)  # nni.trace: NNI rebuilds it
    return TorchEvaluator(training_func, optimizer, training_step, dummy_input=torch.randn(64, 1, 8, 8),
                          evaluating_func=evaluating_func)


def count_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def main(budget: float = 0.7, *, epochs: int = 8, importance_steps: int = 20, finetune_steps: int = 150,
         backend: str = "cpu", profiler_settings: dict[str, Any] | None = None) -> dict[str, float]:
    """Run the demo; the keyword arguments only shorten it (the test runs a quick version).

    ``backend="macs"`` (analytic cost) makes the selection deterministic on a busy machine.
    """
    torch.manual_seed(0)
    model = digits_resnet()
    fit(model, TRAIN, epochs=epochs, max_lr=0.1, seed=0, progress=False)
    model.eval()

    # --- LayerMerge, NNI style: select layers with config_list, the budget is a constructor argument ---
    config_list = [{"op_types": ["Conv2d"], "exclude_op_names": ["0.0"]}]  # keep the stem conv as it is
    pruner = LayerMergePruner(
        model, config_list, make_evaluator(model), budget=budget,
        importance="finetune", importance_settings={"steps": importance_steps},  # by the evaluator's training_func
        backend=backend, profiler_settings=profiler_settings, cache_dir=tempfile.mkdtemp(prefix="lm_plugin-"),
        progress=False,
    )
    print(pruner.chain.summary(), end="\n\n")
    trainable, masks = pruner.compress(max_steps=finetune_steps)  # fine-tuned by the evaluator
    assert masks == {}  # nothing to mask: the layers are gone
    print(pruner.plan.summary(pruner.chain), end="\n\n")
    merged = pruner.merge(trainable.eval())

    acc0, acc1 = evaluate(model, TEST), evaluate(merged, TEST)
    ms0, ms1 = pruner.measure_latency(model), pruner.measure_latency(merged)
    print(f"{'':28} {'original':>10} {'LayerMerge':>10}")
    print(f"{'test accuracy (%)':28} {acc0:>10.2f} {acc1:>10.2f}")
    print(f"{'conv layers':28} {count_convs(model):>10} {count_convs(merged):>10}")
    print(f"{f'latency, batch 64, {backend} (ms)':28} {ms0:>10.3f} {ms1:>10.3f}")

    # --- NNI's own channel pruner, made usable again: masks -> smaller model with lm_plugin.nni.speedup ---
    pruned = copy.deepcopy(model)
    l1 = L1NormPruner(pruned, [{"op_types": ["Conv2d"], "exclude_op_names": ["0.0"], "sparse_ratio": 0.5}])
    _, l1_masks = l1.compress()
    l1.unwrap_model()
    pruned = speedup(pruned, l1_masks, torch.randn(64, 1, 8, 8))
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"\nL1NormPruner + speedup: {params(model)} -> {params(pruned)} parameters "
          f"(accuracy before fine-tuning {evaluate(pruned, TEST):.2f} %)")
    return {"acc_original": acc0, "acc_merged": acc1, "ms_original": ms0, "ms_merged": ms1,
            "convs_original": count_convs(model), "convs_merged": count_convs(merged)}


if __name__ == "__main__":
    main()
