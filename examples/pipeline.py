"""Compose compressions with ``lm_plugin.pipeline``: LayerMerge → torch-pruning channel pruning → int8, and reversed.

A small residual CNN is trained on scikit-learn's digits, then compressed twice:

1. LayerMerge (depth) → torch-pruning channel pruning (``MetaPruner`` + ``GroupMagnitudeImportance(p=1)``) →
   PyTorch int8 post-training quantisation (FX graph mode, x86 kernels). Directly after LayerMerge the
   channel-pruning stage prunes LayerMerge's trainable form (BatchNorm kept), fine-tunes it and merges it;
2. the reverse order of the first two: channel pruning → LayerMerge → int8.

After every stage the pipeline checks the model and records test accuracy, CPU latency measured side by side
with the original, MACs, parameters and size. Both tables are printed.

Run: python examples/pipeline.py [--quick] [--json results.json]   (about a minute on one CPU core)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from typing import Any

import torch

from lm_plugin.data.datasets import digits
from lm_plugin.pipeline import PipelineResult, run_pipeline
from lm_plugin.train import fit
from lm_plugin.workloads.models import digits_resnet


def main(quick: bool = False, json_path: str | None = None) -> dict[str, PipelineResult]:
    torch.manual_seed(0)
    train, test = digits(64, train=True), digits(256, train=False)
    model = digits_resnet(width=16 if quick else 32)
    fit(model, train, epochs=3 if quick else 8, max_lr=0.1, seed=0, progress=False)
    model.eval()

    layermerge: dict[str, Any] = {
        "budget": 0.8,
        "importance_settings": {"steps": 3 if quick else 10},
        "epochs": 1 if quick else 2,
        "clip_budget": True,  # on a noisy machine 0.8 may be out of reach: then take the fastest reachable plan
    }
    # The same channel-pruning settings in both orders: right after LayerMerge the stage prunes LayerMerge's
    # trainable form (BatchNorm still there) and merges it again, so the ordinary fine-tuning recipe works.
    prune = {"macs_ratio": 0.7, "epochs": 1 if quick else 2, "max_lr": 0.02}
    common: dict[str, Any] = {
        "example_inputs": torch.randn(64, 1, 8, 8),  # latency is measured at batch 64
        "train_data": train,
        "test_data": test,
        "rounds": 1 if quick else 3,
        # short timings without retries: the side-by-side ratio is what the table reports
        "profiler_settings": {"warmup": 2 if quick else 3, "repeats": 5 if quick else 10, "max_spread": 1e9},
        "cache_dir": tempfile.mkdtemp(prefix="lm_plugin-"),
    }
    orders = {
        "LayerMerge -> channel pruning -> int8": [
            ("layermerge", layermerge), ("channel_prune_tp", prune), "quantize_torch"],
        "channel pruning -> LayerMerge -> int8": [
            ("channel_prune_tp", prune), ("layermerge", layermerge), "quantize_torch"],
    }
    results = {}
    for title, stages in orders.items():
        result = run_pipeline(model, stages, **common)
        print(f"\n== {title}\n{result.table()}")
        results[title] = result
    if json_path:
        with open(json_path, "w") as f:
            json.dump({title: r.to_dict() for title, r in results.items()}, f, indent=2)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and shorter runs (for tests)")
    parser.add_argument("--json", help="also write both results as JSON to this file")
    args = parser.parse_args()
    main(args.quick, args.json)
