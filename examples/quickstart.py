"""LayerMerge end to end on real data, in about a minute on a laptop CPU.

A small residual CNN is trained on scikit-learn's digits; LayerMerge builds the latency table (CPU) and the
importance table (few-step distillation), the DP picks the best plan for 60 % of the original latency, the
trainable form is fine-tuned, merged, checked for exactness, and compared with the original.

Run: python examples/quickstart.py   (what `make demo` runs until the full Fashion-MNIST demo lands)
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn as nn

from lm_plugin import LayerMergePruner
from lm_plugin.data.datasets import digits
from lm_plugin.train import evaluate, fit
from lm_plugin.workloads.models import digits_resnet


def main() -> None:
    torch.manual_seed(0)
    train, test = digits(64, train=True), digits(256, train=False)
    model = digits_resnet()
    fit(model, train, epochs=10, max_lr=0.1, seed=0, progress=False)
    model.eval()

    pruner = LayerMergePruner(
        model, budget=0.6, example_inputs=torch.randn(64, 1, 8, 8), backend="cpu",
        importance="distill", train_data=train, eval_data=test, importance_settings={"steps": 20},
        cache_dir=tempfile.mkdtemp(prefix="lm_plugin-"),
    )
    print(pruner.chain.summary(), end="\n\n")
    plan = pruner.search().plan
    print(plan.summary(pruner.chain), end="\n\n")

    trainable = pruner.apply(plan)
    fit(trainable, train, epochs=3, max_lr=0.02, teacher=model, distill_alpha=0.5, seed=0, progress=False)
    merged = pruner.merge(trainable.eval())

    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        err = ((trainable.double()(x) - pruner.merge(trainable)(x)).norm() / trainable(x).norm()).item()
    trainable.float()

    acc0, acc1 = evaluate(model, test), evaluate(merged, test)
    # The fair baseline is the uncompressed network with its BNs folded, as it would be deployed.
    ms0, ms1 = pruner.measure_latency(pruner.baseline()), pruner.measure_latency(merged)
    convs = lambda m: sum(isinstance(mod, nn.Conv2d) for mod in m.modules())  # noqa: E731
    print(f"{'':34} {'original':>10} {'merged':>10}")
    print(f"{'test accuracy (%)':34} {acc0:>10.2f} {acc1:>10.2f}")
    print(f"{'conv layers':34} {convs(model):>10} {convs(merged):>10}")
    print(f"{'latency, batch 64, CPU (ms)':34} {ms0:>10.3f} {ms1:>10.3f}")
    print(f"{'predicted latency (ms)':34} {pruner.latency_model().original_ms:>10.3f} "
          f"{pruner.predict_latency(plan):>10.3f}")
    print(f"{'merged vs trainable (fp64 rel err)':34} {'':>10} {err:>10.1e}")
    print(f"\nmeasured speed-up {ms0 / ms1:.2f}x at budget {pruner.budget} "
          f"(accuracy change {acc1 - acc0:+.2f} %p)")


if __name__ == "__main__":
    main()
