"""The ``lm-plugin`` command line (also ``python -m lm_plugin``): compress, profile, solve, merge, demo, inspect,
nni-report.

Exit status: 0 on success, 2 on bad input (the message says what to fix), 1 on any other failure. Every
command that writes results stages them and publishes the output folder only when it is complete.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence

from ..data.datasets import DataUnavailableError
from ..errors import LayerMergeError
from ..runs import (
    DEMO_DEFAULTS,
    FINETUNE,
    LATENCY,
    MODEL,
    OUTPUT,
    SELECT,
    BadInputError,
    Options,
    add_options,
    resolve,
    say,
)
from ..solve import InfeasibleBudgetError
from .commands import run_compress, run_inspect, run_merge, run_profile, run_solve

__all__ = ["COMMANDS", "build_parser", "main"]

# name -> (help, options, runner, command defaults)
COMMANDS: dict[str, tuple[str, list[str], Callable[[Options], int], dict]] = {
    "compress": ("search, fine-tune, merge, check and measure; write report, plan and models",
                 MODEL + LATENCY + SELECT + FINETUNE + OUTPUT, run_compress, {}),
    "profile": ("build the latency table only", MODEL + LATENCY + ["mode", "max_kernel", "ignored_layers"] + OUTPUT,
                run_profile, {}),
    "solve": ("build the tables and write the plan for a budget (no fine-tuning)", MODEL + LATENCY + SELECT + OUTPUT,
              run_solve, {}),
    "merge": ("turn a fine-tuned trainable form into the deploy form (TorchScript + ONNX)",
              MODEL + LATENCY + ["plan", "trainable", "ignored_layers"] + OUTPUT, run_merge, {}),
    "demo": ("the offline demo: resnet_fm on Fashion-MNIST, end to end, with a report",
             MODEL + LATENCY + SELECT + FINETUNE + OUTPUT, run_compress, DEMO_DEFAULTS),
    "inspect": ("report what LayerMerge can compress in a model: chain, removable activations, breaks",
                ["model", "checkpoint", "input_shape", "seed", "mode", "max_kernel", "ignored_layers", "json",
                 "chain"], run_inspect, {"batch_size": 1}),
}


def _inspect_arguments(cmd: argparse.ArgumentParser) -> None:
    """``lm-plugin inspect MODEL_SPEC --input-shape C,H,W [--batch N] [--json PATH] [--chain]``."""
    cmd.add_argument("model", nargs="?", default=argparse.SUPPRESS, metavar="MODEL_SPEC",
                     help="the model spec (same forms as --model)")
    cmd.add_argument("--batch", dest="batch_size", type=int, default=argparse.SUPPRESS, metavar="N",
                     help="batch size of the example input (default 1)")


#: Command-specific arguments beyond the shared options.
EXTRA_ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"inspect": _inspect_arguments}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    parser = argparse.ArgumentParser(prog="lm-plugin", description="LayerMerge depth compression.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, options, runner, defaults) in COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=text)
        add_options(cmd, options, defaults)
        if name in EXTRA_ARGUMENTS:
            EXTRA_ARGUMENTS[name](cmd)
        cmd.set_defaults(func=runner)
    # Delegated whole to lm_plugin.nni.report (which parses its own arguments): listed here for --help.
    sub.add_parser("nni-report", add_help=False, help="report a finished NNI experiment of LayerMerge trials: "
                   "all trials, the Pareto front, the fastest within --max-drop (needs the nni extra)")
    return parser


def _one_line(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    """Warnings on the terminal as one readable line each (no Python source lines: users did not write them)."""
    return f"[lm-plugin] warning ({category.__name__}): {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _one_line  # type: ignore[assignment]
    if argv[:1] == ["nni-report"]:
        from ..nni.report import main as nni_report  # imports NNI: only for this command

        return nni_report(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        opts = resolve(args, COMMANDS[args.command][3])
        return args.func(opts)
    except (BadInputError, InfeasibleBudgetError, DataUnavailableError) as exc:
        say(f"error: {exc}")
        return 2
    except LayerMergeError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted; caches keep what was measured, the next run resumes")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
