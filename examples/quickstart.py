"""End to end on one model, in under a minute on a laptop CPU.

trace -> chain -> a plan -> trainable form -> merged (deploy) form -> exactness and latency check.
Run: python examples/quickstart.py  (this is what `make demo` runs until the full demo lands)
"""

from __future__ import annotations

import torch

from lm_plugin import LayerMergePruner, Plan
from lm_plugin.workloads.models import resnet_fm


def main() -> None:
    torch.manual_seed(0)
    model = resnet_fm().eval()  # the reference workload's ResNet (random init here)
    x = torch.randn(64, 1, 28, 28)
    pruner = LayerMergePruner(model, budget=0.6, example_inputs=x, backend="cpu",
                              profiler_settings={"warmup": 5, "repeats": 15})
    print(pruner.chain.summary(), end="\n\n")

    plan = Plan.sample(pruner.chain, rng=3, p_merge=0.7, p_drop=0.5)
    print(plan.summary(pruner.chain), end="\n\n")

    trainable = pruner.apply(plan)  # fine-tune this one
    merged = pruner.merge(trainable.eval())  # one conv per block, BN folded

    # Exactness: the deploy form computes what the trainable form computes (float64 to see rounding only).
    x64 = x.double()
    with torch.no_grad():
        ref, out = trainable.double()(x64), pruner.merge(trainable)(x64)
    err = ((ref - out).norm() / ref.norm()).item()

    original_ms = pruner.measure_latency(model)
    merged_ms = pruner.measure_latency(merged)
    predicted_ms = pruner.predict_latency(plan)
    convs = lambda m: sum(isinstance(mod, torch.nn.Conv2d) for mod in m.modules())  # noqa: E731
    rows = [
        ("conv layers", f"{convs(model)}", f"{convs(merged)}"),
        ("latency, batch 64, CPU (ms)", f"{original_ms:.2f}", f"{merged_ms:.2f}"),
        ("predicted latency (ms)", f"{pruner.latency_model().original_ms:.2f}", f"{predicted_ms:.2f}"),
        ("merged vs trainable, rel. error (fp64)", "", f"{err:.1e}"),
    ]
    print(f"{'':40} {'original':>10} {'merged':>10}")
    for name, a, b in rows:
        print(f"{name:40} {a:>10} {b:>10}")
    print(f"\nmeasured speed-up: {original_ms / merged_ms:.2f}x "
          "(random plan; `pruner.search()` picks the best plan for a budget once issue #4 lands)")


if __name__ == "__main__":
    main()
