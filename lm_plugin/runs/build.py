"""A run described by options: what every entry point (the ``lm-plugin`` commands, NNI trials) validates, loads
and builds from the same :class:`~lm_plugin.runs.options.Options`, in the same order — cheap checks first, the
model and data next, the pruner last — so that bad input is refused before anything expensive.

```python
from lm_plugin.runs import Options, build_run

run = build_run(Options(model="lm_plugin:resnet_fm", train=True, data="fashion_mnist", budget="0.6"))
run.pruner.search()
```
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import data as lm_data
from ..budget import Budget
from ..compress import FinetuneSettings, TradeoffPoint, tradeoff
from ..data import DataError, DataSplits
from ..errors import LayerMergeError
from ..pruner import LayerMergePruner
from ..train import evaluate
from ..workloads.models import trained
from .options import Options
from .specs import BadInputError, DataSpec, import_object, load_model, parse_data_spec, parse_normalize, parse_shape

__all__ = ["DEMO_DEFAULTS", "NEAR_CHANCE", "Run", "build_model", "build_pruner", "build_run", "describe_run",
           "finetune_settings", "frontier", "prepare", "say", "staged_output"]


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
        raise BadInputError(str(exc)) from None


def _check_data(opts: Options, required: bool) -> DataSpec | None:
    """Parse ``--data`` and check what is cheap to check (folder layout, the factory's import) before the model."""
    if opts.data is None:
        if required:
            raise BadInputError("this command needs data for the importance table and fine-tuning: pass --data NAME "
                           f"({', '.join(lm_data.list_datasets())}), --data imagefolder:DIR or "
                           "--data package.module:factory")
        return None
    spec = parse_data_spec(opts.data, lm_data.list_datasets())
    if opts.normalize is not None:
        if spec.kind != "imagefolder":
            raise BadInputError("--normalize applies to --data imagefolder:DIR (named datasets and factories normalise "
                           "their own data); drop it")
        parse_normalize(opts.normalize)
    if spec.kind == "imagefolder":
        if opts.input_shape is None:
            raise BadInputError("--data imagefolder:DIR resizes the images to --input-shape: pass it, e.g. "
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
                raise BadInputError(f"{spec.target} does not take the arguments {spec.kwargs}: {exc}") from None
            splits = lm_data.as_data_splits(returned, val_size=opts.val_size, seed=opts.seed, source=spec.target)
    found = tuple(splits.input_shape)
    if shape is not None and shape != found:
        size = "×".join(map(str, found))
        raise BadInputError(f"--input-shape {','.join(map(str, shape))} does not match {opts.data}, whose inputs are "
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
        raise BadInputError(
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
        raise BadInputError("pass --input-shape (e.g. 3,224,224) or --data so the input shape is known")
    model = build_model(opts)
    splits = _splits(opts, spec, shape, model)
    with _refused():
        if splits is not None:
            lm_data.check_model_fits(model, splits, data_name=opts.data or "the data")
            if opts.checkpoint is not None:
                _check_checkpoint_scores(opts, model, splits)
        else:
            lm_data.output_width(model, shape)  # type: ignore[arg-type]
    return model, _example(opts, splits.input_shape if splits is not None else shape), splits  # type: ignore[arg-type]


def build_model(opts: Options) -> nn.Module:
    """The model ``--model`` (and ``--checkpoint`` or ``--train``) names."""
    if not opts.model:
        raise BadInputError("no model given: pass --model (e.g. torchvision:resnet18:num_classes=10)")
    if opts.train:
        source, _, name = opts.model.partition(":")
        if source != "lm_plugin" or ":" in name:
            raise BadInputError("--train works with registered workload models (lm_plugin:NAME); train other models "
                           "yourself and pass --checkpoint")
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
        raise BadInputError(f"bad --budget {opts.budget!r}: {exc}") from None
    return LayerMergePruner(
        model, budget, example_inputs=example, ignored_layers=opts.ignored_layers, mode=opts.mode,
        max_kernel=opts.max_kernel, backend=opts.backend, batch_size=opts.batch_size, profiler_settings=profiler,
        cache_dir=opts.cache_dir or "default", progress=opts.progress, importance=opts.importance,
        train_data=splits.train if splits else None, eval_data=splits.val if splits else None,
        importance_settings=settings, screen=None if opts.screen in ("none", "off") else opts.screen)


@dataclass
class Run:
    """What a run's options build: the model, an example input batch, the data and the pruner.

    Attributes:
        options: The options it was built from.
        model: The user's model (trained or loaded; never modified by the pruner).
        example: Example inputs at the latency batch size.
        data: The data splits (None for commands that need no data).
        pruner: The configured pruner.
        finetune: The fine-tuning the options ask for.
    """

    options: Options
    model: nn.Module
    example: torch.Tensor
    data: DataSplits | None
    pruner: LayerMergePruner
    finetune: FinetuneSettings


def build_run(opts: Options, *, data_required: bool = True) -> Run:
    """Check, load and build everything ``opts`` describe (:func:`prepare`, then :func:`build_pruner`); bad input
    raises :class:`~lm_plugin.runs.specs.BadInputError` before any table is built."""
    settings = finetune_settings(opts)
    model, example, splits = prepare(opts, data_required)
    return Run(opts, model, example, splits, build_pruner(opts, model, example, splits), settings)


@contextlib.contextmanager
def staged_output(output: str | None, overwrite: bool) -> Iterator[Path]:
    """A fresh staging folder that becomes ``output`` only if the block finishes without an error.

    A failed or interrupted run leaves the previous output (if any) untouched and no half-written folder.
    """
    if not output:
        raise BadInputError("pass --output FOLDER for the results")
    final = Path(output)
    if final.exists() and not (final.is_dir() and not any(final.iterdir())) and not overwrite:
        raise BadInputError(f"output {output!r} already exists; choose another --output or pass --overwrite")
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


def describe_run(opts: Options, splits: DataSplits | None = None) -> dict[str, Any]:
    """What was run, for the report: command line, options, and where importance and accuracy were measured."""
    data = {"accuracy_split": splits.test_name, "data_notes": list(splits.notes)} if splits is not None else {}
    return {"command": shlex.join(["lm-plugin", *sys.argv[1:]]), "model": opts.model, "data": opts.data, **data,
            "options": {k: v for k, v in vars(opts).items() if k not in ("progress",)}}



def finetune_settings(opts: Options) -> FinetuneSettings:
    """The fine-tuning the options describe (``--finetune-epochs auto`` or a number)."""
    epochs: float | str = str(opts.finetune_epochs).strip().lower()
    if epochs != "auto":
        try:
            epochs = float(epochs)
        except ValueError:
            raise BadInputError(f"bad --finetune-epochs {opts.finetune_epochs!r}: give 'auto' or a number of epochs "
                           "(0: no fine-tuning)") from None
    try:
        return FinetuneSettings(epochs=epochs, max_lr=opts.finetune_lr, distill_alpha=opts.distill_alpha,
                                seed=opts.seed)
    except LayerMergeError as exc:
        raise BadInputError(str(exc)) from None


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


def _check_budget(text: str) -> None:
    """Fail fast on a bad budget, before any data is loaded or a folder is made."""
    try:
        Budget.parse(text)
    except (ValueError, TypeError) as exc:
        raise BadInputError(f"bad --budget {text!r}: {exc}") from None
