"""What each CLI command does, on top of the library (no logic here that Python users cannot call)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..compress import compress
from ..export import export_onnx, export_torchscript, onnx_error
from ..inspect import inspect_model
from ..merge import check_error
from ..plan import Plan
from ..report import plot_plan, write_run
from ..runs import (
    BadInputError,
    Options,
    build_model,
    build_run,
    describe_run,
    frontier,
    parse_shape,
    say,
    staged_output,
)

__all__ = ["run_compress", "run_inspect", "run_merge", "run_profile", "run_solve"]


# ------------------------------------------------------------------------------------------------ commands
def run_compress(opts: Options) -> int:
    """Search, fine-tune, merge, verify, measure, and write the output folder."""
    with staged_output(opts.output, opts.overwrite) as folder:
        start = time.perf_counter()
        run = build_run(opts)
        pruner, splits = run.pruner, run.data
        assert splits is not None
        say(f"chain: {pruner.chain.length} convs, {len(pruner.candidates)} candidate blocks")
        prepared = time.perf_counter() - start
        result = compress(pruner, train_data=splits.train, test_data=splits.test, finetune=run.finetune,
                          rounds=opts.rounds, progress=opts.progress, log=say)
        result.seconds = {"prepare": prepared, **result.seconds}
        points = frontier(opts, pruner, result.seconds)
        say("writing the report and exporting the models")
        write_run(folder, result, pruner, frontier=points, context=describe_run(opts, splits))
    print(result.summary(splits.test_name))
    if splits.test_name != "test":
        print(f"\nnote: the accuracy above is measured on the {splits.test_name} split ({opts.data} has no test "
              "split; importance was scored on other images, see the report)")
    print(f"\nreport: {Path(opts.output) / 'report.md'}")
    return 0


def run_profile(opts: Options) -> int:
    """Build (or load) the latency table and write it as ``latency.json``."""
    with staged_output(opts.output, opts.overwrite) as folder:
        pruner = build_run(opts, data_required=False).pruner
        lat = pruner.latency_model()
        entries = [{"key": list(key), "ms": ms} for key, ms in sorted(lat.block_ms.items(), key=str)]
        skips = [{"residual_target": t, "ms": ms} for t, ms in sorted(lat.skip_ms.items())]
        report = {"context": describe_run(opts), "profiler": pruner.profiler.signature(),
                  "original_ms": lat.original_ms, "outside_chain_ms": lat.rest_ms, "scale": lat.scale,
                  "entries": entries, "projection_skips": skips,
                  "latency_check": lat.check.to_dict() if lat.check is not None else None}
        (folder / "latency.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"{len(entries)} latency entries; original {lat.original_ms:.3f} ms, outside the chain "
          f"{lat.rest_ms:.3f} ms ({pruner.profiler.signature()['backend']}, batch {opts.batch_size})")
    if lat.check is not None:
        print(lat.check.summary())
    print(f"table: {Path(opts.output) / 'latency.json'}")
    return 0


def run_solve(opts: Options) -> int:
    """Build (or load) both tables, solve at the budget, write ``plan.json`` and the predicted trade-off."""
    with staged_output(opts.output, opts.overwrite) as folder:
        run = build_run(opts)
        pruner, splits = run.pruner, run.data
        found = pruner.search()
        plan, predicted, objective = found.plan, found.predicted_ms, found.objective
        points = frontier(opts, pruner, {})
        plan.to_json(str(folder / "plan.json"))
        plot_plan(pruner.chain, plan, folder / "plan.png", title=f"plan at budget {pruner.budget}")
        report = {"context": describe_run(opts, splits), "budget": str(pruner.budget), "budget_ms": pruner.budget_ms(),
                  "predicted_ms": {"original": pruner.latency_model().original_ms, "compressed": predicted},
                  "estimated_accuracy_change": objective, "plan": plan.to_dict(),
                  "plan_summary": plan.summary(pruner.chain), "frontier": [vars(p) for p in points]}
        screen = pruner.screen_summary(found)
        if screen:
            report["screen"] = screen
        (folder / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(plan.summary(pruner.chain))
    print(f"\npredicted {predicted:.3f} ms vs original {report['predicted_ms']['original']:.3f} ms; estimated "
          f"accuracy change before fine-tuning {objective:+.2f} %p\nplan: {Path(opts.output) / 'plan.json'}")
    if found.scored_entries is not None:
        print(f"screened search: {found.scored_entries} of {found.table_entries} entries scored with "
              f"{pruner.estimator.name}")
    return 0


def run_merge(opts: Options) -> int:
    """Merge a fine-tuned trainable form (``--plan`` + ``--trainable``) into the deploy form and export it."""
    if not opts.plan or not Path(opts.plan).is_file():
        raise BadInputError("pass --plan PLAN.json (written by `lm-plugin solve` or `compress`)")
    if not opts.trainable or not Path(opts.trainable).is_file():
        raise BadInputError("pass --trainable TRAINABLE.pt (the fine-tuned trainable form's state dict)")
    with staged_output(opts.output, opts.overwrite) as folder:
        run = build_run(opts, data_required=False)
        pruner, example = run.pruner, run.example
        plan = Plan.from_json(opts.plan)
        trainable = pruner.apply(plan)
        state = torch.load(opts.trainable, map_location="cpu", weights_only=True)
        try:
            trainable.load_state_dict(state)
        except RuntimeError as exc:
            raise BadInputError(f"{opts.trainable!r} is not the trainable form of this plan and model: {exc}") from None
        merged = pruner.merge(trainable.eval())  # checks itself in float64
        error = check_error(merged)
        export_torchscript(merged, example[:1], folder / "model.ts")
        export_onnx(merged, example[:1], folder / "model.onnx")
        report = {"context": describe_run(opts), "plan": plan.to_dict(), "merge_error": error,
                  "onnx_error": onnx_error(folder / "model.onnx", merged, example[:4])}
        (folder / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"merged {pruner.chain.length} convs into {len(plan.blocks())}; float64 merge error {error:.1e}\n"
          f"models: {Path(opts.output) / 'model.ts'}, {Path(opts.output) / 'model.onnx'}")
    return 0


def run_inspect(opts: Options) -> int:
    """Trace the model and report what LayerMerge can compress (no tables, no output folder).

    Exit status 0 whenever a report is printed, also for a model the library refuses (the report says why).
    """
    if opts.input_shape is None:
        raise BadInputError("pass --input-shape C,H,W (the shape of one input without the batch), e.g. 3,224,224")
    shape = parse_shape(opts.input_shape)
    if opts.batch_size < 1:
        raise BadInputError(f"bad --batch {opts.batch_size}: give a positive batch size")
    model = build_model(opts)
    example = torch.randn(opts.batch_size, *shape, generator=torch.Generator().manual_seed(opts.seed))
    say(f"tracing {opts.model} at {opts.batch_size}x{'x'.join(map(str, shape))}")
    report = inspect_model(model, example, ignored_layers=opts.ignored_layers, max_kernel=opts.max_kernel,
                           mode=opts.mode)
    if opts.json:
        path = Path(opts.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
        staging.write_text(json.dumps({"context": describe_run(opts), **report.to_dict()}, indent=1, default=str))
        staging.replace(path)
    print(report.summary(chain=opts.chain))
    if opts.json:
        print(f"\nreport: {opts.json}")
    return 0
