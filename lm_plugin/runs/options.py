"""Every option of a run in one place: defaults, YAML config files, and their precedence.

Precedence: an option given on the command line > the same key in ``--config FILE.yaml`` > the default.
YAML keys are the long option names with ``_`` or ``-`` (``finetune_epochs`` or ``finetune-epochs``).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..budget import DEFAULT_BUDGET
from .specs import BadInputError

__all__ = ["FINETUNE", "LATENCY", "MODEL", "OUTPUT", "SELECT", "Options", "add_options", "resolve"]

# Option groups, by what they configure (commands and NNI trials take the groups they need).
MODEL = ["model", "checkpoint", "train", "input_shape", "data", "data_root", "normalize", "seed", "cache_dir",
         "progress"]
LATENCY = ["backend", "batch_size", "threads"]
SELECT = ["budget", "importance", "importance_steps", "screen", "val_size", "mode", "max_kernel", "ignored_layers",
          "train_batch_size"]
FINETUNE = ["finetune_epochs", "finetune_lr", "distill_alpha", "rounds", "tradeoff"]
OUTPUT = ["output", "overwrite"]


@dataclass
class Options:
    """Settings of one CLI run (each field is a ``--long-option`` and a YAML key)."""

    model: str | None = None
    checkpoint: str | None = None
    train: bool = False
    input_shape: str | None = None
    data: str | None = None
    data_root: str | None = None
    normalize: str | list | dict | None = None
    budget: str = str(DEFAULT_BUDGET)
    backend: str = "auto"
    batch_size: int = 64
    threads: int | None = None
    importance: str = "distill"
    importance_steps: int | None = None
    screen: str = "auto"
    val_size: int = 2000
    mode: str = "layermerge"
    max_kernel: int = 7
    ignored_layers: list[str] = field(default_factory=list)
    finetune_epochs: str = "auto"
    finetune_lr: float = 0.02
    distill_alpha: float = 0.0
    train_batch_size: int = 128
    rounds: int = 3
    tradeoff: bool | None = None
    seed: int = 0
    plan: str | None = None
    trainable: str | None = None
    output: str | None = None
    overwrite: bool = False
    cache_dir: str | None = None
    progress: bool = True
    json: str | None = None
    chain: bool = False


HELP = {
    "model": "model spec: torchvision:NAME[:k=v,...], timm:NAME[:k=v,...], lm_plugin:NAME, "
             "package.module:factory[:k=v,...] or file.pt",
    "checkpoint": "state dict to load into the model (a .pt file)",
    "train": "for lm_plugin:NAME models: train with the workload recipe first (cached after the first run)",
    "input_shape": "shape of one input without batch, e.g. 3,224,224 (default: the dataset's; imagefolder data is "
                   "resized to it)",
    "data": "data for importance, fine-tuning and accuracy: a dataset name (fashion_mnist, digits), "
            "imagefolder:DIR (DIR/train, DIR/val, optional DIR/test) or package.module:factory[:k=v,...]",
    "data_root": "dataset directory of named datasets (default: $LM_PLUGIN_DATA or ~/.cache/lm_plugin/data)",
    "normalize": "normalisation of imagefolder data: the statistics the model was trained with, MEAN,...:STD,...; "
                 "'data' (computed on the training images) or 'none' (pixels in [0, 1]). Default: what the model "
                 "declares (timm's pretrained_cfg); required for a model that declares none",
    "budget": f"latency budget: a fraction of the original (default {DEFAULT_BUDGET}) or milliseconds (12ms)",
    "backend": "latency backend: auto, cpu, cuda, onnxruntime, tensorrt",
    "batch_size": "batch size of the latency measurements",
    "threads": "CPU threads for latency measurements (default: torch's)",
    "importance": "importance estimator: distill, finetune, local, tail_distill or zero_shot",
    "importance_steps": "training steps per candidate of the training estimators (all but zero_shot); default: "
                        "the estimator's (distill 30, finetune 200, local 40, tail_distill 10)",
    "screen": "search with this cheap estimator first (e.g. tail_distill, with its screening settings) and score "
              "with --importance only the entries the plan needs; auto (default): tail_distill for distill, "
              "nothing for the cheap estimators; none: score the complete table",
    "val_size": "training images on which importance is scored (the test split stays unseen)",
    "mode": "layermerge (default), act_only (2023 depth compression) or layer_only",
    "max_kernel": "largest merged kernel a candidate may have",
    "ignored_layers": "module names never merged or dropped (repeatable)",
    "finetune_epochs": "fine-tuning of the trainable form: auto (default) trains one-epoch cycles with a halving "
                       "peak learning rate until the accuracy on the importance split stops improving (at most 10 "
                       "epochs; the best epoch is kept), or a number of epochs with one schedule (0: none)",
    "finetune_lr": "peak learning rate of fine-tuning (OneCycle)",
    "distill_alpha": "weight of distillation toward the original while fine-tuning (0: none)",
    "train_batch_size": "batch size of training and fine-tuning",
    "rounds": "interleaved rounds of the final side-by-side latency measurement",
    "tradeoff": "draw the DP's latency/accuracy trade-off at 15 budgets in tradeoff.png. Default: only when it is "
                "free (a complete importance table: a few DP solves); with a screened search each budget may score "
                "more importance entries (up to as many as the search), so it needs --tradeoff",
    "seed": "random seed",
    "plan": "plan.json to merge with (merge command)",
    "trainable": "fine-tuned trainable-form state dict, trainable.pt (merge command)",
    "output": "output folder",
    "overwrite": "replace an existing output folder",
    "cache_dir": "table cache directory (default: $LM_PLUGIN_CACHE or ~/.cache/lm_plugin)",
    "progress": "show progress bars",
    "json": "also write the report as JSON to this file (inspect command)",
    "chain": "append the chain's per-conv table (inspect command)",
}


def _type(f: dataclasses.Field) -> Any:
    text = str(f.type)
    if "int" in text and "str" not in text:
        return int
    if "float" in text:
        return float
    return str


def add_options(parser: argparse.ArgumentParser, names: list[str], defaults: dict[str, Any] | None = None) -> None:
    """Add ``--config`` and the given options; unset options stay absent so YAML and defaults can fill them.

    ``defaults``: the command's own defaults (shown in ``--help`` instead of the general ones).
    """
    parser.add_argument("--config", help="YAML file with any of the options below (command line wins)")
    fields = {f.name: f for f in dataclasses.fields(Options)}
    for name in names:
        f, flag = fields[name], "--" + name.replace("_", "-")
        text = HELP[name] + _default(f, (defaults or {}).get(name, f.default))
        if str(f.type).startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif name == "ignored_layers":
            parser.add_argument(flag, action="append", default=argparse.SUPPRESS, metavar="NAME", help=text)
        else:
            parser.add_argument(flag, type=_type(f), default=argparse.SUPPRESS, help=text)


def _default(f: dataclasses.Field, value: Any) -> str:
    """`` (default: X)`` for --help, unless the help text already says what the default is."""
    if value is None or value is dataclasses.MISSING or ("default" in HELP[f.name].lower() and value == f.default):
        return ""
    if isinstance(value, bool):
        return f" (default: {'on' if value else 'off'})"
    return f" (default: {value})"


def resolve(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> Options:
    """Defaults ← command defaults ← YAML config ← explicit command-line options."""
    values: dict[str, Any] = dict(defaults or {})
    given = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func")}
    if getattr(args, "config", None):
        values.update(_load_yaml(Path(args.config)))
    values.update(given)
    try:
        return Options(**values)
    except TypeError as exc:
        raise BadInputError(str(exc)) from None


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BadInputError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BadInputError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"config file {str(path)!r} must be a mapping of option: value")
    known = {f.name for f in dataclasses.fields(Options)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise BadInputError(f"unknown option {key!r} in {str(path)!r}; known options: {', '.join(sorted(known))}")
        out[name] = str(value) if name == "budget" else value
    return out
