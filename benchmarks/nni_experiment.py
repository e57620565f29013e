"""An 8-trial NNI experiment on the reference workload's ``resnet_fm``: budgets chosen by NNI's tuner, the front.

Runs examples/nni_experiment/config.yml through NNI's Python API (local training service, web server on
127.0.0.1, one trial at a time: trials time latency on the CPU), with ``maxTrialNumber`` set by ``--trials``. Each
trial is ``python -m lm_plugin.nni.trial`` on ``resnet_fm`` trained with the workload recipe (trained here first,
once, so no trial trains while another measures): one budget from the Random tuner's ``quniform(0.4, 0.9, 0.05)``
→ ``distill`` importance (5 steps per entry, 1,000 training images) → DP → 1 epoch of fine-tuning (max lr 0.02) →
merge → side-by-side CPU timing (3 rounds, batch 64) → test accuracy. The first trial builds the latency and
importance tables, the others load them.

    python benchmarks/nni_experiment.py                       # 8 trials: about an hour on 2 CPU cores
    taskset -c 1 python benchmarks/nni_experiment.py --threads 1   # one quiet core, as benchmarks/pareto.py
    python benchmarks/nni_experiment.py --trials 3 --output /tmp/nni_bench   # a shorter look

Every trial plans with the latency table the first trial measured: on a busy machine that table is wrong for all
of them. The JSON lists, per trial, the drift warnings its ``trial.stderr`` holds (the original network timed
again against the table's figure); a run with large drift measures nothing but the machine's load.

Writes ``benchmarks/results/nni_experiment.json`` (every trial, the front, the fastest within ``--max-drop``) and
``benchmarks/results/nni_experiment_front.png``; prints the trial table. The experiment itself stays in
``--workdir`` (default ``~/nni-experiments``): ``python -m lm_plugin.nni.report <its folder>`` reads it again.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm_plugin.nni.experiment import load_config, run_experiment  # noqa: E402
from lm_plugin.nni.report import experiment_report  # noqa: E402
from lm_plugin.workloads.models import trained  # noqa: E402

CONFIG = ROOT / "examples" / "nni_experiment" / "config.yml"


def _drift_lines(folder: str | None) -> list[str]:
    """The LatencyDriftWarning lines of a trial's stderr (the machine changed speed since the table was built)."""
    path = Path(folder or "") / "trial.stderr"
    if not path.is_file():
        return []
    return [line.split("LatencyDriftWarning: ", 1)[1][:160] for line in path.read_text(errors="replace").splitlines()
            if "LatencyDriftWarning: " in line]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="maxTrialNumber (default 8)")
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy points the pick may lose")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of the trials' latency timing")
    parser.add_argument("--workdir", default=None, help="experimentWorkingDirectory (default ~/nni-experiments)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"),
                        help="folder for nni_experiment.json and nni_experiment_front.png")
    args = parser.parse_args(argv)

    start = time.time()
    model = trained("resnet_fm")  # the checkpoint every trial's --train loads (cached)
    print(f"resnet_fm: {model.test_accuracy:.2f} % test accuracy", flush=True)
    config = load_config(CONFIG)
    config.max_trial_number = args.trials
    if args.threads is not None:
        config.trial_command += f" --threads {args.threads}"
    if args.workdir:
        config.experiment_working_directory = str(Path(args.workdir).resolve())
    finished = run_experiment(config)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    report = experiment_report(finished.directory, max_drop=args.max_drop)  # into <experiment>/lm_plugin_report
    shutil.copyfile(report.files["pareto.png"], out / "nni_experiment_front.png")
    result = {
        "command": " ".join(["python benchmarks/nni_experiment.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": json.loads(json.dumps(config.json(), default=str)),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "status": finished.status,
        "listening": finished.listening,
        "seconds": time.time() - start,
        "drift_warnings": {t.trial_id: _drift_lines(t.folder) for t in report.trials},
        **report.to_dict(),
    }
    (out / "nni_experiment.json").write_text(json.dumps(result, indent=1, default=str))
    print(report.files["trials.md"].read_text())
    print(f"{out / 'nni_experiment.json'}, {out / 'nni_experiment_front.png'} ({result['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
