"""What each CLI command does, on top of the library (no logic here that Python users cannot call)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import data as lm_data
from ..budget import Budget
from ..compress import FinetuneSettings, TradeoffPoint, compress, tradeoff
from ..data import DataError, DataSplits
from ..errors import LayerMergeError
from ..export import export_onnx, export_torchscript, onnx_error
from ..inspect import inspect_model
from ..merge import check_error
from ..plan import Plan
from ..pruner import LayerMergePruner
from ..report import plot_plan, write_run
from ..train import evaluate
from .options import Options
from .specs import CLIError, DataSpec, import_object, load_model, parse_data_spec, parse_normalize, parse_shape

__all__ = ["DEMO_DEFAULTS", "build_pruner", "finetune_settings", "frontier", "prepare", "run_compress",
           "run_inspect", "run_merge", "run_profile", "run_solve"]

#: What ``lm-plugin demo`` runs unless told otherwise: the reference workload, offline, searched on the runtime
#: ``auto`` picks (ONNX Runtime on a CPU-only machine where it is installed).
DEMO_DEFAULTS: dict[str, Any] = {
    "model": "lm_plugin:resnet_fm",
    "train": True,
    "data": "fashion_mnist",
    "backend": "auto",
    "importance": "distill",
    "importance_steps": 5,
    "val_size": 1000,
    "output": "lm_plugin_demo",
    "overwrite": True,
}


def say(message: str) -> None:
    """Progress line on stderr (stdout is kept for the final summary)."""
    print(f"[lm-plugin] {message}", file=sys.stderr, flush=True)


FACTORY_HELP = "--data package.module:factory[:key=value,...] names a function that returns the loaders"


# ------------------------------------------------------------------------------------------ building blocks
@contextlib.contextmanager
def _refused() -> Iterator[None]:
    """The library's data errors are bad input to the CLI: exit status 2 with the library's advice."""
    try:
        yield
    except DataError as exc:
        raise CLIError(str(exc)) from None


def _check_data(opts: Options, required: bool) -> DataSpec | None:
    """Parse ``--data`` and check what is cheap to check (folder layout, the factory's import) before the model."""
    if opts.data is None:
        if required:
            raise CLIError("this command needs data for the importance table and fine-tuning: pass --data NAME "
                           f"({', '.join(lm_data.list_datasets())}), --data imagefolder:DIR or "
                           "--data package.module:factory")
        return None
    spec = parse_data_spec(opts.data, lm_data.list_datasets())
    if opts.normalize is not None:
        if spec.kind != "imagefolder":
            raise CLIError("--normalize applies to --data imagefolder:DIR (named datasets and factories normalise "
                           "their own data); drop it")
        parse_normalize(opts.normalize)
    if spec.kind == "imagefolder":
        if opts.input_shape is None:
            raise CLIError("--data imagefolder:DIR resizes the images to --input-shape: pass it, e.g. "
                           "--input-shape 3,224,224 (RGB) or 1,28,28 (grayscale)")
        with _refused():
            lm_data.check_image_folder(spec.target)
    elif spec.kind == "factory":
        import_object(*spec.target.split(":"), what=FACTORY_HELP)
    return spec


def _splits(opts: Options, spec: DataSpec | None, shape: tuple[int, ...] | None,
            model: nn.Module | None = None) -> DataSplits | None:
    """Load the data a spec names; an ``--input-shape`` must match it."""
    if spec is None:
        return None
    say(f"loading {opts.data}")
    with _refused():
        if spec.kind == "name":
            splits = lm_data.data_splits(spec.target, opts.data_root, batch_size=opts.train_batch_size,
                                         val_size=opts.val_size, seed=opts.seed)
        elif spec.kind == "imagefolder":
            assert shape is not None  # _check_data made sure
            normalize = parse_normalize(opts.normalize) if opts.normalize is not None else None
            splits = lm_data.image_folder(spec.target, shape, normalize=normalize, model=model,
                                          batch_size=opts.train_batch_size, val_size=opts.val_size, seed=opts.seed)
        else:
            module, name = spec.target.split(":")
            factory = import_object(module, name, FACTORY_HELP)
            try:
                returned = factory(**spec.kwargs)
            except TypeError as exc:
                raise CLIError(f"{spec.target} does not take the arguments {spec.kwargs}: {exc}") from None
            splits = lm_data.as_data_splits(returned, val_size=opts.val_size, seed=opts.seed, source=spec.target)
    found = tuple(splits.input_shape)
    if shape is not None and shape != found:
        size = "×".join(map(str, found))
        raise CLIError(f"--input-shape {','.join(map(str, shape))} does not match {opts.data}, whose inputs are "
                       f"{size}: drop --input-shape (the data's shape is used) or pass --input-shape "
                       f"{','.join(map(str, found))}")
    for note in splits.notes:
        say(note)
    return splits


#: A trained checkpoint scoring within this fraction of the way from chance to 100 % on the importance split stops
#: the run (10 classes: below 19 %; 2 classes: below 55 %).
NEAR_CHANCE = 0.1


def _check_checkpoint_scores(opts: Options, model: nn.Module, splits: DataSplits) -> None:
    """Evaluate the user's trained model on the importance split before any table: near chance, the data is not
    what it was trained on (normalisation, class order, input size) and compressing it would optimise noise."""
    accuracy = evaluate(model, splits.val)
    chance = 100.0 / splits.num_classes if splits.num_classes else None
    say(f"the checkpoint scores {accuracy:.2f} % on the importance split"
        + (f" (chance {chance:.1f} %)" if chance else ""))
    if chance is not None and accuracy < chance + NEAR_CHANCE * (100.0 - chance):
        raise CLIError(
            f"the checkpoint scores {accuracy:.2f} % on {opts.data}, near chance ({chance:.1f} %): the data is not "
            "what the model was trained on. Likely causes: the normalisation (pass the statistics you trained "
            "with, --normalize MEAN,...:STD,...), the class order (ImageFolder sorts class folders by name), or "
            "the input size (--input-shape). Nothing was compressed.")


def prepare(opts: Options, data_required: bool) -> tuple[nn.Module, torch.Tensor, DataSplits | None]:
    """Validate the cheap things first (budget, data spec and layout, shape), then build the model, load the data,
    and check that the model runs on the data's shape with a head as wide as its classes — all before tracing."""
    _check_budget(opts.budget)
    spec = _check_data(opts, data_required)
    shape = parse_shape(opts.input_shape) if opts.input_shape is not None else None
    if shape is None and spec is None:
        raise CLIError("pass --input-shape (e.g. 3,224,224) or --data so the input shape is known")
    model = _model(opts)
    splits = _splits(opts, spec, shape, model)
    with _refused():
        if splits is not None:
            lm_data.check_model_fits(model, splits, data_name=opts.data or "the data")
            if opts.checkpoint is not None:
                _check_checkpoint_scores(opts, model, splits)
        else:
            lm_data.output_width(model, shape)  # type: ignore[arg-type]
    return model, _example(opts, splits.input_shape if splits is not None else shape), splits  # type: ignore[arg-type]


def _model(opts: Options) -> nn.Module:
    if not opts.model:
        raise CLIError("no model given: pass --model (e.g. torchvision:resnet18:num_classes=10)")
    if opts.train:
        source, _, name = opts.model.partition(":")
        if source != "lm_plugin" or ":" in name:
            raise CLIError("--train works with registered workload models (lm_plugin:NAME); train other models "
                           "yourself and pass --checkpoint")
        from ..workloads.models import trained

        say(f"training {name} with the workload recipe (cached after the first run)")
        model = trained(name, data_root=opts.data_root, seed=opts.seed, progress=opts.progress)
        return model.eval()
    return load_model(opts.model, opts.checkpoint)


def _example(opts: Options, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(opts.batch_size, *shape, generator=torch.Generator().manual_seed(opts.seed))


def build_pruner(opts: Options, model: nn.Module, example: torch.Tensor,
                 splits: DataSplits | None) -> LayerMergePruner:
    """The pruner the options describe, for ``model`` on ``example`` inputs (what every command and NNI trial
    compresses with)."""
    settings = {"steps": opts.importance_steps} if opts.importance_steps is not None and opts.importance != \
        "zero_shot" else {}
    profiler = {"threads": opts.threads} if opts.threads is not None else {}
    try:
        budget = Budget.parse(opts.budget)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"bad --budget {opts.budget!r}: {exc}") from None
    return LayerMergePruner(
        model, budget, example_inputs=example, ignored_layers=opts.ignored_layers, mode=opts.mode,
        max_kernel=opts.max_kernel, backend=opts.backend, batch_size=opts.batch_size, profiler_settings=profiler,
        cache_dir=opts.cache_dir or "default", progress=opts.progress, importance=opts.importance,
        train_data=splits.train if splits else None, eval_data=splits.val if splits else None,
        importance_settings=settings, screen=None if opts.screen in ("none", "off") else opts.screen)


@contextlib.contextmanager
def staged_output(output: str | None, overwrite: bool) -> Iterator[Path]:
    """A fresh staging folder that becomes ``output`` only if the block finishes without an error.

    A failed or interrupted run leaves the previous output (if any) untouched and no half-written folder.
    """
    if not output:
        raise CLIError("pass --output FOLDER for the results")
    final = Path(output)
    if final.exists() and not (final.is_dir() and not any(final.iterdir())) and not overwrite:
        raise CLIError(f"output {output!r} already exists; choose another --output or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    staging.replace(final)


def _context(opts: Options, splits: DataSplits | None = None) -> dict[str, Any]:
    """What was run, for the report: command line, options, and where importance and accuracy were measured."""
    data = {"accuracy_split": splits.test_name, "data_notes": list(splits.notes)} if splits is not None else {}
    return {"command": shlex.join(["lm-plugin", *sys.argv[1:]]), "model": opts.model, "data": opts.data, **data,
            "options": {k: v for k, v in vars(opts).items() if k not in ("progress",)}}


# ------------------------------------------------------------------------------------------------ commands
def finetune_settings(opts: Options) -> FinetuneSettings:
    """The fine-tuning the options describe (``--finetune-epochs auto`` or a number)."""
    epochs: float | str = str(opts.finetune_epochs).strip().lower()
    if epochs != "auto":
        try:
            epochs = float(epochs)
        except ValueError:
            raise CLIError(f"bad --finetune-epochs {opts.finetune_epochs!r}: give 'auto' or a number of epochs "
                           "(0: no fine-tuning)") from None
    try:
        return FinetuneSettings(epochs=epochs, max_lr=opts.finetune_lr, distill_alpha=opts.distill_alpha,
                                seed=opts.seed)
    except LayerMergeError as exc:
        raise CLIError(str(exc)) from None


def frontier(opts: Options, pruner: LayerMergePruner, seconds: dict[str, float]) -> list[TradeoffPoint]:
    """The trade-off sweep when asked (``--tradeoff``) or free (a complete importance table); its time is recorded
    in ``seconds["tradeoff"]``."""
    wanted = opts.tradeoff if opts.tradeoff is not None else pruner.screen is None
    if not wanted:
        say("no trade-off sweep (with a screened search it scores more entries; pass --tradeoff for it)")
        return []
    start = time.perf_counter()
    say("solving at 15 budgets for the trade-off plot")
    points = tradeoff(pruner)
    seconds["tradeoff"] = time.perf_counter() - start
    return points


def run_compress(opts: Options) -> int:
    """Search, fine-tune, merge, verify, measure, and write the output folder."""
    with staged_output(opts.output, opts.overwrite) as folder:
        start = time.perf_counter()
        settings = finetune_settings(opts)
        model, example, splits = prepare(opts, data_required=True)
        assert splits is not None
        pruner = build_pruner(opts, model, example, splits)
        say(f"chain: {pruner.chain.length} convs, {len(pruner.candidates)} candidate blocks")
        prepared = time.perf_counter() - start
        result = compress(pruner, train_data=splits.train, test_data=splits.test, finetune=settings,
                          rounds=opts.rounds, progress=opts.progress, log=say)
        result.seconds = {"prepare": prepared, **result.seconds}
        points = frontier(opts, pruner, result.seconds)
        say("writing the report and exporting the models")
        write_run(folder, result, pruner, frontier=points, context=_context(opts, splits))
    print(result.summary(splits.test_name))
    if splits.test_name != "test":
        print(f"\nnote: the accuracy above is measured on the {splits.test_name} split ({opts.data} has no test "
              "split; importance was scored on other images, see the report)")
    print(f"\nreport: {Path(opts.output) / 'report.md'}")
    return 0


def run_profile(opts: Options) -> int:
    """Build (or load) the latency table and write it as ``latency.json``."""
    with staged_output(opts.output, opts.overwrite) as folder:
        model, example, _ = prepare(opts, data_required=False)
        pruner = build_pruner(opts, model, example, None)
        lat = pruner.latency_model()
        entries = [{"key": list(key), "ms": ms} for key, ms in sorted(lat.block_ms.items(), key=str)]
        skips = [{"residual_target": t, "ms": ms} for t, ms in sorted(lat.skip_ms.items())]
        report = {"context": _context(opts), "profiler": pruner.profiler.signature(), "original_ms": lat.original_ms,
                  "outside_chain_ms": lat.rest_ms, "scale": lat.scale, "entries": entries, "projection_skips": skips,
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
        model, example, splits = prepare(opts, data_required=True)
        pruner = build_pruner(opts, model, example, splits)
        found = pruner.search()
        plan, predicted, objective = found.plan, found.predicted_ms, found.objective
        points = frontier(opts, pruner, {})
        plan.to_json(str(folder / "plan.json"))
        plot_plan(pruner.chain, plan, folder / "plan.png", title=f"plan at budget {pruner.budget}")
        report = {"context": _context(opts, splits), "budget": str(pruner.budget), "budget_ms": pruner.budget_ms(),
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
        raise CLIError("pass --plan PLAN.json (written by `lm-plugin solve` or `compress`)")
    if not opts.trainable or not Path(opts.trainable).is_file():
        raise CLIError("pass --trainable TRAINABLE.pt (the fine-tuned trainable form's state dict)")
    with staged_output(opts.output, opts.overwrite) as folder:
        model, example, _ = prepare(opts, data_required=False)
        pruner = build_pruner(opts, model, example, None)
        plan = Plan.from_json(opts.plan)
        trainable = pruner.apply(plan)
        state = torch.load(opts.trainable, map_location="cpu", weights_only=True)
        try:
            trainable.load_state_dict(state)
        except RuntimeError as exc:
            raise CLIError(f"{opts.trainable!r} is not the trainable form of this plan and model: {exc}") from None
        merged = pruner.merge(trainable.eval())  # checks itself in float64
        error = check_error(merged)
        export_torchscript(merged, example[:1], folder / "model.ts")
        export_onnx(merged, example[:1], folder / "model.onnx")
        report = {"context": _context(opts), "plan": plan.to_dict(), "merge_error": error,
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
        raise CLIError("pass --input-shape C,H,W (the shape of one input without the batch), e.g. 3,224,224")
    shape = parse_shape(opts.input_shape)
    if opts.batch_size < 1:
        raise CLIError(f"bad --batch {opts.batch_size}: give a positive batch size")
    model = _model(opts)
    example = torch.randn(opts.batch_size, *shape, generator=torch.Generator().manual_seed(opts.seed))
    say(f"tracing {opts.model} at {opts.batch_size}x{'x'.join(map(str, shape))}")
    report = inspect_model(model, example, ignored_layers=opts.ignored_layers, max_kernel=opts.max_kernel,
                           mode=opts.mode)
    if opts.json:
        path = Path(opts.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
        staging.write_text(json.dumps({"context": _context(opts), **report.to_dict()}, indent=1, default=str))
        staging.replace(path)
    print(report.summary(chain=opts.chain))
    if opts.json:
        print(f"\nreport: {opts.json}")
    return 0


def _check_budget(text: str) -> None:
    """Fail fast on a bad budget, before any data is loaded or a folder is made."""
    try:
        Budget.parse(text)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"bad --budget {text!r}: {exc}") from None
