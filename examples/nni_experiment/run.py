"""The LayerMerge NNI experiment through NNI's Python API (``nni.experiment.Experiment('local')``), then its report.

    python examples/nni_experiment/run.py                 # config.yml: resnet_fm on Fashion-MNIST, 8 trials
    python examples/nni_experiment/run.py --quick         # digits, a tiny model, 3 trials: a few minutes on 2 cores

Both run the experiment config.yml describes (``--quick`` swaps in a small trial command, a 3-point GridSearch and
trialConcurrency 2), on the local training service with the web server on 127.0.0.1 and a free port, wait until
the experiment has finished, stop it, and write the report (trials.md, pareto.json, pareto.png) into ``--output``.
The same config runs with ``nnictl create --config examples/nni_experiment/config.yml``; see
docs/nni-experiments.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from nni.experiment import ExperimentConfig
from nni.experiment.config import AlgorithmConfig

from lm_plugin.data.datasets import digits
from lm_plugin.nni.experiment import ExperimentRun, load_config, run_experiment, trial_command
from lm_plugin.nni.report import ExperimentReport, experiment_report
from lm_plugin.runs import load_model
from lm_plugin.train import evaluate, fit

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "config.yml"

#: The quick mode's model: a residual CNN for 8×8 digits with 5 convs (16 channels), trained for 3 epochs.
QUICK_MODEL = "lm_plugin:digits_resnet:width=16,blocks=2"
#: The quick mode's GridSearch over the budget (fractions of the original's latency).
QUICK_BUDGETS = (0.6, 0.75, 0.9)
#: Trial options of the quick mode: analytic latency (MACs: deterministic, so a busy CI machine cannot make a budget
#: infeasible), 3 distillation steps per importance entry, two epochs of fine-tuning.
QUICK_TRIAL = ["--data", "digits", "--backend", "macs", "--importance", "distill", "--importance-steps", "3",
               "--val-size", "256", "--finetune-epochs", "2", "--rounds", "1"]


def quick_model(folder: str | os.PathLike[str]) -> Path:
    """Train the quick mode's model once (3 epochs on digits, seconds) and return its state dict's path."""
    path = Path(folder) / "quick_model.pt"
    if not path.is_file():
        torch.manual_seed(0)
        model = load_model(QUICK_MODEL)
        fit(model, digits(64, train=True), epochs=3, max_lr=0.1, progress=False)
        print(f"quick model: {evaluate(model, digits(512, train=False)):.2f} % test accuracy", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        torch.save(model.state_dict(), staging)
        staging.replace(path)
    return path


def quick_config(workdir: str | os.PathLike[str], budgets: Sequence[float | str] = QUICK_BUDGETS,
                 concurrency: int = 2) -> ExperimentConfig:
    """config.yml made small: the quick model on digits, a GridSearch over ``budgets``, ``concurrency`` trials.

    Experiments, the model and the table cache go under ``workdir``.
    """
    work = Path(workdir).resolve()
    config = load_config(CONFIG)
    config.experiment_name = "layermerge-quick"
    config.search_space = {"budget": {"_type": "choice", "_value": list(budgets)}}
    config.tuner = AlgorithmConfig(name="GridSearch")
    config.trial_command = trial_command(["--model", QUICK_MODEL, "--checkpoint", str(quick_model(work)),
                                          *QUICK_TRIAL, "--cache-dir", str(work / "cache")])
    config.trial_concurrency = concurrency
    config.max_trial_number = len(budgets)
    config.max_experiment_duration = "20m"
    config.experiment_working_directory = str(work / "experiments")
    return config


def run(config: ExperimentConfig, output: str | os.PathLike[str], *, max_drop: float = 1.0,
        timeout_s: float | None = None) -> tuple[ExperimentRun, ExperimentReport]:
    """Run the experiment to its end, then write its report into ``output``."""
    finished = run_experiment(config, timeout_s=timeout_s)
    return finished, experiment_report(finished.directory, max_drop=max_drop, output=output)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits, a tiny model, 3 trials (tests and CI)")
    parser.add_argument("--config", default=str(CONFIG), help="experiment config (not with --quick)")
    parser.add_argument("--output", help="report folder (default: nni_experiment_report, or nni_quick with --quick)")
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy points the pick may lose")
    parser.add_argument("--timeout", type=float, default=None, help="stop the experiment after this many seconds")
    args = parser.parse_args(argv)
    output = Path(args.output or ("nni_quick" if args.quick else "nni_experiment_report"))
    config = quick_config(output / "work") if args.quick else load_config(args.config)
    finished, report = run(config, output, max_drop=args.max_drop, timeout_s=args.timeout)
    print(report.files["trials.md"].read_text())
    print(f"experiment {finished.id} ({finished.status}) in {finished.directory}; report: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
